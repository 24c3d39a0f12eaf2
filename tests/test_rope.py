"""build_cos_sin_cache against transformers' LlamaRotaryEmbedding (the oracle).

The cache must equal Hugging Face's cos/sin for every position a model may see
(here up to 100k, where Llama 3's llama3 scaling matters most), for plain RoPE and
for llama3 scaling, with head sizes 64 and 128. On CPU the two are built with the
same float32 operations, so they agree to the last bit; on a GPU transformers
evaluates cos/sin with the device's own math, so a few float32 ulps are allowed.
"""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from tinyvllm.model.rope import build_cos_sin_cache, inverse_frequencies

MAX_POSITION = 100_003  # a little past 100k, not a round number
LLAMA3_2 = {
    "rope_type": "llama3",
    "factor": 32.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}
LLAMA3_1 = {**LLAMA3_2, "factor": 8.0}

CASES = [
    pytest.param(64, 500_000.0, None, id="plain-d64-theta5e5"),
    pytest.param(128, 10_000.0, None, id="plain-d128-theta1e4"),
    pytest.param(64, 500_000.0, LLAMA3_2, id="llama3.2-d64"),
    pytest.param(128, 500_000.0, LLAMA3_1, id="llama3.1-d128"),
]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def hf_cos_sin(head_dim: int, theta: float, scaling: dict | None, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    rope = {"rope_type": "default", "rope_theta": theta} if scaling is None else {**scaling, "rope_theta": theta}
    config = LlamaConfig(
        hidden_size=head_dim * 4,
        num_attention_heads=4,
        head_dim=head_dim,
        max_position_embeddings=131072,
        rope_parameters=rope,
    )
    emb = LlamaRotaryEmbedding(config).to(device)
    x = torch.zeros(1, dtype=torch.float32, device=device)
    position_ids = torch.arange(MAX_POSITION, device=device)[None, :]
    cos, sin = emb(x, position_ids)  # [1, P, D], each half repeated
    return cos[0], sin[0]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("head_dim,theta,scaling", CASES)
def test_cos_sin_cache_matches_transformers(head_dim, theta, scaling, device):
    cache = build_cos_sin_cache(head_dim, theta, MAX_POSITION, scaling, device)
    assert cache.shape == (MAX_POSITION, head_dim) and cache.dtype == torch.float32
    assert cache.device.type == device
    cos, sin = hf_cos_sin(head_dim, theta, scaling, device)
    half = head_dim // 2
    # transformers repeats the D/2 frequencies twice (rotate-half); the cache stores each once.
    assert torch.equal(cos[:, :half], cos[:, half:]) and torch.equal(sin[:, :half], sin[:, half:])
    if device == "cpu":
        torch.testing.assert_close(cache[:, :half], cos[:, :half], rtol=0, atol=0)
        torch.testing.assert_close(cache[:, half:], sin[:, :half], rtol=0, atol=0)
    else:
        torch.testing.assert_close(cache[:, :half], cos[:, :half], rtol=0, atol=2e-6)
        torch.testing.assert_close(cache[:, half:], sin[:, :half], rtol=0, atol=2e-6)


@pytest.mark.parametrize("scaling", [None, LLAMA3_2, LLAMA3_1], ids=["plain", "llama3.2", "llama3.1"])
def test_inverse_frequencies_match_transformers(scaling):
    rope = {"rope_type": "default", "rope_theta": 500_000.0} if scaling is None else {**scaling, "rope_theta": 500_000.0}
    config = LlamaConfig(hidden_size=2048, num_attention_heads=32, head_dim=64, rope_parameters=rope)
    hf = LlamaRotaryEmbedding(config).inv_freq
    ours = inverse_frequencies(64, 500_000.0, scaling)
    assert ours.dtype == torch.float32
    assert torch.equal(ours, hf)


def test_llama3_scaling_changes_only_the_slow_frequencies():
    plain = inverse_frequencies(64, 500_000.0, None)
    scaled = inverse_frequencies(64, 500_000.0, LLAMA3_2)
    wavelen = 2 * torch.pi / plain
    fast = wavelen < 8192 / 4  # shorter than original_max / high_freq_factor: untouched
    slow = wavelen > 8192 / 1  # longer than original_max / low_freq_factor: divided by factor
    assert fast.any() and slow.any() and (~fast & ~slow).any()  # all three bands exist at d=64
    assert torch.equal(scaled[fast], plain[fast])
    torch.testing.assert_close(scaled[slow], plain[slow] / 32)
    mid = ~fast & ~slow
    assert ((scaled[mid] < plain[mid]) & (scaled[mid] > plain[mid] / 32)).all()


def test_legacy_type_key_and_unsupported_type():
    # Old configs spell it "type"; unknown types must fail loudly rather than silently use plain RoPE.
    legacy = {k: v for k, v in LLAMA3_2.items() if k != "rope_type"} | {"type": "llama3"}
    assert torch.equal(inverse_frequencies(64, 500_000.0, legacy), inverse_frequencies(64, 500_000.0, LLAMA3_2))
    with pytest.raises(NotImplementedError):
        inverse_frequencies(64, 10_000.0, {"rope_type": "yarn", "factor": 4.0})
