"""What this process holds and what the machine can still give: the memory plan's inputs."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

# what part of the memory free when the engine starts its KV cache may take
KV_SHARE_CPU = 0.25
KV_SHARE_GPU = 0.5
KV_MIN_BYTES = 256 << 20


def resident_bytes() -> int:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def available_bytes() -> int | None:
    """What the machine can still give (MemAvailable, or the cgroup's limit if lower)."""
    found: list[int] = []
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    found.append(int(line.split()[1]) * 1024)
    except OSError:
        pass
    for path, used_path in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
    ):
        try:
            limit = Path(path).read_text().strip()
            used = int(Path(used_path).read_text().strip())
            if limit != "max" and int(limit) < 1 << 60:
                found.append(int(limit) - used)
        except (OSError, ValueError):
            continue
    return min(found) if found else None


@dataclass(frozen=True)
class KVBudget:
    bytes: int
    source: str  # why this much, for the server's first lines

    def describe(self) -> str:
        return f"{self.bytes / 1e9:.2f} GB ({self.source})"


def kv_budget(requested_gb: float | None = None) -> KVBudget:
    """The KV cache's budget: what the caller asked for, else a share of what the machine (or
    the GPU) has free now, as the training memory plan reads it."""
    if requested_gb is not None:
        return KVBudget(int(requested_gb * 1e9), "--kv-cache-gb")
    if _has_gpu():
        import torch

        free, _ = torch.cuda.mem_get_info()
        return KVBudget(
            max(KV_MIN_BYTES, int(free * KV_SHARE_GPU)), f"{KV_SHARE_GPU:.0%} of the GPU memory free at start"
        )
    free_cpu = available_bytes()
    if free_cpu is None:
        return KVBudget(4 << 30, "the machine's free memory is unknown: 4 GiB")
    return KVBudget(max(KV_MIN_BYTES, int(free_cpu * KV_SHARE_CPU)), f"{KV_SHARE_CPU:.0%} of the memory free at start")


def _has_gpu() -> bool:
    """Whether torch would find a CUDA device, without importing torch on a machine with no
    NVIDIA driver (the server states its budget at start; torch costs seconds to import)."""
    if "torch" not in sys.modules and not Path("/proc/driver/nvidia").exists():
        return False
    import torch

    return bool(torch.cuda.is_available())
