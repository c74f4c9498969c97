"""Process memory readings shared by the benchmarks (Linux /proc; graceful elsewhere)."""

from __future__ import annotations

import resource
from pathlib import Path


def status_mib(field: str) -> float | None:
    """A memory field of /proc/self/status (VmRSS, VmHWM) in MiB, or None off Linux."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Reset the resident high-water mark (Linux clear_refs, value 5); False where not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return status_mib("VmHWM") is not None
    except OSError:
        return False


def peak_rss_mib() -> float:
    """The process's resident high-water mark: VmHWM, else ru_maxrss (peak over the whole process)."""
    return status_mib("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
