"""Moved to ``fastlm.benchmarking.timing``; this name stays until offload_capacity.py imports
from there (``import _common`` first: it puts this checkout's fastlm on sys.path)."""

from fastlm.benchmarking.timing import *  # noqa: F403
