"""What this process holds and what the machine can still give: the memory plan's inputs."""

from __future__ import annotations

from pathlib import Path


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
