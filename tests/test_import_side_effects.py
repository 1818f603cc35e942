"""Importing fastlm changes nothing outside it: every module is imported in a fresh Python, and
the environment and huggingface_hub's offline flag must read the same afterwards.

Settings a command needs (``fastlm`` runs offline unless HF_HUB_OFFLINE is set, for instance)
are applied when the command runs, in ``fastlm.cli.main``, never on import.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# Runs in the child: the libraries fastlm builds on first, then the snapshot, then every module
# of the package, then what changed. The libraries come first because some change the
# environment themselves (bitsandbytes sets TORCHINDUCTOR_CACHE_DIR when imported), and the hub's
# constants must be loaded for a module that rewrites them to be seen.
_IMPORT_ALL = """
import importlib, json, os, pkgutil
import huggingface_hub.constants as hub

for library in ("torch", "transformers", "peft", "trl", "bitsandbytes", "sentence_transformers"):
    try:
        importlib.import_module(library)
    except ImportError:
        pass
env, offline = dict(os.environ), hub.HF_HUB_OFFLINE
import fastlm

names = sorted(m.name for m in pkgutil.walk_packages(fastlm.__path__, "fastlm."))
for name in names:
    importlib.import_module(name)
changed = {
    key: [env.get(key), os.environ.get(key)]
    for key in set(env) | set(os.environ)
    if env.get(key) != os.environ.get(key)
}
report = {"environment": changed, "hub_offline": [offline, hub.HF_HUB_OFFLINE]}
print(json.dumps({"modules": names, **report}))
"""


def _clean_env() -> dict[str, str]:
    """This environment without the variables fastlm might set, plus the test settings."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("HF_", "TRANSFORMERS_", "TOKENIZERS_", "TRITON_"))
    }
    env["TRITON_INTERPRET"] = "1"  # as tests/conftest.py sets it for this process
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def test_importing_every_module_changes_no_environment_or_hub_setting(tmp_path):
    result = subprocess.run(
        [sys.executable, "-c", _IMPORT_ALL],
        cwd=tmp_path,
        env=_clean_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert {"fastlm.cli", "fastlm.commands.bench", "fastlm.api"} <= set(report["modules"])
    # {variable: [before, after]} and the hub's HF_HUB_OFFLINE [before, after]
    assert (report["environment"], report["hub_offline"]) == ({}, [False, False])


def test_commands_run_offline_unless_the_user_says_otherwise(monkeypatch, capsys):
    """The offline default is applied when a command runs (here: no command, the help)."""
    from huggingface_hub import constants

    from fastlm import cli

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    assert cli.main([]) == 2
    assert os.environ["HF_HUB_OFFLINE"] == "1" and constants.HF_HUB_OFFLINE is True

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    assert cli.main([]) == 2
    assert os.environ["HF_HUB_OFFLINE"] == "0" and constants.HF_HUB_OFFLINE is False
    capsys.readouterr()
