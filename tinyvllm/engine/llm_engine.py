"""LLMEngine: requests in, one model step at a time, RequestOutputs out.

    engine = LLMEngine.from_config(EngineConfig(max_model_len=2048))   # or LLMEngine.from_model(None, ...)
    engine.add_request("req-0", "Hello", SamplingParams(max_tokens=8))
    while engine.has_unfinished_requests():
        for out in engine.step():      # every request that advanced this step
            print(out.request_id, out.outputs[0].text, out.finished)

One ``step()`` is nano-vllm's shape:

    out = scheduler.schedule()                   # which sequences, how many tokens each
    result = model_runner.execute(out)           # forward pass + sampling: one id per sequence
    scheduler.postprocess(out, result.sampled_token_ids)  # progress, stop checks, free finished blocks
    for each sequence that got a token:          # (not a prompt chunk that stopped short)
        self._update_text(seq, pos)              # detokenization, stop strings, log-probabilities;
    self.stats.on_step(sampled)                  # then one RequestOutput per request that advanced

With async scheduling (``EngineConfig.async_scheduling``, on by default on a GPU) the same
work is split around the GPU's step: see :meth:`LLMEngine._step_async`.

A request with ``SamplingParams(n=k)`` is fanned out here into k sequences (vLLM's "parallel
sampling"): each is scheduled, preempted and finished on its own, under the sequence id
``f"{i}_{request_id}"`` (vLLM's spelling; ``request_id`` itself when n = 1), with its own copy of
the params whose ``seed``, when set, is ``seed + i`` (so the k completions differ, and the whole
set is reproducible). They come back together: one RequestOutput per request, its ``outputs[i]``
being sequence i (``index`` i), ``finished`` once all are. Aborting the request aborts them all.

The engine owns the requests and the text (tokenizer, detokenizers, stop strings; in an engine
process, only the text that stop strings need: the server's process makes the rest); the
Scheduler owns the sequences' progress and the KV blocks; the ModelRunner owns the device.
Requests may be added or aborted between any two steps; request ids are the handle, which
is what an async loop or an OpenAI-compatible server needs.

Host syncs: the only device->host transfer in a step is the sampled ids, with the
log-probabilities any request asked for (tinyvllm/engine/logprobs.py).

Each RequestOutput carries the request's RequestMetrics (arrival, first scheduled, first and
last token times, prompt tokens served from the prefix cache); ``get_metrics()`` returns the
engine's counters and gauges (tinyvllm/engine/stats.py), which also feed the stats line.

Requests that can never run (prompt longer than the model allows, or bigger than
the whole KV cache, or empty) are not raised as exceptions: they finish at once
with ``finish_reason="error"`` and ``RequestOutput.error`` set, returned by the
next ``step()``, so that one bad request never fails the others of a batch.
"""

from __future__ import annotations

import itertools
import logging
import time
from typing import Any

import torch

from tinyvllm.engine.engine_config import EngineConfig
from tinyvllm.engine.logits_processors import tokenize_bad_words
from tinyvllm.engine.request_state import RequestState, TokenTexts, child_params, engine_needs_text
from tinyvllm.engine.scheduler import Scheduler
from tinyvllm.engine.sequence import PLACEHOLDER, Sequence, SequenceStatus
from tinyvllm.engine.stats import EngineStats, Metric
from tinyvllm.generation_config import load_sampling_defaults
from tinyvllm.outputs import RequestOutput
from tinyvllm.sampling_params import RequestOutputKind, SamplingParams

logger = logging.getLogger("tinyvllm")

PromptType = str | list[int] | dict[str, Any]


