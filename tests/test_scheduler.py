import pytest

from tinyvllm import SamplingParams
from tinyvllm.engine.engine_config import EngineConfig
from tinyvllm.engine.scheduler import Scheduler
from tinyvllm.engine.sequence import Sequence, SequenceStatus


def mk(rid, n, **params):
    return Sequence(rid, list(range(n)), SamplingParams(**params))


def make(num_blocks, block_size, *, max_num_seqs=10, max_num_batched_tokens=1000, longest_first=None, **kw):
    """A Scheduler and its BlockManager (max_model_len: the token budget, so the budget check passes)."""
    config = EngineConfig(
        num_kv_blocks=num_blocks, block_size=block_size, max_num_seqs=max_num_seqs, device="cpu",
        max_num_batched_tokens=max_num_batched_tokens, max_model_len=kw.pop("max_model_len", max_num_batched_tokens),
        decode_longest_first_min_seqs=longest_first, **kw,
    )
    sch = Scheduler(config)
    return sch, sch.block_manager


def fake_step(sch, out, token=5):
    """A model step that samples ``token`` for every sequence, recorded by postprocess."""
    sch.postprocess(out, [token] * len(out.seqs))


def test_prefill_respects_token_budget_and_order():
    sch, bm = make(100, 4, max_num_seqs=10, max_num_batched_tokens=20)
    seqs = [mk("a", 8), mk("b", 8), mk("c", 8), mk("d", 2)]
    for s in seqs:
        sch.add(s)
    out = sch.schedule()
    assert out.is_prefill and [s.request_id for s in out.seqs] == ["a", "b"]  # c would exceed 20; d waits (FIFO)
    assert out.num_batched_tokens == 16
    fake_step(sch, out)
    out = sch.schedule()
    assert out.is_prefill and [s.request_id for s in out.seqs] == ["c", "d"]
    fake_step(sch, out)
    out = sch.schedule()
    assert not out.is_prefill and [s.request_id for s in out.seqs] == ["a", "b", "c", "d"]
    assert all(s.num_uncomputed_tokens == 1 for s in out.seqs)


def test_max_num_seqs_counts_running():
    sch, bm = make(100, 4, max_num_seqs=3, max_num_batched_tokens=1000)
    for i in range(5):
        sch.add(mk(str(i), 3))
    out = sch.schedule()
    assert len(out.seqs) == 3
    fake_step(sch, out)
    out = sch.schedule()  # nothing can join: 3 running
    assert not out.is_prefill and len(out.seqs) == 3
    fake_step(sch, out)
    sch.finish(out.seqs[0])
    assert out.seqs[0].status == SequenceStatus.FINISHED and out.seqs[0].block_table == []
    out = sch.schedule()
    assert out.is_prefill and [s.request_id for s in out.seqs] == ["3"]


def test_prefill_waits_for_blocks():
    sch, bm = make(4, 4)
    sch.add(mk("a", 12))  # 3 blocks
    sch.add(mk("b", 8))  # 2 blocks: must wait
    out = sch.schedule()
    assert [s.request_id for s in out.seqs] == ["a"]
    fake_step(sch, out)
    out = sch.schedule()
    assert not out.is_prefill and [s.request_id for s in out.seqs] == ["a"]


def test_decode_batch_runs_longest_first_from_the_runners_batch_size():
    """A decode batch of at least longest_first_min_seqs sequences goes longest first (ties keep
    arrival order), a smaller one (or with no threshold) in arrival order; preemption is not affected."""
    for threshold, expect in ((None, ["short", "long", "mid", "mid2"]), (5, ["short", "long", "mid", "mid2"]),
                              (4, ["long", "mid", "mid2", "short"])):
        sch, bm = make(100, 4, longest_first=threshold)
        for s in [mk("short", 3), mk("long", 10), mk("mid", 6), mk("mid2", 6)]:
            sch.add(s)
        fake_step(sch, sch.schedule())
        assert [s.request_id for s in sch.schedule().seqs] == expect, threshold
    sch, bm = make(100, 4, longest_first=2)
    seqs = [mk("short", 3), mk("long", 10), mk("mid", 6), mk("mid2", 6)]
    for s in seqs:
        sch.add(s)
    out = sch.schedule()
    assert out.is_prefill and [s.request_id for s in out.seqs] == ["short", "long", "mid", "mid2"]  # arrival order
    fake_step(sch, out)
    out = sch.schedule()
    assert not out.is_prefill and [s.request_id for s in out.seqs] == ["long", "mid", "mid2", "short"]
    assert [s.num_tokens for s in out.seqs] == [11, 7, 7, 4]
    assert [s.request_id for s in sch.running] == ["short", "long", "mid", "mid2"]  # the queue keeps arrival order
    fake_step(sch, out)
    sch.finish(seqs[1])
    out = sch.schedule()
    assert [s.request_id for s in out.seqs] == ["mid", "mid2", "short"]


