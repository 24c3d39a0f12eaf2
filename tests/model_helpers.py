"""What tests/test_model_vs_transformers.py shares: the transformers oracle and a minimal paged-cache
driver for the model runner.

* The oracle: tiny Llama shapes (Shape, SHAPES), transformers' LlamaConfig for them and our ModelConfig
  from the same dict (both RoPE config forms), random weights, transformers' model and logits, the
  float32 truth next to transformers at the tested dtype (Reference), and the logits and greedy checks
  with their tolerances (the rules are in test_model_vs_transformers.py's docstring).
* The driver: a stand-in for the engine around ModelRunner, i.e. sequences (Seq), a shuffled pool of
  KV blocks (BlockPool) and one scheduler step (step).
"""

from __future__ import annotations

import json
import random
import zlib
from dataclasses import dataclass, field

import pytest
import torch
from transformers import LlamaConfig
from transformers import LlamaForCausalLM as HFLlama

from tinyvllm import SamplingParams
from tinyvllm.config import ModelConfig
from tinyvllm.engine.engine_config import EngineConfig
from tinyvllm.engine.model_runner import ModelRunner
from tinyvllm.engine.scheduler import SchedulerOutput

HAS_CUDA = torch.cuda.is_available()
DEVICES = [pytest.param("cpu", torch.float32, id="cpu-fp32")]
if HAS_CUDA:
    DEVICES.append(pytest.param("cuda", torch.bfloat16, id="cuda-bf16"))

BF16_ERR_RATIO = 2.0  # our bf16 error from the float32 truth <= this x transformers-bf16's
TIE_EPS = 0.02  # a near-tie: truth margin <= TIE_EPS x logit std ...
TIE_NOISE_MULT = 2.0  # ... or <= this x transformers-bf16's max error on that row
GREEDY_SLACK = 2  # bf16: ours agrees with the truth on >= (transformers-bf16's agreement - this) rows


# ---------------------------------------------------------------------------------------------
# Configs: transformers' LlamaConfig for the reference, our ModelConfig from the same dict.
# ---------------------------------------------------------------------------------------------


def config_from_dict(d: dict):
    return ModelConfig.from_dict(d)


def to_rope_form(d: dict, form: str) -> dict:
    """transformers 5 writes `rope_parameters`; published Llama 3.x configs have top-level
    `rope_theta` + `rope_scaling`. Return config dict ``d`` in the requested form."""
    d = json.loads(json.dumps(d))
    if form == "parameters":
        return d
    rope = d.pop("rope_parameters")
    d["rope_theta"] = rope["rope_theta"]
    scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
    d["rope_scaling"] = None if scaling.get("rope_type") == "default" else scaling
    return d


@dataclass(frozen=True)
class Shape:
    name: str
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    layers: int = 2
    intermediate: int = 176
    vocab: int = 320
    tied: bool = False
    llama3: bool = False
    theta: float = 10000.0
    rope_form: str = "parameters"
    bias: bool = False


# head_dim 64 and 128 only: the sizes the CUDA attention kernels support, so the same shapes run on GPU.
SHAPES = [
    Shape("gqa-d64-tied-llama3", hidden=256, heads=4, kv_heads=2, head_dim=64, tied=True, llama3=True, theta=500000.0),
    Shape("mha-d128-untied-plain-legacyform", hidden=192, heads=2, kv_heads=2, head_dim=128, rope_form="legacy"),
    Shape("gqa4-d64-untied-llama3-legacyform", hidden=192, heads=8, kv_heads=2, head_dim=64, llama3=True, rope_form="legacy"),
    Shape("mqa-d64-tied-plain-bias", hidden=96, heads=4, kv_heads=1, head_dim=64, tied=True, bias=True, layers=3),
]
BLOCK_SIZE = 8  # the smallest block the CUDA kernels take: sequences span several blocks


