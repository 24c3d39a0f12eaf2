"""InputBatch: a decode step's packed inputs, built with numpy from block tables kept between steps.

At batch 256 with 1,000-token contexts a decode step carries 256 block tables of 63 or more
entries: 16k integers. Flattening them from Python lists and converting the result every step
costs about a millisecond of host time, as much as the GPU's whole step. But a running sequence's
block table only ever grows, by one block every ``block_size`` tokens. So, as vLLM's InputBatch
does, each running sequence owns a row of one persistent array ``tables[rows, max_blocks]``; a step
writes only the blocks appended since the last one, gathers its sequences' rows with one fancy
index, and computes the slots from that array. The Python left per sequence is reading a few
integers.

The packed layout is the decode step's one host-to-device copy (tinyvllm/model/attention_metadata.py
``unpack_decode_inputs``), for ``bs`` rows (``n`` sequences, then padding) and ``width`` table entries:

    [ ids[bs] | positions[bs] | slots[bs] | seq_lens[bs] | block_tables[bs * width] ]

Padding rows are zero-length sequences whose slot is -1 (the cache write skips them), which is
what a CUDA graph captured for ``bs`` rows expects.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence as SequenceLike

import numpy as np

if TYPE_CHECKING:
    from tinyvllm.engine.sequence import Sequence


def check_span(seq: "Sequence", start: int, end: int, block_size: int) -> None:
    """The tokens start..end-1 of ``seq`` exist and its block table covers them (a ValueError naming it)."""
    rid = getattr(seq, "request_id", "?")
    if end <= start or start >= len(seq.token_ids):
        raise ValueError(f"sequence {rid} has no new token to compute")
    if end > len(seq.token_ids):
        raise ValueError(f"sequence {rid}: {end - start} tokens scheduled from position {start}, it has {len(seq.token_ids)}")
    if len(seq.block_table) * block_size < end:
        raise ValueError(f"sequence {rid}: block table covers {len(seq.block_table) * block_size} tokens, needs {end}")


class InputBatch:
    """Persistent block-table rows (one per running sequence) and the decode step's packed inputs."""

    def __init__(self, max_rows: int, max_blocks: int, block_size: int) -> None:
        self.block_size = block_size
        self.tables = np.zeros((max_rows, max(max_blocks, 1)), dtype=np.int64)  # entries past a row's length: 0
        self._len = [0] * max_rows  # blocks written in each row
        # Who holds each row: the sequence and the very list object its table was copied from. The
        # block manager appends to that list and replaces it when it frees the blocks (preemption,
        # finish), so "same list, longer" means "copy the new tail" and "another list" means "rewrite".
        # Holding the sequence also keeps its id() from being reused while the row is mapped.
        self._holder: list[tuple[object, list[int]] | None] = [None] * max_rows
        self._row_of: dict[int, int] = {}  # id(seq) -> row
        self._free = list(range(max_rows - 1, -1, -1))

    # ---- rows ----------------------------------------------------------------------------------
    def rows(self, seqs: SequenceLike["Sequence"]) -> tuple[list[int], int]:
        """Each sequence's row, its block table brought up to date; and the longest table's length."""
        rows = []
        for seq in seqs:
            row = self._row_of.get(id(seq))
            if row is None or self._holder[row][0] is not seq:
                row = self._assign(seq, seqs)
            table, held = seq.block_table, self._holder[row]
            n = self._len[row]
            if held[1] is not table or len(table) < n:  # a new table (freed and allocated again)
                self._write(row, table, 0)
                self._holder[row] = (seq, table)
            elif len(table) > n:  # blocks appended since the last step
                self._write(row, table, n)
            rows.append(row)
        return rows, max((self._len[r] for r in rows), default=0)

    def _assign(self, seq: "Sequence", batch: SequenceLike["Sequence"]) -> int:
        if not self._free:  # reclaim the rows of sequences not in this batch (they finished or wait)
            current = {id(s) for s in batch}
            for key, row in list(self._row_of.items()):
                if key not in current:
                    del self._row_of[key]
                    self._holder[row] = None
                    self._free.append(row)
            if not self._free:
                raise ValueError(f"a decode batch of more than {len(self._holder)} sequences (max_num_seqs)")
        row = self._free.pop()
        self._row_of[id(seq)] = row
        self._holder[row] = (seq, seq.block_table)
        self._write(row, seq.block_table, 0)
        return row

    def _write(self, row: int, table: list[int], start: int) -> None:
        """Entries ``start..`` of ``table`` into ``row``; zeros after them (where an older table was)."""
        n = len(table)
        if n > self.tables.shape[1]:  # longer than max_seq_len allows (a caller's own sequences): widen
            self.tables = np.pad(self.tables, ((0, 0), (0, n - self.tables.shape[1])))
        self.tables[row, start:n] = table[start:]
        if self._len[row] > n:
            self.tables[row, n : self._len[row]] = 0
        self._len[row] = n

    # ---- the step's inputs ---------------------------------------------------------------------
    def pack_decode(self, seqs: SequenceLike["Sequence"], rows: list[int], bs: int, width: int) -> np.ndarray:
        """The packed inputs of one new token per sequence (its ``num_computed_tokens``), ``bs`` rows
        (``bs >= len(seqs)``: padding after them) and ``width`` table entries (at least the longest
        table of ``rows``). A sequence with no token to compute, or a table too short, is a ValueError."""
        n, bsz = len(seqs), self.block_size
        pos = np.fromiter((s.num_computed_tokens for s in seqs), np.int64, n)
        num_tokens = np.fromiter((len(s.token_ids) for s in seqs), np.int64, n)
        rows_a = np.asarray(rows, dtype=np.int64)
        covered = np.asarray(self._len, dtype=np.int64)[rows_a] * bsz
        bad = np.flatnonzero((pos >= num_tokens) | (pos + 1 > covered))
        if bad.size:
            seq = seqs[int(bad[0])]
            check_span(seq, seq.num_computed_tokens, seq.num_computed_tokens + 1, bsz)
        packed = np.zeros(4 * bs + bs * width, dtype=np.int64)
        ids, positions, slots, lens = (packed[k * bs : k * bs + n] for k in range(4))
        tables = packed[4 * bs :].reshape(bs, width)
        ids[:] = [s.token_ids[s.num_computed_tokens] for s in seqs]
        positions[:] = pos
        w = min(width, self.tables.shape[1])
        tables[:n, :w] = self.tables[rows_a, :w]
        slots[:] = tables[np.arange(n), pos // bsz] * bsz + pos % bsz
        packed[2 * bs + n : 3 * bs] = -1  # padding rows write nothing
        lens[:] = pos + 1
        return packed
