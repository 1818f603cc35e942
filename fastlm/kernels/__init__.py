"""Triton kernels, one op per file, each beside its plain-PyTorch reference.

Every public op dispatches on the tensor's device: CUDA tensors run the Triton kernel, CPU tensors
run the reference (tests drive the Triton code on CPU through ``TRITON_INTERPRET=1``).
"""
