"""Fixtures shared by the model-family tests."""

from __future__ import annotations

import pytest

from fastlm.models import moe


@pytest.fixture
def grouped_calls(monkeypatch):
    """How many times the grouped experts ran (``moe.grouped_experts``)."""
    calls = []
    original = moe.grouped_experts

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(moe, "grouped_experts", counting)
    return calls
