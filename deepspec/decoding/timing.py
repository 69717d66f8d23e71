"""Where a generation's time goes, measured without stalling the device.

On the CPU a region is timed by the wall clock. On a GPU the host only queues work, so a wall clock
around a forward measures the launch, not the kernels; there each region records a pair of CUDA events
and the elapsed times are read once, after the generation's final synchronisation, so timing adds no
host sync of its own to a round.
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from collections.abc import Iterator

import torch


class RegionTimer:
    def __init__(self, device: torch.device):
        self.cuda = torch.device(device).type == "cuda"
        self._seconds: dict[str, float] = defaultdict(float)
        self._events: dict[str, list[tuple[torch.cuda.Event, torch.cuda.Event]]] = defaultdict(list)

    @contextlib.contextmanager
    def region(self, name: str) -> Iterator[None]:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self._events[name].append((start, end))
        else:
            t0 = time.perf_counter()
            yield
            self._seconds[name] += time.perf_counter() - t0

    def seconds(self) -> dict[str, float]:
        """Total seconds per region (one device synchronisation on a GPU, none on the CPU)."""
        if self.cuda and self._events:
            torch.cuda.synchronize()
            for name, pairs in self._events.items():
                self._seconds[name] += sum(s.elapsed_time(e) for s, e in pairs) / 1e3
            self._events.clear()
        return dict(self._seconds)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU): a wall clock read after it is honest."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
