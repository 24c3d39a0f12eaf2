"""Read a llama.cpp GGUF file into a ModelConfig and Hugging Face-named tensors.

A GGUF file is a header of typed metadata (`llama.embedding_length`, `tokenizer.ggml.tokens`, ...)
followed by tensors, each stored as F32/F16/BF16 or in a block-quantized type (Q8_0, Q4_0, Q4_1, ...).
PyPI's `gguf` package parses the file (GGUFReader) and dequantizes blocks (gguf.quants.dequantize);
this module does the three translations tinyvllm needs on top:

1. metadata -> ModelConfig (`llama.*` keys; tied embeddings = no `output.weight` tensor);
2. llama.cpp names -> HF names (`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight`);
3. un-permute the rows of q and k. llama.cpp's converter reorders them so that RoPE can rotate
   adjacent pairs (x0,x1),(x2,x3)...; HF's rotate-half pairs x[i] with x[i + head_dim/2]. Undoing the
   permutation per head gives back the HF layout. Skip it and the model "speaks garbage".

Llama 3.1+ rope scaling is not in the metadata: llama.cpp bakes it into a `rope_freqs.weight`
tensor of per-frequency divisors. We recover the llama3 parameters by matching that tensor.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tinyvllm.checkpoint import CheckpointError, validate_weights
from tinyvllm.config import ModelConfig

_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_BLOCK = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")


def hf_name(gguf_name: str) -> str | None:
    """The Hugging Face name of a llama.cpp tensor name, or None if it has none."""
    if m := _BLOCK.match(gguf_name):
        layer, part, kind = m.groups()
        return f"model.layers.{layer}.{_LAYER_NAMES[part]}.{kind}" if part in _LAYER_NAMES else None
    base, _, kind = gguf_name.rpartition(".")
    return f"{_GLOBAL_NAMES[base]}.{kind}" if base in _GLOBAL_NAMES else None


def unpermute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation (per head: interleaved pairs -> two halves)."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def permute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """llama.cpp's q/k row permutation (HF halves -> interleaved pairs); the inverse of `unpermute`."""
    rows = w.shape[0]
    return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def open_gguf(path: str | Path):
    """A gguf.GGUFReader for `path`; a damaged file is a CheckpointError naming it."""
    from gguf import GGUFReader

    try:
        return GGUFReader(str(path))
    except Exception as e:  # the reader raises ValueError, struct/IndexError, ... on damaged files
        raise CheckpointError(f"{path}: corrupt or truncated GGUF file ({type(e).__name__}: {e})") from e


def gguf_metadata(reader, skip_arrays: tuple[str, ...] = ()) -> dict[str, Any]:
    """The metadata as plain Python values (strings, numbers, lists)."""
    out = {}
    for key, fld in reader.fields.items():
        if key.startswith("GGUF.") or key in skip_arrays:
            continue
        out[key] = fld.contents()
    return out