def hf_config(s: Shape) -> LlamaConfig:
    rope = {"rope_type": "default", "rope_theta": s.theta}
    if s.llama3:
        # original context 64 at these tiny sizes: some frequencies scaled, some smoothed, some untouched.
        rope = {
            "rope_type": "llama3",
            "rope_theta": s.theta,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        }
    return LlamaConfig(
        vocab_size=s.vocab,
        hidden_size=s.hidden,
        intermediate_size=s.intermediate,
        num_hidden_layers=s.layers,
        num_attention_heads=s.heads,
        num_key_value_heads=s.kv_heads,
        head_dim=s.head_dim,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        rope_parameters=rope,
        tie_word_embeddings=s.tied,
        attention_bias=s.bias,
        mlp_bias=s.bias,
        architectures=["LlamaForCausalLM"],
        attn_implementation="eager",
    )


def random_state_dict(config: LlamaConfig, seed: int) -> dict[str, torch.Tensor]:
    """Float32 weights with enough spread that logits are far from uniform; norms around 1, not 1."""
    torch.manual_seed(seed)
    model = HFLlama(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) * (0.5 if "embed" in name else 1.5) / p.shape[-1] ** 0.5)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def hf_model(config: LlamaConfig, state: dict[str, torch.Tensor], dtype: torch.dtype, device: str) -> HFLlama:
    """transformers' model built AT ``dtype`` (never .to(dtype): that would round the rotary inv_freq)."""
    model = HFLlama._from_config(config, dtype=dtype).to(device).eval()
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()})
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32
    return model


@torch.no_grad()
def hf_logits(model: HFLlama, token_ids: list[int]) -> torch.Tensor:
    """transformers' logits at every position of ``token_ids``: [len, vocab] float32."""
    device = model.model.embed_tokens.weight.device
    ids = torch.tensor([token_ids], device=device)
    return model(input_ids=ids, use_cache=False).logits[0].float()


# ---------------------------------------------------------------------------------------------
# A minimal stand-in for the engine: sequences and a shuffled pool of KV blocks.
# ---------------------------------------------------------------------------------------------


@dataclass
class Seq:
    """The fields of tinyvllm.engine.sequence.Sequence that ModelRunner reads."""

    token_ids: list[int]
    num_computed_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    request_id: str = "r"
    sampling_params: SamplingParams = field(default_factory=SamplingParams)  # (prompt_logprobs: None)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


class BlockPool:
    """Hands out KV blocks in a shuffled order so that block tables are not contiguous."""

    def __init__(self, num_blocks: int, block_size: int, seed: int = 0) -> None:
        self.free = list(range(num_blocks))
        random.Random(seed).shuffle(self.free)
        self.block_size = block_size

    def cover(self, seq: Seq) -> None:
        while len(seq.block_table) * self.block_size < seq.num_tokens:
            seq.block_table.append(self.free.pop())


def scheduled(seqs: list[Seq]) -> SchedulerOutput:
    """Every sequence's whole uncomputed span, as the scheduler schedules it."""
    return SchedulerOutput(list(seqs), [s.num_tokens - s.num_computed_tokens for s in seqs])


def step(runner: ModelRunner, pool: BlockPool, seqs: list[Seq]) -> torch.Tensor:
    """Cover, compute, mark computed: what the scheduler does around the ModelRunner."""
    for s in seqs:
        pool.cover(s)
    logits = runner.compute_logits(scheduled(seqs))
    for s in seqs:
        s.num_computed_tokens = s.num_tokens
    return logits


def new_runner(config: ModelConfig, state, *, dtype, device, block_size, num_blocks) -> ModelRunner:
    """A ModelRunner whose EngineConfig is fitted to ``config`` (max_model_len: the model's)."""
    engine_config = EngineConfig(dtype=dtype, device=device, block_size=block_size, num_kv_blocks=num_blocks)
    engine_config.fit_model(config)
    return ModelRunner(engine_config, config, state)


