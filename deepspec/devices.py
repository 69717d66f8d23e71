"""Which device a job runs on: jobs of one node that asked Snakemake for a GPU each claim a different one.

Snakemake counts GPUs (`resources: gpu=1` against `--resources gpu=N`) but does not say which device a
job may use, so each job takes the first visible device no other deepspec job of this node holds: a lock
file per device (flock), released by the kernel when the process exits, crash or not. Under SLURM each
job sees only its own allocation and simply takes it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
from pathlib import Path
from typing import IO

import torch

_held: list[IO] = []  # open lock files: held for the life of the process


def lock_dir() -> Path:
    return Path(os.environ.get("DEEPSPEC_LOCK_DIR", Path(tempfile.gettempdir()) / "deepspec-devices"))


def claim_slot(keys: list[str], directory: Path | None = None) -> int:
    """Index of the first of `keys` whose lock this process could take (and now holds)."""
    directory = directory or lock_dir()
    directory.mkdir(parents=True, exist_ok=True)
    for i, key in enumerate(keys):
        fh = open(directory / f"{key}.lock", "w")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.close()
            continue
        _held.append(fh)
        return i
    raise RuntimeError(f"all {len(keys)} visible devices are held by other deepspec jobs on this node "
                       f"(locks in {directory}); ask Snakemake for fewer GPUs than the node has (--resources gpu=N)")


def on(device: torch.device | str) -> contextlib.AbstractContextManager:
    """New tensors default to `device` inside (the backends and drafters build index tensors as they go);
    nothing changes on the CPU."""
    device = torch.device(device)
    return device if device.type != "cpu" else contextlib.nullcontext()


def bf16_autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    return torch.autocast(device.type, dtype=torch.bfloat16) if enabled else contextlib.nullcontext()


def job_device(gpus: int) -> torch.device:
    """The device a job asked `gpus` GPUs of runs on: a claimed CUDA device, or the CPU."""
    if gpus <= 0 or not torch.cuda.is_available():
        return torch.device("cpu")
    n = torch.cuda.device_count()
    keys = [str(getattr(torch.cuda.get_device_properties(i), "uuid", i)) for i in range(n)]
    index = claim_slot(keys)
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def peak_memory_mb(device: torch.device) -> dict[str, float]:
    """This process's peak resident memory so far, and its peak device allocation on a GPU, in MiB."""
    import resource

    peak = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}  # Linux: KiB
    if device.type == "cuda":
        peak["peak_device_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return peak
