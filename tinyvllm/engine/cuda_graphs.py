"""DecodeGraphs: the whole decode step (embedding to logits) captured once per shape, replayed.

A batch-1 decode step of a 1B model launches about 150 small kernels. Launched one by one
from Python, each costs several microseconds of CPU time, and together they take longer
than the GPU needs to read the weights. A CUDA graph records the launches once and replays
them with one call: the GPU then runs them back to back.

A graph replays exactly what it recorded: the same kernels, grids and memory addresses.
So the step's inputs live in STATIC buffers that every replay reads, and each step writes
its new inputs into them (one host-to-device copy), then replays. What varies is handled
by capturing several graphs:

* the batch size: graphs for a ladder of sizes (1, 2, 4, 8, then every 16 up to
  ``max_num_seqs``); a batch is padded up to the next one. A padded row has slot -1 (its
  k/v are not written), length 0 (its attention output is 0) and its logits are dropped.
* the block tables' width, which sets the decode attention's plan (how many blocks split
  each context; chosen on the host at capture time and kept by the graph, course chapter
  11): graphs for a few context buckets (``CONTEXT_BUCKETS`` tokens, up to the longest
  sequence the cache holds); a batch takes the smallest bucket that holds its longest
  sequence. A plan made for a wider table stays correct for shorter contexts, only slower.

The static inputs are ONE int64 buffer laid out [ids | positions | slots | seq_lens |
block_tables] for the graph's (batch, width), so one copy fills it; the int32 views the
attention kernels read are made inside the graph. The graphs end at the final norm and
leave the hidden states in one static output buffer; the lm_head runs after the replay
(one GEMM launch), so that no graph keeps a [batch, vocab] logits tensor of its own. All
graphs share one memory pool and the two buffers, and are captured largest first
(nano-vllm's order, so the smaller ones fit in what the larger ones freed).

``capture=False`` runs the same static-buffer path eagerly (no graph): the CPU tests use it
to check the padding and the buffers against the plain eager step.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Callable

import torch

from tinyvllm.model.attention_metadata import unpack_decode_inputs

if TYPE_CHECKING:
    from tinyvllm.model.llama import KVCache, LlamaForCausalLM

logger = logging.getLogger("tinyvllm")

CONTEXT_BUCKETS = (512, 4096, 32768)  # tokens; the cache's longest sequence is always a bucket too


def batch_sizes(max_num_seqs: int) -> list[int]:
    """The captured batch sizes: 1, 2, 4, 8, then every 16, up to and including max_num_seqs."""
    sizes = [s for s in (1, 2, 4, 8) if s < max_num_seqs] + list(range(16, max_num_seqs, 16))
    return sizes + [max_num_seqs]


def context_buckets(max_seq_len: int, block_size: int, buckets: tuple[int, ...] = CONTEXT_BUCKETS) -> list[int]:
    """The captured block-table widths, in blocks: the buckets below max_seq_len, then max_seq_len."""
    tokens = [t for t in buckets if t < max_seq_len] + [max_seq_len]
    return sorted({-(-t // block_size) for t in tokens})


class DecodeGraphs:
    """Static decode inputs and one decode step per (batch size, table width), captured or eager."""

    @torch.no_grad()
    def __init__(self, model: "LlamaForCausalLM", kv_caches: list["KVCache"], *, max_num_seqs: int,
                 max_seq_len: int, block_size: int, capture: bool,
                 buckets: tuple[int, ...] = CONTEXT_BUCKETS) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.sizes = batch_sizes(max_num_seqs)
        self.widths = context_buckets(max_seq_len, block_size, buckets)
        device = model.device
        self.inputs = torch.zeros(4 * self.sizes[-1] + self.sizes[-1] * self.widths[-1], dtype=torch.int64,
                                  device=device)
        self.hidden = torch.zeros(self.sizes[-1], model.hidden_size, dtype=model.dtype, device=device)
        self.steps: dict[tuple[int, int], Callable[[], None]] = {}
        t0 = time.perf_counter()
        pool = torch.cuda.graph_pool_handle() if capture else None
        if capture:  # (a capture empties the allocator's cache first: empty it now, or that looks like a gain)
            torch.cuda.empty_cache()
        free0 = torch.cuda.mem_get_info(device)[0] if capture else 0
        for bs in reversed(self.sizes):
            for width in reversed(self.widths):
                self.steps[(bs, width)] = self._capture(bs, width, pool) if capture else self._eager(bs, width)
        self.memory_bytes = 0
        if capture:
            torch.cuda.synchronize(device)
            self.memory_bytes = free0 - torch.cuda.mem_get_info(device)[0]  # the pool, cuBLAS's workspace, the graphs
            logger.info(
                "tinyvllm: captured %d decode CUDA graphs (batch %s x contexts up to %s tokens) in %.1f s, %.0f MiB",
                len(self.steps), self.sizes, [w * block_size for w in self.widths], time.perf_counter() - t0,
                self.memory_bytes / 2**20,
            )

    # ---- shapes ---------------------------------------------------------------------------
    def shape_for(self, num_seqs: int, num_blocks: int) -> tuple[int, int] | None:
        """The (batch size, width) whose graph runs this batch, or None (too large: run eagerly)."""
        bs = next((s for s in self.sizes if s >= num_seqs), None)
        width = next((w for w in self.widths if w >= num_blocks), None)
        return None if bs is None or width is None else (bs, width)

    def views(self, bs: int, width: int) -> tuple[torch.Tensor, ...]:
        """The static buffer's pieces for a (bs, width) step: ids, positions, slots, seq_lens [bs],
        block_tables [bs * width] (int64)."""
        pieces = torch.split(self.inputs[: bs * (4 + width)], [bs, bs, bs, bs, bs * width])
        return tuple(pieces)

    # ---- one step ---------------------------------------------------------------------------
    def _forward(self, bs: int, width: int) -> None:
        """The decode step over the static inputs, up to the final norm, into ``self.hidden[:bs]``."""
        # (sum_seq_lens not known at capture: the plan must hold for any lengths)
        ids, positions, attn = unpack_decode_inputs(self.inputs[: bs * (4 + width)], bs, width, None)
        self.hidden[:bs].copy_(self.model.forward(ids, positions, self.kv_caches, attn))

    def _eager(self, bs: int, width: int) -> Callable[[], None]:
        return lambda: self._forward(bs, width)

    def _capture(self, bs: int, width: int, pool) -> Callable[[], None]:
        # One eager run first: it allocates what the kernels allocate on first use (the error
        # flags, cuBLAS's workspace) and settles the decode plan's one-time queries, none of
        # which may happen inside a capture. The inputs: every row a zero-length sequence
        # (its attention output is 0) whose slot is -1 (the cache is not written).
        self.inputs[: bs * (4 + width)].zero_()
        self.views(bs, width)[2].fill_(-1)
        self._forward(bs, width)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            self._forward(bs, width)
        return graph.replay

    def replay(self, bs: int, width: int, n: int) -> torch.Tensor | None:
        """Replay the (bs, width) graph over the static inputs as they are (the ModelRunner has
        copied a step's packed inputs, padded to this shape, into ``inputs``; tinyvllm/engine/input_batch.py);
        the logits of the first ``n`` rows (None on a tensor-parallel rank other than 0, whose
        logits went to rank 0)."""
        self.steps[(bs, width)]()
        return self.model.compute_logits(self.hidden[:n])