def parse_prompt(prompt: PromptType) -> tuple[str | None, list[int] | None]:
    """A prompt is text, a list of token ids, or vLLM's dict forms:
    ``{"prompt": "..."}`` (TextPrompt) or ``{"prompt_token_ids": [...]}`` (TokensPrompt)."""
    if isinstance(prompt, str):
        return prompt, None
    if isinstance(prompt, dict):
        if "prompt_token_ids" in prompt:
            return prompt.get("prompt"), [int(t) for t in prompt["prompt_token_ids"]]
        if "prompt" in prompt:
            return str(prompt["prompt"]), None
        raise ValueError(f"a prompt dict needs 'prompt' or 'prompt_token_ids', got keys {sorted(prompt)}")
    if isinstance(prompt, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return None, list(prompt)
    raise TypeError(f"unsupported prompt type {type(prompt).__name__}: expected str, list[int] or dict")


class LLMEngine:
    def __init__(
        self,
        config: EngineConfig,
        model_runner: Any,
        tokenizer: Any,
        *,
        vocab_size: int | None = None,
        detokenizer_cls: Any = None,
    ) -> None:
        """``config`` must be complete (max_model_len and num_kv_blocks known): :meth:`from_config`
        builds one; tests pass a config and a toy runner. ``vocab_size``: prompts with ids outside
        ``[0, vocab_size)`` fail (None: not checked)."""
        self.config = config
        self.model_runner = model_runner
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        if detokenizer_cls is None and tokenizer is not None:
            from tinyvllm.tokenizer import IncrementalDetokenizer as detokenizer_cls
        self.detokenizer_cls = detokenizer_cls
        self.scheduler = Scheduler(config)
        self.block_manager = self.scheduler.block_manager  # (the scheduler's; here for a reader's convenience)
        self.stats = EngineStats(self.scheduler, log_stats=not config.disable_log_stats)

        self.requests: dict[str, RequestState] = {}  # unfinished requests by id
        self._owner: dict[int, tuple[RequestState, int]] = {}  # id(seq) -> its request, its index there
        self._pending: list[RequestOutput] = []  # finished outside a step (errors, aborts)
        # True in an engine process (engine_core.py): step() returns each output in its wire form,
        # RequestOutput.to_wire's tuple, cheap to pickle; the server's side builds the objects.
        self.wire_outputs = False
        # True in an engine process too: a request whose text decides nothing here (no stop
        # strings) is not detokenized here; the server's process makes its text from the token
        # ids (engine_core.py, vLLM V1's split), off the step's critical path.
        self.text_in_client = False
        # The model's recommended sampling (its generation_config.json), for fields a request leaves
        # unset: a server's requests, LLM.get_default_sampling_params() (tinyvllm/generation_config.py)
        self.default_sampling: dict[str, Any] = {}
        self._token_texts = TokenTexts(tokenizer)  # each token alone as text (Logprob.decoded_token)
        self._arrival = itertools.count()
        self.num_steps = 0
        # async scheduling: the step launched last, whose token ids the host has not read yet
        self._in_flight: tuple[Any, Any, list[tuple[int, Sequence, int]]] | None = None

    # ---- construction ---------------------------------------------------------------------
    @classmethod
    def from_model(cls, model: str | None = None, **kwargs: Any) -> "LLMEngine":
        """``LLMEngine.from_model(model, max_model_len=..., ...)``: EngineConfig's fields as keywords."""
        return cls.from_config(EngineConfig(model, **kwargs))

    @classmethod
    def from_config(cls, config: EngineConfig) -> "LLMEngine":
        """Read the checkpoint and the tokenizer, complete ``config``, build the runner and the engine."""
        from tinyvllm.engine.model_runner import ModelRunner
        from tinyvllm.loader import load_model, resolve_model

        if config.device.type == "cpu" and config.dtype != torch.float32:
            logger.warning(
                "tinyvllm: %s on a CPU is slow (each product goes through float32: about 2x slower); "
                "use float32, the default there.", str(config.dtype).removeprefix("torch."),
            )
        path = resolve_model(config.model)
        if config.tensor_parallel_size > 1:
            model_config, tokenizer, runner = cls._build_tensor_parallel(config, path)
        else:
            model_config, weights, tokenizer = load_model(path, config.dtype)  # a GGUF: tinyvllm.gguf_cache
            config.fit_model(model_config, tokenizer.eos_token_ids)
            # With num_kv_blocks=None the runner sizes the cache after the weights are on the device
            # (GPU: free memory x gpu_memory_utilization minus an activation reserve; CPU: a few
            # full-length sequences, capped at 1 GiB). It refuses a cache smaller than max_model_len.
            runner = ModelRunner(config, model_config, weights)
            del weights
        if config.cache_capacity < config.max_model_len:
            logger.warning(
                "tinyvllm: the KV cache holds %d tokens (%d blocks of %d), less than max_model_len=%d; "
                "sequences will be capped at %d tokens.", config.cache_capacity, config.num_kv_blocks,
                config.block_size, config.max_model_len, config.max_seq_len,
            )
        engine = cls(config, runner, tokenizer, vocab_size=model_config.vocab_size)
        engine.model_config = model_config
        engine.default_sampling = load_sampling_defaults(path, config.generation_config)
        if engine.default_sampling:
            logger.warning("tinyvllm: the model's generation config sets the sampling defaults of requests that "
                           "leave them unset: %s (generation_config='vllm' / --generation-config vllm: none)",
                           ", ".join(f"{k}={v}" for k, v in engine.default_sampling.items()))  # fmt: skip
        return engine

    @staticmethod
    def _build_tensor_parallel(config: EngineConfig, path: str) -> tuple[Any, Any, Any]:
        """Tensor parallelism: check the model splits (before any process starts), start ranks
        1..N-1 (tinyvllm/engine/multiproc_executor.py), then build rank 0's runner here, over
        rank 0's slice of the weights. The scheduler, tokenizer and sampler stay in this process."""
        from tinyvllm.engine.model_runner import ModelRunner
        from tinyvllm.engine.multiproc_executor import MultiprocExecutor
        from tinyvllm.loader import load_checkpoint, load_model_config
        from tinyvllm.tokenizer import Tokenizer

        n = config.tensor_parallel_size
        model_config = load_model_config(path)
        tokenizer = Tokenizer.from_pretrained(path)
        config.fit_model(model_config, tokenizer.eos_token_ids)  # a ValueError if N does not split the heads
        executor = MultiprocExecutor(config, path)
        try:
            _, weights = load_checkpoint(path, config.dtype, tp_rank=0, tp_size=n)
            runner = ModelRunner(config, model_config, weights, tp_rank=0, tp_size=n)
            del weights
        except BaseException as e:
            try:
                executor.raise_if_dead(e, wait_s=1.0)  # a worker's own error explains this one
            finally:
                executor.shutdown()
            raise
        runner.executor = executor
        executor.mark_ready()
        return model_config, tokenizer, runner

    def shutdown(self) -> None:
        """Stop the tensor-parallel workers, if any (also done when the engine is garbage-collected)."""
        executor = getattr(self.model_runner, "executor", None)
        if executor is not None:
            executor.shutdown()

    # ---- requests ---------------------------------------------------------------------------
    def add_request(
        self,
        request_id: str,
        prompt: PromptType,
        params: SamplingParams | None = None,
        *,
        prompt_token_ids: list[int] | None = None,
    ) -> None:
        """Queue a request. ``prompt`` is text, token ids or a vLLM prompt dict.

        Raises only for caller bugs (duplicate id, wrong types, params the model's vocabulary
        cannot satisfy: a ValueError naming the field). A prompt that can never run finishes
        with ``finish_reason="error"`` (see the module docstring).
        """
        request_id = str(request_id)
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        params = params if params is not None else SamplingParams()
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be a SamplingParams, got {type(params).__name__}")
        params = self._fit_params(params)
        text, ids = parse_prompt(prompt)
        if prompt_token_ids is not None:
            ids = list(prompt_token_ids)
        if ids is None:
            ids = self.tokenizer.encode(text)
        n = params.n
        state = RequestState(request_id, text, list(ids), params, logprobs=[None] * n, cumulative_logprobs=[None] * n)
        for i in range(n):
            seq_id, p = (request_id, params) if n == 1 else (f"{i}_{request_id}", child_params(params, i))
            state.seqs.append(Sequence(seq_id, list(ids), p, arrival_index=next(self._arrival), prompt=text))
        error = self._validate(state.seqs[0])
        if error is not None:
            for seq in state.seqs:
                seq.status = SequenceStatus.FINISHED
                seq.finish_reason = "error"
                seq.error = error  # reported by whoever reads the output (LLM.generate logs it, once)
                seq.metrics.finished_time = time.time()
                self.stats.on_finished(seq)
            state.error = error
            self._pending.append(self._make_output(state))
            return
        if params.logprobs is not None:
            state.logprobs, state.cumulative_logprobs = [[] for _ in range(n)], [0.0] * n
        if params.prompt_logprobs is not None:
            state.prompt_logprobs = [None] * len(ids)  # position 0 stays None: nothing comes before it
        for i, seq in enumerate(state.seqs):
            if seq.sampling_params.seed is not None:
                seq.generator = torch.Generator(device=self.config.device)
                seq.generator.manual_seed(seq.sampling_params.seed)
            if self.detokenizer_cls is not None and (not self.text_in_client or engine_needs_text(seq.sampling_params)):
                seq.detokenizer = self.detokenizer_cls(self.tokenizer, seq.prompt_token_ids)
            self._owner[id(seq)] = (state, i)
            self.scheduler.add(seq)
        self.requests[request_id] = state

    def _fit_params(self, params: SamplingParams) -> SamplingParams:
        """Check what only the model's vocabulary can (a ValueError naming the field), and
        tokenize ``bad_words`` (into a copy of the params, which may serve other requests)."""
        V = self.vocab_size
        if V is not None:
            for name in ("logprobs", "prompt_logprobs"):
                k = getattr(params, name)
                if k is not None and k > V:
                    raise ValueError(f"{name} must be at most the vocabulary size ({V}), got {k}.")
            for name in ("logit_bias", "allowed_token_ids"):
                bad = [t for t in getattr(params, name) or () if t >= V]
                if bad:
                    raise ValueError(f"{name} has token ids outside the vocabulary (vocab_size={V}): {bad[:8]}.")
        if params.bad_words and params.bad_words_token_ids is None:
            if self.tokenizer is None:
                raise ValueError("bad_words needs the engine's tokenizer, and this engine has none.")
            params = params.clone()
            params._bad_words_token_ids = tokenize_bad_words(params.bad_words, self.tokenizer)
            bad = [t for word in params._bad_words_token_ids for t in word if V is not None and t >= V]
            if bad:
                raise ValueError(f"bad_words tokenize to ids outside the vocabulary (vocab_size={V}): {bad[:8]}.")
        return params

    def _validate(self, seq: Sequence) -> str | None:
        c = self.config
        n = seq.num_prompt_tokens
        if n == 0:
            return "The prompt is empty."
        if n + 1 > c.max_model_len:
            return (
                f"The prompt (length {n}) is longer than the maximum model length of {c.max_model_len} "
                "(it needs room for at least one generated token). Shorten the prompt or raise max_model_len."
            )
        if n + 1 > c.max_seq_len:
            return (
                f"The prompt (length {n}) does not fit in the KV cache, which holds {c.max_seq_len} tokens "
                f"({c.num_kv_blocks} blocks of {c.block_size}). Raise num_kv_blocks / gpu_memory_utilization."
            )
        if self.vocab_size is not None:
            bad = [t for t in seq.prompt_token_ids if not 0 <= t < self.vocab_size]
            if bad:
                return f"Token id {bad[0]} is out of vocabulary (vocab_size={self.vocab_size})."
        return None

    def abort_request(self, request_id: str | list[str]) -> None:
        """Stop request(s) now, every one of their sequences, and free their blocks; the final
        output (finish_reason "abort" for the sequences still running) comes from the next
        ``step()``. Unknown or finished ids are ignored."""
        ids = [request_id] if isinstance(request_id, str) else list(request_id)
        for rid in ids:
            state = self.requests.pop(rid, None)
            if state is None:
                continue
            for seq in state.seqs:
                if not seq.is_finished:
                    self.scheduler.finish(seq)
                    seq.finish_reason = "abort"
                    seq.metrics.finished_time = time.time()
                    self.stats.on_finished(seq)
                self._owner.pop(id(seq), None)
            self._pending.append(self._make_output(state))

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests) or bool(self._pending) or self._in_flight is not None

    def has_in_flight_step(self) -> bool:
        """Async scheduling: a step is launched whose token ids the host has not read yet."""
        return self._in_flight is not None

    def get_num_unfinished_requests(self) -> int:
        return len(self.requests)

    def scheduler_stats(self) -> dict[str, int]:
        """Requests waiting and running, KV blocks in all and free (a server's gauges), model steps
        run, and the prefix cache's lookups and hits so far, in prompt tokens."""
        s, bm = self.scheduler, self.block_manager
        return {"num_requests_waiting": len(s.waiting), "num_requests_running": len(s.running),
                "num_kv_blocks": bm.num_blocks, "num_free_kv_blocks": bm.num_free_blocks,
                "num_engine_steps": self.num_steps, "prefix_cache_queries": s.prefix_cache_queries,
                "prefix_cache_hits": s.prefix_cache_hits}  # fmt: skip

    def get_metrics(self) -> list[Metric]:
        """The engine's counters and gauges under vLLM's names (tinyvllm/engine/stats.py)."""
        return self.stats.get_metrics()

    # ---- the step ----------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one model step; return an output for every request that advanced (and for those
        that failed or were aborted since the last step). With async scheduling the outputs are
        the previous step's (see :meth:`_step_async`)."""
        outputs, self._pending = self._pending, []
        if self.config.async_scheduling:
            return outputs + self._step_async()
        if not self.scheduler.has_unfinished():
            return outputs
        out = self.scheduler.schedule()
        result = self.model_runner.execute(out)
        num_tokens = [seq.num_tokens for seq in out.seqs]
        self.scheduler.postprocess(out, result.sampled_token_ids)
        self.num_steps += 1
        appended = [(i, seq, seq.num_tokens - 1) for i, seq in enumerate(out.seqs) if seq.num_tokens > num_tokens[i]]
        return outputs + self._emit(out, result, appended)

    def _step_async(self) -> list[RequestOutput]:
        """One step with the host one step behind the GPU (vLLM's async scheduling).

        Step N is launched without waiting for step N-1's sampled ids: the scheduler recorded
        N-1's tokens as placeholders (only the length stops need no id), and the model runner
        reads their real values on the device. Then, while the GPU runs step N, the host
        learns N-1's ids (the one sync, for a copy that is already done or nearly), checks
        EOS and stop ids, detokenizes and checks stop strings, and records step N with
        placeholders: the CPU's work of one step overlaps the GPU's work of the next. A request
        that stops at step N-1 was also scheduled in step N: that one extra token is discarded.
        A step holding a request whose sampling reads its past tokens on the host (penalties, bad
        words) is resolved before the next is scheduled: no overlap for that step.
        """
        prev, self._in_flight = self._in_flight, None
        outputs = []
        if prev is not None and any(seq.sampling_params.reads_output_tokens for _, seq, _ in prev[2]):
            outputs, prev = self._resolve(*prev), None  # penalties / bad words need the real tokens first
        out = pending = None
        if self.scheduler.has_unfinished():
            out = self.scheduler.schedule()
            pending = self.model_runner.execute_async(out)  # step N, launched
        if prev is not None:
            outputs = self._resolve(*prev)  # step N-1, learnt while N runs
        if out is not None:
            num_tokens = [seq.num_tokens for seq in out.seqs]
            self.scheduler.postprocess(out, [PLACEHOLDER - i for i in range(len(out.seqs))])  # counts, length stops
            self.num_steps += 1
            appended = [(i, seq, seq.num_tokens - 1) for i, seq in enumerate(out.seqs) if seq.num_tokens > num_tokens[i]]
            self._in_flight = (out, pending, appended)
        return outputs

    def _resolve(self, out: Any, pending: Any, appended: list[tuple[int, Sequence, int]]) -> list[RequestOutput]:
        """A launched step's real token ids: each replaces its placeholder, then the token stop
        checks (EOS, stop ids) run on it, then log-probabilities, text and outputs (:meth:`_emit`)."""
        result = pending.to_host()  # the one host sync, for a copy that is done or nearly
        known = []
        for i, seq, pos in appended:
            if seq.finish_reason == "abort" or pos >= seq.num_tokens or seq.token_ids[pos] != PLACEHOLDER - i:
                continue  # aborted while the step ran
            token = result.sampled_token_ids[i]
            seq.token_ids[pos] = token
            verdict = self.scheduler.stop_verdict(seq, token, pos + 1)
            if verdict is not None:
                seq.finish_reason, seq.stop_reason = verdict
            known.append((i, seq, pos))
        return self._emit(out, result, known)

    def _emit(self, out: Any, result: Any, appended: list[tuple[int, Sequence, int]]) -> list[RequestOutput]:
        """A step's results on the host: prompt log-probabilities of its sequences; for each
        sequence ``i`` whose token at ``pos`` is now known, its log-probabilities, its metrics,
        its text and the stop strings (a sequence that finished drops any later placeholder
        token and leaves the scheduler); the stats; then one RequestOutput per request whose
        sequences got a token."""
        owner_of = self._owner
        if any(chunk is not None for chunk in result.prompt_logprobs):
            for i, seq in enumerate(out.seqs):
                owner = owner_of.get(id(seq))
                if owner is not None and result.prompt_logprobs[i] is not None:
                    owner[0].record_prompt_logprobs(result.prompt_logprobs[i], self._token_texts)
        # (At batch 256 this loop runs 256 times a step on the host, while the GPU runs the next
        # step: everything per sequence here is plain attribute work, no per-token allocation.)
        advanced: dict[str, RequestState] = {}  # (insertion-ordered: first sequence's place in the batch)
        done: set[str] = set()  # requests one of whose sequences finished here
        logprobs = result.logprobs
        now = time.time()
        sampled = []
        for i, seq, pos in appended:
            owner = owner_of.get(id(seq))
            if owner is None:  # aborted, or finished at an earlier step (async scheduling)
                continue
            state, index = owner
            advanced[state.request_id] = state
            sampled.append(seq)
            if logprobs[i] is not None:
                state.record_logprobs(index, logprobs[i], self._token_texts)
            m = seq.metrics
            if m.first_token_time is None:
                m.first_token_time = now
            m.last_token_time = now
            if seq.detokenizer is not None:
                self._update_text(seq, pos)
            if seq.finish_reason is not None:
                del seq.token_ids[pos + 1 :]
                if not seq.is_finished:
                    self.scheduler.finish(seq)
                m.finished_time = now
                self.stats.on_finished(seq)
                done.add(state.request_id)
        self.stats.on_step(sampled)
        outputs = []
        interval = self.config.stream_interval
        for rid, state in advanced.items():
            finished = rid in done and state.finished
            if finished:
                del self.requests[rid]
                for seq in state.seqs:
                    owner_of.pop(id(seq), None)
            elif state.params.output_kind == RequestOutputKind.FINAL_ONLY:
                continue
            elif interval > 1:  # a stream's output every `interval` steps, its first at once (vLLM's)
                state.unsent_steps += 1
                if state.streamed and state.unsent_steps < interval:
                    continue
                state.unsent_steps, state.streamed = 0, True
            outputs.append(self._make_output(state))
        return outputs

    def _update_text(self, seq: Sequence, pos: int) -> None:
        """Detokenize the token at ``pos`` (the one just known), then check the stop strings.

        The token stop checks have already run; a token stop (EOS or a stop token id:
        ``finish_reason == "stop"`` at this point) is not part of the text (vLLM). A stop
        string may still end a sequence the scheduler let run, or one it ended on length.
        """
        p = seq.sampling_params
        token_stop = seq.finish_reason == "stop"
        if token_stop and not p.include_stop_str_in_output:
            return
        new_text = seq.detokenizer.step(seq.token_ids[pos])
        if not new_text:
            return
        seq.output_text += new_text
        if p.stop and pos + 1 - seq.num_prompt_tokens > p.min_tokens and not token_stop:
            text = seq.output_text
            for stop in p.stop:
                start = max(0, len(text) - len(new_text) - len(stop) + 1)
                idx = text.find(stop, start)
                if idx != -1:
                    cut = idx + len(stop) if p.include_stop_str_in_output else idx
                    seq.output_text = text[:cut]
                    seq.finish_reason, seq.stop_reason = "stop", stop
                    break

    def _make_output(self, state: RequestState) -> RequestOutput:
        if self.wire_outputs:  # (an engine process: tuples to send, see RequestOutput.to_wire)
            return state.wire_output(prompt_once=True)
        return state.make_output()
