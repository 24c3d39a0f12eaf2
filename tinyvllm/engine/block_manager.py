"""BlockManager: hands out fixed-size KV-cache blocks, shares them by prefix, takes them back.

The KV cache is one big array of ``num_blocks`` blocks, each holding the keys and
values of ``block_size`` consecutive tokens (per layer:
``[num_blocks, num_kv_heads, block_size, head_dim]``). A sequence owns a *block
table*: ``block_table[i]`` is the physical block holding its tokens
``i*block_size .. (i+1)*block_size - 1``. Blocks need not be contiguous, so a
sequence grows one block at a time and frees everything at once when it ends:
no fragmentation, no up-front reservation of ``max_model_len`` slots.

**Prefix caching** (``enable_prefix_caching``, course chapter 17). The keys and values
of a token depend on that token and on every token before it, and on nothing else.
So a *full* block is identified by its tokens and the tokens of every block before
it, which is what its hash chains::

    hash(block i) = sha256(hash(block i-1) + token ids of block i)

Two sequences whose first ``k`` blocks hash alike hold the same keys and values there,
and can share those blocks instead of computing them twice (a system prompt sent with
every request, the turns of a conversation, a preempted sequence coming back). sha256
makes a collision, which would silently hand one request another's cache, as unlikely
as guessing a key; a cheap 64-bit hash would need the tokens compared on every hit.

* ``cached``: hash -> block, every full block whose tokens are known (published when the
  step that computes it is scheduled: each layer writes the whole batch's keys and values
  before any attention reads them, so a request admitted later in the same step can
  already read it).
* ``ref_count``: how many sequences' tables hold the block. A shared block is freed when
  its last user lets go.
* A freed block that has a hash is not wiped: it stays in ``cached`` and waits in
  ``evictable`` (least recently used first), where a new request can still find it. It is
  only reused for other tokens when a new block is needed and no block without a hash is
  free: then the least recently used cached one loses its hash (LRU eviction).

So a block is in exactly one state: in use (ref_count > 0), free and empty
(``free_block_ids``), or free and cached (``evictable``). ``num_free_blocks`` counts both
free kinds: either can be handed out.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict, deque
from typing import Sequence as SequenceLike

from tinyvllm.engine.sequence import Sequence

BlockHash = bytes  # a sha256 digest


def hash_block_tokens(parent: BlockHash | None, token_ids: SequenceLike[int]) -> BlockHash:
    """The hash of a full block: sha256 over its parent's hash (none for the first block)
    and its token ids as 8-byte integers. Every block of one cache has ``block_size``
    tokens, so the byte string is unambiguous."""
    h = hashlib.sha256(parent or b"")
    h.update(array("q", token_ids).tobytes())
    return h.digest()


class Block:
    __slots__ = ("block_id", "ref_count", "block_hash")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_count = 0
        self.block_hash: BlockHash | None = None  # set while the block is in the prefix cache

    def __repr__(self) -> str:
        cached = ", cached" if self.block_hash is not None else ""
        return f"Block(id={self.block_id}, ref={self.ref_count}{cached})"


class NoFreeBlocksError(RuntimeError):
    pass


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be at least 1, got {num_blocks}.")
        if block_size < 1:
            raise ValueError(f"block_size must be at least 1, got {block_size}.")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_block_ids: deque[int] = deque(range(num_blocks))  # free, no hash: taken first
        self.evictable: OrderedDict[int, None] = OrderedDict()  # free, cached: least recently used first
        self.cached: dict[BlockHash, int] = {}  # hash -> block id
        # Prefix-cache lookups, in tokens (vLLM's prefix_cache_queries / prefix_cache_hits).
        self.num_queries = 0
        self.num_hits = 0

    # ---- bookkeeping -------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        """Blocks that can be handed out now: empty ones and cached ones nobody uses."""
        return len(self.free_block_ids) + len(self.evictable)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    @property
    def num_cached_blocks(self) -> int:
        """Blocks in the prefix cache (in use or evictable)."""
        return len(self.cached)

    @property
    def usage(self) -> float:
        """The share of blocks in use (0..1): the stats line's KV cache usage."""
        return self.num_used_blocks / self.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        """Blocks that hold ``num_tokens`` tokens (ceil division)."""
        return (num_tokens + self.block_size - 1) // self.block_size

    def _take_block(self) -> int:
        """A block for new tokens: an empty one if any, else evict the least recently used cached one."""
        if self.free_block_ids:
            block_id = self.free_block_ids.popleft()
        elif self.evictable:
            block_id, _ = self.evictable.popitem(last=False)
            block = self.blocks[block_id]
            del self.cached[block.block_hash]
            block.block_hash = None
        else:
            raise NoFreeBlocksError("out of KV-cache blocks")
        block = self.blocks[block_id]
        assert block.ref_count == 0, block
        block.ref_count = 1
        return block_id

    def _share_block(self, block_id: int) -> None:
        """One more user of a cached block (an evictable one leaves the free pool)."""
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self.evictable[block_id]
        block.ref_count += 1

    def _release_block(self, block_id: int) -> None:
        block = self.blocks[block_id]
        assert block.ref_count > 0, f"double free of {block}"
        block.ref_count -= 1
        if block.ref_count == 0:
            if block.block_hash is not None:
                self.evictable[block_id] = None  # most recently used: evicted last
            else:
                self.free_block_ids.append(block_id)

    # ---- prefix caching ------------------------------------------------------------------------
    def block_hashes(self, seq: Sequence) -> list[BlockHash]:
        """The chained hashes of ``seq``'s full blocks, extended to cover its tokens (kept on the
        sequence, so each block is hashed once in its life, preemptions included). A block whose
        tokens are not all known yet ends the list until they are."""
        hashes, bs = seq.block_hashes, self.block_size
        for i in range(len(hashes), seq.num_tokens // bs):
            tokens = seq.token_ids[i * bs : (i + 1) * bs]
            if min(tokens) < 0:  # a placeholder of a step in flight (async scheduling): hashed once known
                break
            hashes.append(hash_block_tokens(hashes[-1] if hashes else None, tokens))
        return hashes

    def get_computed_blocks(self, seq: Sequence) -> tuple[list[int], int]:
        """The longest run of ``seq``'s leading full blocks already in the cache, and the number
        of tokens they hold. At least one token is always left to compute (the step needs its
        logits), so a fully cached sequence recomputes its last block. Counted in the hit rate."""
        if not self.enable_prefix_caching:
            return [], 0
        hits: list[int] = []
        max_blocks = (seq.num_tokens - 1) // self.block_size
        for block_hash in self.block_hashes(seq)[:max_blocks]:
            block_id = self.cached.get(block_hash)
            if block_id is None:
                break
            hits.append(block_id)
        self.num_queries += seq.num_tokens
        self.num_hits += len(hits) * self.block_size
        return hits, len(hits) * self.block_size

    def cache_full_blocks(self, seq: Sequence, num_tokens: int) -> None:
        """Publish ``seq``'s full blocks among its first ``num_tokens`` tokens (computed, or
        being computed by the step now scheduled). A block whose hash is already cached by
        another block (two sequences computed the same prefix at once) stays private."""
        num_full = num_tokens // self.block_size
        if not self.enable_prefix_caching or num_full <= seq.num_published_blocks:
            return  # (most decode steps fill no block)
        hashes = self.block_hashes(seq)
        num_full = min(num_full, len(hashes))  # (a block holding a placeholder waits for a later step)
        for i in range(seq.num_published_blocks, num_full):
            block = self.blocks[seq.block_table[i]]
            if block.block_hash is None and hashes[i] not in self.cached:
                block.block_hash = hashes[i]
                self.cached[hashes[i]] = block.block_id
        seq.num_published_blocks = max(seq.num_published_blocks, num_full)

    # ---- allocation ----------------------------------------------------------------------------
    def can_allocate_slots(self, seq: Sequence, num_new_tokens: int, computed_blocks: SequenceLike[int] = ()) -> bool:
        """Could :meth:`allocate_slots` succeed now?"""
        return self._new_blocks_needed(seq, num_new_tokens, computed_blocks) <= self.num_free_blocks - sum(
            1 for b in computed_blocks if self.blocks[b].ref_count == 0  # sharing them takes them off the free pool
        )

    def allocate_slots(self, seq: Sequence, num_new_tokens: int, computed_blocks: SequenceLike[int] = ()) -> bool:
        """Make ``seq``'s block table cover ``num_new_tokens`` more tokens than it has computed.

        A waiting sequence (empty table) may bring ``computed_blocks`` from
        :meth:`get_computed_blocks`: they start its table, shared, and ``num_new_tokens``
        count from their end. Returns False, changing nothing, when the free blocks do not
        suffice; the caller then waits or preempts."""
        if not computed_blocks and seq.num_computed_tokens + num_new_tokens <= len(seq.block_table) * self.block_size:
            return True  # the table already covers them (most decode steps)
        if computed_blocks and seq.block_table:
            raise ValueError(f"{seq.request_id}: cached blocks can only start an empty block table")
        if not self.can_allocate_slots(seq, num_new_tokens, computed_blocks):
            return False
        num_new_blocks = self._new_blocks_needed(seq, num_new_tokens, computed_blocks)
        for block_id in computed_blocks:
            self._share_block(block_id)
        seq.block_table.extend(computed_blocks)
        for _ in range(num_new_blocks):
            seq.block_table.append(self._take_block())
        if computed_blocks:
            seq.num_published_blocks = len(computed_blocks)  # they are in the cache already
        return True

    def _new_blocks_needed(self, seq: Sequence, num_new_tokens: int, computed_blocks: SequenceLike[int]) -> int:
        end = seq.num_computed_tokens + len(computed_blocks) * self.block_size + num_new_tokens
        return max(0, self.blocks_needed(end) - len(seq.block_table) - len(computed_blocks))

    # ---- finish / preempt ------------------------------------------------------------------------
    def free(self, seq: Sequence) -> None:
        """Drop ``seq``'s references to its blocks and clear its table. Last block first: the
        tail of a sequence is the part least likely to be shared, so it is evicted first."""
        for block_id in reversed(seq.block_table):
            self._release_block(block_id)
        seq.block_table = []
        seq.num_published_blocks = 0

    def check_invariants(self) -> None:
        """For tests: every block is in exactly one state, and the hash map agrees with the blocks."""
        free = set(self.free_block_ids)
        assert len(free) == len(self.free_block_ids), "a block is on the free list twice"
        assert free.isdisjoint(self.evictable), "a block is both free and evictable"
        for block in self.blocks:
            assert block.ref_count >= 0
            assert (block.ref_count == 0) == (block.block_id in free or block.block_id in self.evictable), block
            if block.block_hash is None:
                assert block.block_id not in self.evictable, block
            else:
                assert self.cached.get(block.block_hash) == block.block_id, block
                assert block.block_id not in free, block
        assert len(self.cached) == sum(b.block_hash is not None for b in self.blocks)
