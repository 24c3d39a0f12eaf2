"""Scheduler: decides which sequences run in the next model step, and records what it did.

Continuous batching means the batch is rebuilt every step: requests join as soon
as there is room and leave (freeing their KV blocks) the moment they finish,
instead of the whole batch waiting for its longest member (static batching).

Two queues:

* ``waiting``: sequences with no KV blocks: new requests, and preempted ones.
* ``running``: sequences that hold blocks: being prefilled (a prompt in chunks) or decoded.

A step holds at most ``max_num_batched_tokens`` tokens (the token budget) of at most
``max_num_seqs`` sequences. Two policies (course chapters 13 and 18):

* **chunked prefill** (``enable_chunked_prefill``, the default; vLLM's): every running
  sequence that decodes gets its one token first, then running sequences part-way
  through their prompt get as much of the rest as the budget holds, then waiting
  sequences are admitted in arrival order with as much of their prompt as still fits.
  A long prompt is split across steps, and a step mixes decodes and prompt chunks, so a
  prompt arriving never stalls the decodes for longer than one step of the budget.
* **prefill or decode** (``enable_chunked_prefill=False``; nano-vllm's, vLLM v0's): a
  step is either a *prefill step* (waiting sequences in arrival order, each with its whole
  uncomputed span, while they fit the budget) or, when none can start, a *decode step*
  (every running sequence, one token each).

Admission asks the BlockManager for the longest cached prefix of the sequence (prefix
caching, course chapter 17): those tokens are not computed again, only the rest is
scheduled. The blocks a step fills are published to the prefix cache when it is scheduled.

When a running sequence needs a block and none is free, the *newest* running sequence is
preempted: its blocks are freed and it goes back to the front of ``waiting``, to be
recomputed by a later prefill (recomputation, vLLM's default; no swapping to CPU; with
prefix caching, its freed blocks usually are still cached when it comes back). If the
sequence needing the block is itself the newest, it is the one preempted. That way the
oldest requests always make progress and nothing deadlocks, as long as one sequence
alone fits in the cache, which EngineConfig guarantees by capping a sequence's length at
the cache capacity (``max_seq_len``). No sequence is admitted in a step that preempted
(course chapter 19). A large pure decode batch is handed to the model longest sequence
first (see ``_order_decodes``).

``schedule()`` returns a SchedulerOutput: the sequences and how many tokens of each the
model computes this step. After the step, ``postprocess(out, token_ids)`` owns the
sequences' progress: it advances ``num_computed_tokens``, appends the sampled token of
each sequence whose scheduled span reached its end (a prompt chunk short of it samples
nothing), runs the token stop checks (EOS, stop token ids, max_tokens, max_seq_len) and
frees the blocks of the sequences that finished. Text (detokenization, stop strings) is
the engine's: the scheduler never sees a string.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from tinyvllm.engine.block_manager import BlockManager
from tinyvllm.engine.engine_config import EngineConfig
from tinyvllm.engine.sequence import Sequence, SequenceStatus


@dataclass
class SchedulerOutput:
    """One step's batch: ``seqs[i]`` computes its next ``num_scheduled_tokens[i]`` tokens,
    ``token_ids[num_computed_tokens : num_computed_tokens + num_scheduled_tokens[i]]``
    (its whole uncomputed span, or a chunk of it with chunked prefill). ``is_prefill``:
    the step runs prompt tokens (False: a pure decode step)."""

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

    def remove(self, seq: Sequence) -> int:
        """Take ``seq`` out of the step (it was preempted); returns the tokens it had."""
        i = self.seqs.index(seq)
        del self.seqs[i]
        return self.num_scheduled_tokens.pop(i)


class Scheduler:
    def __init__(self, config: EngineConfig) -> None:
        """Reads max_num_seqs, max_num_batched_tokens, max_seq_len, eos_token_ids,
        enable_chunked_prefill, enable_prefix_caching and decode_longest_first_min_seqs from
        ``config``, and owns the BlockManager of its ``num_kv_blocks`` blocks of ``block_size``
        tokens."""
        if config.max_seq_len is None:
            raise ValueError("the Scheduler needs a complete EngineConfig (max_model_len and num_kv_blocks known)")
        self.config = config
        self.block_manager = BlockManager(config.num_kv_blocks, config.block_size, config.enable_prefix_caching)
        self._eos = frozenset(config.eos_token_ids)
        self.waiting: deque[Sequence] = deque()
        self.running: deque[Sequence] = deque()
        # Counters since the start (the stats line and LLM.get_metrics read them).
        self.num_preemptions = 0
        self.prefix_cache_requests = 0  # admissions that looked up the prefix cache
        self.prefix_cache_queries = 0  # tokens of the sequences admitted with caching on
        self.prefix_cache_hits = 0  # of those, tokens found in the prefix cache

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

    def _preempt_newest(self, out: SchedulerOutput) -> Sequence:
        """Preempt the newest running sequence (and take it out of this step if it was in)."""
        victim = self.running.pop()
        if victim in out.seqs:
            out.remove(victim)
        self.block_manager.free(victim)
        victim.reset_for_recompute()
        self.waiting.appendleft(victim)
        self.num_preemptions += 1
        out.preempted.append(victim)
        return victim

    def _reserve(self, seq: Sequence, num_tokens: int, out: SchedulerOutput) -> bool:
        """Blocks for ``num_tokens`` more tokens of the running ``seq``, preempting the newest
        running sequences until they fit. False when ``seq`` itself had to be preempted."""
        while not self.block_manager.allocate_slots(seq, num_tokens):
            if self._preempt_newest(out) is seq:
                return False
        return True

    def _try_admit(self, out: SchedulerOutput, budget: int, chunk: bool) -> int:
        """Start ``waiting[0]`` in this step with as much of its uncached span as ``budget``
        allows (all of it or nothing unless ``chunk``). Returns the tokens scheduled; 0 when it
        cannot start now (the caller stops admitting: arrival order is kept)."""
        seq = self.waiting[0]
        bm = self.block_manager
        # prompt_logprobs needs the logits of every prompt position: nothing may be skipped.
        use_cache = bm.enable_prefix_caching and getattr(seq.sampling_params, "prompt_logprobs", None) is None
        hits, num_cached = bm.get_computed_blocks(seq) if use_cache else ([], 0)
        n = seq.num_tokens - num_cached
        if n > budget:
            if not chunk:
                return 0
            n = budget
        if not bm.allocate_slots(seq, n, hits):
            return 0
        self.waiting.popleft()
        seq.num_computed_tokens = num_cached
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)
        if use_cache:
            self.prefix_cache_requests += 1
            self.prefix_cache_queries += seq.num_tokens
            self.prefix_cache_hits += num_cached
        m = seq.metrics
        if m.first_scheduled_time is None:  # (a preempted sequence comes back here too)
            m.first_scheduled_time = time.time()
            m.time_in_queue = m.first_scheduled_time - m.arrival_time
            m.num_cached_tokens = num_cached
        bm.cache_full_blocks(seq, num_cached + n)  # a later admission in this step may share them
        out.add(seq, n)
        return n

    # ---- the policy ----------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        if self.config.enable_chunked_prefill:
            out = self._schedule_chunked()
        else:
            out = self._schedule_prefill()
            if out.is_empty:
                out = self._schedule_decode()
        if out.is_empty:
            raise RuntimeError(  # cannot happen while one sequence always fits; guard against a hang
                f"scheduler made no progress: {len(self.waiting)} waiting, {len(self.running)} running, "
                f"{self.block_manager.num_free_blocks} free blocks"
            )
        if not out.is_prefill:
            self._order_decodes(out)
        return out

    def _schedule_chunked(self) -> SchedulerOutput:
        """Decodes first, then running prompts' next chunks, then new prompts, under the budget."""
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        decodes: list[Sequence] = []
        prefills: list[Sequence] = []
        for seq in self.running:
            (decodes if len(seq.token_ids) - seq.num_computed_tokens == 1 else prefills).append(seq)
        allocate_slots = self.block_manager.allocate_slots
        bs = self.block_manager.block_size
        for seq in decodes + prefills:  # each group oldest first
            if seq.status != SequenceStatus.RUNNING:  # preempted while making room for an older one
                continue
            left = len(seq.token_ids) - seq.num_computed_tokens
            n = min(left, budget)
            if n == 0:
                break
            # (most decode steps: the table already has room; else new blocks, or preemption)
            if seq.num_computed_tokens + n <= len(seq.block_table) * bs or allocate_slots(seq, n):
                out.add(seq, n)
                out.is_prefill |= left > 1
                budget -= n
                continue
            if self._reserve(seq, n, out):
                out.add(seq, n)
                out.is_prefill |= left > 1
            budget = self.config.max_num_batched_tokens - out.num_batched_tokens  # a preempted one gave back
        self._publish(out)
        if out.preempted:  # memory is short: admitting now would only preempt again
            return out
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            n = self._try_admit(out, budget, chunk=True)
            if n == 0:
                break
            out.is_prefill = True
            budget -= n
        return out

    def _schedule_prefill(self) -> SchedulerOutput:
        """Without chunking: waiting sequences, each with its whole uncached span, under the budget."""
        out = SchedulerOutput(is_prefill=True)
        budget = self.config.max_num_batched_tokens
        while self.waiting and len(self.running) < self.config.max_num_seqs:  # (admitted ones are in running)
            n = self._try_admit(out, budget, chunk=False)
            if n == 0:
                break
            budget -= n
        return out

    def _schedule_decode(self) -> SchedulerOutput:
        """Without chunking: every running sequence, one token each, oldest first; room is made
        by preempting from the newest end."""
        out = SchedulerOutput(is_prefill=False)
        for seq in list(self.running):
            if seq.status != SequenceStatus.RUNNING:  # preempted above while making room
                continue
            if self._reserve(seq, 1, out):
                out.add(seq, 1)
        self._publish(out)
        return out

    def _publish(self, out: SchedulerOutput) -> None:
        """Offer the prefix cache the blocks the running sequences of this step fill. Only once
        the step's preemptions are decided: a sequence preempted in it computes nothing."""
        bm = self.block_manager
        if not bm.enable_prefix_caching:
            return
        bs = bm.block_size
        for seq, n in zip(out.seqs, out.num_scheduled_tokens):
            if (seq.num_computed_tokens + n) // bs > seq.num_published_blocks:  # (a block filled)
                bm.cache_full_blocks(seq, seq.num_computed_tokens + n)

    def _order_decodes(self, out: SchedulerOutput) -> None:
        """Longest first, for pure decode batches of at least config.decode_longest_first_min_seqs
        (which the ModelRunner sets from its GPU's SM count; None on CPU): the decode attention
        kernel's blocks reach the SMs in batch order, so the longest sequences start first and
        the short ones fill in behind them, instead of a long one starting last and streaming
        alone at the end ("longest processing time first"). Measured on an H200, Llama-1B heads,
        ragged batches of 128-256: the kernel 4-13% faster at 8 of 10, within 1% at the other
        two (bench/results/README.md, row 48). The sort is stable, and postprocess pairs each
        sampled token with its sequence."""
        n = self.config.decode_longest_first_min_seqs
        if n and len(out.seqs) >= n:
            order = sorted(range(len(out.seqs)), key=lambda i: out.seqs[i].num_tokens, reverse=True)
            out.seqs = [out.seqs[i] for i in order]
            out.num_scheduled_tokens = [out.num_scheduled_tokens[i] for i in order]

    # ---- after the step ----------------------------------------------------------------------
    def postprocess(self, out: SchedulerOutput, token_ids: list[int]) -> list[Sequence]:
        """Record a step: ``token_ids[i]`` was sampled for ``out.seqs[i]``. Returns the sequences
        that got a new token, in step order.

        Each sequence's scheduled tokens are now in the KV cache. A sequence whose span reached
        its last token gets the sampled token appended and checked against the token stop
        conditions; a prompt chunk that stopped short of it has no token (its ``token_ids[i]``
        is a placeholder). A finished sequence leaves the running queue and its blocks are
        freed at once, so that the next step can admit waiting requests.
        """
        if len(token_ids) != len(out.seqs):
            raise ValueError(f"postprocess: {len(token_ids)} token ids for {len(out.seqs)} scheduled sequences")
        sampled = []
        finished = SequenceStatus.FINISHED
        for seq, num_tokens, token_id in zip(out.seqs, out.num_scheduled_tokens, token_ids):
            if seq.status is finished:  # (async scheduling: it stopped at an earlier token, learnt while this step ran)
                continue
            seq.num_computed_tokens += num_tokens
            tokens = seq.token_ids
            if seq.num_computed_tokens < len(tokens):  # a prompt chunk: more of it next step
                continue
            tokens.append(token_id)
            verdict = self.stop_verdict(seq, token_id, len(tokens))
            if verdict is not None:
                seq.finish_reason, seq.stop_reason = verdict
                self.finish(seq)
            sampled.append(seq)
        return sampled

    def stop_verdict(self, seq: Sequence, token_id: int, num_tokens: int) -> tuple[str, int | None] | None:
        """The token stop conditions for ``token_id`` as the sequence's token number ``num_tokens``,
        in vLLM's order: EOS (unless ignore_eos) or a stop token id, once min_tokens are out; then
        max_tokens, or the longest sequence the engine allows. Returns (finish_reason, stop_reason)
        or None. (The overlapped engine calls it again once a step's real token ids arrive.)"""
        p = seq.sampling_params
        n_out = num_tokens - len(seq.prompt_token_ids)
        if n_out >= p.min_tokens:
            if not p.ignore_eos and token_id in self._eos:
                return "stop", None
            if token_id in p._stop_token_set:
                return "stop", token_id
        if (p.max_tokens is not None and n_out >= p.max_tokens) or num_tokens >= self.config.max_seq_len:
            return "length", None
        return None
