"""LLMEngine: requests in, one model step at a time, RequestOutputs out.

    engine.add_request("req-0", "Hello", SamplingParams(max_tokens=8))
    while engine.has_unfinished_requests():
        for out in engine.step():      # every request that advanced this step
            print(out.request_id, out.outputs[0].text, out.finished)

One ``step()`` is: the scheduler picks a batch (a prefill of new sequences or a
decode of every running one), the ModelRunner computes one row of logits per
sequence, the Sampler picks one token per row, and the engine appends the tokens,
detokenizes them incrementally, checks the stop conditions, and frees the blocks
of the sequences that finished, so that the next step can admit new requests.
Requests may be added or aborted between any two steps; request ids are the
handle, which is what an async loop or an OpenAI-compatible server needs.

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

from tinyvllm import ops
from tinyvllm.engine.block_manager import BlockManager
from tinyvllm.engine.sampler import Sampler
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
        model_runner: Any,
        tokenizer: Any,
        *,
        block_size: int,
        num_kv_blocks: int,
        max_model_len: int,
        max_num_seqs: int = 256,
        max_num_batched_tokens: int | None = None,
        eos_token_ids: list[int] | None = None,
        vocab_size: int | None = None,
        seed: int | None = 0,
        device: str | torch.device = "cpu",
        detokenizer_cls: Any = None,
    ) -> None:
        self.model_runner = model_runner
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.block_size = block_size
        self.num_kv_blocks = num_kv_blocks
        self.max_model_len = max_model_len
        # One sequence must always fit in the cache on its own (that is what makes
        # preemption deadlock-free), so a sequence's length is capped by the capacity too.
        self.max_seq_len = min(max_model_len, num_kv_blocks * block_size)
        if max_num_batched_tokens is None:
            max_num_batched_tokens = max(8192, self.max_seq_len)
        if max_num_batched_tokens < self.max_seq_len:
            raise ValueError(
                f"max_num_batched_tokens ({max_num_batched_tokens}) is smaller than the longest sequence "
                f"({self.max_seq_len} tokens): without chunked prefill a prompt must fit one step. "
                "Raise max_num_batched_tokens or lower max_model_len."
            )
        self.max_num_batched_tokens = max_num_batched_tokens
        self.vocab_size = vocab_size
        if detokenizer_cls is None and tokenizer is not None:
            from tinyvllm.tokenizer import IncrementalDetokenizer as detokenizer_cls
        self.detokenizer_cls = detokenizer_cls
        if eos_token_ids is None:
            eos_token_ids = list(getattr(tokenizer, "eos_token_ids", None) or []) if tokenizer is not None else []
        self.eos_token_ids = list(eos_token_ids)
        self._eos_set = frozenset(self.eos_token_ids)

        self.block_manager = BlockManager(num_kv_blocks, block_size)
        self.scheduler = Scheduler(
            self.block_manager, max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
            # the runner knows its attention kernel, and so when the order of a decode batch matters
            longest_first_min_seqs=getattr(model_runner, "decode_longest_first_min_seqs", None),
        )
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(0 if seed is None else seed)
        self.sampler = Sampler(self.eos_token_ids, self.generator)

        self.requests: dict[str, Sequence] = {}  # unfinished requests by id
        self._pending: list[RequestOutput] = []  # finished outside a step (errors, aborts)
        self._arrival = itertools.count()
        self.num_steps = 0

    # ---- construction from a model name -------------------------------------------------
    @classmethod
    def from_model(
        cls,
        model: str | None = None,
        *,
        dtype: str | torch.dtype = "auto",
        device: str | torch.device | None = None,
        max_model_len: int | None = None,
        max_num_seqs: int = 256,
        block_size: int = 16,
        seed: int | None = 0,
        gpu_memory_utilization: float = 0.9,
        max_num_batched_tokens: int | None = None,
        num_kv_blocks: int | None = None,
    ) -> "LLMEngine":
        from tinyvllm.engine.model_runner import ModelRunner
        from tinyvllm.loader import load_checkpoint, resolve_model
        from tinyvllm.tokenizer import Tokenizer

        device = torch.device(device) if device is not None else default_device()
        torch_dtype = resolve_dtype(dtype, device)
        if not 0.0 < gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}.")
        path = resolve_model(model)
        config, weights = load_checkpoint(path, torch_dtype)
        tokenizer = Tokenizer.from_pretrained(path)

        if max_model_len is None:
            max_model_len = config.max_position_embeddings
            if device.type == "cpu":
                max_model_len = min(max_model_len, CPU_DEFAULT_MAX_MODEL_LEN)
        elif max_model_len > config.max_position_embeddings:
            raise ValueError(
                f"max_model_len ({max_model_len}) is larger than the model's max_position_embeddings "
                f"({config.max_position_embeddings})."
            )
        if max_num_batched_tokens is None:
            max_num_batched_tokens = max(8192, max_model_len)
        # num_kv_blocks=None: the runner sizes the cache after the weights are on the device
        # (GPU: free memory x gpu_memory_utilization minus an activation reserve; CPU: a few
        # full-length sequences, capped at 1 GiB). It refuses a cache smaller than max_model_len.
        runner = ModelRunner(
            config, weights, dtype=torch_dtype, device=device, block_size=block_size, num_blocks=num_kv_blocks,
            gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len,
            max_num_batched_tokens=max_num_batched_tokens, max_num_seqs=max_num_seqs,
        )
        num_kv_blocks = runner.num_blocks
        capacity = num_kv_blocks * block_size
        if capacity < max_model_len:
            logger.warning(
                "tinyvllm: the KV cache holds %d tokens (%d blocks of %d), less than max_model_len=%d; "
                "sequences will be capped at %d tokens.", capacity, num_kv_blocks, block_size, max_model_len, capacity,
            )
        del weights
        eos = list(dict.fromkeys(list(getattr(tokenizer, "eos_token_ids", None) or []) + list(config.eos_token_ids or [])))
        engine = cls(
            runner, tokenizer, block_size=block_size, num_kv_blocks=num_kv_blocks, max_model_len=max_model_len,
            max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens, eos_token_ids=eos,
            vocab_size=config.vocab_size, seed=seed, device=device,
        )
        engine.model_config = config
        engine.dtype = torch_dtype
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
            seq.error = error
            logger.warning("tinyvllm: request %s failed: %s", request_id, error)
            self._pending.append(self._make_output(seq))
            return
        if params.seed is not None:
            seq.generator = torch.Generator(device=self.device)
            seq.generator.manual_seed(params.seed)
        if self.detokenizer_cls is not None:
            seq.detokenizer = self.detokenizer_cls(self.tokenizer, seq.prompt_token_ids)
        self.requests[request_id] = seq
        self.scheduler.add(seq)

    def _validate(self, seq: Sequence) -> str | None:
        n = seq.num_prompt_tokens
        if n == 0:
            return "The prompt is empty."
        if n + 1 > self.max_model_len:
            return (
                f"The prompt (length {n}) is longer than the maximum model length of {self.max_model_len} "
                "(it needs room for at least one generated token). Shorten the prompt or raise max_model_len."
            )
        if n + 1 > self.max_seq_len:
            return (
                f"The prompt (length {n}) does not fit in the KV cache, which holds {self.max_seq_len} tokens "
                f"({self.num_kv_blocks} blocks of {self.block_size}). Raise num_kv_blocks / gpu_memory_utilization."
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
        outputs, self._pending = self._pending, []
        if not self.scheduler.has_unfinished():
            return outputs
        sched = self.scheduler.schedule()
        if sched.is_empty:
            raise RuntimeError(  # cannot happen while one sequence always fits; guard against a hang
                f"scheduler made no progress: {len(self.scheduler.waiting)} waiting, "
                f"{len(self.scheduler.running)} running, {self.block_manager.num_free_blocks} free blocks"
            )
        seqs = sched.seqs
        logits = self.model_runner.execute(seqs)
        token_ids = self.sampler(logits, seqs).tolist()  # the step's single device->host transfer
        # The kernels' flags for indices they refused to follow (a bug in the inputs the runner
        # built): host memory, already final once the copy above has waited for the step.
        ops.check_kernel_errors(synchronize=False)
        self.num_steps += 1
        for seq, token_id in zip(seqs, token_ids):
            seq.num_computed_tokens = seq.num_tokens
            seq.append_token(token_id)
            self._postprocess(seq, token_id)
            if seq.finish_reason is not None:
                self.scheduler.finish(seq)
                del self.requests[seq.request_id]
            outputs.append(self._make_output(seq))
        return outputs

    def _postprocess(self, seq: Sequence, token_id: int) -> None:
        """Stop checks in vLLM's order, then incremental detokenization and stop strings."""
        p = seq.sampling_params
        n_out = seq.num_output_tokens
        stop_token = False
        if n_out >= p.min_tokens:
            if not p.ignore_eos and token_id in self._eos_set:
                seq.finish_reason, seq.stop_reason, stop_token = "stop", None, True
            elif token_id in p.stop_token_set:
                seq.finish_reason, seq.stop_reason, stop_token = "stop", token_id, True
        if seq.finish_reason is None:
            if (p.max_tokens is not None and n_out >= p.max_tokens) or seq.num_tokens >= self.max_seq_len:
                seq.finish_reason = "length"
        if seq.detokenizer is None or (stop_token and not p.include_stop_str_in_output):
            return  # the stop token itself is not part of the text (vLLM)
        new_text = seq.detokenizer.step(token_id)
        if not new_text:
            return
        seq.output_text += new_text
        if p.stop and n_out > p.min_tokens and not stop_token:
            text = seq.output_text
            for stop in p.stop:
                start = max(0, len(text) - len(new_text) - len(stop) + 1)
                idx = text.find(stop, start)
                if idx != -1:
                    cut = idx + len(stop) if p.include_stop_str_in_output else idx
                    seq.output_text = text[:cut]
                    seq.finish_reason, seq.stop_reason = "stop", stop
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


# ---- device, dtype and KV-cache sizing ---------------------------------------------------------
# The reference ops are slow on CPU and the runner's default CPU cache holds a few sequences of
# this length (tinyvllm.engine.model_runner.DEFAULT_CPU_MAX_MODEL_LEN).
CPU_DEFAULT_MAX_MODEL_LEN = 4096


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


_DTYPES = {
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "half": torch.float16, "fp16": torch.float16,
    "float32": torch.float32, "float": torch.float32, "fp32": torch.float32,
}


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """"auto" -> bfloat16 on a GPU, float32 on CPU; else a name or a torch dtype."""
    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.bfloat16, torch.float16, torch.float32):
            raise ValueError(f"dtype must be bfloat16, float16 or float32, got {dtype}.")
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, str) and dtype.lower() in _DTYPES:
        return _DTYPES[dtype.lower()]
    raise ValueError(f"dtype must be 'auto', 'bfloat16', 'float16', 'float32' or a torch dtype, got {dtype!r}.")
