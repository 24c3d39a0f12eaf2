"""LLM: the offline batch API, shaped like ``vllm.LLM``.

    from tinyvllm import LLM, SamplingParams
    llm = LLM()                                        # SmolLM2-135M-Instruct
    outs = llm.generate(["Hello", "The sky is"], SamplingParams(temperature=0, max_tokens=16))
    outs = llm.chat([{"role": "user", "content": "What is the capital of France?"}])

``generate`` adds every prompt to an :class:`~tinyvllm.engine.llm_engine.LLMEngine`
and steps it until all are done; continuous batching happens inside the engine.

``SamplingParams(n=k)`` gives each prompt's RequestOutput k completions (``outputs[i].index == i``).

A prompt that can never run (longer than ``max_model_len - 1`` tokens, bigger than
the KV cache, empty, or with out-of-vocabulary ids) does not fail the call: its
RequestOutput comes back in its place with ``finished=True``, an empty completion
with ``finish_reason="error"``, and ``error`` holding the message (also logged as
a warning). The other prompts run normally. (vLLM raises a ValueError for the whole
call instead; tinyvllm's choice keeps a batch job's other results.)
Invalid *arguments* (bad SamplingParams, a params list of the wrong length, a
prompt of the wrong type, token ids outside the model's vocabulary in ``logit_bias`` or
``allowed_token_ids``) still raise before anything runs. Each failed prompt is logged once,
here (the engine only records the error in its output).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
from typing import Any, Sequence as Seq

import torch

from tinyvllm.engine.engine_config import EngineConfig
from tinyvllm.engine.gc_heap import frozen_heap
from tinyvllm.engine.llm_engine import LLMEngine, PromptType
from tinyvllm.engine.stats import Metric
from tinyvllm.outputs import RequestOutput
from tinyvllm.sampling_params import RequestOutputKind, SamplingParams

logger = logging.getLogger("tinyvllm")

Message = dict[str, Any]


class LLM:
    def __init__(
        self,
        model: str | None = None,
        dtype: str | torch.dtype = "auto",
        max_model_len: int | None = None,
        max_num_seqs: int = 256,
        block_size: int = 16,
        seed: int | None = 0,
        device: str | torch.device | None = None,
        gpu_memory_utilization: float = 0.9,
        max_num_batched_tokens: int | None = None,
        num_kv_blocks: int | None = None,
        enforce_eager: bool = False,
        enable_prefix_caching: bool = True,
        enable_chunked_prefill: bool = True,
        disable_log_stats: bool = False,
        async_scheduling: bool | None = None,
        tensor_parallel_size: int = 1,
        generation_config: str = "auto",
    ) -> None:
        """vLLM's arguments; they become one EngineConfig (tinyvllm.engine.engine_config), which
        validates them and documents each."""
        config = EngineConfig(
            model=model, dtype=dtype, max_model_len=max_model_len, max_num_seqs=max_num_seqs,
            block_size=block_size, seed=seed, device=device, gpu_memory_utilization=gpu_memory_utilization,
            max_num_batched_tokens=max_num_batched_tokens, num_kv_blocks=num_kv_blocks, enforce_eager=enforce_eager,
            enable_prefix_caching=enable_prefix_caching, enable_chunked_prefill=enable_chunked_prefill,
            disable_log_stats=disable_log_stats,
            async_scheduling=async_scheduling, tensor_parallel_size=tensor_parallel_size,
            generation_config=generation_config,
        )
        self.llm_engine = LLMEngine.from_config(config)
        self._request_counter = itertools.count()

    def get_tokenizer(self):
        return self.llm_engine.tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        """SamplingParams with the model's recommended settings (its generation_config.json, unless
        ``generation_config="vllm"``), SamplingParams' own defaults elsewhere: what ``generate``
        and ``chat`` use when given none (vLLM's)."""
        return SamplingParams(**self.llm_engine.default_sampling)

    def get_metrics(self) -> list[Metric]:
        """The engine's counters and gauges, as vLLM's ``LLM.get_metrics()``: a list of
        ``Counter`` / ``Gauge`` with vLLM's names (``vllm:prompt_tokens``,
        ``vllm:prefix_cache_hits``, ``vllm:kv_cache_usage_perc``...; tinyvllm/engine/stats.py)."""
        return self.llm_engine.get_metrics()

    # ---- generate -------------------------------------------------------------------------------
    def generate(
        self,
        prompts: PromptType | Seq[PromptType],
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Complete every prompt; return one RequestOutput per prompt, in input order.

        ``prompts``: a str, a list of str, a ``{"prompt_token_ids": [...]}`` dict (vLLM's
        TokensPrompt) or ``{"prompt": "..."}`` (TextPrompt), or a list mixing those.
        ``sampling_params``: one for all prompts, or a list with one per prompt; a dict of
        SamplingParams' fields (``{"temperature": 0, "max_tokens": 32}``) stands for one.
        """
        prompt_list = _as_prompt_list(prompts)
        params_list = self._params_list(sampling_params, len(prompt_list))
        return self._run(prompt_list, params_list, use_tqdm)

    # ---- chat -----------------------------------------------------------------------------------
    def chat(
        self,
        messages: list[Message] | list[list[Message]],
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
        use_tqdm: bool = True,
        add_generation_prompt: bool = True,
        chat_template: str | None = None,
        chat_template_kwargs: dict[str, Any] | None = None,
        continue_final_message: bool = False,
    ) -> list[RequestOutput]:
        """Generate replies to one conversation (a list of {"role", "content"} dicts) or a batch
        of conversations (a list of such lists), using the tokenizer's chat template.
        ``continue_final_message``: go on with the last message (an assistant reply begun by the
        caller) instead of starting a new one; ``add_generation_prompt`` must then be False.

        The template already writes the BOS token when the model wants one, so the rendered
        text is tokenized without adding special tokens (no double BOS).
        """
        if not isinstance(messages, (list, tuple)) or not messages:
            raise ValueError("messages must be a non-empty list of messages or of conversations")
        conversations = [messages] if isinstance(messages[0], dict) else list(messages)
        tok = self.get_tokenizer()
        kwargs = dict(chat_template_kwargs or {})
        if chat_template is not None:
            kwargs["chat_template"] = chat_template
        prompts = []
        for conv in conversations:
            if not isinstance(conv, (list, tuple)) or not all(isinstance(m, dict) for m in conv):
                raise ValueError("each conversation must be a list of {'role': ..., 'content': ...} dicts")
            text = tok.apply_chat_template(list(conv), add_generation_prompt=add_generation_prompt,
                                           continue_final_message=continue_final_message, **kwargs)  # fmt: skip
            prompts.append({"prompt": text, "prompt_token_ids": tok.encode(text, add_special_tokens=False)})
        params_list = self._params_list(sampling_params, len(prompts))
        return self._run(prompts, params_list, use_tqdm)

    # ---- internals ------------------------------------------------------------------------------
    def _params_list(self, sampling_params, n: int) -> list[SamplingParams]:
        """One SamplingParams per prompt from None (the model's defaults), one SamplingParams (or
        dict), or a list of them."""
        if sampling_params is None:
            return [self.get_default_sampling_params()] * n
        if isinstance(sampling_params, (SamplingParams, dict)):
            return [_as_sampling_params(sampling_params, "sampling_params")] * n
        if not isinstance(sampling_params, (list, tuple)):
            raise TypeError(
                "sampling_params must be a SamplingParams, a dict of its fields, or a list with one per prompt, "
                f"got {type(sampling_params).__name__}"
            )
        if len(sampling_params) != n:
            raise ValueError(
                f"sampling_params has {len(sampling_params)} entries but there are {n} prompts: "
                "pass one SamplingParams, or a list with one per prompt."
            )
        return [_as_sampling_params(p, f"sampling_params[{i}]") for i, p in enumerate(sampling_params)]

    def _run(self, prompts: list[PromptType], params: list[SamplingParams], use_tqdm: bool) -> list[RequestOutput]:
        engine = self.llm_engine
        ids: list[str] = []
        final: dict[str, RequestOutput] = {}
        bar = None
        # Only the finished outputs are wanted here: FINAL_ONLY spares the engine building one
        # RequestOutput per request per step (vLLM's LLM does the same). The caller's params are
        # copied, not changed; one copy per distinct params object.
        final_only: dict[int, SamplingParams] = {}
        try:
            for prompt, p in zip(prompts, params):  # (a request the engine refuses undoes the ones before it)
                rid = str(next(self._request_counter))
                if id(p) not in final_only:
                    final_only[id(p)] = dataclasses.replace(p, output_kind=RequestOutputKind.FINAL_ONLY)
                engine.add_request(rid, prompt, final_only[id(p)])
                ids.append(rid)
            wanted = set(ids)
            if use_tqdm:
                from tqdm.auto import tqdm

                bar = tqdm(total=len(ids), desc="Processed prompts", dynamic_ncols=True)
            with frozen_heap():  # no full garbage collection walks the start-up heap mid-run (gc_heap.py)
                while len(final) < len(ids):
                    if not engine.has_unfinished_requests():
                        raise RuntimeError("engine stopped before every request finished")
                    for out in engine.step():
                        if out.finished and out.request_id in wanted:
                            final[out.request_id] = out
                            if bar is not None:
                                bar.update(1)
        except BaseException:
            engine.abort_request([r for r in ids if r not in final])
            engine.step()  # drain the abort outputs so the engine is clean for the next call
            raise
        finally:
            if bar is not None:
                bar.close()
        for rid, out in final.items():
            if out.error is not None:
                logger.warning("tinyvllm: prompt %d failed: %s", ids.index(rid), out.error)
        return [final[r] for r in ids]


def _as_sampling_params(params: SamplingParams | dict, name: str) -> SamplingParams:
    """A SamplingParams, or a dict of its fields (``{"temperature": 0}``) made into one."""
    if isinstance(params, SamplingParams):
        return params
    if isinstance(params, dict):
        known = {f.name for f in dataclasses.fields(SamplingParams) if f.init}
        unknown = sorted(str(k) for k in params if k not in known)
        if unknown:
            raise TypeError(f"{name} has no field {unknown[0]!r}; SamplingParams' fields are {', '.join(sorted(known))}")
        return SamplingParams(**params)
    raise TypeError(f"{name} must be a SamplingParams or a dict of its fields, got {type(params).__name__}")


def _as_prompt_list(prompts) -> list[PromptType]:
    if isinstance(prompts, (str, dict)):
        return [prompts]
    if isinstance(prompts, (list, tuple)):
        if not prompts:
            return []
        # A flat list of ints is ONE tokenized prompt (as vLLM's prompt_token_ids); a list of lists is many.
        if all(isinstance(t, int) and not isinstance(t, bool) for t in prompts):
            return [list(prompts)]
        return list(prompts)
    raise TypeError(f"prompts must be a str, a dict, or a list of those, got {type(prompts).__name__}")
