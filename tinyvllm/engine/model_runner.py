"""ModelRunner: the device side of a step. Scheduled sequences in, one sampled token each out.

It owns the model, the paged KV cache (one key and one value tensor per layer,
``[num_blocks, num_kv_heads, block_size, head_dim]``) and the Sampler. ``execute(out)``:

1. prepares the inputs of the step's ``out.num_scheduled_tokens[i]`` new tokens of each
   sequence as one flat, token-major batch plus the AttentionMetadata (slots to write,
   block tables to read, lengths), in one of two shapes:
   * ``prepare_decode``: every sequence brings exactly one token (the common case under
     continuous batching): fixed columns of one entry per sequence, built with numpy from
     block tables kept between steps (``InputBatch``, tinyvllm/engine/input_batch.py). On a
     GPU this step replays a captured CUDA graph (``DecodeGraphs``,
     tinyvllm/engine/cuda_graphs.py) unless ``enforce_eager``;
   * ``prepare_prefill``: anything else (prompts, a mix); its attention handles cached
     prefixes, so mixed batches and prompt chunks are correct too;
   and sends all of those integers to the device in ONE host-to-device copy from a
   pinned buffer (small copies cost ~10 us each, and a decode step is ~1 ms);
2. runs the model, and the lm_head only on each sequence's last token (a prompt of
   1,000 tokens needs one row of logits, not 1,000 x 128,256 floats), plus every prompt
   position of the sequences that asked for ``prompt_logprobs`` (such a step always takes
   the prefill path);
3. samples one token per sequence (a prompt chunk that stops short of its sequence's end
   draws nothing and its id is ignored) and copies the ids (with any log-probabilities) to the
   host: the step's only device->host transfer, started at once and waited for by
   ``PendingOutput.to_host()`` (one step later with async scheduling, whose placeholder
   ids the next step's inputs take from the device); then reads the kernels' error flags,
   which that copy has already waited for (``tinyvllm.ops.check_kernel_errors``).

It only reads the sequences (``token_ids``, ``num_computed_tokens``, ``block_table``, and
the SamplingParams for sampling and ``prompt_logprobs``);
the Scheduler allocates blocks and records the progress. At construction it completes
the EngineConfig with what only it can measure: the cache size (``num_kv_blocks``, when
not given) and, on a GPU, ``decode_longest_first_min_seqs``.

Tensor parallelism (``tp_size`` > 1): every rank has a runner over its slice of the model and
its own KV cache (its KV heads; the same number of blocks everywhere, the smallest any rank can
hold, so the block tables are the same on every rank). Rank 0's runner is the engine's: after
building a step's packed inputs it broadcasts them (a header of host ints, then the one packed
int64 tensor, see :meth:`_send_step`), and the other ranks' runners replay the same step
(tinyvllm/engine/tp_worker.py); the logits are gathered to rank 0, which alone samples.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Sequence as SequenceLike

import numpy as np
import torch

from tinyvllm import ops
from tinyvllm.config import ModelConfig
from tinyvllm.distributed.utils import num_kv_heads_per_rank
from tinyvllm.engine.cuda_graphs import DecodeGraphs
from tinyvllm.engine.engine_config import EngineConfig
from tinyvllm.engine.input_batch import InputBatch, check_span
from tinyvllm.engine.logprobs import ModelRunnerOutput, PromptSpan, SamplerOutput, prompt_logprob_spans
from tinyvllm.engine.sampler import Sampler
from tinyvllm.engine.sequence import PLACEHOLDER
from tinyvllm.model.attention_metadata import AttentionMetadata, flatten_block_tables, unpack_decode_inputs
from tinyvllm.model.llama import LlamaForCausalLM

if TYPE_CHECKING:
    from tinyvllm.engine.scheduler import SchedulerOutput
    from tinyvllm.engine.sequence import Sequence

logger = logging.getLogger("tinyvllm")

# On CPU there is no memory to measure and the reference ops are slow: a KV cache
# for a few full-length sequences, capped at this many bytes, is plenty.
CPU_KV_CACHE_BYTES = 1 << 30
CPU_MAX_SEQS = 4

# The kinds of step rank 0 announces to the other ranks (the first int of the step header).
STEP_STOP, STEP_DECODE, STEP_PREFILL, STEP_GRAPH = 0, 1, 2, 3


def kv_cache_bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype, tp_size: int = 1) -> int:
    """Bytes of one block of KV cache across all layers (keys and values), on one rank of ``tp_size``."""
    head_dim = config.head_dim  # ModelConfig resolves an implied head_dim
    itemsize = torch.empty((), dtype=dtype).element_size()
    kv_heads = num_kv_heads_per_rank(config.num_key_value_heads, tp_size)
    return 2 * config.num_hidden_layers * kv_heads * block_size * head_dim * itemsize


def activation_bytes(config: ModelConfig, dtype: torch.dtype, max_num_batched_tokens: int, max_num_seqs: int) -> int:
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


def determine_num_blocks(model_config: ModelConfig, config: EngineConfig, tp_size: int = 1) -> int:
    """How many KV-cache blocks to allocate for ``config`` (its max_model_len must be known).

    GPU: call this AFTER the weights are on the device. The budget is
    ``gpu_memory_utilization * free memory`` minus an activation reserve
    (:func:`activation_bytes`); every remaining byte becomes KV cache.
    CPU: enough blocks for CPU_MAX_SEQS sequences of max_model_len tokens, capped at
    CPU_KV_CACHE_BYTES.
    """
    block_size, max_model_len = config.block_size, config.max_model_len
    per_block = kv_cache_bytes_per_block(model_config, block_size, config.dtype, tp_size)
    if config.device.type == "cuda":
        torch.cuda.empty_cache()
        free, _total = torch.cuda.mem_get_info(config.device)
        budget = int(config.gpu_memory_utilization * free) - activation_bytes(
            model_config, config.dtype, config.max_num_batched_tokens, config.max_num_seqs
        )
        num_blocks = budget // per_block
    else:
        blocks_per_seq = math.ceil(max_model_len / block_size)
        num_blocks = min(CPU_MAX_SEQS * blocks_per_seq, CPU_KV_CACHE_BYTES // per_block)
    if num_blocks < math.ceil(max_model_len / block_size):
        raise ValueError(
            f"the KV cache fits {num_blocks} blocks of {block_size} tokens, fewer than one sequence of "
            f"max_model_len={max_model_len} needs: lower max_model_len or raise gpu_memory_utilization"
        )
    return int(num_blocks)


def _allocated(device: torch.device) -> int:
    """Bytes the caching allocator has handed out on ``device`` (0 on CPU)."""
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


def _min_over_ranks(value: int) -> int:
    """The smallest ``value`` any tensor-parallel rank has (an all-reduce on the CPU group)."""
    import torch.distributed as dist

    from tinyvllm.distributed.parallel_state import get_tp_group

    t = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=get_tp_group().cpu_group)
    return int(t.item())


def decode_longest_first_min_seqs(num_kv_heads: int, num_sms: int) -> int:
    """The smallest decode batch worth ordering longest first: two attention blocks per SM
    (one block per sequence and kv head). Why: see ``ModelRunner.__init__``."""
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


class PendingOutput:
    """A launched step's sampler output on its way to the host: ``to_host()`` waits for the
    copy (the step's one device->host transfer), then reads the kernels' error flags, which
    that wait made final (``tinyvllm.ops.check_kernel_errors``: an index the kernels refused to
    follow, a bug in the inputs built here)."""

    def __init__(self, sampled: SamplerOutput, pinned: bool) -> None:
        self._sampled = sampled
        packed = sampled.pack()
        self._done: torch.cuda.Event | None = None
        if pinned:  # start the copy now; the host's caching allocator keeps the pinned buffer
            self._host = torch.empty(packed.shape, dtype=packed.dtype, pin_memory=True)
            self._host.copy_(packed, non_blocking=True)
            self._done = torch.cuda.Event()
            self._done.record()
        else:
            self._host = packed

    def to_host(self) -> ModelRunnerOutput:
        if self._done is not None:
            self._done.synchronize()
        result = self._sampled.unpack(self._host.cpu())
        ops.check_kernel_errors(synchronize=False)
        return result


class ModelRunner:
    """Owns the model, its paged KV cache and the sampler; ``execute(out)`` runs one step."""

    def __init__(self, config: EngineConfig, model_config: ModelConfig, weights: dict[str, torch.Tensor], *,
                 tp_rank: int = 0, tp_size: int = 1) -> None:
        """``config`` must know max_model_len (:meth:`EngineConfig.fit_model`). With
        ``config.num_kv_blocks=None`` the cache is sized from memory (:func:`determine_num_blocks`)
        and the result written back with :meth:`EngineConfig.fit_cache`. With ``tp_size`` > 1
        every rank builds its runner at the same time (the constructor's collectives pair up),
        ``weights`` are this rank's slices and ``config.device`` this rank's device."""
        if config.max_model_len is None:
            raise ValueError("the ModelRunner needs config.max_model_len: call EngineConfig.fit_model first")
        self.config = config
        self.device = config.device
        self.block_size = config.block_size
        self.tp_rank, self.tp_size = tp_rank, tp_size
        self.executor = None  # rank 0 of tp_size > 1: the MultiprocExecutor holding the other ranks
        max_position = max(config.max_model_len, model_config.max_position_embeddings)
        mem0 = _allocated(self.device)
        self.model = LlamaForCausalLM(model_config, weights, config.dtype, self.device, max_position=max_position,
                                      tp_rank=tp_rank, tp_size=tp_size)
        weight_bytes = _allocated(self.device) - mem0

        if config.num_kv_blocks is None:
            num_blocks = determine_num_blocks(model_config, config, tp_size)
            if tp_size > 1:  # the block tables are shared: every rank gets the smallest rank's count
                num_blocks = _min_over_ranks(num_blocks)
            config.fit_cache(num_blocks)
        m = self.model
        shape = (config.num_kv_blocks, m.num_kv_heads, config.block_size, m.head_dim)
        self.kv_caches: list[tuple[torch.Tensor, torch.Tensor]] = [
            (torch.zeros(shape, dtype=config.dtype, device=self.device), torch.zeros(shape, dtype=config.dtype, device=self.device))
            for _ in range(m.num_layers)
        ]

        # Decode batches at least this large go to the model longest sequence first (the
        # scheduler orders them; None: never). The attention kernel's blocks reach the SMs
        # in batch order, so past about two blocks per SM the long ones should start first.
        # Below that, a batch runs as one wave of wide blocks, one per SM, where the order
        # only decides which SMs take the long ones, and longest first puts them side by
        # side: measured on an H200, batch 16 was up to 19% SLOWER longest first, batch
        # 48-256 up to 16% faster (bench/results/README.md, row 48).
        if self.device.type == "cuda":
            sms = torch.cuda.get_device_properties(self.device).multi_processor_count
            config.decode_longest_first_min_seqs = decode_longest_first_min_seqs(m.num_kv_heads, sms)

        # The sampler lives on rank 0 only (the other ranks' logits are gathered there).
        self.sampler = Sampler(config.eos_token_ids, seed=config.seed, device=self.device) if tp_rank == 0 else None
        # The host side of the one host-to-device copy per step (pinned, so the copy is async).
        self._pinned = self.device.type == "cuda"
        self._host_buf = torch.empty(0, dtype=torch.int64)
        self._copy_done: torch.cuda.Event | None = None
        # Decode steps' block tables, kept on the host between steps (tinyvllm/engine/input_batch.py).
        self.input_batch = InputBatch(config.max_num_seqs, -(-config.max_seq_len // config.block_size), config.block_size)
        # The last step's sampled ids, left on the device for the next step's inputs.
        self._last_sampled: torch.Tensor | None = None
        # Decode steps replay CUDA graphs on a GPU (captured here, once), unless enforce_eager.
        self.graphs: DecodeGraphs | None = None
        if self.device.type == "cuda" and not config.enforce_eager:
            if tp_size > 1:  # NCCL sets up its communicator on the first collective, which no capture may hold
                from tinyvllm.distributed import tensor_model_parallel_all_reduce
                tensor_model_parallel_all_reduce(torch.zeros(1, device=self.device))
                torch.cuda.synchronize(self.device)
            if ops.decode_step_has_kernels(config.dtype, self.device, m.head_dim, config.block_size):
                self.graphs = DecodeGraphs(self.model, self.kv_caches, max_num_seqs=config.max_num_seqs,
                                           max_seq_len=config.max_seq_len, block_size=config.block_size, capture=True)
            else:  # a reference op syncs with the host, which a capture forbids
                logger.warning("tinyvllm: no CUDA graphs: a decode op of this model runs the torch reference "
                               "(head_dim=%d, block_size=%d, %s)", m.head_dim, config.block_size, config.dtype)
        if self.device.type == "cuda":  # the card's memory, where it went: one line
            kv_bytes = 2 * sum(k.numel() * k.element_size() for k, _ in self.kv_caches)
            logger.info(
                "tinyvllm: GPU memory: weights %.2f GiB, CUDA graphs %.2f GiB, KV cache %.2f GiB = %d blocks "
                "of %d tokens (%d tokens; gpu_memory_utilization=%.2f)", weight_bytes / 2**30,
                (self.graphs.memory_bytes if self.graphs else 0) / 2**30, kv_bytes / 2**30, config.num_kv_blocks,
                config.block_size, config.cache_capacity, config.gpu_memory_utilization,
            )

    # ---- the step -----------------------------------------------------------------------

    def execute(self, out: "SchedulerOutput") -> ModelRunnerOutput:
        """Run the scheduled tokens of ``out.seqs``; return one sampled token id per sequence
        (``.sampled_token_ids``) and the log-probabilities they asked for."""
        return self.execute_async(out).to_host()

    def execute_async(self, out: "SchedulerOutput") -> "PendingOutput":
        """Launch the step and return at once: the sampled ids stay on the device (the next
        step's inputs may read them, see :meth:`_fill_placeholders`) while a non-blocking copy
        brings them, with any log-probabilities, to pinned host memory; ``.to_host()`` waits
        for that copy only."""
        spans = prompt_logprob_spans(out.seqs, out.num_scheduled_tokens)  # (once: a loop over the batch)
        logits = self.compute_logits(out, spans)
        S = len(out.seqs)
        # A prompt chunk that stops short of its sequence's end keeps no token (the scheduler
        # appends none): it draws no random number, so that a seeded request gets the same
        # tokens whether its prompt is chunked or not.
        ends = [s.num_computed_tokens + n == s.num_tokens for s, n in zip(out.seqs, out.num_scheduled_tokens)]
        sampled = self.sampler(logits[:S], out.seqs, logits[S:], spans, draws=None if all(ends) else ends)
        self._last_sampled = sampled.sampled_token_ids
        return PendingOutput(sampled, pinned=self._pinned)

    @torch.no_grad()
    def compute_logits(self, out: "SchedulerOutput", spans: list[PromptSpan] | None = None) -> torch.Tensor:
        """Run ``num_scheduled_tokens[i]`` new tokens of each ``seqs[i]`` (from its
        ``num_computed_tokens`` on) through the model, writing their k/v into the cache; return the
        logits of each sequence's last scheduled token, float32 [len(seqs), vocab], followed by the
        rows of its ``prompt_logprob_spans`` (none unless a sequence asked for prompt_logprobs;
        ``spans``: those spans, when the caller has them)."""
        if not out.seqs:
            raise ValueError("execute() needs at least one sequence")
        if self.executor is not None:  # rank 0 of several: a dead rank is an error naming it, not a hang
            self.executor.check_health()
            self.executor.in_step = True  # the workers are mid-step until all its collectives are issued
            try:
                logits = self._compute_logits(out, spans)
            except Exception as e:
                self.executor.raise_if_dead(e)
                raise
            self.executor.in_step = False
            return logits
        return self._compute_logits(out, spans)

    def _compute_logits(self, out: "SchedulerOutput", spans: list[PromptSpan] | None) -> torch.Tensor:
        if spans is None:
            spans = prompt_logprob_spans(out.seqs, out.num_scheduled_tokens)
        if spans:
            input_ids, positions, attn = self.prepare_prefill(out.seqs, out.num_scheduled_tokens, spans)
        elif all(n == 1 for n in out.num_scheduled_tokens):
            rows, max_blocks = self.input_batch.rows(out.seqs)
            shape = self.graphs.shape_for(len(out.seqs), max_blocks) if self.graphs is not None else None
            if shape is not None:
                return self._replay_decode(out.seqs, rows, *shape)
            input_ids, positions, attn = self.prepare_decode(out.seqs, (rows, max_blocks))
        else:
            input_ids, positions, attn = self.prepare_prefill(out.seqs, out.num_scheduled_tokens)
        return self.run_model(input_ids, positions, attn)

    def _replay_decode(self, seqs: SequenceLike["Sequence"], rows: list[int], bs: int, width: int) -> torch.Tensor:
        """A decode step through the CUDA graph captured for ``bs`` rows and ``width`` table entries:
        the packed inputs, padded to that shape, go straight into the graph's static buffer."""
        packed = self.input_batch.pack_decode(seqs, rows, bs, width)
        n = len(seqs)
        static = self._copy_in(packed, self.graphs.inputs[: packed.size])
        if packed[:n].min() < 0:
            self._fill_placeholders(static[:n])
        if self.tp_size > 1:  # the other ranks replay the same graph over the same inputs
            self._send_step(STEP_GRAPH, static, [bs, width, n])
        return self.graphs.replay(bs, width, n)

    def _fill_placeholders(self, ids: torch.Tensor) -> None:
        """Replace, in place on the device, the placeholders of the previous step's tokens.

        With async scheduling the engine records a step's sampled tokens before it knows them:
        row i's token is the placeholder ``PLACEHOLDER - i`` = ``-(i + 1)``, and the real id is row i of
        that step's sampled ids, still on the device. This step's input ids read them there, so
        no host sync stands between two steps."""
        prev = self._last_sampled
        if prev is None:
            raise RuntimeError("a placeholder token id, but no previous step to take it from")
        rows = (PLACEHOLDER - ids).clamp_(0, prev.numel() - 1)
        ids.copy_(torch.where(ids < 0, prev[rows], ids))

    def run_model(self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionMetadata) -> torch.Tensor:
        """The forward pass and the lm_head on each sequence's last row (where a captured
        CUDA graph will replay the decode step)."""
        hidden = self.model.forward(input_ids, positions, self.kv_caches, attn)
        if attn.is_prefill:
            hidden = hidden.index_select(0, attn.logits_indices)  # decode: row s is already sequence s
        return self.model.compute_logits(hidden)

    # ---- inputs -------------------------------------------------------------------------

    def prepare_decode(
        self, seqs: SequenceLike["Sequence"], rows: tuple[list[int], int] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        """One new token per sequence: (input_ids [S], positions [S], AttentionMetadata).

        Every input is a column of one entry per sequence (plus the block tables, one row per
        sequence), copied in one piece laid out [ids | positions | slots | seq_lens | block_tables]
        and built with numpy from the block tables the InputBatch keeps between steps (``rows``:
        its ``rows(seqs)``, when the caller has them). Row s is sequence s all the way to the
        logits, so no query offsets and no row selection are needed. A CUDA graph reads the same
        layout from its static buffer (:meth:`_replay_decode`).
        """
        rows, max_blocks = rows if rows is not None else self.input_batch.rows(seqs)
        S = len(seqs)
        packed = self.input_batch.pack_decode(seqs, rows, S, max_blocks)
        dev = self._copy_in(packed)
        if packed[:S].min() < 0:
            self._fill_placeholders(dev[:S])
        sizes = [S, max_blocks, int(packed[3 * S : 4 * S].sum())]
        self._send_step(STEP_DECODE, dev, sizes)
        return self.decode_inputs(dev, *sizes)

    # A decode step's packed inputs as (input_ids, positions, AttentionMetadata): on rank 0 and on
    # every other rank (tp_worker.py).
    decode_inputs = staticmethod(unpack_decode_inputs)

    def prepare_prefill(
        self,
        seqs: SequenceLike["Sequence"],
        num_scheduled_tokens: SequenceLike[int],
        prompt_spans: SequenceLike[PromptSpan] = (),
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        """Any number of new tokens per sequence: (input_ids [T], positions [T], AttentionMetadata).

        Sequence s owns query rows ``cu_seqlens_q[s] .. cu_seqlens_q[s+1]-1`` and attends over its
        cached prefix plus those rows (causally); only its last row's logits are computed
        (``logits_indices``), then the rows of ``prompt_spans`` (prompt logprobs). One copy:
        [ids | positions | slots | seq_lens | cu_seqlens_q | logits_indices | block_tables].
        """
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        seq_lens: list[int] = []
        cu_seqlens_q = [0]
        for seq, n in zip(seqs, num_scheduled_tokens, strict=True):
            start, end = seq.num_computed_tokens, seq.num_computed_tokens + n
            check_span(seq, start, end, self.block_size)
            input_ids += seq.token_ids[start:end]
            positions += range(start, end)
            slots += _slots(seq.block_table, start, end, self.block_size)
            seq_lens.append(end)
            cu_seqlens_q.append(cu_seqlens_q[-1] + n)
        logits_indices = [c - 1 for c in cu_seqlens_q[1:]]
        logits_indices += [r for span in prompt_spans for r in range(span.row, span.row + span.count)]
        block_tables, max_blocks = self._block_tables(seqs)
        packed = self._copy_in(input_ids + positions + slots + seq_lens + cu_seqlens_q + logits_indices + block_tables)
        if min(input_ids) < 0:
            self._fill_placeholders(packed[: len(input_ids)])
        sizes = [len(input_ids), len(seqs), len(logits_indices), max_blocks, max(num_scheduled_tokens), sum(seq_lens)]
        self._send_step(STEP_PREFILL, packed, sizes)
        return self.prefill_inputs(packed, *sizes)

    @staticmethod
    def prefill_inputs(packed: torch.Tensor, num_tokens: int, num_seqs: int, num_logits: int, max_blocks: int,
                       max_seqlen_q: int, sum_seq_lens: int) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        """A prefill step's packed inputs [ids | positions | slots | seq_lens | cu_seqlens_q |
        logits_indices | block_tables] (on the device) as (input_ids, positions, AttentionMetadata)."""
        T, S = num_tokens, num_seqs
        d_ids, d_pos, d_slots, d_lens, d_cu, d_last, d_bt = torch.split(
            packed, [T, T, T, S, S + 1, num_logits, S * max_blocks])
        attn = AttentionMetadata(
            is_prefill=True,
            slot_mapping=d_slots,
            block_tables=d_bt.view(S, max_blocks).to(torch.int32),
            seq_lens=d_lens.to(torch.int32),
            max_seqlen_q=max_seqlen_q,
            cu_seqlens_q=d_cu.to(torch.int32),
            logits_indices=d_last,
            sum_seq_lens=sum_seq_lens,
        )
        return d_ids, d_pos, attn

    # ---- tensor parallelism: rank 0 announces each step -------------------------------------

    def _send_step(self, kind: int, packed: torch.Tensor, sizes: list[int]) -> None:
        """Rank 0 of several: the header [kind, len(packed), *sizes] on the CPU group, then the
        packed inputs themselves (placeholders already filled) on the device group."""
        if self.tp_size == 1:
            return
        from tinyvllm.distributed import broadcast_step_header, broadcast_tensor

        broadcast_step_header([kind, packed.numel(), *sizes])
        broadcast_tensor(packed)

    @staticmethod
    def _block_tables(seqs: SequenceLike["Sequence"]) -> tuple[list[int], int]:
        """Every block table padded with 0 to the longest one, row-major; and that width."""
        max_blocks = max(len(seq.block_table) for seq in seqs)
        return flatten_block_tables([seq.block_table for seq in seqs], max_blocks), max_blocks

    def _copy_in(self, values: list[int] | np.ndarray, out: torch.Tensor | None = None) -> torch.Tensor:
        """``values`` as an int64 device tensor, in one host-to-device copy (from a reused pinned
        buffer on CUDA), into ``out`` if given (the decode graphs' static inputs). A list becomes
        an array through numpy's ``fromiter``, about 4x faster than ``torch.tensor(list)`` (a
        millisecond per step at batch 256, measured)."""
        if not isinstance(values, np.ndarray):
            values = np.fromiter(values, dtype=np.int64, count=len(values))
        host = torch.from_numpy(values)
        if not self._pinned:
            return host.to(self.device) if out is None else out.copy_(host)
        if self._host_buf.numel() < host.numel():
            self._host_buf = torch.empty(max(host.numel(), 2 * self._host_buf.numel()), dtype=torch.int64).pin_memory()
            self._copy_done = None
        if self._copy_done is not None:
            self._copy_done.synchronize()  # the previous step's copy may still be reading the buffer
        buf = self._host_buf[: host.numel()]
        buf.copy_(host)
        dev = buf.to(self.device, non_blocking=True) if out is None else out.copy_(buf, non_blocking=True)
        self._copy_done = torch.cuda.Event()
        self._copy_done.record()
        return dev
