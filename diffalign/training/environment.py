"""What a run ran on: ``environment.json`` in every training run's output directory.

The same code, seed and data give bit-identical weights on one machine (``tests/test_train_dpo_cli.py``), but not
across machines: the CPU's vector unit (``torch.backends.cpu.get_cpu_capability()``) and the library versions choose
different kernels, which sum in a different order, and a 600-step run then lands a few evaluation prompts away. A
result that does not reproduce can only be traced when each run says where it ran, so the trainers write this file
when they start and append one entry per start (a resumed run adds an entry, so a run that moved between machines
says so):

    {"starts": [{"started_utc": ..., "resumed": false, "diffalign": {"version", "commit", "dirty"},
                 "python": ..., "platform": ..., "cpu": {"model", "logical_cores", "torch_capability"},
                 "torch": {"version", "threads", "cuda", "cudnn", "devices"}, "packages": {name: version},
                 "processes": N, "mixed_precision": ..., "deterministic": ...}]}

Nothing here fails a run: a value that cannot be read is ``null``.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

PACKAGES = ("diffusers", "transformers", "accelerate", "peft", "open_clip_torch", "safetensors", "numpy",
            "xformers")  # fmt: skip
"""Distributions whose versions are recorded (``null`` when not installed)."""

REPO = Path(__file__).resolve().parents[2]


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def cpu_model() -> str | None:
    """The CPU's marketing name (``/proc/cpuinfo`` on Linux, ``platform.processor()`` elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def git_state(repo: Path = REPO) -> dict[str, Any]:
    """The commit of the diffalign checkout the code runs from and whether it has uncommitted changes to tracked
    files; both ``None`` for an installed copy (no ``.git``) or without git."""
    if not (repo / ".git").exists():
        return {"commit": None, "dirty": None}
    try:
        head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()  # fmt: skip
        status = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=10, check=True).stdout  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    return {"commit": head or None, "dirty": bool(status.strip())}


def describe(processes: int = 1, mixed_precision: str | None = None, deterministic: bool | None = None,
             resumed: bool = False) -> dict[str, Any]:  # fmt: skip
    """One entry of ``environment.json`` for the current process."""
    import torch

    cuda = torch.cuda.is_available()
    devices = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else []
    try:
        capability = torch.backends.cpu.get_cpu_capability()
    except AttributeError:  # older torch
        capability = None
    return {
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "resumed": resumed,
        "diffalign": {"version": _version("diffalign"), **git_state()},
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu": {"model": cpu_model(), "logical_cores": os.cpu_count(), "torch_capability": capability},
        "torch": {
            "version": torch.__version__,
            "threads": torch.get_num_threads(),
            "cuda": torch.version.cuda if cuda else None,
            "cudnn": torch.backends.cudnn.version() if cuda else None,
            "devices": devices,
        },
        "packages": {name: _version(name) for name in PACKAGES},
        "processes": processes,
        "mixed_precision": mixed_precision,
        "deterministic": deterministic,
    }


def record(output_dir: Path, entry: dict[str, Any]) -> Path:
    """Append ``entry`` to ``output_dir/environment.json`` (created on a fresh start; an unreadable file is
    replaced, its text kept under ``unreadable``). Written to a temporary file and renamed."""
    path = Path(output_dir) / "environment.json"
    doc: dict[str, Any] = {"starts": []}
    if path.exists():
        try:
            old = json.loads(path.read_text())
            doc["starts"] = list(old["starts"])
        except (ValueError, KeyError, TypeError):
            doc["unreadable"] = path.read_text(errors="replace")[:10_000]
    doc["starts"].append(entry)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=2))
    os.replace(tmp, path)
    return path
