"""BlockManager: hands out fixed-size KV-cache blocks and takes them back.

The KV cache is one big array of ``num_blocks`` blocks, each holding the keys and
values of ``block_size`` consecutive tokens of one sequence (per layer:
``[num_blocks, num_kv_heads, block_size, head_dim]``). A sequence owns a *block
table*: ``block_table[i]`` is the physical block holding its tokens
``i*block_size .. (i+1)*block_size - 1``. Blocks need not be contiguous, so a
sequence grows one block at a time and frees everything at once when it ends:
no fragmentation, no up-front reservation of ``max_model_len`` slots.

Every block carries a reference count. Today each block has exactly one owner
(ref_count 0 or 1), but the counts are what prefix caching needs later: blocks
whose content hash (a hash of their tokens chained with the previous block's
hash) matches can be shared by several sequences, and a block returns to the
free list only when its last user lets go. ``Block.hash`` is kept for that.
"""

from __future__ import annotations

from collections import deque

from tinyvllm.engine.sequence import Sequence


class Block:
    __slots__ = ("block_id", "ref_count", "hash")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_count = 0
        self.hash = -1  # content hash for prefix caching (unused yet)

    def __repr__(self) -> str:
        return f"Block(id={self.block_id}, ref={self.ref_count})"


class NoFreeBlocksError(RuntimeError):
    pass


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be at least 1, got {num_blocks}.")
        if block_size < 1:
            raise ValueError(f"block_size must be at least 1, got {block_size}.")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_block_ids: deque[int] = deque(range(num_blocks))

    # ---- bookkeeping -------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self.free_block_ids)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self.free_block_ids)

    def blocks_needed(self, num_tokens: int) -> int:
        """Blocks that hold ``num_tokens`` tokens (ceil division)."""
        return (num_tokens + self.block_size - 1) // self.block_size

    def _take_block(self) -> int:
        if not self.free_block_ids:
            raise NoFreeBlocksError("out of KV-cache blocks")
        block_id = self.free_block_ids.popleft()
        block = self.blocks[block_id]
        assert block.ref_count == 0, block
        block.ref_count = 1
        block.hash = -1
        return block_id

    def _release_block(self, block_id: int) -> None:
        block = self.blocks[block_id]
        assert block.ref_count > 0, f"double free of {block}"
        block.ref_count -= 1
        if block.ref_count == 0:
            self.free_block_ids.append(block_id)

    # ---- prefill: blocks for a whole sequence ---------------------------------------
    def can_allocate(self, seq: Sequence) -> bool:
        """Are there enough free blocks to hold all of ``seq.token_ids``?"""
        return self.blocks_needed(seq.num_tokens) - len(seq.block_table) <= self.num_free_blocks

    def allocate(self, seq: Sequence) -> None:
        """Give ``seq`` blocks covering all its tokens (a fresh or a preempted sequence)."""
        assert not seq.block_table, f"{seq.request_id} already holds blocks"
        needed = self.blocks_needed(seq.num_tokens)
        if needed > self.num_free_blocks:
            raise NoFreeBlocksError(f"{seq.request_id} needs {needed} blocks, {self.num_free_blocks} free")
        seq.block_table = [self._take_block() for _ in range(needed)]

    # ---- decode: one more slot -------------------------------------------------------
    def can_append(self, seq: Sequence) -> bool:
        """Can the block table be made to cover ``seq.num_tokens`` (at most one new block)?"""
        return self.blocks_needed(seq.num_tokens) <= len(seq.block_table) or self.num_free_blocks > 0

    def append_slot(self, seq: Sequence) -> None:
        """Grow ``seq.block_table`` so it covers ``seq.num_tokens`` tokens."""
        while len(seq.block_table) < self.blocks_needed(seq.num_tokens):
            seq.block_table.append(self._take_block())

    # ---- finish / preempt --------------------------------------------------------------
    def free(self, seq: Sequence) -> None:
        """Drop ``seq``'s references to its blocks (last block first) and clear its table."""
        for block_id in reversed(seq.block_table):
            self._release_block(block_id)
        seq.block_table = []

    def check_invariants(self) -> None:
        """For tests: ref counts and the free list agree."""
        free = set(self.free_block_ids)
        assert len(free) == len(self.free_block_ids), "a block is on the free list twice"
        for block in self.blocks:
            assert block.ref_count >= 0
            assert (block.ref_count == 0) == (block.block_id in free), block
