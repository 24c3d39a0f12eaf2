"""The start-up heap frozen while the engine runs (tinyvllm/engine/gc_heap.py): nested freezes freeze
and thaw once; LLM.generate runs frozen and thaws after, also when a step fails; the engine's own
process stays frozen from start-up on. On a tiny random Llama on the CPU."""

from __future__ import annotations

import gc
import multiprocessing as mp
import signal
import threading
import weakref

import pytest

from engine_helpers import make_tiny_llama
from tinyvllm import LLM, SamplingParams
from tinyvllm.engine import gc_heap
from tinyvllm.engine.engine_config import EngineConfig

ENGINE = dict(device="cpu", dtype="float32", max_model_len=64, max_num_seqs=4, num_kv_blocks=32)


@pytest.fixture(autouse=True)
def thawed():
    if gc_heap._depth or gc.get_freeze_count():
        pytest.skip("something else in this process holds the heap frozen")
    yield
    assert gc_heap._depth == 0 and gc.get_freeze_count() == 0


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return str(make_tiny_llama(tmp_path_factory.mktemp("tiny-llama")))


def test_nested_freezes_freeze_and_thaw_once():
    gc_heap.freeze_heap()
    frozen = gc.get_freeze_count()
    assert frozen > 0  # (this process tracks many objects: torch, pytest)
    later = [[i] for i in range(100)]  # new containers, tracked after the freeze
    # (The count can only fall meanwhile, by 0 or a few: an earlier test's idle engine thread
    # ending in the background frees objects that were frozen. A second freeze would add >= 100.)
    with gc_heap.frozen_heap():  # an inner freeze leaves them alone
        assert frozen - 50 < gc.get_freeze_count() <= frozen
    assert frozen - 50 < gc.get_freeze_count() <= frozen  # the inner thaw thaws nothing
    gc_heap.thaw_heap()
    assert gc.get_freeze_count() == 0 and len(later) == 100
    with pytest.raises(RuntimeError, match="without a freeze_heap"):
        gc_heap.thaw_heap()


def test_a_freeze_for_good_collects_the_garbage_first():
    class Node:
        pass

    a, b = Node(), Node()
    a.other, b.other = b, a  # a cycle: only the collector frees it
    dead = weakref.ref(a)
    del a, b
    gc_heap.freeze_heap(collect=True)
    try:
        assert dead() is None  # collected, not frozen for good
    finally:
        gc_heap.thaw_heap()


def test_generate_runs_frozen_and_thaws_after(model):
    llm = LLM(model=model, **ENGINE)
    engine = llm.llm_engine
    seen = []
    step = engine.step
    engine.step = lambda: seen.append(gc.get_freeze_count()) or step()
    params = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": [5, 6]}], params, use_tqdm=False)
    assert len(outs[0].outputs[0].token_ids) == 3
    assert seen and all(n > 0 for n in seen)  # every step ran with the start-up heap frozen
    assert gc.get_freeze_count() == 0  # and the user's process is itself again (the fixture checks the depth)

    calls = []

    def failing_step():
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("boom")
        return step()  # (the clean-up step that drains the abort)

    engine.step = failing_step
    with pytest.raises(RuntimeError, match="boom"):
        llm.generate([{"prompt_token_ids": [5, 6]}], params, use_tqdm=False)
    assert gc.get_freeze_count() == 0


def test_the_engine_process_freezes_its_heap_after_start_up(model):
    """engine_core_main (the server's engine process) freezes once it is ready, for good. Run here in
    this process's main thread (it sets a signal handler), with a thread playing the server: the heap
    is frozen when "ready" arrives and stays frozen after the loop ends, until the test thaws it."""
    from tinyvllm.engine.engine_core import engine_core_main

    ours, theirs = mp.Pipe()
    seen = {}

    def server() -> None:
        if ours.poll(120):
            seen["first"] = ours.recv()[0]
            seen["depth"], seen["frozen"] = gc_heap._depth, gc.get_freeze_count()
        ours.send(("stop",))

    sigint = signal.getsignal(signal.SIGINT)
    t = threading.Thread(target=server, daemon=True)
    t.start()
    try:
        engine_core_main(EngineConfig(model, **ENGINE), theirs)
        t.join(30)
        assert seen["first"] == "ready" and seen["depth"] == 1 and seen["frozen"] > 0
        assert gc_heap._depth == 1  # still frozen after the loop ends: the process is about to exit
    finally:
        signal.signal(signal.SIGINT, sigint)
        while gc_heap._depth:
            gc_heap.thaw_heap()
