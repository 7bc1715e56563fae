"""Host memory readings for the loader's phase marks (Linux ``/proc/self/status``; nothing elsewhere).

``VmRSS`` is the resident set now, ``VmHWM`` its peak since the process started (what ``ru_maxrss``
reports at exit). Reading both costs ~20 us, so every phase mark records them.
"""

from __future__ import annotations

import os

_STATUS = "/proc/self/status"
_AVAILABLE = os.path.exists(_STATUS)


def host_rss_mib() -> tuple[float, float] | None:
    """``(VmRSS, VmHWM)`` of this process in MiB, or None where ``/proc`` has no such file."""
    if not _AVAILABLE:
        return None
    rss = hwm = 0.0
    try:
        with open(_STATUS, "rb") as f:
            for line in f:
                if line.startswith(b"VmRSS:"):
                    rss = int(line.split()[1]) / 1024
                elif line.startswith(b"VmHWM:"):
                    hwm = int(line.split()[1]) / 1024
    except OSError:  # pragma: no cover - /proc vanished
        return None
    return round(rss, 1), round(hwm, 1)
