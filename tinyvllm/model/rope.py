"""The rotary position embedding's cos/sin cache, built once per model.

RoPE rotates each (x_i, x_{i+D/2}) pair of a query or key head by the angle
``position * inv_freq[i]``. The angles depend only on the position, so the model
computes ``cos`` and ``sin`` of every angle once, for every position it may see,
and the rotary kernel (``tinyvllm.ops.rotary_embedding``) just looks rows up:

    cos_sin_cache[p] = [cos(p * inv_freq[0..D/2-1]), sin(p * inv_freq[0..D/2-1])]

``inv_freq[i] = 1 / theta^(2i/D)``: fast-turning pairs first, slow ones last.
Llama 3.x stretches the slow end ("llama3" rope scaling) so that a model trained
on 8k positions reads 128k: pairs whose wavelength is longer than the original
context are slowed down by ``factor``, short ones are left alone, and the band
in between is interpolated smoothly.

Everything is computed in float32 with exactly the same operations, in the same
order, as Hugging Face transformers (``modeling_rope_utils`` and
``LlamaRotaryEmbedding.forward``), so the cache equals theirs bit for bit on CPU
(tests/test_rope.py). Two details matter for that:
  * the angles are ``float32(position) * inv_freq`` (one rounding), not a matmul
    or a float64 product;
  * the cache stays float32 whatever the model dtype: rounding inv_freq or the
    angles to bf16 changes the rotation visibly at large positions.
"""

from __future__ import annotations

import math

import torch


def inverse_frequencies(head_dim: int, rope_theta: float, rope_scaling: dict | None) -> torch.Tensor:
    """inv_freq [head_dim // 2] float32, with the checkpoint's rope scaling applied."""
    # Same expression as transformers: integer arange -> float32, theta ** (2i / D).
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).to(dtype=torch.float) / head_dim
    inv_freq = 1.0 / (rope_theta**exponents)

    rope_type = (rope_scaling or {}).get("rope_type", (rope_scaling or {}).get("type", "default"))
    if rope_type == "default":
        return inv_freq
    if rope_type == "linear":  # positions divided by factor == frequencies divided by factor
        return inv_freq / rope_scaling["factor"]
    if rope_type != "llama3":
        raise NotImplementedError(f"rope scaling type {rope_type!r} is not supported (default, linear, llama3 are)")

    factor = rope_scaling["factor"]  # 8 for Llama 3.1, 32 for Llama 3.2
    low_freq_factor = rope_scaling["low_freq_factor"]  # 1
    high_freq_factor = rope_scaling["high_freq_factor"]  # 4
    old_context_len = rope_scaling["original_max_position_embeddings"]  # 8192

    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    # Long wavelengths (slow pairs): divide the frequency by factor. Short ones: keep.
    inv_freq_llama = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    # In between: interpolate between the two, linearly in old_context_len / wavelen.
    smooth_factor = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed_inv_freq = (1 - smooth_factor) * inv_freq_llama / factor + smooth_factor * inv_freq_llama
    is_medium_freq = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium_freq, smoothed_inv_freq, inv_freq_llama)


def build_cos_sin_cache(
    head_dim: int,
    rope_theta: float,
    max_position: int,
    rope_scaling: dict | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """cos_sin_cache [max_position, head_dim] float32: row p = [cos(p * inv_freq), sin(p * inv_freq)].

    Built on the CPU (so that it is identical whatever the device) and then moved to ``device``.
    """
    inv_freq = inverse_frequencies(head_dim, rope_theta, rope_scaling)
    positions = torch.arange(max_position, dtype=torch.int64).float()
    angles = positions[:, None] * inv_freq[None, :]  # [P, D/2] float32
    cache = torch.cat((angles.cos(), angles.sin()), dim=-1)
    return cache.to(device) if device is not None else cache
