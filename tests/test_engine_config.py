"""EngineConfig: LLM(...)'s arguments validated in one place, completed in three steps,
with the derived values (the token budget, max_seq_len) computed once."""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch

from fixtures import tiny_config_dict
from tinyvllm.config import ModelConfig
from tinyvllm.engine.engine_config import CPU_DEFAULT_MAX_MODEL_LEN, EngineConfig

CPU = dict(device="cpu")


def model(max_position_embeddings: int = 256, eos=2) -> ModelConfig:
    return ModelConfig.from_dict(tiny_config_dict(max_position_embeddings=max_position_embeddings, eos_token_id=eos))


def test_llm_arguments_are_the_config_fields():
    """LLM(...)'s public signature (vLLM's names and tinyvllm's defaults) is EngineConfig's first fields."""
    from tinyvllm import LLM

    params = list(inspect.signature(LLM.__init__).parameters.values())[1:]
    fields = dataclasses.fields(EngineConfig)[: len(params)]
    assert [(p.name, p.default) for p in params] == [(f.name, f.default) for f in fields]
    assert [p.name for p in params] == [
        "model", "dtype", "max_model_len", "max_num_seqs", "block_size", "seed", "device",
        "gpu_memory_utilization", "max_num_batched_tokens", "num_kv_blocks", "enforce_eager",
        "enable_prefix_caching", "enable_chunked_prefill", "disable_log_stats",
        "async_scheduling", "tensor_parallel_size", "generation_config",
    ]  # fmt: skip


@pytest.mark.parametrize(
    "field, value",
    [
        ("max_model_len", 0), ("max_model_len", -5), ("max_num_seqs", 0), ("block_size", 0),
        ("max_num_batched_tokens", -1), ("num_kv_blocks", 0), ("gpu_memory_utilization", 0.0),
        ("gpu_memory_utilization", 1.5), ("gpu_memory_utilization", float("nan")), ("dtype", "int8"),
        ("dtype", "float99"), ("dtype", torch.int32), ("device", "tpu"), ("device", "not a device"),
        ("max_num_batched_tokens", 100),  # with chunked prefill: fewer than max_num_seqs (256)
        ("tensor_parallel_size", 0),
    ],
)  # fmt: skip
def test_each_field_is_validated_by_name(field, value):
    with pytest.raises(ValueError, match=rf"^{field} "):
        EngineConfig(**{**CPU, field: value})


@pytest.mark.parametrize(
    "field, value, wanted",
    [
        ("max_model_len", 1.5, "an int or None"), ("max_num_seqs", None, "an int"), ("block_size", True, "an int"),
        ("block_size", "16", "an int"), ("seed", "1", "an int or None"), ("enforce_eager", 1, "True or False"),
        ("gpu_memory_utilization", "0.9", "a number"), ("dtype", 16, "a str or a torch.dtype"), ("model", 3, "a str"),
        ("enable_prefix_caching", 1, "True or False"), ("enable_chunked_prefill", "yes", "True or False"),
        ("disable_log_stats", None, "True or False"), ("async_scheduling", 1, "True or False"),
    ],
)  # fmt: skip
def test_a_field_of_the_wrong_type_is_a_type_error_naming_the_type_wanted(field, value, wanted):
    with pytest.raises(TypeError, match=rf"^{field} must be {wanted}"):
        EngineConfig(**{**CPU, field: value})


def test_llm_validates_before_loading_anything():
    """A bad argument is a ValueError naming it, before the (missing) model is looked for."""
    from tinyvllm import LLM

    with pytest.raises(ValueError, match="max_num_seqs"):
        LLM(model="/no/such/model", max_num_seqs=0, device="cpu")


def test_device_and_dtype_are_resolved():
    c = EngineConfig(**CPU)
    assert c.device == torch.device("cpu") and c.dtype == torch.float32  # "auto" on CPU
    assert EngineConfig(dtype="bf16", **CPU).dtype == torch.bfloat16
    assert EngineConfig(dtype=torch.float16, **CPU).dtype == torch.float16
    assert EngineConfig().device.type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_fit_model_defaults_or_checks_max_model_len_and_merges_eos():
    c = EngineConfig(enable_chunked_prefill=False, **CPU)
    assert c.max_model_len is None and c.max_num_batched_tokens is None and c.max_seq_len is None
    c.fit_model(model(max_position_embeddings=100_000, eos=2), eos_token_ids=[7, 2])
    assert c.max_model_len == CPU_DEFAULT_MAX_MODEL_LEN  # capped on CPU
    assert c.max_num_batched_tokens == 8192  # the unchunked default budget: max(8192, max_model_len)
    assert c.eos_token_ids == (7, 2)  # the tokenizer's first, no repeats
    c = EngineConfig(max_model_len=64, **CPU)
    c.fit_model(model(256))
    assert c.max_model_len == 64 and c.eos_token_ids == (2,)
    with pytest.raises(ValueError, match=r"max_model_len \(300\) is larger than the model's max_position_embeddings \(256\)"):
        EngineConfig(max_model_len=300, **CPU).fit_model(model(256))
    c = EngineConfig(max_model_len=20_000, **CPU)
    assert c.max_num_batched_tokens == 8192  # chunked prefill: a long prompt takes several steps
    c = EngineConfig(max_model_len=20_000, enable_chunked_prefill=False, **CPU)
    assert c.max_num_batched_tokens == 20_000  # without it, a prompt must fit one step


def test_max_seq_len_is_capped_by_the_cache():
    c = EngineConfig(max_model_len=256, **CPU)
    c.fit_cache(10)  # 10 blocks of 16 = 160 tokens
    assert (c.num_kv_blocks, c.cache_capacity, c.max_seq_len) == (10, 160, 160)
    c = EngineConfig(max_model_len=64, num_kv_blocks=10, **CPU)  # both known: derived at once
    assert c.max_seq_len == 64 and c.max_num_batched_tokens == 8192


def test_without_chunked_prefill_the_token_budget_must_hold_the_longest_sequence():
    UNCHUNKED = dict(enable_chunked_prefill=False, max_num_seqs=8, **CPU)
    with pytest.raises(ValueError, match=r"max_num_batched_tokens \(100\) is smaller than the longest sequence \(160 tokens\)"):
        EngineConfig(max_model_len=256, num_kv_blocks=10, max_num_batched_tokens=100, **UNCHUNKED)
    # Capped by a small cache, the same budget is enough.
    c = EngineConfig(max_model_len=256, num_kv_blocks=6, max_num_batched_tokens=100, **UNCHUNKED)
    assert c.max_seq_len == 96
    c = EngineConfig(max_model_len=256, max_num_batched_tokens=100, **UNCHUNKED)
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        c.fit_cache(10)  # the runner's cache makes the longest sequence 160 tokens
    # With chunked prefill (the default) a prompt may be longer than the budget.
    c = EngineConfig(max_model_len=256, num_kv_blocks=10, max_num_batched_tokens=100, max_num_seqs=8, **CPU)
    assert (c.max_seq_len, c.max_num_batched_tokens) == (160, 100)
