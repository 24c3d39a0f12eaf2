"""BlockManager: block tables that cover their tokens, reference counts, and the prefix cache
(chained hashes of full blocks, sharing, LRU eviction of freed cached blocks)."""

import pytest

from tinyvllm import SamplingParams
from tinyvllm.engine.block_manager import BlockManager, hash_block_tokens
from tinyvllm.engine.sequence import Sequence


def seq(n_tokens: int, rid: str = "r", tokens=None) -> Sequence:
    return Sequence(rid, list(tokens if tokens is not None else range(n_tokens)), SamplingParams())


def admit(bm: BlockManager, s: Sequence) -> int:
    """What the scheduler does for a waiting sequence: take its cached prefix, allocate the rest,
    publish its full blocks. Returns the number of cached tokens."""
    hits, cached = bm.get_computed_blocks(s)
    assert bm.allocate_slots(s, s.num_tokens - cached, hits)
    s.num_computed_tokens = cached
    bm.cache_full_blocks(s, s.num_tokens)
    return cached


def test_allocate_covers_tokens_and_free_returns_everything():
    bm = BlockManager(num_blocks=10, block_size=4, enable_prefix_caching=False)
    for n, blocks in [(1, 1), (4, 1), (5, 2), (15, 4), (16, 4), (17, 5)]:
        s = seq(n)
        assert bm.can_allocate_slots(s, n)
        assert bm.allocate_slots(s, n)
        assert len(s.block_table) == blocks == bm.blocks_needed(n)
        assert bm.num_free_blocks == 10 - blocks
        assert all(bm.blocks[b].ref_count == 1 for b in s.block_table)
        bm.free(s)
        assert s.block_table == [] and bm.num_free_blocks == 10
        bm.check_invariants()


def test_allocate_slots_grows_one_block_at_block_boundaries():
    bm = BlockManager(num_blocks=4, block_size=4)
    s = seq(3)
    assert bm.allocate_slots(s, 3)
    s.num_computed_tokens = 3
    grown_at = []
    for _ in range(10):
        s.append_token(7)
        before = len(s.block_table)
        assert bm.allocate_slots(s, 1)
        if len(s.block_table) > before:
            grown_at.append(s.num_tokens)
        assert len(s.block_table) * 4 >= s.num_tokens
        s.num_computed_tokens += 1
    assert grown_at == [5, 9, 13]
    bm.check_invariants()


def test_exhaustion_changes_nothing_and_blocks_are_distinct():
    bm = BlockManager(num_blocks=3, block_size=2, enable_prefix_caching=False)
    a, b = seq(4, "a"), seq(3, "b")
    assert bm.allocate_slots(a, 4)
    assert not bm.can_allocate_slots(b, 3)  # needs 2, 1 free
    assert not bm.allocate_slots(b, 3)
    assert a.block_table and b.block_table == [] and bm.num_free_blocks == 1
    c = seq(2, "c")
    assert bm.allocate_slots(c, 2)
    assert set(a.block_table).isdisjoint(c.block_table)
    assert bm.num_free_blocks == 0
    c.num_computed_tokens = 2
    c.append_token(1)  # token 3 needs a new block; none left
    assert not bm.allocate_slots(c, 1) and len(c.block_table) == 1
    bm.free(a)
    assert bm.allocate_slots(c, 1)
    bm.free(c)
    assert bm.num_free_blocks == 3
    bm.check_invariants()


def test_shared_blocks_are_freed_by_their_last_user_and_double_free_is_caught():
    bm = BlockManager(num_blocks=4, block_size=2)
    s, t = seq(5, "s"), seq(5, "t")
    assert admit(bm, s) == 0
    assert admit(bm, t) == 4  # t shares s's two full blocks, computes its last token in its own block
    assert t.block_table[:2] == s.block_table[:2] and t.block_table[2] != s.block_table[2]
    assert [bm.blocks[b].ref_count for b in s.block_table] == [2, 2, 1]
    assert bm.num_free_blocks == 0
    bm.free(s)
    assert [bm.blocks[b].ref_count for b in t.block_table] == [1, 1, 1] and bm.num_free_blocks == 1
    bm.free(t)
    assert bm.num_free_blocks == 4
    t.block_table = [0]
    with pytest.raises(AssertionError, match="double free"):
        bm.free(t)


def test_block_hashes_chain_over_the_whole_prefix():
    """A block's hash depends on its tokens and on every token before it, and only full blocks
    have one; the sequence keeps its hashes as it grows."""
    bm = BlockManager(num_blocks=8, block_size=2)
    a = seq(0, "a", [1, 2, 3, 4, 5])
    b = seq(0, "b", [9, 2, 3, 4, 5])  # same second block, different first
    ha, hb = list(bm.block_hashes(a)), list(bm.block_hashes(b))
    assert len(ha) == 2 and ha[0] == hash_block_tokens(None, [1, 2]) and ha[1] == hash_block_tokens(ha[0], [3, 4])
    assert ha[0] != hb[0] and ha[1] != hb[1]  # the chain carries the difference forward
    a.append_token(6)
    assert bm.block_hashes(a)[:2] == ha and len(a.block_hashes) == 3