def test_decode_preempts_newest_and_recomputes():
    sch, bm = make(4, 4)
    a, b = mk("a", 8), mk("b", 8)  # 2 blocks each: the cache is full
    sch.add(a)
    sch.add(b)
    fake_step(sch, sch.schedule())  # both prefilled; each now has 9 tokens and needs a 3rd block
    out = sch.schedule()
    assert not out.is_prefill
    assert [s.request_id for s in out.seqs] == ["a"] and [s.request_id for s in out.preempted] == ["b"]
    assert b.status == SequenceStatus.WAITING and b.num_computed_tokens == 0 and b.block_table == []
    assert b.num_preemptions == 1 and sch.num_preemptions == 1 and list(sch.waiting) == [b]
    assert len(a.block_table) == 3 and bm.num_free_blocks == 1
    fake_step(sch, out)
    # b needs 3 blocks (10 tokens incl. its generated one) to be recomputed: not yet.
    out = sch.schedule()
    assert not out.is_prefill and out.seqs == [a]
    sch.finish(a)
    out = sch.schedule()
    assert out.is_prefill and out.seqs == [b] and out.num_scheduled_tokens == [9]  # prompt + generated token
    bm.check_invariants()


def test_decode_preempts_itself_when_newest():
    sch, bm = make(3, 2)
    a, b = mk("a", 2), mk("b", 4)
    sch.add(a)
    sch.add(b)
    fake_step(sch, sch.schedule())  # a: 3 tokens in 1 block; b: 5 tokens in 2 blocks; 0 free
    out = sch.schedule()
    # a is oldest and needs a block: b (newest) is preempted, a decodes.
    assert out.seqs == [a] and out.preempted == [b]
    # a single sequence alone: b waits until a finishes.
    sch.finish(a)
    out = sch.schedule()
    assert out.seqs == [b] and out.is_prefill


# ---- what a step reports and how postprocess records it ------------------------------------------
def test_num_scheduled_tokens_per_sequence():
    """A prefill schedules each sequence's whole uncomputed span, a decode one token each;
    num_batched_tokens is their sum. (A preempted sequence's span: see the preemption test.)"""
    sch, bm = make(4, 4)
    a, b = mk("a", 8), mk("b", 9)
    sch.add(a)
    sch.add(b)
    out = sch.schedule()
    assert out.is_prefill and out.seqs == [a] and out.num_scheduled_tokens == [8]  # b needs 3 blocks: 2 free
    fake_step(sch, out)
    out = sch.schedule()
    assert not out.is_prefill and out.seqs == [a] and out.num_scheduled_tokens == [1]
    fake_step(sch, out)
    sch.add(c := mk("c", 3))
    sch.finish(a)
    out = sch.schedule()  # b (3 blocks) and c (1 block) fit the 4 free blocks
    assert out.is_prefill and out.seqs == [b, c] and out.num_scheduled_tokens == [9, 3]
    assert out.num_batched_tokens == 12
    fake_step(sch, out)
    out = sch.schedule()
    assert not out.is_prefill and out.seqs == [b, c] and out.num_scheduled_tokens == [1, 1]


def test_postprocess_advances_num_computed_tokens_and_appends_the_token():
    sch, bm = make(100, 4)
    a, b = mk("a", 6), mk("b", 3)
    sch.add(a)
    sch.add(b)
    out = sch.schedule()
    sch.postprocess(out, [40, 41])
    assert (a.num_computed_tokens, a.token_ids[-1], a.num_tokens) == (6, 40, 7)
    assert (b.num_computed_tokens, b.token_ids[-1], b.num_tokens) == (3, 41, 4)
    assert a.status == b.status == SequenceStatus.RUNNING and a.finish_reason is None
    out = sch.schedule()
    assert [s.num_uncomputed_tokens for s in out.seqs] == out.num_scheduled_tokens == [1, 1]
    sch.postprocess(out, [42, 43])
    assert (a.num_computed_tokens, a.output_token_ids) == (7, [40, 42])
    assert (b.num_computed_tokens, b.output_token_ids) == (4, [41, 43])
    with pytest.raises(ValueError, match="1 token ids for 2 scheduled sequences"):
        sch.postprocess(sch.schedule(), [1])
    assert (a.num_computed_tokens, b.num_computed_tokens) == (7, 4)  # nothing recorded


@pytest.mark.parametrize(
    "params, token, reason, stop_reason",
    [
        ({}, 2, "stop", None),  # EOS
        ({"ignore_eos": True, "max_tokens": 3}, 2, "length", None),  # EOS ignored: ends on max_tokens
        ({"stop_token_ids": [7]}, 7, "stop", 7),
        ({"max_tokens": 3}, 9, "length", None),
        ({"min_tokens": 5}, 2, "length", None),  # EOS held back by min_tokens: ends on max_seq_len (8)
    ],
)
def test_postprocess_finishes_and_frees_the_blocks(params, token, reason, stop_reason):
    """A token stop or a length limit finishes the sequence in postprocess: it leaves the running
    queue, its blocks are free at once, and a waiting sequence can take them in the next step."""
    sch, bm = make(2, 4, max_num_batched_tokens=8, eos_token_ids=(2,))  # max_seq_len 8: the cache
    a = mk("a", 5, **params)
    sch.add(a)
    steps = 0
    while a.finish_reason is None:
        out = sch.schedule()
        sch.postprocess(out, [token])
        steps += 1
    assert (a.finish_reason, a.stop_reason) == (reason, stop_reason)
    assert steps == (1 if reason == "stop" else 3) and a.num_output_tokens == steps
    assert a.status == SequenceStatus.FINISHED and a.block_table == [] and not sch.running
    assert bm.num_free_blocks == 2
    bm.check_invariants()
    sch.add(b := mk("b", 7))
    assert sch.schedule().seqs == [b]  # the whole cache is free for the next request
