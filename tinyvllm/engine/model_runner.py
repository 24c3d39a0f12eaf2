"""ModelRunner: turns a batch of Sequences into one forward pass and its logits.

It owns the model and the paged KV cache (one key and one value tensor per layer,
``[num_blocks, num_kv_heads, block_size, head_dim]``). Each step it:

1. flattens the new tokens of every sequence into one token-major batch and builds
   the AttentionMetadata (slots to write, block tables to read, lengths);
2. sends all of those integers to the device in ONE host-to-device copy from a
   pinned buffer (small copies cost ~10 us each, and a decode step is ~1 ms);
3. runs the model, and the lm_head only on each sequence's last token (a prompt
   of 1,000 tokens needs one row of logits, not 1,000 x 128,256 floats).

The step is a *decode* when every sequence brings exactly one new token (the
common case under continuous batching, and the one CUDA graphs will capture);
anything else (prompts, chunked prefill, a mix) runs as a *prefill*, whose
attention handles cached prefixes, so mixed batches are correct too.

It only reads the sequences (``token_ids``, ``num_computed_tokens``, ``block_table``);
the scheduler allocates blocks and advances ``num_computed_tokens``.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Sequence as SequenceLike

import torch

from tinyvllm.model.attention_metadata import AttentionMetadata
from tinyvllm.model.llama import LlamaForCausalLM

if TYPE_CHECKING:
    from tinyvllm.engine.sequence import Sequence

# On CPU there is no memory to measure and the reference ops are slow: a KV cache
# for a few full-length sequences, capped at this many bytes, is plenty.
CPU_KV_CACHE_BYTES = 1 << 30
CPU_MAX_SEQS = 4
DEFAULT_CPU_MAX_MODEL_LEN = 4096


def kv_cache_bytes_per_block(config, block_size: int, dtype: torch.dtype) -> int:
    """Bytes of one block of KV cache across all layers (keys and values)."""
    head_dim = config.head_dim  # ModelConfig resolves an implied head_dim
    itemsize = torch.empty((), dtype=dtype).element_size()
    return 2 * config.num_hidden_layers * config.num_key_value_heads * block_size * head_dim * itemsize


def activation_bytes(config, dtype: torch.dtype, max_num_batched_tokens: int, max_num_seqs: int) -> int:
    """A generous estimate of the largest step's activations (prefill of max_num_batched_tokens).

    Per token, alive at the peak of a layer: x, residual, qkv, attention output, o_proj output,
    gate_up, silu_and_mul output (in dtype); plus float32 logits (and their dtype copy) per sequence.
    Doubled for the allocator's slack and the kernels' workspaces.
    """
    head_dim = config.head_dim  # ModelConfig resolves an implied head_dim
    itemsize = torch.empty((), dtype=dtype).element_size()
    per_token = (
        3 * config.hidden_size
        + (config.num_attention_heads + 2 * config.num_key_value_heads) * head_dim
        + config.num_attention_heads * head_dim
        + 3 * config.intermediate_size
    ) * itemsize
    logits = max_num_seqs * config.vocab_size * (4 + itemsize)
    return 2 * (max_num_batched_tokens * per_token + logits)


def determine_num_blocks(
    config,
    *,
    block_size: int,
    dtype: torch.dtype,
    device: torch.device | str,
    gpu_memory_utilization: float = 0.9,
    max_model_len: int | None = None,
    max_num_batched_tokens: int = 8192,
    max_num_seqs: int = 256,
) -> int:
    """How many KV-cache blocks to allocate.

    GPU: call this AFTER the weights are on the device. The budget is
    ``gpu_memory_utilization * free memory`` minus an activation reserve
    (:func:`activation_bytes`); every remaining byte becomes KV cache.
    CPU: enough blocks for CPU_MAX_SEQS sequences of max_model_len tokens (default 4096),
    capped at CPU_KV_CACHE_BYTES.
    """
    device = torch.device(device)
    per_block = kv_cache_bytes_per_block(config, block_size, dtype)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        free, _total = torch.cuda.mem_get_info(device)
        budget = int(gpu_memory_utilization * free) - activation_bytes(
            config, dtype, max_num_batched_tokens, max_num_seqs
        )
        num_blocks = budget // per_block
    else:
        blocks_per_seq = math.ceil((max_model_len or DEFAULT_CPU_MAX_MODEL_LEN) / block_size)
        num_blocks = min(CPU_MAX_SEQS * blocks_per_seq, CPU_KV_CACHE_BYTES // per_block)
    if max_model_len is not None and num_blocks < math.ceil(max_model_len / block_size):
        raise ValueError(
            f"the KV cache fits {num_blocks} blocks of {block_size} tokens, fewer than one sequence of "
            f"max_model_len={max_model_len} needs: lower max_model_len or raise gpu_memory_utilization"
        )
    if num_blocks <= 0:
        raise ValueError("no memory left for the KV cache")
    return int(num_blocks)


def decode_longest_first_min_seqs(num_kv_heads: int, num_sms: int) -> int:
    """The smallest decode batch worth ordering longest first: two attention blocks per SM
    (one block per sequence and kv head). See ``ModelRunner.decode_longest_first_min_seqs``."""
    return -(-2 * num_sms // num_kv_heads)


def _slots(block_table: list[int], start: int, end: int, block_size: int) -> list[int]:
    """Cache slots of positions start..end-1: block_table[p // bs] * bs + p % bs, one range per block."""
    slots: list[int] = []
    p = start
    while p < end:
        logical = p // block_size
        stop = min(end, (logical + 1) * block_size)
        shift = (block_table[logical] - logical) * block_size  # slot = p + shift within this block
        slots.extend(range(p + shift, stop + shift))
        p = stop
    return slots


class ModelRunner:
    """Owns the model and its paged KV cache; ``execute(seqs)`` runs one step.

    ``num_blocks=None`` sizes the cache from memory (see :func:`determine_num_blocks`);
    read the result from ``runner.num_blocks`` to build the BlockManager.
    """

    def __init__(
        self,
        config,
        weights: dict[str, torch.Tensor],
        *,
        dtype: torch.dtype,
        device: torch.device | str,
        block_size: int = 16,
        num_blocks: int | None = None,
        gpu_memory_utilization: float = 0.9,
        max_model_len: int | None = None,
        max_num_batched_tokens: int = 8192,
        max_num_seqs: int = 256,
    ) -> None:
        self.config = config
        self.dtype = dtype
        self.device = torch.device(device)
        self.block_size = block_size
        max_position = max(max_model_len or 0, config.max_position_embeddings)
        self.model = LlamaForCausalLM(config, weights, dtype, self.device, max_position=max_position)

        if num_blocks is None:
            num_blocks = determine_num_blocks(
                config,
                block_size=block_size,
                dtype=dtype,
                device=self.device,
                gpu_memory_utilization=gpu_memory_utilization,
                max_model_len=max_model_len,
                max_num_batched_tokens=max_num_batched_tokens,
                max_num_seqs=max_num_seqs,
            )
        self.num_blocks = num_blocks
        m = self.model
        shape = (num_blocks, m.num_kv_heads, block_size, m.head_dim)
        self.kv_caches: list[tuple[torch.Tensor, torch.Tensor]] = [
            (torch.zeros(shape, dtype=dtype, device=self.device), torch.zeros(shape, dtype=dtype, device=self.device))
            for _ in range(m.num_layers)
        ]

        # Decode batches at least this large go to the model longest sequence first (the
        # scheduler orders them; None: never). The attention kernel's blocks reach the SMs
        # in batch order, so past about two blocks per SM the long ones should start first.
        # Below that, a batch runs as one wave of wide blocks, one per SM, where the order
        # only decides which SMs take the long ones, and longest first puts them side by
        # side: measured on an H200, batch 16 was up to 19% SLOWER longest first, batch
        # 48-256 up to 16% faster (bench/results/h200-2026-11-27-decode-gap/, section 7).
        self.decode_longest_first_min_seqs: int | None = None
        if self.device.type == "cuda":
            sms = torch.cuda.get_device_properties(self.device).multi_processor_count
            self.decode_longest_first_min_seqs = decode_longest_first_min_seqs(m.num_kv_heads, sms)

        # The host side of the one host-to-device copy per step (pinned, so the copy is async).
        self._pinned = self.device.type == "cuda"
        self._host_buf = torch.empty(0, dtype=torch.int64)
        self._copy_done: torch.cuda.Event | None = None

    # ---- inputs -------------------------------------------------------------------------

    def _to_device(self, values: list[int]) -> torch.Tensor:
        """One int64 host-to-device copy of ``values``, from a reused pinned buffer on CUDA."""
        host = torch.tensor(values, dtype=torch.int64)
        if not self._pinned:
            return host.to(self.device)
        if self._host_buf.numel() < host.numel():
            self._host_buf = torch.empty(max(host.numel(), 2 * self._host_buf.numel()), dtype=torch.int64).pin_memory()
            self._copy_done = None
        if self._copy_done is not None:
            self._copy_done.synchronize()  # the previous step's copy may still be reading the buffer
        buf = self._host_buf[: host.numel()]
        buf.copy_(host)
        dev = buf.to(self.device, non_blocking=True)
        self._copy_done = torch.cuda.Event()
        self._copy_done.record()
        return dev

    def prepare_inputs(self, seqs: SequenceLike["Sequence"]) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        """Flatten the new tokens of ``seqs``: (input_ids [T], positions [T], AttentionMetadata)."""
        if not seqs:
            raise ValueError("execute() needs at least one sequence")
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        seq_lens: list[int] = []
        cu_seqlens_q = [0]
        for seq in seqs:
            start, end = seq.num_computed_tokens, seq.num_tokens
            if end <= start:
                raise ValueError(f"sequence {getattr(seq, 'request_id', '?')} has no new token to compute")
            if len(seq.block_table) * bs < end:
                raise ValueError(
                    f"sequence {getattr(seq, 'request_id', '?')}: block table covers "
                    f"{len(seq.block_table) * bs} tokens, needs {end}"
                )
            input_ids += seq.token_ids[start:end]
            positions += range(start, end)
            slots += _slots(seq.block_table, start, end, bs)
            seq_lens.append(end)
            cu_seqlens_q.append(cu_seqlens_q[-1] + end - start)
        num_tokens, num_seqs = len(input_ids), len(seqs)
        is_prefill = num_tokens != num_seqs  # decode: exactly one new token per sequence
        max_blocks = max(len(seq.block_table) for seq in seqs)
        block_tables = [b for seq in seqs for b in seq.block_table + [0] * (max_blocks - len(seq.block_table))]
        logits_indices = [c - 1 for c in cu_seqlens_q[1:]]

        # One copy: [ids | positions | slots | seq_lens | cu_seqlens_q | logits_indices | block_tables].
        dev = self._to_device(input_ids + positions + slots + seq_lens + cu_seqlens_q + logits_indices + block_tables)
        pieces = torch.split(dev, [num_tokens, num_tokens, num_tokens, num_seqs, num_seqs + 1, num_seqs, len(block_tables)])
        d_ids, d_pos, d_slots, d_seq_lens, d_cu, d_last, d_bt = pieces
        attn = AttentionMetadata(
            is_prefill=is_prefill,
            slot_mapping=d_slots,
            block_tables=d_bt.view(num_seqs, max_blocks).to(torch.int32),
            seq_lens=d_seq_lens.to(torch.int32),
            max_seqlen_q=max(cu_seqlens_q[s + 1] - cu_seqlens_q[s] for s in range(num_seqs)),
            cu_seqlens_q=d_cu.to(torch.int32) if is_prefill else None,
            logits_indices=d_last if is_prefill else None,
            sum_seq_lens=sum(seq_lens),
        )
        return d_ids, d_pos, attn

    # ---- the step -----------------------------------------------------------------------

    @torch.no_grad()
    def execute(self, seqs: SequenceLike["Sequence"]) -> torch.Tensor:
        """Run ``seq.token_ids[seq.num_computed_tokens:]`` of every sequence; write their k/v into the
        cache; return the logits of each sequence's last token, float32 [len(seqs), vocab]."""
        input_ids, positions, attn = self.prepare_inputs(seqs)
        hidden = self.model.forward(input_ids, positions, self.kv_caches, attn)
        if attn.is_prefill:
            hidden = hidden.index_select(0, attn.logits_indices)  # decode: row s is already sequence s
        return self.model.compute_logits(hidden)
