import pytest

from tinyvllm import SamplingParams
from tinyvllm.engine.engine_config import EngineConfig
from tinyvllm.engine.scheduler import Scheduler
from tinyvllm.engine.sequence import Sequence, SequenceStatus


def mk(rid, n, **params):
    return Sequence(rid, list(range(n)), SamplingParams(**params))


def make(num_blocks, block_size, *, max_num_seqs=10, max_num_batched_tokens=1000, longest_first=None,
         chunked=False, caching=False, **kw):
    """A Scheduler and its BlockManager (max_model_len: the token budget, so the budget check passes).
    Without ``chunked`` the "prefill or decode" policy; ``caching``: prefix caching (the
    sequences of ``mk`` all share their first tokens)."""
    config = EngineConfig(
        num_kv_blocks=num_blocks, block_size=block_size, max_num_seqs=max_num_seqs, device="cpu",
        max_num_batched_tokens=max_num_batched_tokens, max_model_len=kw.pop("max_model_len", max_num_batched_tokens),
        decode_longest_first_min_seqs=longest_first, enable_chunked_prefill=chunked, enable_prefix_caching=caching,
        **kw,
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


# ---- chunked prefill: decodes first, then prompt chunks, under the token budget -------------------
def ids(out):
    return [(s.request_id, n) for s, n in zip(out.seqs, out.num_scheduled_tokens)]


def test_chunked_prompt_is_split_at_the_budget_and_samples_only_at_its_end():
    sch, bm = make(100, 4, max_num_batched_tokens=8, max_model_len=64, chunked=True, max_num_seqs=4)
    a = mk("a", 19)
    sch.add(a)
    for expect_done in (8, 16):
        out = sch.schedule()
        assert ids(out) == [("a", 8)] and out.is_prefill
        assert sch.postprocess(out, [-1]) == [] and a.num_output_tokens == 0  # a chunk samples nothing
        assert a.num_computed_tokens == expect_done and len(a.block_table) * 4 >= expect_done
    out = sch.schedule()
    assert ids(out) == [("a", 3)]
    assert sch.postprocess(out, [40]) == [a] and a.output_token_ids == [40]
    out = sch.schedule()
    assert ids(out) == [("a", 1)] and not out.is_prefill


def test_chunked_step_runs_decodes_first_then_running_prompts_then_new_ones():
    sch, bm = make(100, 4, max_num_batched_tokens=10, max_model_len=64, chunked=True, max_num_seqs=6)
    d1, d2 = mk("d1", 3), mk("d2", 2)
    sch.add(d1)
    sch.add(d2)
    fake_step(sch, sch.schedule())  # both prompts in one step (5 tokens); both decode from now on
    long1, long2 = mk("long1", 30), mk("long2", 30)
    sch.add(long1)
    out = sch.schedule()
    assert ids(out) == [("d1", 1), ("d2", 1), ("long1", 8)] and out.num_batched_tokens == 10
    fake_step(sch, out)
    sch.add(long2)
    out = sch.schedule()  # long1 (running, part-way) goes before long2 (waiting); long2 gets nothing left
    assert ids(out) == [("d1", 1), ("d2", 1), ("long1", 8)]
    fake_step(sch, out)
    sch.finish(d2)
    out = sch.schedule()
    assert ids(out) == [("d1", 1), ("long1", 9)]
    fake_step(sch, out)
    out = sch.schedule()  # long1 has 5 left: the rest of the budget starts long2
    assert ids(out) == [("d1", 1), ("long1", 5), ("long2", 4)]
    fake_step(sch, out)
    assert long1.num_output_tokens == 1 and long2.num_output_tokens == 0 and long2.num_computed_tokens == 4


def test_chunked_preemption_takes_the_newest_and_admits_nobody_in_that_step():
    sch, bm = make(4, 4, max_num_batched_tokens=8, max_model_len=16, chunked=True, max_num_seqs=4)
    a, b = mk("a", 4), mk("b", 4)
    sch.add(a)
    sch.add(b)
    for _ in range(5):  # the prompts, then 4 decodes: 8 tokens computed each, 2 blocks each: the cache is full
        fake_step(sch, sch.schedule())
    assert a.num_computed_tokens == b.num_computed_tokens == 8 and bm.num_free_blocks == 0
    sch.add(late := mk("late", 2))
    out = sch.schedule()
    # a (oldest) needs a 3rd block: b, the newest, is preempted. A block is free again, but
    # nobody is admitted in a step that preempted.
    assert ids(out) == [("a", 1)] and out.preempted == [b] and list(sch.waiting) == [b, late]
    assert b.num_computed_tokens == 0 and b.block_table == [] and sch.num_preemptions == 1
    assert bm.num_free_blocks == 1
    bm.check_invariants()


def test_chunked_preempting_a_sequence_already_in_the_step_gives_back_its_tokens():
    """Decodes are scheduled before running prompts; if an older running prompt then needs a block
    and the newest sequence is a decode already in the step, it leaves the step (its token too)."""
    sch, bm = make(5, 4, max_num_batched_tokens=8, max_model_len=20, chunked=True, max_num_seqs=4)
    old, new = mk("old", 20), mk("new", 5)
    for seq, computed in ((old, 8), (new, 4)):  # old: part-way through its prompt; new: decoding
        assert bm.allocate_slots(seq, computed)
        seq.num_computed_tokens = computed
        seq.status = SequenceStatus.RUNNING
        sch.running.append(seq)
    out = sch.schedule()
    assert ids(out) == [("old", 7)] and out.preempted == [new] and list(sch.waiting) == [new]
    assert new.block_table == [] and len(old.block_table) == 4 and bm.num_free_blocks == 1
    bm.check_invariants()


def test_chunked_budget_must_hold_every_decode():
    with pytest.raises(ValueError, match=r"max_num_batched_tokens \(8\) must be at least max_num_seqs \(10\)"):
        make(100, 4, max_num_batched_tokens=8, max_model_len=64, chunked=True, max_num_seqs=10)
    make(100, 4, max_num_batched_tokens=8, max_model_len=8, chunked=False, max_num_seqs=10)  # decode steps: no budget


# ---- prefix caching in the scheduler ----------------------------------------------------------------
@pytest.mark.parametrize("chunked", [False, True])
def test_a_shared_prefix_admitted_in_the_same_step_is_computed_once(chunked):
    sch, bm = make(100, 4, max_num_batched_tokens=100, max_model_len=100, chunked=chunked, caching=True)
    a = Sequence("a", list(range(10)) + [50, 51], SamplingParams())
    b = Sequence("b", list(range(10)) + [60], SamplingParams())
    sch.add(a)
    sch.add(b)
    out = sch.schedule()
    # b finds a's first two blocks (published when a was scheduled) and computes 3 tokens.
    assert ids(out) == [("a", 12), ("b", 3)] and b.num_computed_tokens == 8
    assert b.block_table[:2] == a.block_table[:2] and b.block_table[2] != a.block_table[2]
    assert b.metrics.num_cached_tokens == 8 and a.metrics.num_cached_tokens == 0
    assert (sch.prefix_cache_queries, sch.prefix_cache_hits, sch.prefix_cache_requests) == (23, 8, 2)


def test_a_preempted_sequence_comes_back_through_its_cached_blocks():
    sch, bm = make(5, 4, max_num_batched_tokens=20, max_model_len=20, caching=True)
    a, b = mk("a", 8), Sequence("b", [9] * 8, SamplingParams())
    sch.add(a)
    sch.add(b)
    fake_step(sch, sch.schedule())  # 2 blocks each, 1 free; both need a 3rd block to decode
    out = sch.schedule()  # a takes the free block; b must preempt itself
    assert out.seqs == [a] and out.preempted == [b] and bm.num_cached_blocks == 4  # b's full blocks stay cached
    fake_step(sch, out)
    sch.finish(a)
    out = sch.schedule()
    # b is recomputed from its cached prefix: 8 of its 9 tokens are found, 1 is computed.
    assert ids(out) == [("b", 1)] and b.num_computed_tokens == 8
    assert b.metrics.num_cached_tokens == 0  # (the request's first admission found nothing)
    bm.check_invariants()
