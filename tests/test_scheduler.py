from tinyvllm import SamplingParams
from tinyvllm.engine.block_manager import BlockManager
from tinyvllm.engine.scheduler import Scheduler
from tinyvllm.engine.sequence import Sequence, SequenceStatus


def mk(rid, n):
    return Sequence(rid, list(range(n)), SamplingParams())


def fake_step(sched_out):
    """What the engine does after a step: everything is computed, one token appended."""
    for s in sched_out.seqs:
        s.num_computed_tokens = s.num_tokens
        s.append_token(5)


def test_prefill_respects_token_budget_and_order():
    bm = BlockManager(100, 4)
    sch = Scheduler(bm, max_num_seqs=10, max_num_batched_tokens=20)
    seqs = [mk("a", 8), mk("b", 8), mk("c", 8), mk("d", 2)]
    for s in seqs:
        sch.add(s)
    out = sch.schedule()
    assert out.is_prefill and [s.request_id for s in out.seqs] == ["a", "b"]  # c would exceed 20; d waits (FIFO)
    assert out.num_batched_tokens == 16
    fake_step(out)
    out = sch.schedule()
    assert out.is_prefill and [s.request_id for s in out.seqs] == ["c", "d"]
    fake_step(out)
    out = sch.schedule()
    assert not out.is_prefill and [s.request_id for s in out.seqs] == ["a", "b", "c", "d"]
    assert all(s.num_uncomputed_tokens == 1 for s in out.seqs)


def test_max_num_seqs_counts_running():
    bm = BlockManager(100, 4)
    sch = Scheduler(bm, max_num_seqs=3, max_num_batched_tokens=1000)
    for i in range(5):
        sch.add(mk(str(i), 3))
    out = sch.schedule()
    assert len(out.seqs) == 3
    fake_step(out)
    out = sch.schedule()  # nothing can join: 3 running
    assert not out.is_prefill and len(out.seqs) == 3
    fake_step(out)
    sch.finish(out.seqs[0])
    assert out.seqs[0].status == SequenceStatus.FINISHED and out.seqs[0].block_table == []
    out = sch.schedule()
    assert out.is_prefill and [s.request_id for s in out.seqs] == ["3"]


def test_prefill_waits_for_blocks():
    bm = BlockManager(4, 4)
    sch = Scheduler(bm, max_num_seqs=10, max_num_batched_tokens=1000)
    sch.add(mk("a", 12))  # 3 blocks
    sch.add(mk("b", 8))  # 2 blocks: must wait
    out = sch.schedule()
    assert [s.request_id for s in out.seqs] == ["a"]
    fake_step(out)
    out = sch.schedule()
    assert not out.is_prefill and [s.request_id for s in out.seqs] == ["a"]


def test_decode_batch_runs_longest_first_from_the_runners_batch_size():
    """A decode batch of at least longest_first_min_seqs sequences goes longest first (ties keep
    arrival order), a smaller one (or with no threshold) in arrival order; preemption is not affected."""
    for threshold, expect in ((None, ["short", "long", "mid", "mid2"]), (5, ["short", "long", "mid", "mid2"]),
                              (4, ["long", "mid", "mid2", "short"])):
        bm = BlockManager(100, 4)
        sch = Scheduler(bm, max_num_seqs=10, max_num_batched_tokens=1000, longest_first_min_seqs=threshold)
        for s in [mk("short", 3), mk("long", 10), mk("mid", 6), mk("mid2", 6)]:
            sch.add(s)
        fake_step(sch.schedule())
        assert [s.request_id for s in sch.schedule().seqs] == expect, threshold
    bm = BlockManager(100, 4)
    sch = Scheduler(bm, max_num_seqs=10, max_num_batched_tokens=1000, longest_first_min_seqs=2)
    seqs = [mk("short", 3), mk("long", 10), mk("mid", 6), mk("mid2", 6)]
    for s in seqs:
        sch.add(s)
    out = sch.schedule()
    assert out.is_prefill and [s.request_id for s in out.seqs] == ["short", "long", "mid", "mid2"]  # arrival order
    fake_step(out)
    out = sch.schedule()
    assert not out.is_prefill and [s.request_id for s in out.seqs] == ["long", "mid", "mid2", "short"]
    assert [s.num_tokens for s in out.seqs] == [11, 7, 7, 4]
    assert [s.request_id for s in sch.running] == ["short", "long", "mid", "mid2"]  # the queue keeps arrival order
    fake_step(out)
    sch.finish(seqs[1])
    out = sch.schedule()
    assert [s.request_id for s in out.seqs] == ["mid", "mid2", "short"]


def test_decode_preempts_newest_and_recomputes():
    bm = BlockManager(4, 4)
    sch = Scheduler(bm, max_num_seqs=10, max_num_batched_tokens=1000)
    a, b = mk("a", 8), mk("b", 8)  # 2 blocks each: the cache is full
    sch.add(a)
    sch.add(b)
    fake_step(sch.schedule())  # both prefilled; each now has 9 tokens and needs a 3rd block
    out = sch.schedule()
    assert not out.is_prefill
    assert [s.request_id for s in out.seqs] == ["a"] and [s.request_id for s in out.preempted] == ["b"]
    assert b.status == SequenceStatus.WAITING and b.num_computed_tokens == 0 and b.block_table == []
    assert b.num_preemptions == 1 and sch.num_preemptions == 1 and list(sch.waiting) == [b]
    assert len(a.block_table) == 3 and bm.num_free_blocks == 1
    fake_step(out)
    # b needs 3 blocks (10 tokens incl. its generated one) to be recomputed: not yet.
    out = sch.schedule()
    assert not out.is_prefill and out.seqs == [a]
    sch.finish(a)
    out = sch.schedule()
    assert out.is_prefill and out.seqs == [b] and out.num_batched_tokens == 9  # prompt + generated token
    bm.check_invariants()


def test_decode_preempts_itself_when_newest():
    bm = BlockManager(3, 2)
    sch = Scheduler(bm, max_num_seqs=10, max_num_batched_tokens=1000)
    a, b = mk("a", 2), mk("b", 4)
    sch.add(a)
    sch.add(b)
    fake_step(sch.schedule())  # a: 3 tokens in 1 block; b: 5 tokens in 2 blocks; 0 free
    out = sch.schedule()
    # a is oldest and needs a block: b (newest) is preempted, a decodes.
    assert out.seqs == [a] and out.preempted == [b]
    # a single sequence alone: b waits until a finishes.
    sch.finish(a)
    out = sch.schedule()
    assert out.seqs == [b] and out.is_prefill
