"""What a Llama checkpoint must hold, and the error for one that does not.

Both readers (`tinyvllm.loader` for safetensors directories, `tinyvllm.gguf_loader` for llama.cpp
files) end with the same check: every tensor a Llama of this config needs, by its Hugging Face name
and shape, and nothing else. It lives here so that the two readers share it without importing each
other.
"""

from __future__ import annotations

import torch

from tinyvllm.config import ModelConfig

# Buffers some old checkpoints saved next to the weights; they are recomputed, never loaded.
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: missing, unexpected, mis-shaped or unreadable tensors."""


def expected_tensor_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a Llama checkpoint of this config must hold, by its Hugging Face name."""
    h, d, i = config.hidden_size, config.head_dim, config.intermediate_size
    q, kv = config.num_attention_heads * d, config.num_key_value_heads * d
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (config.vocab_size, h), "model.norm.weight": (h,)}
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, h)
    for layer in range(config.num_hidden_layers):
        p = f"model.layers.{layer}."
        proj = {
            "self_attn.q_proj": (q, h), "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h),
            "self_attn.o_proj": (h, q), "mlp.gate_proj": (i, h), "mlp.up_proj": (i, h), "mlp.down_proj": (h, i),
        }  # fmt: skip
        for name, shape in proj.items():
            shapes[f"{p}{name}.weight"] = shape
            is_attn = name.startswith("self_attn")
            if (config.attention_bias and is_attn) or (config.mlp_bias and not is_attn):
                shapes[f"{p}{name}.bias"] = shape[:1]
        shapes[f"{p}input_layernorm.weight"] = (h,)
        shapes[f"{p}post_attention_layernorm.weight"] = (h,)
    return shapes


def validate_weights(
    config: ModelConfig, weights: dict[str, torch.Tensor], sources: dict[str, str]
) -> dict[str, torch.Tensor]:
    """Check names and shapes against the config; return the weights without ignorable extras.

    `sources` maps each tensor name to the file it came from, for the error message. A tied model's
    checkpoint may still carry `lm_head.weight` (a copy of the embedding); it is dropped.
    """
    expected = expected_tensor_shapes(config)
    weights = {k: v for k, v in weights.items() if not k.endswith(_IGNORED_SUFFIXES)}
    if config.tie_word_embeddings:
        weights.pop("lm_head.weight", None)
    missing = [k for k in expected if k not in weights]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        where = ", ".join(sorted(set(sources.values()))) or "the checkpoint"
        raise CheckpointError(f"{where}: missing tensor {missing[0]!r}{more}")
    for name, tensor in weights.items():
        if name not in expected:
            raise CheckpointError(f"{sources.get(name, '?')}: unexpected tensor {name!r} for {config.architecture}")
        if tuple(tensor.shape) != expected[name]:
            raise CheckpointError(
                f"{sources.get(name, '?')}: tensor {name!r} has shape {list(tensor.shape)}, "
                f"expected {list(expected[name])} from the config"
            )
    return weights
