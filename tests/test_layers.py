"""The package's layers only point down (the contracts in pyproject.toml, checked by
import-linter), and every import of a fastlm module inside a function says why it is there."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "fastlm"


def test_import_contracts_are_kept():
    pytest.importorskip("importlinter")
    run = subprocess.run(
        [sys.executable, "-c", "from importlinter.cli import lint_imports_command as c; c()",
         "--no-cache"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert "BROKEN" not in run.stdout and "KEPT" in run.stdout


def lazy_imports_without_reason(source: str) -> list[tuple[int, str]]:
    """(line, module) of each fastlm import inside a function with no ``# lazy: <reason>``
    comment on its line or the line above."""
    lines = source.splitlines()
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for sub in ast.walk(node):
            if isinstance(sub, ast.ImportFrom):
                names = [sub.module or ""] if not sub.level else ["fastlm (relative)"]
            elif isinstance(sub, ast.Import):
                names = [alias.name for alias in sub.names]
            else:
                continue
            if not any(name == "fastlm" or name.startswith("fastlm") for name in names):
                continue
            nearby = lines[sub.lineno - 1] + (lines[sub.lineno - 2] if sub.lineno > 1 else "")
            if "# lazy:" not in nearby:
                found.append((sub.lineno, names[0]))
    return sorted(set(found))


def test_every_lazy_fastlm_import_gives_its_reason():
    missing = [
        f"{path.relative_to(ROOT)}:{line}: {module}"
        for path in sorted(PACKAGE.rglob("*.py"))
        for line, module in lazy_imports_without_reason(path.read_text(encoding="utf-8"))
    ]
    assert not missing, "in-function fastlm imports without '# lazy: <reason>':\n" + "\n".join(
        missing
    )


def test_the_lazy_import_check_sees_a_bare_one():
    bare = "def f():\n    from fastlm import models\n    return models\n"
    explained = "def f():\n    from fastlm import models  # lazy: start-up time\n"
    outside = "import fastlm\n\ndef f():\n    import json\n"
    assert lazy_imports_without_reason(bare) == [(2, "fastlm")]
    assert lazy_imports_without_reason(explained) == []
    assert lazy_imports_without_reason(outside) == []
