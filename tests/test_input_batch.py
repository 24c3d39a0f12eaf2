"""InputBatch: the decode step's packed inputs from persistent block-table rows equal the ones built
from the sequences' lists, step after step, while tables grow, are freed and reallocated, and rows
pass from finished sequences to new ones."""

from __future__ import annotations

import random

import numpy as np
import pytest

from tinyvllm import SamplingParams
from tinyvllm.engine.input_batch import InputBatch
from tinyvllm.engine.sequence import Sequence

BS = 4  # block size


def reference_pack(seqs: list[Sequence], bs: int, width: int) -> list[int]:
    """The packed layout built from the lists, padding rows as the CUDA graphs want them."""
    n = len(seqs)
    pad = bs - n
    pos = [s.num_computed_tokens for s in seqs]
    ids = [s.token_ids[p] for s, p in zip(seqs, pos)]
    slots = [s.block_table[p // BS] * BS + p % BS for s, p in zip(seqs, pos)]
    tables = [b for s in seqs for b in s.block_table + [0] * (width - len(s.block_table))]
    return (ids + [0] * pad + pos + [0] * pad + slots + [-1] * pad + [p + 1 for p in pos] + [0] * pad
            + tables + [0] * (pad * width))  # fmt: skip


def test_packed_inputs_follow_growing_freed_and_new_sequences():
    rng = random.Random(0)
    batch = InputBatch(max_rows=6, max_blocks=40, block_size=BS)
    free_blocks = list(range(1, 500))
    rng.shuffle(free_blocks)
    running: list[Sequence] = []
    made = 0
    for step in range(300):
        while len(running) < 6 and rng.random() < 0.5:  # new sequences take the rows of finished ones
            n = rng.randrange(1, 30)
            seq = Sequence(f"r{made}", [rng.randrange(1000) for _ in range(n)], SamplingParams())
            seq.block_table = [free_blocks.pop() for _ in range(-(-n // BS))]
            seq.num_computed_tokens = n - 1
            running.append(seq)
            made += 1
        for seq in running:
            if rng.random() < 0.05:  # preempted and admitted again: a new table in a new list
                free_blocks += seq.block_table
                seq.block_table = [free_blocks.pop(0) for _ in range(-(-seq.num_tokens // BS))]
        step_seqs = rng.sample(running, rng.randrange(1, len(running) + 1)) if running else []
        if step_seqs:
            rows, max_blocks = batch.rows(step_seqs)
            assert max_blocks == max(len(s.block_table) for s in step_seqs)
            for bs, width in ((len(step_seqs), max_blocks), (8, 40)):  # exact, and padded as a graph's
                packed = batch.pack_decode(step_seqs, rows, bs, width)
                assert packed.dtype == np.int64
                assert packed.tolist() == reference_pack(step_seqs, bs, width), step
        for seq in list(running):  # every running sequence gets its token; some finish
            seq.append_token(rng.randrange(1000))
            seq.num_computed_tokens += 1
            if seq.num_tokens > len(seq.block_table) * BS:
                seq.block_table.append(free_blocks.pop())
            if rng.random() < 0.08 or seq.num_tokens >= 40 * BS:
                free_blocks += seq.block_table
                seq.block_table = []
                running.remove(seq)
    assert made > 20  # rows were reclaimed many times over


def test_a_bad_decode_batch_names_the_sequence():
    batch = InputBatch(max_rows=2, max_blocks=4, block_size=BS)
    done = Sequence("done", [1, 2, 3], SamplingParams(), num_computed_tokens=3, block_table=[0])
    rows, _ = batch.rows([done])
    with pytest.raises(ValueError, match="sequence done has no new token"):
        batch.pack_decode([done], rows, 1, 1)
    short = Sequence("short", [1] * 6, SamplingParams(), num_computed_tokens=5, block_table=[0])
    rows, _ = batch.rows([short])
    with pytest.raises(ValueError, match="sequence short: block table covers 4 tokens, needs 6"):
        batch.pack_decode([short], rows, 1, 1)
    three = [Sequence(str(i), [1, 2], SamplingParams(), num_computed_tokens=1, block_table=[i]) for i in range(3)]
    with pytest.raises(ValueError, match="more than 2 sequences"):
        batch.rows(three)
