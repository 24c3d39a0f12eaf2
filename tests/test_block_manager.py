import pytest

from tinyvllm import SamplingParams
from tinyvllm.engine.block_manager import BlockManager, NoFreeBlocksError
from tinyvllm.engine.sequence import Sequence


def seq(n_tokens: int, rid: str = "r") -> Sequence:
    return Sequence(rid, list(range(n_tokens)), SamplingParams())


def test_allocate_covers_tokens_and_free_returns_everything():
    bm = BlockManager(num_blocks=10, block_size=4)
    for n, blocks in [(1, 1), (4, 1), (5, 2), (15, 4), (16, 4), (17, 5)]:
        s = seq(n)
        assert bm.can_allocate(s)
        bm.allocate(s)
        assert len(s.block_table) == blocks == bm.blocks_needed(n)
        assert bm.num_free_blocks == 10 - blocks
        assert all(bm.blocks[b].ref_count == 1 for b in s.block_table)
        bm.free(s)
        assert s.block_table == [] and bm.num_free_blocks == 10
        bm.check_invariants()


def test_append_slot_grows_one_block_at_block_boundaries():
    bm = BlockManager(num_blocks=4, block_size=4)
    s = seq(3)
    bm.allocate(s)
    grown_at = []
    for _ in range(10):
        s.append_token(7)
        assert bm.can_append(s)
        before = len(s.block_table)
        bm.append_slot(s)
        if len(s.block_table) > before:
            grown_at.append(s.num_tokens)
        assert len(s.block_table) * 4 >= s.num_tokens
    assert grown_at == [5, 9, 13]
    bm.check_invariants()


def test_exhaustion_and_distinct_blocks():
    bm = BlockManager(num_blocks=3, block_size=2)
    a, b = seq(4, "a"), seq(3, "b")
    bm.allocate(a)
    assert not bm.can_allocate(b)  # needs 2, 1 free
    with pytest.raises(NoFreeBlocksError):
        bm.allocate(b)
    assert a.block_table and b.block_table == []
    c = seq(2, "c")
    bm.allocate(c)
    assert set(a.block_table).isdisjoint(c.block_table)
    assert bm.num_free_blocks == 0
    c.append_token(1)  # token 3 needs a new block; none left
    assert not bm.can_append(c)
    with pytest.raises(NoFreeBlocksError):
        bm.append_slot(c)
    bm.free(a)
    assert bm.can_append(c)
    bm.append_slot(c)
    bm.free(c)
    assert bm.num_free_blocks == 3
    bm.check_invariants()


def test_ref_counts_guard_double_free_and_sharing():
    bm = BlockManager(num_blocks=2, block_size=2)
    s = seq(2)
    bm.allocate(s)
    bid = s.block_table[0]
    # Prefix caching will share a block: a second reference keeps it off the free list.
    bm.blocks[bid].ref_count += 1
    t = seq(2, "t")
    t.block_table = [bid]
    bm.free(s)
    assert bm.num_free_blocks == 1 and bm.blocks[bid].ref_count == 1
    bm.free(t)
    assert bm.num_free_blocks == 2
    t.block_table = [bid]
    with pytest.raises(AssertionError):
        bm.free(t)


def test_freed_blocks_are_reused_last():
    # FIFO free list: a just-freed block goes to the back (keeps recently freed content around
    # for prefix caching later).
    bm = BlockManager(num_blocks=3, block_size=1)
    a = seq(1)
    bm.allocate(a)
    first = a.block_table[0]
    bm.free(a)
    b = seq(1)
    bm.allocate(b)
    assert b.block_table[0] != first
