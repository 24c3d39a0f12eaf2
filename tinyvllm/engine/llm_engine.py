"""LLMEngine: requests in, one model step at a time, RequestOutputs out.

    engine = LLMEngine.from_config(EngineConfig(max_model_len=2048))   # or LLMEngine.from_model(None, ...)
    engine.add_request("req-0", "Hello", SamplingParams(max_tokens=8))
    while engine.has_unfinished_requests():
        for out in engine.step():      # every request that advanced this step
            print(out.request_id, out.outputs[0].text, out.finished)

One ``step()`` is nano-vllm's shape:

    out = scheduler.schedule()                   # which sequences, how many tokens each
    token_ids = model_runner.execute(out)        # forward pass + sampling: one id per sequence
    scheduler.postprocess(out, token_ids)        # progress, token stop checks, free finished blocks
    for seq in out.seqs:                         # text: incremental detokenization, stop strings,
        self._update_text(seq)                   # then one RequestOutput per sequence

The engine owns the requests and the text (tokenizer, detokenizers, stop strings); the
Scheduler owns the sequences' progress and the KV blocks; the ModelRunner owns the device.
Requests may be added or aborted between any two steps; request ids are the handle, which
is what an async loop or an OpenAI-compatible server needs.

Host syncs: the only device->host transfer in a step is the list of sampled ids.

Requests that can never run (prompt longer than the model allows, or bigger than
the whole KV cache, or empty) are not raised as exceptions: they finish at once
with ``finish_reason="error"`` and ``RequestOutput.error`` set, returned by the
next ``step()``, so that one bad request never fails the others of a batch.
"""

from __future__ import annotations

import itertools
import logging
from typing import Any

import torch

from tinyvllm.engine.engine_config import EngineConfig
from tinyvllm.engine.scheduler import Scheduler
from tinyvllm.engine.sequence import Sequence, SequenceStatus
from tinyvllm.outputs import CompletionOutput, RequestOutput
from tinyvllm.sampling_params import SamplingParams

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

        self.requests: dict[str, Sequence] = {}  # unfinished requests by id
        self._pending: list[RequestOutput] = []  # finished outside a step (errors, aborts)
        self._arrival = itertools.count()
        self.num_steps = 0

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
        return engine

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

        Raises only for caller bugs (duplicate id, wrong types). A prompt that can
        never run finishes with ``finish_reason="error"`` (see the module docstring).
        """
        request_id = str(request_id)
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        params = params if params is not None else SamplingParams()
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be a SamplingParams, got {type(params).__name__}")
        text, ids = parse_prompt(prompt)
        if prompt_token_ids is not None:
            ids = list(prompt_token_ids)
        if ids is None:
            ids = self.tokenizer.encode(text)
        seq = Sequence(request_id, list(ids), params, arrival_index=next(self._arrival), prompt=text)
        error = self._validate(seq)
        if error is not None:
            seq.status = SequenceStatus.FINISHED
            seq.finish_reason = "error"
            seq.error = error  # reported by whoever reads the output (LLM.generate logs it, once)
            self._pending.append(self._make_output(seq))
            return
        if params.seed is not None:
            seq.generator = torch.Generator(device=self.config.device)
            seq.generator.manual_seed(params.seed)
        if self.detokenizer_cls is not None:
            seq.detokenizer = self.detokenizer_cls(self.tokenizer, seq.prompt_token_ids)
        self.requests[request_id] = seq
        self.scheduler.add(seq)

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
        """Stop request(s) now and free their blocks; the final output (finish_reason "abort")
        comes from the next ``step()``. Unknown or finished ids are ignored."""
        ids = [request_id] if isinstance(request_id, str) else list(request_id)
        for rid in ids:
            seq = self.requests.pop(rid, None)
            if seq is None:
                continue
            self.scheduler.finish(seq)
            seq.finish_reason = "abort"
            self._pending.append(self._make_output(seq))

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests) or bool(self._pending)

    def get_num_unfinished_requests(self) -> int:
        return len(self.requests)

    # ---- the step ----------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one model step; return an output for every request that advanced (and for those
        that failed or were aborted since the last step)."""
        outputs, self._pending = self._pending, []
        if not self.scheduler.has_unfinished():
            return outputs
        out = self.scheduler.schedule()
        token_ids = self.model_runner.execute(out)
        self.scheduler.postprocess(out, token_ids)
        self.num_steps += 1
        for seq in out.seqs:
            self._update_text(seq)
            if seq.finish_reason is not None:
                del self.requests[seq.request_id]
            outputs.append(self._make_output(seq))
        return outputs

    def _update_text(self, seq: Sequence) -> None:
        """Detokenize the token the scheduler just appended, then check the stop strings.

        The scheduler has already run the token stop checks; a token stop (EOS or a stop token
        id: ``finish_reason == "stop"`` at this point) is not part of the text (vLLM). A stop
        string may still end a sequence the scheduler let run, or one it ended on length.
        """
        p = seq.sampling_params
        token_stop = seq.finish_reason == "stop"
        if seq.detokenizer is None or (token_stop and not p.include_stop_str_in_output):
            return
        new_text = seq.detokenizer.step(seq.token_ids[-1])
        if not new_text:
            return
        seq.output_text += new_text
        if p.stop and seq.num_output_tokens > p.min_tokens and not token_stop:
            text = seq.output_text
            for stop in p.stop:
                start = max(0, len(text) - len(new_text) - len(stop) + 1)
                idx = text.find(stop, start)
                if idx != -1:
                    cut = idx + len(stop) if p.include_stop_str_in_output else idx
                    seq.output_text = text[:cut]
                    seq.finish_reason, seq.stop_reason = "stop", stop
                    if not seq.is_finished:
                        self.scheduler.finish(seq)
                    break

    def _make_output(self, seq: Sequence) -> RequestOutput:
        text = seq.output_text
        p = seq.sampling_params
        if seq.finish_reason is None and p.stop and not p.include_stop_str_in_output:
            # While running, hold back a tail that could be the start of a stop string,
            # so a streamed text never shows characters that a later stop would cut.
            hold = max(len(s) for s in p.stop) - 1
            if hold > 0:
                text = text[: max(0, len(text) - hold)]
        completion = CompletionOutput(
            index=0, text=text, token_ids=list(seq.output_token_ids),
            finish_reason=seq.finish_reason, stop_reason=seq.stop_reason,
        )
        return RequestOutput(
            request_id=seq.request_id, prompt=seq.prompt, prompt_token_ids=list(seq.prompt_token_ids),
            outputs=[completion], finished=seq.finish_reason is not None, error=seq.error,
        )
