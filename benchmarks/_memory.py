"""Peak-memory and timing helpers shared by the detector benchmarks."""

from __future__ import annotations

from pathlib import Path

import torch


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


class Peak:
    """Peak memory rise over a block (CPU: VmHWM after a reset; CUDA: max_memory_allocated)."""

    def __init__(self, device):
        self.device, self.value = device, float("nan")

    @staticmethod
    def _status(field: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
        return 0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            try:
                Path("/proc/self/clear_refs").write_text("5")
            except OSError:
                pass
            self.base = self._status("VmRSS")
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.value = torch.cuda.max_memory_allocated() - self.base
        else:
            self.value = self._status("VmHWM") - self.base
