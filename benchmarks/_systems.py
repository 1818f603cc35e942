"""Moved to ``fastlm.benchmarking.systems``; this name stays until offload_capacity.py imports
from there (``import _common`` first: it puts this checkout's fastlm on sys.path)."""

from fastlm.benchmarking.systems import *  # noqa: F403
