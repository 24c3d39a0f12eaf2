"""ModelConfig from config.json: both RoPE forms, GQA/MHA, head_dim, eos forms, clear errors."""

from __future__ import annotations

import json

import pytest

from fixtures import tiny_config_dict
from tinyvllm.config import ModelConfig, load_config

LLAMA3_SCALING = {"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def llama32_1b(**overrides) -> dict:
    """Llama-3.2-1B-Instruct's published config.json (top-level rope_theta / rope_scaling)."""
    d = {
        "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009], "head_dim": 64, "hidden_act": "silu",
        "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 8192, "max_position_embeddings": 131072,
        "mlp_bias": False, "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 16,
        "num_key_value_heads": 8, "pretraining_tp": 1, "rms_norm_eps": 1e-05,
        "rope_scaling": {**LLAMA3_SCALING, "rope_type": "llama3"}, "rope_theta": 500000.0,
        "tie_word_embeddings": True, "torch_dtype": "bfloat16", "transformers_version": "4.45.0.dev0",
        "use_cache": True, "vocab_size": 128256,
    }  # fmt: skip
    d.update(overrides)
    return d


def test_llama32_top_level_rope_form():
    c = ModelConfig.from_dict(llama32_1b())
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads) == (2048, 16, 32, 8)
    assert c.head_dim == 64 and c.intermediate_size == 8192 and c.vocab_size == 128256
    assert c.rope_theta == 500000.0
    assert c.rope_scaling == {"rope_type": "llama3", **LLAMA3_SCALING}
    assert c.tie_word_embeddings and c.eos_token_ids == [128001, 128008, 128009] and c.bos_token_id == 128000
    assert c.torch_dtype == "bfloat16" and c.max_position_embeddings == 131072


def test_transformers5_rope_parameters_form_matches():
    d = llama32_1b()
    del d["rope_theta"], d["rope_scaling"], d["torch_dtype"]
    d["rope_parameters"] = {"rope_type": "llama3", "rope_theta": 500000.0, **LLAMA3_SCALING}
    d["dtype"] = "bfloat16"
    assert ModelConfig.from_dict(d) == ModelConfig.from_dict(llama32_1b())


def test_transformers5_written_config_roundtrip(tmp_path):
    """What transformers 5 actually writes (LlamaConfig.save_pretrained) reads back the same."""
    from transformers import LlamaConfig

    hf = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=96, rope_theta=500000.0,
                     rope_scaling={"rope_type": "llama3", **LLAMA3_SCALING}, tie_word_embeddings=True)  # fmt: skip
    hf.save_pretrained(tmp_path)
    c = load_config(tmp_path)
    assert c.rope_theta == 500000.0 and c.rope_scaling == {"rope_type": "llama3", **LLAMA3_SCALING}
    assert c.num_key_value_heads == 2 and c.head_dim == 16 and c.tie_word_embeddings


@pytest.mark.parametrize("form", ["none", "default_type", "rope_parameters_default"])
def test_no_scaling(form):
    d = tiny_config_dict()
    if form == "none":
        d["rope_scaling"] = None
    elif form == "default_type":
        d["rope_scaling"] = {"type": "default"}
    else:
        del d["rope_theta"]
        d["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0}
    c = ModelConfig.from_dict(d)
    assert c.rope_scaling is None and c.rope_theta == 10000.0


def test_mha_and_implied_head_dim_and_int_eos():
    d = tiny_config_dict(eos_token_id=7)
    del d["num_key_value_heads"]
    c = ModelConfig.from_dict(d)
    assert c.num_key_value_heads == c.num_attention_heads == 4
    assert c.head_dim == 64 // 4 and c.eos_token_ids == [7]


def test_explicit_head_dim_wins():
    assert ModelConfig.from_dict(tiny_config_dict(head_dim=32)).head_dim == 32


def test_mistral_without_sliding_window_ok_with_window_rejected():
    ok = ModelConfig.from_dict(tiny_config_dict(architectures=["MistralForCausalLM"], sliding_window=None))
    assert ok.architecture == "MistralForCausalLM"
    with pytest.raises(ValueError, match="sliding_window=4096"):
        ModelConfig.from_dict(tiny_config_dict(architectures=["MistralForCausalLM"], sliding_window=4096,
                                               max_position_embeddings=32768))  # fmt: skip


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"architectures": ["GPT2LMHeadModel"]}, "unsupported architecture 'GPT2LMHeadModel'"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "unsupported rope type 'yarn'"),
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "low_freq_factor"),
        ({"hidden_size": None}, "missing required key 'hidden_size'"),
        ({"num_key_value_heads": 3}, "multiple of num_key_value_heads"),
    ],
)
def test_errors_name_the_problem(overrides, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_dict(tiny_config_dict(**overrides))


def test_load_config_missing_key_names_file(tmp_path):
    d = tiny_config_dict()
    del d["num_hidden_layers"]
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match=r"config\.json: config is missing required key 'num_hidden_layers'"):
        load_config(tmp_path)
    with pytest.raises(FileNotFoundError):
        load_config(tmp_path / "nowhere")
