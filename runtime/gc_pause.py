"""Pause Python's cyclic garbage collector while a load imports the stack and builds the model.

Importing torch, transformers and bitsandbytes creates millions of long-lived objects. With the
collector on, CPython traverses the growing heap again and again along the way (young collections
every few hundred allocations, full ones each time the heap grew by a quarter): measured 1.2-1.4 s of a
10-11 s cold start on the GPU machine (0.6 s paused; docs/benchmarks.md). Paused, that work becomes one
full collection at the end of the call, and only when the call imported something (a warm process pays
nothing). The collector's previous state is restored in every case, errors included; nothing is frozen or left disabled.
``QCONV_GC_PAUSE=0`` leaves the collector alone (an A/B switch for ``scripts/bench_load.py``).
"""

from __future__ import annotations

import contextlib
import gc
import os
import sys
import time
from collections.abc import Iterator

#: A call that imported at least this many modules ends with one full collection (the debt the
#: imports would otherwise leave to whatever allocates next).
COLLECT_AFTER_IMPORTS = 100


@contextlib.contextmanager
def gc_paused(stats: dict[str, float] | None = None) -> Iterator[None]:
    """Disable the cyclic GC inside the block; afterwards restore it (and collect once if it was on).

    ``stats`` (optional) receives ``gc_collect_s``: the seconds of that final collection (0.0 when the
    block imported fewer than :data:`COLLECT_AFTER_IMPORTS` modules or the GC was off to begin with).
    """
    if os.environ.get("QCONV_GC_PAUSE", "1") == "0":
        yield
        return
    was_enabled = gc.isenabled()
    modules_before = len(sys.modules)
    gc.disable()
    try:
        yield
    finally:
        spent = 0.0
        if was_enabled:
            if len(sys.modules) - modules_before >= COLLECT_AFTER_IMPORTS:
                t0 = time.perf_counter()
                gc.collect()
                spent = time.perf_counter() - t0
            gc.enable()
        if stats is not None:
            stats["gc_collect_s"] = round(spent, 3)
