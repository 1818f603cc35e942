"""Write docs/reference.md, the API reference, from the public modules' docstrings.

    python docs/build_api_reference.py            # rewrite docs/reference.md
    python docs/build_api_reference.py --check    # exit 1 if docs/reference.md is out of date

Plain ``inspect``, no Sphinx: for each module in ``MODULES``, its docstring, then every public
name (``__all__`` when the module has one, else the classes, functions and UPPER_CASE constants
defined in the module itself) with its signature and docstring; a class also lists the public
methods it defines. Anything the reference cannot show properly (a public object without a
docstring, a name in ``__all__`` that does not exist, a default whose repr holds a memory address)
is reported as a ``ReferenceWarning``; ``tests/test_docs.py`` requires none. Methods and
properties without a docstring are listed with their signature alone.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import os
import re
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUTPUT = ROOT / "docs" / "reference.md"

# The public API, in reading order: (module, one-line title).
MODULES: list[tuple[str, str]] = [
    ("fastlm.api", "Loading and LoRA (FastModel)"),
    ("fastlm.memory", "Memory figures"),
    ("fastlm.errors", "Errors"),
    ("fastlm.export", "Exports"),
    ("fastlm.export.merged", "Merged checkpoints"),
    ("fastlm.export.gguf_writer", "GGUF"),
    ("fastlm.data", "The demo data set"),
    ("fastlm.data.formats", "Training data formats"),
    ("fastlm.embeddings", "Embedding models"),
    ("fastlm.embeddings.demo_data", "The retrieval demo set"),
    ("fastlm.real_models", "Real weights"),
    ("fastlm.models", "Architectures and patching"),
    ("fastlm.models.attention", "Attention: flash kernel or eager"),
    ("fastlm.models.packing", "Packed sequences: where a padding-free batch's sequences start"),
    ("fastlm.models.padding", "Padded batches: the real tokens, read from the mask"),
    ("fastlm.autograd", "LoRA autograd Functions"),
    ("fastlm.kernels.rms_norm", "Kernel: RMSNorm"),
    ("fastlm.kernels.rope", "Kernel: RoPE"),
    ("fastlm.kernels.swiglu", "Kernel: SwiGLU"),
    ("fastlm.kernels.geglu", "Kernel: GeGLU"),
    ("fastlm.kernels.fused_linear_cross_entropy", "Kernel: fused linear cross-entropy"),
    ("fastlm.kernels.nf4_dequant", "Kernel: NF4 dequantisation"),
    ("fastlm.kernels.flash_attention", "Kernel: flash attention"),
    ("fastlm.offload", "Offloaded checkpointing and weight streaming"),
    ("fastlm.distributed", "DDP and FSDP2"),
    ("fastlm.versions", "Version checks"),
]
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")
_MAX_LINE = 100


class ReferenceWarning(UserWarning):
    """Something in a public docstring or signature the reference cannot show properly."""


def _warn(message: str) -> None:
    warnings.warn(message, ReferenceWarning, stacklevel=2)


def _public_names(module) -> list[str]:
    names = getattr(module, "__all__", None)
    if names is not None:
        missing = [name for name in names if not hasattr(module, name)]
        for name in missing:
            _warn(f"{module.__name__}.__all__ names {name!r}, which does not exist")
        return [name for name in names if name not in missing and not name.startswith("__")]
    found = []
    for name, value in vars(module).items():
        if name.startswith("_"):
            continue
        if inspect.isclass(value) or inspect.isfunction(value):
            if getattr(value, "__module__", None) == module.__name__:
                found.append(name)
        elif name.isupper() and not inspect.ismodule(value):
            found.append(name)
    return found


def _annotation(annotation) -> str:
    return annotation if isinstance(annotation, str) else inspect.formatannotation(annotation)


def _param(param: inspect.Parameter) -> str:
    text = param.name
    if param.kind is inspect.Parameter.VAR_POSITIONAL:
        text = "*" + text
    elif param.kind is inspect.Parameter.VAR_KEYWORD:
        text = "**" + text
    annotated = param.annotation is not inspect.Parameter.empty
    if annotated:
        text += ": " + _annotation(param.annotation)
    if param.default is not inspect.Parameter.empty:
        text += (" = " if annotated else "=") + repr(param.default)
    return text


def _signature(name: str, obj, prefix: str = "def ") -> str:
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return f"{prefix}{name}(...)"
    rendered, kinds = [], [p.kind for p in sig.parameters.values()]
    for i, param in enumerate(sig.parameters.values()):
        first_keyword_only = param.kind is inspect.Parameter.KEYWORD_ONLY and (
            i == 0 or kinds[i - 1] is not inspect.Parameter.KEYWORD_ONLY
        )
        if first_keyword_only and inspect.Parameter.VAR_POSITIONAL not in kinds[:i]:
            rendered.append("*")  # the bare star before the first keyword-only parameter
        rendered.append(_param(param))
        if param.kind is inspect.Parameter.POSITIONAL_ONLY and (
            i + 1 == len(kinds) or kinds[i + 1] is not inspect.Parameter.POSITIONAL_ONLY
        ):
            rendered.append("/")
    ret = ""
    if sig.return_annotation is not inspect.Signature.empty:
        ret = f" -> {_annotation(sig.return_annotation)}"
    text = f"{prefix}{name}({', '.join(rendered)}){ret}"
    if len(text) > _MAX_LINE:
        body = "".join(f"    {p},\n" for p in rendered)
        text = f"{prefix}{name}(\n{body}){ret}"
    if _ADDRESS.search(text):
        _warn(f"the signature of {name} shows a memory address: {text}")
        text = _ADDRESS.sub("", text)
    return text


def _doc(qualname: str, obj, required: bool = True) -> str:
    doc = inspect.getdoc(obj)
    if not doc:
        if required:
            _warn(f"{qualname} has no docstring")
        return ""
    return doc


def _text_block(doc: str) -> list[str]:
    if not doc:
        return []
    fence = "````" if "```" in doc else "```"
    return [f"{fence}text", doc, fence, ""]


def _own_methods(cls) -> list[tuple[str, object]]:
    methods = []
    for name, raw in vars(cls).items():
        if name.startswith("_"):
            continue
        if isinstance(raw, (staticmethod, classmethod)):
            methods.append((name, raw.__func__))
        elif isinstance(raw, property) or inspect.isfunction(raw):
            methods.append((name, raw))
    return methods


def _render_class(module_name: str, name: str, cls) -> list[str]:
    qualname = f"{module_name}.{name}"
    lines = [f"### `{name}`", ""]
    if cls.__name__ != name:
        lines += [f"`{name}` is `{cls.__module__}.{cls.__qualname__}`.", ""]
        return lines
    bases = [b.__name__ for b in cls.__bases__ if b is not object]
    head = f"class {name}({', '.join(bases)})" if bases else f"class {name}"
    lines += ["```python", head, "```", ""]
    lines += _text_block(_doc(qualname, cls))
    init = vars(cls).get("__init__")
    fields = getattr(cls, "_fields", None) or getattr(cls, "__dataclass_fields__", None)
    if inspect.isfunction(init) or fields:
        lines += ["```python", _signature(name, cls, prefix=""), "```", ""]
    for method_name, method in _own_methods(cls):
        lines += [f"#### `{name}.{method_name}`", ""]
        if isinstance(method, property):
            lines += ["(property)", ""]
            lines += _text_block(_doc(f"{qualname}.{method_name}", method, required=False))
            continue
        lines += ["```python", _signature(method_name, method), "```", ""]
        lines += _text_block(_doc(f"{qualname}.{method_name}", method, required=False))
    return lines


def _render_constant(name: str, value) -> list[str]:
    text = repr(value)
    if _ADDRESS.search(text) or len(text) > 300:
        text = f"<{type(value).__name__}>"
    return [f"### `{name}`", "", "```python", f"{name} = {text}", "```", ""]


def _render_module(module_name: str, title: str) -> list[str]:
    module = importlib.import_module(module_name)
    lines = [f"## {title}: `{module_name}`", ""]
    lines += _text_block(_doc(module_name, module))
    for name in _public_names(module):
        value = getattr(module, name)
        if inspect.isclass(value):
            lines += _render_class(module_name, name, value)
        elif inspect.isfunction(value) or inspect.isbuiltin(value):
            lines += [f"### `{name}`", "", "```python", _signature(name, value), "```", ""]
            lines += _text_block(_doc(f"{module_name}.{name}", value))
        elif inspect.ismodule(value):
            continue
        else:
            lines += _render_constant(name, value)
    return lines


def _anchor(module_name: str, title: str) -> str:
    heading = f"{title}: {module_name}".lower()
    heading = re.sub(r"[^\w\- ]", "", heading)
    return heading.replace(" ", "-")


def build() -> str:
    """The whole reference as Markdown text. Usage: ``text = build()``."""
    lines = [
        "# API reference",
        "",
        "Generated from the docstrings by `python docs/build_api_reference.py`; do not edit by "
        "hand (`tests/test_docs.py` checks that this file is up to date).",
        "",
        "Guides: [quick start](quickstart.md), [API](api.md), [QLoRA](qlora.md), "
        "[embeddings](embeddings.md), [export](export.md), [kernels](kernels.md), "
        "[supported models and exports](supported.md).",
        "",
        "`from fastlm import FastModel, FastLanguageModel, MemoryCallback, memory_stats, "
        "print_memory` gives the objects documented below under `fastlm.api` and "
        "`fastlm.memory`.",
        "",
        "## Modules",
        "",
    ]
    lines += [f"- [`{name}`](#{_anchor(name, title)}): {title}" for name, title in MODULES]
    lines.append("")
    for module_name, title in MODULES:
        lines += _render_module(module_name, title)
    text = "\n".join(lines).rstrip() + "\n"
    return re.sub(r"\n{3,}", "\n\n", text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the file is stale")
    parser.add_argument("--output", type=Path, default=OUTPUT)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(ROOT))
    text = build()
    if args.check:
        current = args.output.read_text(encoding="utf-8") if args.output.exists() else ""
        if current != text:
            print(f"{args.output} is out of date: run python docs/build_api_reference.py")
            return 1
        return 0
    args.output.write_text(text, encoding="utf-8")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
