"""What a run ran on: the versions of Python, deme, torch and diffusers, and the hardware. `deme run` records it in
run.json and `deme train` in each range's final/deme.json; the report shows it."""
from __future__ import annotations

import os
import platform
import sys
from importlib import metadata
from typing import Optional

DIST = "deme"                  # this package's distribution name (pyproject.toml)
PACKAGES = (DIST, "torch", "diffusers", "accelerate", "clean-fid")   # distribution names whose versions count


def _version(dist: str) -> Optional[str]:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def deme_version() -> str:
    """deme's version: the installed distribution's metadata, written from pyproject.toml's `version` (the one
    source); "unknown" when the package runs from a checkout that was never installed."""
    return _version(DIST) or "unknown"


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux), else what platform says."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe() -> dict:
    """{"python", "<package>": version, "platform", "cpu", "cpus", "gpus"}. Versions come from the installed
    packages' metadata, so torch is not imported for them; the GPUs are listed when torch is imported already (a
    report must not spend ~11 s importing it)."""
    out = {"python": platform.python_version(),
           **{dist: _version(dist) for dist in PACKAGES},
           "platform": platform.platform(), "cpu": cpu_name(), "cpus": os.cpu_count()}
    if "torch" in sys.modules:
        from .devices import gpu_names

        out["gpus"] = gpu_names()
    return out
