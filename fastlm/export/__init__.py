"""Exporting trained models.

from fastlm.export import save_pretrained_gguf, save_pretrained_merged
save_pretrained_merged(model, "out/merged", tokenizer, save_method="merged_16bit")
save_pretrained_gguf(model, "out/gguf", tokenizer, quantization_method="q8_0")
"""

from fastlm.export._atomic import (
    ExportPathError,
    NotEnoughSpaceError,
    NotWritableError,
    atomic_directory,
    atomic_file,
    check_free_disk,
    check_target,
    export_into,
)
from fastlm.export.gguf_writer import save_pretrained_gguf
from fastlm.export.merged import SAVE_METHODS, parse_size, save_pretrained_merged

__all__ = [
    "SAVE_METHODS",
    "ExportPathError",
    "NotEnoughSpaceError",
    "NotWritableError",
    "atomic_directory",
    "atomic_file",
    "check_free_disk",
    "check_target",
    "export_into",
    "parse_size",
    "save_pretrained_gguf",
    "save_pretrained_merged",
]
