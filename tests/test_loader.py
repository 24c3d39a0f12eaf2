"""Safetensors checkpoints: round trips, validation errors naming file + tensor, resolve_model."""

from __future__ import annotations

import json

import pytest
import torch

from fixtures import random_weights, tiny_config_dict, write_checkpoint_dir
from tinyvllm.config import ModelConfig
from tinyvllm.loader import CheckpointError, load_checkpoint, resolve_model


def make(tmp_path, shards=1, **overrides):
    d = tiny_config_dict(**overrides)
    weights = random_weights(ModelConfig.from_dict(d))
    return write_checkpoint_dir(tmp_path / "ckpt", d, weights, shards=shards), d, weights


@pytest.mark.parametrize("shards", [1, 3])
def test_round_trip(tmp_path, shards):
    path, d, weights = make(tmp_path, shards=shards)
    config, loaded = load_checkpoint(path, torch.float32)
    assert config == ModelConfig.from_dict(d)
    assert loaded.keys() == weights.keys()
    for name, t in weights.items():
        assert torch.equal(loaded[name], t), name


def test_dtype_conversion(tmp_path):
    path, _, weights = make(tmp_path)
    _, loaded = load_checkpoint(path, torch.bfloat16)
    assert all(t.dtype == torch.bfloat16 for t in loaded.values())
    assert torch.equal(loaded["model.norm.weight"], weights["model.norm.weight"].bfloat16())


def test_tied_without_and_with_lm_head(tmp_path):
    d = tiny_config_dict(tie_word_embeddings=True)
    weights = random_weights(ModelConfig.from_dict(d))
    assert "lm_head.weight" not in weights
    _, loaded = load_checkpoint(write_checkpoint_dir(tmp_path / "a", d, weights), torch.float32)
    assert "lm_head.weight" not in loaded
    extra = {**weights, "lm_head.weight": weights["model.embed_tokens.weight"].clone()}
    _, loaded = load_checkpoint(write_checkpoint_dir(tmp_path / "b", d, extra), torch.float32)
    assert "lm_head.weight" not in loaded  # tied: the embedding is the head


def test_attention_bias_expected(tmp_path):
    d = tiny_config_dict(attention_bias=True)
    weights = random_weights(ModelConfig.from_dict(d))
    assert "model.layers.1.self_attn.k_proj.bias" in weights
    _, loaded = load_checkpoint(write_checkpoint_dir(tmp_path / "c", d, weights), torch.float32)
    assert loaded["model.layers.1.self_attn.k_proj.bias"].shape == (2 * 16,)


def test_missing_tensor_named(tmp_path):
    d = tiny_config_dict()
    weights = random_weights(ModelConfig.from_dict(d))
    del weights["model.layers.1.mlp.up_proj.weight"]
    path = write_checkpoint_dir(tmp_path / "m", d, weights)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: missing tensor 'model\.layers\.1\.mlp\.up_proj\.weight'"):
        load_checkpoint(path)


def test_unexpected_tensor_named(tmp_path):
    d = tiny_config_dict()
    weights = {**random_weights(ModelConfig.from_dict(d)), "model.layers.5.mlp.up_proj.weight": torch.zeros(2)}
    path = write_checkpoint_dir(tmp_path / "u", d, weights)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: unexpected tensor 'model\.layers\.5\.mlp\.up_proj\.weight'"):
        load_checkpoint(path)


def test_misshaped_tensor_named(tmp_path):
    d = tiny_config_dict()
    weights = random_weights(ModelConfig.from_dict(d))
    weights["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(64, 64)  # MHA-shaped k in a GQA model
    path = write_checkpoint_dir(tmp_path / "s", d, weights, shards=2)
    with pytest.raises(CheckpointError, match=r"model-0000\d-of-00002\.safetensors: tensor 'model\.layers\.0\.self_attn\.k_proj\.weight' has shape \[64, 64\], expected \[32, 64\]"):
        load_checkpoint(path)


def test_truncated_and_corrupt_files_named(tmp_path):
    path, _, _ = make(tmp_path)
    file = path / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: corrupt or truncated"):
        load_checkpoint(path)
    file.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}......")
    with pytest.raises(CheckpointError, match=r"model\.safetensors: corrupt or truncated"):
        load_checkpoint(path)


def test_shard_disagreeing_with_index(tmp_path):
    path, _, _ = make(tmp_path, shards=2)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    name = next(iter(index["weight_map"]))
    index["weight_map"][name] = "model-00002-of-00002.safetensors" if index["weight_map"][name].startswith("model-00001") else "model-00001-of-00002.safetensors"
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=rf"safetensors: (missing|unexpected) tensor '{name}'"):
        load_checkpoint(path)
    index["weight_map"][name] = "model-00009-of-00009.safetensors"
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="shard model-00009-of-00009.safetensors is missing"):
        load_checkpoint(path)


def test_directory_without_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(tiny_config_dict()))
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        load_checkpoint(tmp_path)


def test_resolve_existing_path_and_nonsense(tmp_path):
    assert resolve_model(str(tmp_path)) == str(tmp_path)
    with pytest.raises(FileNotFoundError, match="neither an existing path nor a Hugging Face repo id"):
        resolve_model(str(tmp_path / "no" / "such" / "dir"))
    with pytest.raises(FileNotFoundError, match="neither"):
        resolve_model("not a repo id")


def test_hub_offline_is_a_plain_error(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    with pytest.raises(RuntimeError, match="Hugging Face Hub is unreachable"):
        resolve_model("tinyvllm-test/no-such-model")


def test_hub_connection_error_is_a_plain_error(monkeypatch):
    import huggingface_hub

    def unreachable(*args, **kwargs):
        raise huggingface_hub.errors.LocalEntryNotFoundError("Cannot reach https://huggingface.co: connection refused")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", unreachable)
    with pytest.raises(RuntimeError, match="Hugging Face Hub is unreachable"):
        resolve_model("meta-llama/Llama-3.2-1B-Instruct")
