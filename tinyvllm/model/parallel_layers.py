"""Megatron-style tensor-parallel layers (vLLM's names): each rank holds a slice of a weight.

A linear layer ``Y = X W^T`` (W is [out, in]) splits across N ranks in two ways:

    ColumnParallelLinear   rank r holds the rows W[out_r, :]  -> computes Y[:, out_r]     (no communication)
    RowParallelLinear      rank r holds the cols W[:, in_r]   -> computes X[:, in_r] W[:, in_r]^T, a partial
                           sum of the whole Y; an all-reduce adds the N partial sums     (one all-reduce)

Chained, column then row, the pair needs ONE all-reduce: the column layer's output slice is
exactly the row layer's input slice, and whatever sits between them acts on each slice alone
(attention per head; SiLU(gate) * up per intermediate column). So a decoder layer is
QKV (column, by heads) -> attention -> o_proj (row) -> all-reduce, and gate_up (column, by
intermediate columns) -> SiLU-and-mul -> down (row) -> all-reduce: two all-reduces per layer.

The fused weights keep the model's layouts, per rank: qkv_proj is [q_r | k_r | v_r] (this rank's
query heads, then its KV heads), gate_up_proj is [gate_r | up_r]; the loader slices each
checkpoint tensor (tinyvllm/model/weight_sharding.py) and the model fuses the slices.

The vocabulary splits too: VocabParallelEmbedding holds rows [start, end) of the table (padded to
ceil(V / N) rows so that every rank's slice has the same shape), looks up the ids it owns, writes
zeros for the others, and an all-reduce assembles the embeddings; ParallelLMHead computes this
rank's slice of the logits and gathers them to rank 0, where the sampler lives.

With tp_size = 1 every layer is the plain op it replaces: no masking, no communication.
"""

from __future__ import annotations

import torch

from tinyvllm import ops
from tinyvllm.distributed.communication_op import tensor_model_parallel_all_reduce, tensor_model_parallel_gather


def vocab_range(vocab_size: int, rank: int, tp_size: int) -> tuple[int, int, int]:
    """(start, end, rows per rank): rank r owns token ids [start, end) and pads its slice to ``rows``."""
    rows = -(-vocab_size // tp_size)
    start = min(vocab_size, rank * rows)
    return start, min(vocab_size, start + rows), rows


class ColumnParallelLinear:
    """``y = x @ weight^T + bias`` where weight/bias are this rank's output rows (QKV by heads,
    gate/up by intermediate columns): y is this rank's slice of the output, with no communication."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        self.weight = weight  # [out / N, in]
        self.bias = bias  # [out / N] or None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = ops.linear(x, self.weight)
        if self.bias is not None:
            y += self.bias
        return y


class RowParallelLinear:
    """``y = all_reduce(x_r @ weight_r^T) + bias``: weight is this rank's input columns, x_r the
    matching slice of the input (the column layer's output); the bias is added once, after the sum."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, tp_size: int = 1) -> None:
        self.weight = weight  # [out, in / N]
        self.bias = bias  # [out] (whole, replicated) or None
        self.tp_size = tp_size

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = ops.linear(x, self.weight)
        if self.tp_size > 1:
            tensor_model_parallel_all_reduce(y)
        if self.bias is not None:
            y += self.bias
        return y


class VocabParallelEmbedding:
    """Rows [start, end) of the embedding table; ``__call__(ids)`` returns the whole embeddings."""

    def __init__(self, weight: torch.Tensor, vocab_size: int, rank: int = 0, tp_size: int = 1) -> None:
        self.tp_size = tp_size
        self.start, self.end, rows = vocab_range(vocab_size, rank, tp_size)
        if weight.shape[0] != self.end - self.start:
            raise ValueError(f"embedding slice has {weight.shape[0]} rows, rank {rank} owns {self.end - self.start}")
        if tp_size > 1 and weight.shape[0] < rows:  # same shape on every rank: the lm_head's gather needs it
            weight = torch.cat([weight, weight.new_zeros(rows - weight.shape[0], weight.shape[1])])
        self.weight = weight  # [ceil(V / N), hidden] (tp_size 1: [V, hidden])

    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return ops.embedding(input_ids, self.weight)
        local = input_ids - self.start
        foreign = (local < 0) | (local >= self.end - self.start)  # another rank's tokens
        x = ops.embedding(local.masked_fill(foreign, 0), self.weight)
        x.masked_fill_(foreign.unsqueeze(-1), 0)
        return tensor_model_parallel_all_reduce(x)


class ParallelLMHead:
    """The output projection over this rank's vocabulary rows (the embedding's own, when tied);
    ``compute_logits`` returns float32 [N, vocab] on rank 0 and None on the others."""

    def __init__(self, weight: torch.Tensor, vocab_size: int, tp_size: int = 1) -> None:
        self.weight = weight  # [ceil(V / N), hidden], padded like VocabParallelEmbedding's
        self.vocab_size = vocab_size
        self.tp_size = tp_size

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        logits = ops.linear(hidden, self.weight)
        if self.tp_size > 1:
            logits = tensor_model_parallel_gather(logits, dst=0, dim=-1)  # [N, N_ranks * ceil(V / N)] on rank 0
            if logits is None:
                return None
            logits = logits[:, : self.vocab_size]  # drop the padding rows' logits
        return logits.float()
