"""Helpers shared by the benchmark scripts: machine facts, cached stages, JSON results."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from netsurgeon._validation import atomic_write

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
CACHE = ROOT / ".cache"


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "commit": commit,
            "date": time.strftime("%Y-%m-%d")}


def cached_json(name: str, compute: Callable[[], dict[str, Any]], fresh: bool = False) -> dict[str, Any]:
    """Return the stage result cached under bench/.cache/NAME.json, computing (and caching) it if absent.

    An interrupted benchmark re-run skips the stages it already finished.
    """
    path = CACHE / f"{name}.json"
    if path.is_file() and not fresh:
        return json.loads(path.read_text())
    out = compute()
    with atomic_write(path, "w") as f:
        json.dump(out, f, indent=2)
    return out


def write_result(name: str, result: dict[str, Any]) -> Path:
    path = RESULTS / f"{name}.json"
    with atomic_write(path, "w") as f:
        json.dump(result, f, indent=2)
    return path