def config_from_gguf(meta: dict[str, Any], tensors: dict[str, Any], rope_freqs: np.ndarray | None) -> ModelConfig:
    """Build the ModelConfig from GGUF metadata (keys `{arch}.*`, `tokenizer.ggml.*`)."""
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"unsupported GGUF architecture {arch!r}; supported: 'llama'")

    def key(name: str, default: Any = KeyError) -> Any:
        if f"{arch}.{name}" in meta:
            return meta[f"{arch}.{name}"]
        if default is KeyError:
            raise ValueError(f"GGUF metadata is missing required key '{arch}.{name}'")
        return default

    hidden, heads = int(key("embedding_length")), int(key("attention.head_count"))
    head_dim = int(key("attention.key_length", hidden // heads))
    vocab = key("vocab_size", None)
    if vocab is None:
        vocab = len(meta["tokenizer.ggml.tokens"]) if "tokenizer.ggml.tokens" in meta else tensors["token_embd.weight"].shape[-1]
    rope_theta = _f32(key("rope.freq_base", 10000.0))
    eos = [meta[k] for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id") if k in meta]
    return ModelConfig(
        architecture="LlamaForCausalLM",
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(key("feed_forward_length")),
        num_hidden_layers=int(key("block_count")),
        num_attention_heads=heads,
        num_key_value_heads=int(key("attention.head_count_kv", heads)),
        head_dim=head_dim,
        rms_norm_eps=_f32(key("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=rope_theta,
        rope_scaling=None if rope_freqs is None else llama3_scaling_from_rope_freqs(rope_freqs, rope_theta, head_dim),
        max_position_embeddings=int(key("context_length", 2048)),
        tie_word_embeddings="output.weight" not in tensors,
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=list(dict.fromkeys(int(e) for e in eos)),
        torch_dtype=None,
    )


def _f32(x: float) -> float:
    """A float32 metadata value as the short decimal it was written from (9.99999974e-06 -> 1e-05)."""
    return float(str(np.float32(x)))


def llama3_rope_freqs(theta: float, head_dim: int, factor: float, low: float, high: float, original: int) -> np.ndarray:
    """The divisors llama.cpp's converter stores in `rope_freqs.weight` for llama3 scaling."""
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * np.pi / inv_freq
    low_wavelen, high_wavelen = original / low, original / high
    smooth = (original / wavelen - low) / (high - low)
    mid = 1 / ((1 - smooth) / factor + smooth)
    return np.where(wavelen < high_wavelen, 1.0, np.where(wavelen > low_wavelen, factor, mid))


def llama3_scaling_from_rope_freqs(freqs: np.ndarray, theta: float, head_dim: int) -> dict:
    """Recover the llama3 rope_scaling dict that produced `freqs` (tries the published settings)."""
    factor = float(np.max(freqs))
    for low, high, original in [(1.0, 4.0, 8192), (1.0, 4.0, 4096), (1.0, 4.0, 2048), (1.0, 4.0, 16384)]:
        if np.allclose(llama3_rope_freqs(theta, head_dim, factor, low, high, original), freqs, rtol=1e-4):
            return {"rope_type": "llama3", "factor": factor, "low_freq_factor": low,
                    "high_freq_factor": high, "original_max_position_embeddings": original}  # fmt: skip
    raise ValueError("GGUF rope_freqs.weight does not match any known llama3 rope scaling")


def dequantize(tensor) -> np.ndarray:
    """One GGUF tensor as a float32 numpy array in PyTorch's [rows, cols] order."""
    from gguf import GGMLQuantizationType, quants

    qtype = tensor.tensor_type
    shape = tuple(int(n) for n in reversed(tensor.shape))  # GGUF lists dims innermost-first
    if qtype == GGMLQuantizationType.F32:
        arr = np.array(tensor.data, dtype=np.float32)
    else:
        arr = quants.dequantize(tensor.data, qtype)
    return arr.reshape(shape)


def gguf_config(path: str | Path) -> ModelConfig:
    """The ModelConfig of a GGUF file, without dequantizing its tensors."""
    return _open_with_config(Path(path))[0]


def _open_with_config(path: Path, reader: Any = None):
    reader = reader if reader is not None else open_gguf(path)
    meta = gguf_metadata(reader, skip_arrays=("tokenizer.ggml.merges", "tokenizer.ggml.token_type", "tokenizer.ggml.scores"))
    tensors = {t.name: t for t in reader.tensors}
    try:
        rope_freqs = dequantize(tensors["rope_freqs.weight"]) if "rope_freqs.weight" in tensors else None
        config = config_from_gguf(meta, tensors, rope_freqs)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e
    return config, tensors


def load_gguf(path: str | Path, dtype: torch.dtype = torch.float32, reader: Any = None) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Read a llama-architecture GGUF file into (config, {HF name: CPU tensor in `dtype`}).
    ``reader``: the file's gguf.GGUFReader if it is already open (parsing it takes seconds)."""
    path = Path(path)
    config, tensors = _open_with_config(path, reader)

    weights: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if name == "rope_freqs.weight":
            continue
        hf = hf_name(name)
        if hf is None:
            raise CheckpointError(f"{path}: unexpected tensor {name!r} (no Hugging Face equivalent)")
        try:
            arr = dequantize(t)
        except NotImplementedError as e:
            raise CheckpointError(f"{path}: tensor {name!r} has unsupported type {t.tensor_type.name}") from e
        except ValueError as e:
            raise CheckpointError(f"{path}: tensor {name!r} is corrupt ({e})") from e
        w = torch.from_numpy(arr)
        heads = {".self_attn.q_proj.": config.num_attention_heads, ".self_attn.k_proj.": config.num_key_value_heads}
        for part, n in heads.items():
            if part in hf and w.shape[0] == n * config.head_dim:  # a mis-shaped one is reported below
                w = unpermute(w, n)
        weights[hf] = w.to(dtype)
    return config, validate_weights(config, weights, {k: str(path) for k in weights})
