"""The dependency versions fastlm is tested with, checked when a model is loaded."""

from __future__ import annotations

import importlib.metadata

from packaging.version import Version

from fastlm.errors import UnsupportedVersionError

# (lowest tested, first untested). The CPU suite runs on the newest releases in range, the GPU
# suite on the GPU machine's (torch 2.11, transformers 5.17, peft 0.21, trl 1.15).
TESTED_RANGES: dict[str, tuple[str, str]] = {
    "torch": ("2.11", "2.14"),
    "transformers": ("5.17", "5.24"),
    "peft": ("0.21", "0.22"),
    "trl": ("1.15", "1.17"),
}


def installed_version(package: str) -> str | None:
    """Version string of an installed distribution, or None when it is not installed."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def check_versions(required: tuple[str, ...] = ("torch", "transformers", "peft")) -> None:
    """Raise UnsupportedVersionError when a dependency is outside its tested range.

    Usage: ``check_versions(("torch", "transformers", "peft", "trl"))``. A package that is not
    installed is reported only when it is in ``required``.
    """
    problems = []
    for package, (low, high) in TESTED_RANGES.items():
        found = installed_version(package)
        if found is None:
            if package in required:
                problems.append(f"{package} is not installed (need >={low},<{high})")
            continue
        release = Version(Version(found).base_version)
        if not Version(low) <= release < Version(high):
            problems.append(f"{package} {found} is outside the tested range >={low},<{high}")
    if problems:
        raise UnsupportedVersionError(
            "fastlm was not tested with these versions: "
            + "; ".join(problems)
            + ". Install a tested version, e.g. `pip install 'fastlm[test]'` in a fresh "
            "environment, or pass allow_untested_versions=True to from_pretrained to go on at "
            "your own risk."
        )
