"""The garbage collector and the engine loop: freeze the heap the engine starts with.

Python frees most objects by reference counting; its cyclic garbage collector exists for the
rest (objects that point at each other). It is generational: young objects are scanned often,
and a *full* collection, now and then, walks every tracked container in the process. An
inference process holds a great many of them that never die (torch, the model's modules and
tensors, tokenizers, the CUDA graphs' bookkeeping: hundreds of thousands, millions with
transformers imported), and a full collection walks them all: on the H100 machine one such
pause, inside a window of eight decode steps at batch 256, took 4.9 ms per step on average, 60%
of the step's period (bench/results/README.md, row 95). The pause also lands as a
tens-of-milliseconds hole in every running stream's inter-token latency.

``gc.freeze()`` moves every object tracked so far into a permanent generation that no
collection scans; the young generations still collect the engine's short-lived garbage as
before. vLLM freezes its engine core's heap after start-up for the same reason.

- :func:`freeze_heap`: for a process that exists to run the engine (the server's engine
  process, a tensor-parallel worker): freeze once after loading, for good.
- :func:`frozen_heap`: for a loop inside someone else's process (``LLM.generate``): frozen for
  the loop's length, thawed after, so that a user's objects that later become cyclic garbage
  are collected as usual. Nested uses freeze and thaw once (the outermost).
"""

from __future__ import annotations

import gc
import threading
from contextlib import contextmanager
from typing import Iterator

_depth = 0  # how many frozen_heap()/freeze_heap() are in force (any thread may enter one)
_lock = threading.Lock()


def freeze_heap(collect: bool = False) -> None:
    """Freeze every object tracked so far. ``collect``: a full collection first, so that today's
    garbage is not frozen with the rest (once, for a process that stays frozen for good; a frozen
    block that thaws later needs none)."""
    global _depth
    with _lock:
        if _depth == 0:
            if collect:
                gc.collect()
            gc.freeze()
        _depth += 1


def thaw_heap() -> None:
    """Undo one :func:`freeze_heap`; the last one returns the frozen objects to the collector."""
    global _depth
    with _lock:
        if _depth == 0:
            raise RuntimeError("thaw_heap() without a freeze_heap()")
        _depth -= 1
        if _depth == 0:
            gc.unfreeze()


@contextmanager
def frozen_heap() -> Iterator[None]:
    """The heap as it is on entry frozen for the block's length (see the module's docstring)."""
    freeze_heap()
    try:
        yield
    finally:
        thaw_heap()
