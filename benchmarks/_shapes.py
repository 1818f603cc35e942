"""Moved to ``fastlm.benchmarking.shapes``; this name stays until offload_capacity.py imports
from there (``import _common`` first: it puts this checkout's fastlm on sys.path)."""

from fastlm.benchmarking.shapes import *  # noqa: F403
