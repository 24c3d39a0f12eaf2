"""GGUF: synthetic files in every supported type against the original HF tensors; the real SmolLM2 file."""

from __future__ import annotations

import dataclasses

import gguf
import numpy as np
import pytest
import torch

from fixtures import random_weights, tiny_config_dict, write_gguf
from tinyvllm.config import ModelConfig
from tinyvllm.gguf_loader import llama3_rope_freqs
from tinyvllm.loader import CheckpointError, load_checkpoint

# Largest |error| allowed, relative to the tensor's largest |value|, for each storage type.
TOLERANCE = {"F32": 0.0, "F16": 1e-3, "BF16": 1e-2, "Q8_0": 1e-2, "Q4_0": 0.15, "Q4_1": 0.15}


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py's LlamaModel.permute, verbatim (the layout GGUF files hold)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def tiny():
    config = ModelConfig.from_dict(tiny_config_dict(hidden_size=64, intermediate_size=128))
    return config, random_weights(config, seed=1)


@pytest.mark.parametrize("qtype", list(TOLERANCE))
def test_types_dequantize_and_unpermute(tmp_path, qtype):
    config, weights = tiny()
    path = write_gguf(tmp_path / f"{qtype}.gguf", config, weights, gguf.GGMLQuantizationType[qtype])
    loaded_config, loaded = load_checkpoint(path, torch.float32)
    # The writer stores no tokenizer ids or dtype; everything else comes back from the metadata.
    assert loaded_config == dataclasses.replace(config, bos_token_id=None, eos_token_ids=[], torch_dtype=None)
    assert loaded.keys() == weights.keys()
    for name, original in weights.items():
        err = (loaded[name] - original).abs().max().item()
        assert err <= TOLERANCE[qtype] * original.abs().max().item() + 1e-7, (name, err)


def test_unpermute_inverts_llama_cpp_permute(tmp_path):
    """F32 is exact, so q/k come back bit-identical only if un-permute inverts llama.cpp's permute."""
    config, weights = tiny()
    q = weights["model.layers.0.self_attn.q_proj.weight"].numpy()
    assert not np.array_equal(llama_cpp_permute(q, config.num_attention_heads), q)  # the test has teeth
    path = write_gguf(tmp_path / "f32.gguf", config, weights, gguf.GGMLQuantizationType.F32)
    reader = gguf.GGUFReader(str(path))
    stored_k = next(t for t in reader.tensors if t.name == "blk.0.attn_k.weight").data
    k = weights["model.layers.0.self_attn.k_proj.weight"].numpy()
    assert np.array_equal(stored_k, llama_cpp_permute(k, config.num_key_value_heads))
    _, loaded = load_checkpoint(path)
    assert torch.equal(loaded["model.layers.0.self_attn.q_proj.weight"], weights["model.layers.0.self_attn.q_proj.weight"])
    assert torch.equal(loaded["model.layers.0.self_attn.k_proj.weight"], weights["model.layers.0.self_attn.k_proj.weight"])


def test_tied_gguf_has_no_output_tensor(tmp_path):
    config = ModelConfig.from_dict(tiny_config_dict(hidden_size=64, intermediate_size=128, tie_word_embeddings=True))
    path = write_gguf(tmp_path / "tied.gguf", config, random_weights(config), gguf.GGMLQuantizationType.Q8_0)
    loaded_config, loaded = load_checkpoint(path)
    assert loaded_config.tie_word_embeddings and "lm_head.weight" not in loaded


def test_llama3_rope_scaling_recovered_from_rope_freqs(tmp_path):
    config, weights = tiny()
    scaling = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}  # fmt: skip
    config = dataclasses.replace(config, rope_theta=500000.0, rope_scaling=scaling)
    freqs = llama3_rope_freqs(500000.0, config.head_dim, 32.0, 1.0, 4.0, 8192)
    path = write_gguf(tmp_path / "l3.gguf", config, weights, gguf.GGMLQuantizationType.F16, rope_freqs=freqs)
    loaded_config, loaded = load_checkpoint(path)
    assert loaded_config.rope_scaling == scaling and "rope_freqs.weight" not in loaded


def test_truncated_gguf_named(tmp_path):
    config, weights = tiny()
    path = write_gguf(tmp_path / "t.gguf", config, weights, gguf.GGMLQuantizationType.Q8_0)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"t\.gguf: corrupt or truncated GGUF"):
        load_checkpoint(path)


def test_misshaped_gguf_tensor_named(tmp_path):
    config, weights = tiny()
    weights["model.layers.1.mlp.down_proj.weight"] = torch.randn(64, 64)
    path = write_gguf(tmp_path / "bad.gguf", config, weights, gguf.GGMLQuantizationType.F32)
    with pytest.raises(CheckpointError, match=r"bad\.gguf: tensor 'model\.layers\.1\.mlp\.down_proj\.weight' has shape \[64, 64\]"):
        load_checkpoint(path)


@pytest.fixture(scope="module")
def smollm2(smollm2_path, smollm2_checkpoint):
    """The real GGUF (conftest.py: read once per session)."""
    return smollm2_path, *smollm2_checkpoint


def test_smollm2_config(smollm2):
    path, c, weights = smollm2
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads) == (576, 30, 9, 3)
    assert (c.vocab_size, c.head_dim, c.intermediate_size) == (49152, 64, 1536)
    assert c.tie_word_embeddings and "lm_head.weight" not in weights
    assert c.rope_theta == 100000.0 and c.rope_scaling is None and c.rms_norm_eps == 1e-5
    assert c.bos_token_id == 1 and c.eos_token_ids == [2] and c.max_position_embeddings == 8192
    assert len(weights) == 2 + 9 * 30


def test_smollm2_speaks_sense(smollm2, smollm2_tokenizer):
    """End-to-end check of the un-permute: transformers' Llama with our weights predicts English well.

    With q/k left in llama.cpp's layout the loss on this text is ~4.7 nats/token instead of ~2.9:
    the RoPE frequencies land on the wrong dimension pairs (short prompts still half-work, so a
    perplexity check is the honest test).
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    path, c, weights = smollm2
    tok = smollm2_tokenizer
    hf_config = LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, rms_norm_eps=c.rms_norm_eps, rope_theta=c.rope_theta,
        max_position_embeddings=c.max_position_embeddings, tie_word_embeddings=True,
    )  # fmt: skip
    model = LlamaForCausalLM(hf_config)
    model.load_state_dict(weights, strict=False)
    model.tie_weights()
    text = (
        "The quick brown fox jumps over the lazy dog. Paris is the capital and most populous city of France. "
        "With an estimated population of two million residents, it is the centre of the Ile-de-France region. "
        "The city is a major railway, highway and air-transport hub served by two international airports."
    )
    ids = torch.tensor([tok.encode(text)])
    with torch.no_grad():
        loss = model(ids, labels=ids).loss.item()
    assert loss < 3.5, f"mean NLL {loss:.2f} nats/token: q/k layout or weights are wrong"
