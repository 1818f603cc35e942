"""``--config`` files that do not parse: each parser's own error, one message for all three."""

from __future__ import annotations

import re

import pytest

from fastlm.cli_config import ConfigError, load_config_file

BROKEN = {
    "bad.json": '{"lora-r": 8,',
    "bad.toml": "lora-r = = 8\n",
    "bad.yaml": "lora-r: [8, 16\n",
}


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_a_file_that_does_not_parse_is_a_config_error(tmp_path, name):
    path = tmp_path / name
    path.write_text(BROKEN[name])
    message = rf"^--config {re.escape(str(path))}: cannot parse it: \S"
    with pytest.raises(ConfigError, match=message):
        load_config_file(path)


def test_an_error_that_is_not_the_parsers_is_not_hidden(tmp_path, monkeypatch):
    """Only the parser's error class becomes a ConfigError: a bug in between still shows."""
    import json

    def broken(text):
        raise RuntimeError("not a parse error")

    monkeypatch.setattr(json, "loads", broken)
    path = tmp_path / "ok.json"
    path.write_text("{}")
    with pytest.raises(RuntimeError, match="not a parse error"):
        load_config_file(path)
