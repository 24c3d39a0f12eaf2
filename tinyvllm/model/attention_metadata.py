"""AttentionMetadata: what every attention layer needs to know about the batch.

The model runs a flat batch of ``T`` new tokens drawn from ``S`` sequences
(token-major, no padding). Every layer's attention needs the same bookkeeping to
find its keys and values in the paged KV cache, so the ModelRunner builds it once
per step, on the device, and passes it down:

* where to WRITE each new token's k/v: ``slot_mapping`` (slot = block * block_size + offset);
* where to READ each sequence's k/v: ``block_tables`` and ``seq_lens`` (tokens cached
  after this step's write, i.e. including the new ones);
* for prefill, which query rows belong to which sequence: ``cu_seqlens_q``, and which
  row is each sequence's last token (the only one whose logits are needed).

Decode (every sequence has exactly one new token, row ``s`` is sequence ``s``) needs no
``cu_seqlens_q`` and no ``logits_indices``. All tensors live on the model's device; the
plain ints (``max_seqlen_q``, ``sum_seq_lens``) are known on the host, so nothing here
forces a sync.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AttentionMetadata:
    is_prefill: bool  # True: prefill_attention (any number of new tokens per sequence); False: paged decode
    slot_mapping: torch.Tensor  # [T] int64: cache slot of each new token (-1 = do not write)
    block_tables: torch.Tensor  # [S, max_blocks] int32: physical block of each logical block (padded with 0)
    seq_lens: torch.Tensor  # [S] int32: cached tokens per sequence, INCLUDING this step's
    max_seqlen_q: int  # longest run of new tokens (1 for decode): a launch-size hint
    cu_seqlens_q: torch.Tensor | None = None  # [S+1] int32: sequence s owns rows cu[s]..cu[s+1]-1 (prefill)
    # [S (+P)] int64 (prefill): the row of each sequence's last token, then any prompt-logprob rows
    logits_indices: torch.Tensor | None = None
    sum_seq_lens: int | None = None  # sum of seq_lens, known on the host: a hint for the decode kernel's plan

    @property
    def is_decode(self) -> bool:
        return not self.is_prefill

    @property
    def num_seqs(self) -> int:
        return self.seq_lens.shape[0]


def flatten_block_tables(tables: list[list[int]], width: int) -> list[int]:
    """Block tables row-major, each padded with block 0 to ``width`` entries: the block-table part
    of a prefill step's packed inputs (decode steps keep theirs between steps:
    tinyvllm/engine/input_batch.py). Extending one list is several times faster than a nested
    comprehension."""
    flat: list[int] = []
    for table in tables:
        flat += table
        flat += [0] * (width - len(table))
    return flat


def unpack_decode_inputs(packed: torch.Tensor, num_seqs: int, max_blocks: int, sum_seq_lens: int | None
                         ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
    """A decode step's inputs packed as one int64 device tensor [ids | positions | slots |
    seq_lens | block_tables] (what the runner copies in one piece, and what a CUDA graph reads
    from its static buffer) as (input_ids, positions, AttentionMetadata); the int32 views the
    attention kernels read are made here. ``sum_seq_lens`` None: not known (a graph's capture)."""
    S = num_seqs
    ids, positions, slots, lens, tables = torch.split(packed, [S, S, S, S, S * max_blocks])
    attn = AttentionMetadata(
        is_prefill=False,
        slot_mapping=slots,
        block_tables=tables.view(S, max_blocks).to(torch.int32),
        seq_lens=lens.to(torch.int32),
        max_seqlen_q=1,
        sum_seq_lens=sum_seq_lens,
    )
    return ids, positions, attn