def make_runner(s: Shape, state, device, dtype, *, rope_form=None, block_size=BLOCK_SIZE, num_blocks=96):
    d = to_rope_form(hf_config(s).to_dict(), rope_form or s.rope_form)
    runner = new_runner(config_from_dict(d), state, dtype=dtype, device=device, block_size=block_size, num_blocks=num_blocks)
    return runner, BlockPool(num_blocks, block_size, seed=zlib.crc32(s.name.encode()))


def prompt_ids(vocab: int, n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n,), generator=g).tolist()


# ---------------------------------------------------------------------------------------------
# Comparing logits
# ---------------------------------------------------------------------------------------------


class Reference:
    """transformers at the tested dtype, plus the float32 truth (same rounded weights) for bf16."""

    def __init__(self, config: LlamaConfig, state: dict, device: str, dtype: torch.dtype) -> None:
        self.dtype = dtype
        rounded = {k: v.to(dtype).float() for k, v in state.items()}
        self.truth = hf_model(config, rounded, torch.float32, device)
        self.same = self.truth if dtype == torch.float32 else hf_model(config, rounded, dtype, device)

    def logits(self, token_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        truth = hf_logits(self.truth, token_ids)
        same = truth if self.same is self.truth else hf_logits(self.same, token_ids)
        return same, truth


def assert_logits_close(ours: torch.Tensor, same: torch.Tensor, truth: torch.Tensor, dtype: torch.dtype, what: str):
    """ours/same/truth: [N, vocab] float32 (see the module docstring for the rule)."""
    assert ours.shape == truth.shape and ours.dtype == torch.float32, (ours.shape, truth.shape, ours.dtype)
    assert torch.isfinite(ours).all(), what
    if dtype == torch.float32:
        scale = truth.abs().max().item()
        torch.testing.assert_close(ours, truth, rtol=1e-4, atol=1e-4 * scale, msg=lambda m: f"{what}: {m}")
        return
    std = truth.std().item()
    err_ours = (ours - truth).abs()
    err_hf = (same - truth).abs()
    floor = 1e-3 * std
    assert err_ours.max() <= BF16_ERR_RATIO * err_hf.max() + floor, (
        f"{what}: max err {err_ours.max():.4g} vs transformers-bf16 {err_hf.max():.4g} (logit std {std:.3g})"
    )
    assert err_ours.mean() <= BF16_ERR_RATIO * err_hf.mean() + floor, (
        f"{what}: mean err {err_ours.mean():.4g} vs transformers-bf16 {err_hf.mean():.4g} (logit std {std:.3g})"
    )


def assert_greedy_agrees(ours: torch.Tensor, same: torch.Tensor, truth: torch.Tensor, dtype: torch.dtype, what: str):
    """Row-wise argmax of ours == the truth's (float32: all rows). bf16: see the module docstring."""
    mine, ref = ours.argmax(-1), truth.argmax(-1)
    differ = (mine != ref).nonzero().flatten().tolist()
    if dtype == torch.float32:
        assert not differ, f"{what}: greedy tokens differ at rows {differ}"
        return
    std = truth.std().item()
    for r in differ:  # a flip is allowed only where the truth's two candidates are within bf16 noise
        margin = (truth[r, ref[r]] - truth[r, mine[r]]).item()
        noise = (same[r] - truth[r]).abs().max().item()  # transformers-bf16's own error on this row
        tie = max(TIE_EPS * std, TIE_NOISE_MULT * noise)
        assert margin <= tie, f"{what}: row {r} picks {mine[r]} over {ref[r]}, truth margin {margin:.4g} > {tie:.4g}"
    agree_ours = len(ref) - len(differ)
    agree_hf = int((same.argmax(-1) == ref).sum())
    assert agree_ours >= agree_hf - GREEDY_SLACK, (
        f"{what}: ours agrees with the float32 truth on {agree_ours}/{len(ref)} tokens, transformers-bf16 on "
        f"{agree_hf}/{len(ref)}; differing rows {differ}"
    )
