"""The one result schema every benchmark writes, and where it goes.

    {"benchmark", "date", "git_sha", "hardware", "versions", "backend", ...settings..., "rows": [...]}

One current file per benchmark, card and variant: benchmarks/results/<benchmark>_<card>[_<variant>].json,
where the card is `cpu` or the GPU's model (h100, h200, ...). A new run replaces the file; git keeps the
history. Experiment outputs (studies, measurements) go under results/; benchmark results here.
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import re
import subprocess
from pathlib import Path

import torch

from sparsinglaw.backend import current
from sparsinglaw.io import atomic_write_json

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def card(device: torch.device | str) -> str:
    """`cpu`, or the GPU's model in lower case ("NVIDIA H200" -> h200, "NVIDIA H100 80GB HBM3" -> h100)."""
    device = torch.device(device)
    if device.type != "cuda":
        return device.type
    name = torch.cuda.get_device_name(device)
    m = re.search(r"\b([A-Z]+\d+[A-Za-z]*)\b", name.replace("NVIDIA", ""))
    return (m.group(1) if m else re.sub(r"\W+", "-", name)).lower()


def hardware(device: torch.device | str) -> dict:
    device = torch.device(device)
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"platform": platform.platform(), "cpu": cpu, "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads()}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / 2**30, 1), gpu_count=torch.cuda.device_count())
    return info


def versions() -> dict:
    import numpy
    import scipy
    import transformers

    out = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
           "numpy": numpy.__version__, "scipy": scipy.__version__}
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        pass
    return out


def git_sha() -> str | None:
    """The commit the code ran at ("-dirty" when the tree had changes); None outside a git checkout."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def write(benchmark: str, rows: list, device: torch.device | str, variant: str | None = None,
          out: str | os.PathLike | None = None, **settings) -> Path:
    """Write one result in the common schema to benchmarks/results/ (and a copy into the folder `out`)."""
    result = {"benchmark": benchmark, "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "git_sha": git_sha(), "hardware": hardware(device), "versions": versions(),
              "backend": current().to_json(), **settings, "rows": rows}
    name = f"{benchmark}_{card(device)}" + (f"_{variant}" if variant else "") + ".json"
    path = RESULTS / name
    atomic_write_json(path, result)
    if out:
        atomic_write_json(Path(out) / name, result)
    print(f"wrote {path}")
    return path
