"""Scheduler: decides which sequences run in the next model step, and records what it did.

Continuous batching means the batch is rebuilt every step: requests join as soon
as there is room and leave (freeing their KV blocks) the moment they finish,
instead of the whole batch waiting for its longest member (static batching).

Two queues:

* ``waiting``: sequences with no KV blocks: new requests, and preempted ones.
* ``running``: sequences that hold blocks and are being decoded.

Each step is ONE of two kinds (the policy of nano-vllm and of vLLM's v0 engine
without chunked prefill):

* **prefill step**: take waiting sequences in arrival order while they fit the
  token budget (``max_num_batched_tokens``), the sequence budget
  (``max_num_seqs``, counting the running ones) and the free KV blocks. Each runs
  its whole uncomputed span (its prompt; or prompt + generated tokens after a
  preemption). Waiting work goes first so new requests start quickly.
* **decode step** (when nothing could be prefilled): every running sequence
  advances by one token. A sequence whose new token starts a new block needs a
  free block; if there is none, the *newest* running sequence is preempted: its
  blocks are freed and it goes back to the front of ``waiting``, to be recomputed
  by a later prefill (recomputation, vLLM's default; no swapping to CPU). If the
  sequence needing the block is itself the newest, it is the one preempted.
  That way the oldest requests always make progress and nothing deadlocks, as
  long as one sequence alone fits in the cache, which EngineConfig guarantees by
  capping a sequence's length at the cache capacity (``max_seq_len``). A large
  decode batch is handed to the model longest sequence first (see
  ``_schedule_decode``: it makes the attention kernel's last blocks short ones).

``schedule()`` returns a SchedulerOutput: the sequences and how many tokens of each
the model computes this step. After the step, ``postprocess(out, token_ids)`` owns the
sequences' progress: it advances ``num_computed_tokens``, appends each sampled token,
runs the token stop checks (EOS, stop token ids, max_tokens, max_seq_len) and frees the
blocks of the sequences that finished. Text (detokenization, stop strings) is the
engine's: the scheduler never sees a string.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from tinyvllm.engine.block_manager import BlockManager
from tinyvllm.engine.engine_config import EngineConfig
from tinyvllm.engine.sequence import Sequence, SequenceStatus


@dataclass
class SchedulerOutput:
    """One step's batch: ``seqs[i]`` computes its next ``num_scheduled_tokens[i]`` tokens,
    ``token_ids[num_computed_tokens : num_computed_tokens + num_scheduled_tokens[i]]``
    (its whole uncomputed span today; a chunk of it once prefill is chunked)."""

    seqs: list[Sequence] = field(default_factory=list)
    num_scheduled_tokens: list[int] = field(default_factory=list)
    is_prefill: bool = False
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(self.num_scheduled_tokens)

    @property
    def is_empty(self) -> bool:
        return not self.seqs

    def add(self, seq: Sequence, num_tokens: int) -> None:
        self.seqs.append(seq)
        self.num_scheduled_tokens.append(num_tokens)


class Scheduler:
    def __init__(self, config: EngineConfig) -> None:
        """Reads max_num_seqs, max_num_batched_tokens, max_seq_len, eos_token_ids and
        decode_longest_first_min_seqs from ``config``, and owns the BlockManager of its
        ``num_kv_blocks`` blocks of ``block_size`` tokens."""
        if config.max_seq_len is None:
            raise ValueError("the Scheduler needs a complete EngineConfig (max_model_len and num_kv_blocks known)")
        self.config = config
        self.block_manager = BlockManager(config.num_kv_blocks, config.block_size)
        self._eos = frozenset(config.eos_token_ids)
        self.waiting: deque[Sequence] = deque()
        self.running: deque[Sequence] = deque()
        self.num_preemptions = 0

    # ---- queue management ------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def finish(self, seq: Sequence) -> None:
        """Remove ``seq`` from whichever queue holds it and free its blocks now."""
        if seq.status == SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status == SequenceStatus.WAITING:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED

    def _preempt(self, seq: Sequence) -> None:
        self.block_manager.free(seq)
        seq.reset_for_recompute()
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    # ---- the policy ----------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = self._schedule_prefill()
        if out.is_empty:
            out = self._schedule_decode()
        if out.is_empty:
            raise RuntimeError(  # cannot happen while one sequence always fits; guard against a hang
                f"scheduler made no progress: {len(self.waiting)} waiting, {len(self.running)} running, "
                f"{self.block_manager.num_free_blocks} free blocks"
            )
        return out

    def _schedule_prefill(self) -> SchedulerOutput:
        out = SchedulerOutput(is_prefill=True)
        num_tokens = 0
        while self.waiting:
            if len(self.running) >= self.config.max_num_seqs:  # (scheduled ones are already in running)
                break
            seq = self.waiting[0]
            n = seq.num_uncomputed_tokens
            if num_tokens + n > self.config.max_num_batched_tokens:
                break
            if not self.block_manager.can_allocate(seq):
                break
            self.waiting.popleft()
            self.block_manager.allocate(seq)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            out.add(seq, n)
            num_tokens += n
        return out

    def _schedule_decode(self) -> SchedulerOutput:
        out = SchedulerOutput(is_prefill=False)
        # Walk the running queue oldest first; make room by preempting from the newest end.
        queue = list(self.running)
        scheduled: list[Sequence] = []
        i = 0
        while i < len(queue):
            seq = queue[i]
            if seq.status != SequenceStatus.RUNNING:  # preempted below while making room
                i += 1
                continue
            while not self.block_manager.can_append(seq):
                victim = self.running[-1]
                self.running.pop()
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    break
            if seq.status == SequenceStatus.RUNNING:
                self.block_manager.append_slot(seq)
                scheduled.append(seq)
            i += 1
        # Longest first (for batches of at least config.decode_longest_first_min_seqs, which the
        # ModelRunner sets from its GPU's SM count; None on CPU): the decode attention kernel's
        # blocks reach the SMs in batch order, so the longest sequences start first and the
        # short ones fill in behind them, instead of a long one starting last and streaming
        # alone at the end ("longest processing time first"). Measured on
        # an H200, Llama-1B heads, ragged batches of 128-256: the kernel 4-13% faster at 8 of
        # 10, within 1% at the other two (bench/results/README.md,
        # row 48). The sort is stable, and postprocess pairs each sampled token with its sequence.
        n = self.config.decode_longest_first_min_seqs
        if n and len(scheduled) >= n:
            scheduled.sort(key=lambda s: s.num_tokens, reverse=True)
        for seq in scheduled:
            out.add(seq, 1)
        return out

    # ---- after the step ----------------------------------------------------------------------
    def postprocess(self, out: SchedulerOutput, token_ids: list[int]) -> None:
        """Record a step: ``token_ids[i]`` was sampled for ``out.seqs[i]``.

        Each sequence's scheduled tokens are now in the KV cache; its new token is appended and
        checked against the token stop conditions; a finished sequence leaves the running queue
        and its blocks are freed at once, so that the next step can admit waiting requests.
        (Every scheduled span ends at the sequence's last token today, so every sequence gets a
        token; with chunked prefill a partial chunk's sampled token would be dropped here.)
        """
        if len(token_ids) != len(out.seqs):
            raise ValueError(f"postprocess: {len(token_ids)} token ids for {len(out.seqs)} scheduled sequences")
        for seq, num_tokens, token_id in zip(out.seqs, out.num_scheduled_tokens, token_ids):
            if seq.is_finished:  # (async scheduling: it stopped at an earlier token, learnt while this step ran)
                continue
            seq.num_computed_tokens += num_tokens
            seq.append_token(token_id)
            self._check_stop(seq, token_id)
            if seq.finish_reason is not None:
                self.finish(seq)

    def _check_stop(self, seq: Sequence, token_id: int) -> None:
        verdict = self.stop_verdict(seq, token_id, seq.num_tokens)
        if verdict is not None:
            seq.finish_reason, seq.stop_reason = verdict

    def stop_verdict(self, seq: Sequence, token_id: int, num_tokens: int) -> tuple[str, int | None] | None:
        """The token stop conditions for ``token_id`` as the sequence's token number ``num_tokens``,
        in vLLM's order: EOS (unless ignore_eos) or a stop token id, once min_tokens are out; then
        max_tokens, or the longest sequence the engine allows. Returns (finish_reason, stop_reason)
        or None. (The overlapped engine calls it again once a step's real token ids arrive.)"""
        p = seq.sampling_params
        n_out = num_tokens - seq.num_prompt_tokens
        if n_out >= p.min_tokens:
            if not p.ignore_eos and token_id in self._eos:
                return "stop", None
            if token_id in p.stop_token_set:
                return "stop", token_id
        if (p.max_tokens is not None and n_out >= p.max_tokens) or num_tokens >= self.config.max_seq_len:
            return "length", None
        return None
