"""EngineConfig: every setting of one engine, built once from ``LLM(...)``'s arguments.

    config = EngineConfig(model=None, max_model_len=2048)   # vLLM's argument names
    engine = LLMEngine.from_config(config)

The engine's parts read their settings from this one object instead of passing a dozen
keyword arguments down to each other: the Scheduler (``max_num_seqs``, ``max_num_batched_tokens``,
``max_seq_len``, ``eos_token_ids``, ``decode_longest_first_min_seqs``, ``enable_chunked_prefill``,
``enable_prefix_caching``), the ModelRunner
(``dtype``, ``device``, ``block_size``, ``num_kv_blocks``, ``seed``) and the LLMEngine
(the limits it checks each request against, ``disable_log_stats``).

Some settings can only be known later, so the config is completed in three steps, each of
which checks what it adds:

1. ``EngineConfig(...)``: the user's arguments, validated (a TypeError or ValueError names
   the field: :mod:`tinyvllm.validation`);
   ``device`` and ``dtype`` resolved ("auto" -> bfloat16 on a GPU, float32 on CPU).
2. :meth:`fit_model`, once the checkpoint is read: ``max_model_len`` defaults to the model's
   ``max_position_embeddings`` (capped at 4096 on CPU) or is checked against it; the EOS ids.
3. :meth:`fit_cache`, once the ModelRunner has sized the KV cache (when ``num_kv_blocks`` was
   not given); the runner also sets ``decode_longest_first_min_seqs`` from its GPU.

The derived values (the default ``max_num_batched_tokens``, and ``max_seq_len``: a sequence's
length capped by the cache) are computed in one place, :meth:`_derive`, as soon as what they
derive from is known.

The token budget ``max_num_batched_tokens`` caps the tokens of one step. With chunked prefill
(the default, as in vLLM) a prompt longer than the budget is split across steps, so the budget
only trades a step's latency for its throughput (default 8192). Without it a prompt must fit
one step, so the budget must hold the longest sequence (default ``max(8192, max_model_len)``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterable

import torch

from tinyvllm.generation_config import check_generation_config

from tinyvllm.distributed.utils import check_devices, check_tensor_parallel
from tinyvllm.validation import check_bool, check_float, check_int

if TYPE_CHECKING:
    from tinyvllm.config import ModelConfig

# The reference ops are slow on CPU; the runner's CPU cache holds a few sequences of this length.
CPU_DEFAULT_MAX_MODEL_LEN = 4096
# The default token budget of a step (without chunked prefill: at least max_model_len, since a
# prompt must then fit one step).
DEFAULT_MAX_NUM_BATCHED_TOKENS = 8192

_DTYPES = {
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "half": torch.float16, "fp16": torch.float16,
    "float32": torch.float32, "float": torch.float32, "fp32": torch.float32,
}  # fmt: skip


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """"auto" -> bfloat16 on a GPU, float32 on CPU; else a name or a torch dtype."""
    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.bfloat16, torch.float16, torch.float32):
            raise ValueError(f"dtype must be bfloat16, float16 or float32, got {dtype}.")
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if not isinstance(dtype, str):
        raise TypeError(f"dtype must be a str or a torch.dtype, got {type(dtype).__name__} {dtype!r}.")
    if dtype.lower() in _DTYPES:
        return _DTYPES[dtype.lower()]
    raise ValueError(f"dtype must be 'auto', 'bfloat16', 'float16', 'float32' or a torch dtype, got {dtype!r}.")


def _resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return default_device()
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device must be 'cuda', 'cpu' or a torch.device, got {device!r}.") from e
    if resolved.type not in ("cuda", "cpu"):
        raise ValueError(f"device must be 'cuda' or 'cpu', got {device!r}.")
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device is {device!r} but no CUDA GPU is available.")
    return resolved


@dataclass
class EngineConfig:
    """The engine's settings; the first sixteen are ``LLM(...)``'s arguments, with vLLM's names."""

    model: str | None = None  # local dir, .gguf file or Hugging Face repo id; None: SmolLM2-135M-Instruct
    dtype: str | torch.dtype = "auto"  # resolved to a torch.dtype
    max_model_len: int | None = None  # longest prompt + output; None: the model's limit (4096 on CPU)
    max_num_seqs: int = 256  # sequences in one step at most
    block_size: int = 16  # tokens per KV-cache block
    seed: int | None = 0  # the sampler's seed (requests with their own seed use that)
    device: str | torch.device | None = None  # resolved to a torch.device; None: cuda if available
    gpu_memory_utilization: float = 0.9  # share of the free GPU memory the engine may use
    max_num_batched_tokens: int | None = None  # tokens in one step at most; None: 8192 (see the docstring)
    num_kv_blocks: int | None = None  # KV-cache blocks; None: sized by the ModelRunner from memory
    enforce_eager: bool = False  # True: no CUDA graphs, every decode step launched op by op
    enable_prefix_caching: bool = True  # share the KV blocks of common prompt prefixes (block_manager.py)
    enable_chunked_prefill: bool = True  # split long prompts across steps, decodes first (scheduler.py)
    disable_log_stats: bool = False  # True: no stats line in the log (LLM.get_metrics() still counts)
    async_scheduling: bool | None = None  # overlap the host's work with the GPU's step; None: on a GPU
    tensor_parallel_size: int = 1  # ranks (GPUs, or CPU processes) the model is split across (Megatron-style)
    # Where unset request fields take their defaults: the model's generation_config.json ("auto",
    # vLLM's default), none ("vllm"), or a folder's (tinyvllm/generation_config.py).
    generation_config: str = "auto"
    # A streaming request's outputs every this many steps (its first and its last always): a server's
    # host work per step (outputs, pipe, SSE chunks) divided by it. vLLM's --stream-interval; 1: every token.
    stream_interval: int = 1

    # ---- completed while the engine is built (see the module docstring) ----
    eos_token_ids: tuple[int, ...] = ()  # the tokenizer's and config.json's end-of-sequence ids
    decode_longest_first_min_seqs: int | None = None  # set by the ModelRunner on a GPU (None: arrival order)
    max_seq_len: int | None = field(default=None, init=False)  # min(max_model_len, cache capacity)

    def __post_init__(self) -> None:
        if isinstance(self.model, os.PathLike):
            self.model = os.fspath(self.model)
        if self.model is not None and not isinstance(self.model, str):
            raise TypeError(f"model must be a str (a path or a Hugging Face repo id) or None, got {self.model!r}.")
        self.device = _resolve_device(self.device)
        self.dtype = resolve_dtype(self.dtype, self.device)
        check_int("max_model_len", self.max_model_len, ge=1, optional=True)
        check_int("max_num_seqs", self.max_num_seqs, ge=1)
        check_int("block_size", self.block_size, ge=1)
        check_int("max_num_batched_tokens", self.max_num_batched_tokens, ge=1, optional=True)
        check_int("num_kv_blocks", self.num_kv_blocks, ge=1, optional=True)
        check_bool("enforce_eager", self.enforce_eager)
        check_int("seed", self.seed, optional=True)
        check_float("gpu_memory_utilization", self.gpu_memory_utilization, gt=0, le=1)
        check_int("tensor_parallel_size", self.tensor_parallel_size, ge=1)
        check_int("stream_interval", self.stream_interval, ge=1)
        check_generation_config(self.generation_config)
        check_devices(self.tensor_parallel_size, self.device)  # one GPU per rank
        for name in ("enable_prefix_caching", "enable_chunked_prefill", "disable_log_stats"):
            check_bool(name, getattr(self, name))
        if self.async_scheduling is None:
            self.async_scheduling = self.device.type == "cuda"
        check_bool("async_scheduling", self.async_scheduling)
        self.eos_token_ids = tuple(self.eos_token_ids)
        self._derive()

    def fit_model(self, model_config: "ModelConfig", eos_token_ids: Iterable[int] = ()) -> None:
        """Step 2: the settings that depend on the checkpoint. ``eos_token_ids``: the tokenizer's,
        merged (first) with config.json's."""
        check_tensor_parallel(model_config, self.tensor_parallel_size)  # the heads split evenly
        limit = model_config.max_position_embeddings
        if self.max_model_len is None:
            self.max_model_len = min(limit, CPU_DEFAULT_MAX_MODEL_LEN) if self.device.type == "cpu" else limit
        elif self.max_model_len > limit:
            raise ValueError(
                f"max_model_len ({self.max_model_len}) is larger than the model's max_position_embeddings ({limit})."
            )
        self.eos_token_ids = tuple(dict.fromkeys([*eos_token_ids, *model_config.eos_token_ids]))
        self._derive()

    def fit_cache(self, num_kv_blocks: int) -> None:
        """Step 3: the KV cache's size, as the ModelRunner measured it."""
        check_int("num_kv_blocks", num_kv_blocks, ge=1)
        self.num_kv_blocks = num_kv_blocks
        self._derive()

    @property
    def cache_capacity(self) -> int:
        """Tokens the whole KV cache holds."""
        if self.num_kv_blocks is None:
            raise ValueError("num_kv_blocks is not known yet (the ModelRunner sizes the cache)")
        return self.num_kv_blocks * self.block_size

    def _derive(self) -> None:
        """The values that follow from others; each is set here, as soon as its inputs are known."""
        if self.enable_chunked_prefill:
            if self.max_num_batched_tokens is None:
                self.max_num_batched_tokens = DEFAULT_MAX_NUM_BATCHED_TOKENS
            # Every running sequence decodes one token per step, inside the budget (vLLM's rule).
            if self.max_num_batched_tokens < self.max_num_seqs:
                raise ValueError(
                    f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be at least max_num_seqs "
                    f"({self.max_num_seqs}): with chunked prefill every running sequence's next token is in "
                    "the step's budget."
                )
        if self.max_model_len is None:
            return
        if self.max_num_batched_tokens is None:
            self.max_num_batched_tokens = max(DEFAULT_MAX_NUM_BATCHED_TOKENS, self.max_model_len)
        if self.num_kv_blocks is None:
            return
        # One sequence must always fit in the cache on its own (that is what makes preemption
        # deadlock-free), so a sequence's length is capped by the capacity too.
        self.max_seq_len = min(self.max_model_len, self.cache_capacity)
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < self.max_seq_len:
            raise ValueError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) is smaller than the longest sequence "
                f"({self.max_seq_len} tokens): without chunked prefill a prompt must fit one step. "
                "Raise max_num_batched_tokens, lower max_model_len or enable_chunked_prefill."
            )
