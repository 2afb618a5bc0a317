"""Peak-memory and timing helpers shared by the benchmarks (torch only for CUDA devices)."""

from __future__ import annotations

from pathlib import Path


def vm_status(field: str) -> int:
    """A memory figure of this process from /proc/self/status (VmRSS, VmHWM), in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def reset_peak() -> None:
    """Start VmHWM again from the current RSS (Linux; ignored where not allowed)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def sync(device):
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize()


class Peak:
    """Peak memory rise over a block (CPU: VmHWM after a reset; CUDA: max_memory_allocated)."""

    def __init__(self, device):
        self.device, self.value = device, float("nan")

    def __enter__(self):
        if self.device.type == "cuda":
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            reset_peak()
            self.base = vm_status("VmRSS")
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            import torch

            torch.cuda.synchronize()
            self.value = torch.cuda.max_memory_allocated() - self.base
        else:
            self.value = vm_status("VmHWM") - self.base