def test_lookup_stops_at_the_first_miss_and_leaves_a_token_to_compute():
    bm = BlockManager(num_blocks=16, block_size=4)
    admit(bm, seq(0, "a", range(12)))
    assert bm.get_computed_blocks(seq(0, "b", range(12)))[1] == 8  # whole prompt cached: the last block recomputed
    assert bm.get_computed_blocks(seq(0, "c", range(13)))[1] == 12
    assert bm.get_computed_blocks(seq(0, "d", [*range(4), 99, *range(5, 12)]))[1] == 4  # a miss ends the prefix
    assert bm.get_computed_blocks(seq(0, "e", [99, *range(1, 12)]))[1] == 0
    assert bm.get_computed_blocks(seq(0, "f", range(3)))[1] == 0  # no full block
    off = BlockManager(num_blocks=16, block_size=4, enable_prefix_caching=False)
    admit(off, seq(0, "a", range(12)))
    assert off.get_computed_blocks(seq(0, "b", range(13))) == ([], 0) and off.num_cached_blocks == 0


def test_freed_cached_blocks_stay_findable_and_are_evicted_least_recently_used():
    bm = BlockManager(num_blocks=4, block_size=2)
    a = seq(0, "a", [1, 2, 3])  # one full block (cached) + a partial one
    b = seq(0, "b", [5, 6, 7])
    admit(bm, a)
    admit(bm, b)
    a_block, b_block = a.block_table[0], b.block_table[0]
    bm.free(a)
    bm.free(b)  # b's block is now the most recently used
    assert bm.num_free_blocks == 4 and bm.num_cached_blocks == 2
    bm.check_invariants()
    # The empty blocks go first: both cached blocks survive a 2-block allocation.
    c = seq(0, "c", [8, 8, 8])
    admit(bm, c)
    assert bm.num_cached_blocks == 3 and {a_block, b_block}.isdisjoint(c.block_table)
    bm.free(c)  # c's full block is now the most recent; a's is the oldest
    # 3 new blocks: the 1 empty one, then evict a's (LRU), then b's.
    d = seq(0, "d", range(20, 26))
    assert bm.allocate_slots(d, 6)
    assert a_block in d.block_table and b_block in d.block_table
    assert bm.get_computed_blocks(seq(0, "a2", [1, 2, 3]))[1] == 0  # a's prefix is gone
    assert bm.get_computed_blocks(seq(0, "c2", [8, 8, 8]))[1] == 2  # c's survived
    bm.check_invariants()


def test_sharing_an_evictable_block_takes_it_out_of_the_free_pool():
    bm = BlockManager(num_blocks=3, block_size=2)
    admit(bm, a := seq(0, "a", [1, 2, 3]))
    bm.free(a)
    b = seq(0, "b", [1, 2, 3, 4, 5])  # shares a's cached block, needs 2 more: exactly the other 2
    hits, cached = bm.get_computed_blocks(b)
    assert cached == 2 and bm.can_allocate_slots(b, 3, hits)
    c = seq(0, "c", [1, 2, 3, 4, 5, 6, 7])  # would need 3 more besides the shared one: no
    hits_c, cached_c = bm.get_computed_blocks(c)
    assert cached_c == 2 and not bm.can_allocate_slots(c, 5, hits_c)
    assert bm.allocate_slots(b, 3, hits)
    assert bm.num_free_blocks == 0 and bm.blocks[hits[0]].ref_count == 1
    bm.check_invariants()


def test_a_duplicate_block_stays_private():
    """Two sequences that computed the same prefix side by side: the first one's blocks are the
    cached ones; the second keeps its own, uncached, and they are plain free blocks afterwards."""
    bm = BlockManager(num_blocks=8, block_size=2)
    a, b = seq(4, "a"), seq(4, "b")
    for s in (a, b):
        assert bm.allocate_slots(s, 4)
    bm.cache_full_blocks(a, 4)
    bm.cache_full_blocks(b, 4)
    assert bm.num_cached_blocks == 2 and all(bm.blocks[x].block_hash is None for x in b.block_table)
    bm.free(a)
    bm.free(b)
    assert bm.num_free_blocks == 8 and len(bm.evictable) == 2 and len(bm.free_block_ids) == 6
    bm.check_invariants()


def test_usage_counts_blocks_in_use_only():
    bm = BlockManager(num_blocks=4, block_size=2)
    admit(bm, a := seq(4, "a"))
    assert bm.usage == 0.5
    bm.free(a)
    assert bm.usage == 0.0 and bm.num_cached_blocks == 2
