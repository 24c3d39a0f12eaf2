"""ModelConfig: a typed view of any Llama-architecture `config.json`.

A Hugging Face checkpoint describes its shape in `config.json`. Different checkpoints spell the
same thing differently, and this module is the one place that knows the spellings:

- `head_dim` is explicit in some files and implied (`hidden_size // num_attention_heads`) in others.
- `num_key_value_heads` is missing in old MHA checkpoints (it then equals `num_attention_heads`).
- `eos_token_id` is an int or a list (Llama 3.x Instruct stops on several tokens).
- RoPE: published Llama 3.x checkpoints carry top-level `rope_theta` and `rope_scaling`, while
  transformers 5 writes both inside `rope_parameters`. Both normalise to `rope_theta` +
  `rope_scaling` (None, or the llama3 dict below).

Everything the engine cannot run (another architecture, a rope type other than default/llama3,
Mistral's sliding window) is a ValueError that names it, never a silent wrong answer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")
_MODEL_TYPE_TO_ARCHITECTURE = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}
_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


@dataclass
class ModelConfig:
    """Everything the engine needs to know about a Llama-architecture model's shape."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None  # None or {"rope_type": "llama3", "factor", "low_freq_factor", ...}
    max_position_embeddings: int
    tie_word_embeddings: bool
    bos_token_id: int | None
    eos_token_ids: list[int] = field(default_factory=list)
    attention_bias: bool = False
    mlp_bias: bool = False
    torch_dtype: str | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        """Build a config from a parsed `config.json` (either RoPE form; see the module docstring)."""
        architecture = _architecture(d)
        if d.get("sliding_window") is not None and d.get("use_sliding_window", True):
            window, max_pos = d["sliding_window"], d.get("max_position_embeddings")
            if max_pos is None or window < max_pos:
                raise ValueError(
                    f"{architecture} with sliding_window={window} is not supported "
                    f"(tinyvllm attends over the full context; max_position_embeddings={max_pos})"
                )

        hidden_size = _require(d, "hidden_size", int)
        num_heads = _require(d, "num_attention_heads", int)
        num_kv_heads = int(d.get("num_key_value_heads") or num_heads)
        if num_heads % num_kv_heads:
            raise ValueError(
                f"num_attention_heads ({num_heads}) must be a multiple of num_key_value_heads ({num_kv_heads})"
            )
        head_dim = d.get("head_dim")
        if head_dim is None:
            if hidden_size % num_heads:
                raise ValueError(
                    f"hidden_size ({hidden_size}) is not divisible by num_attention_heads ({num_heads}) "
                    "and config.json has no head_dim"
                )
            head_dim = hidden_size // num_heads

        rope_theta, rope_scaling = _rope(d)
        eos = d.get("eos_token_id")
        eos_ids = [] if eos is None else [int(e) for e in (eos if isinstance(eos, list) else [eos])]
        bos = d.get("bos_token_id")
        return cls(
            architecture=architecture,
            vocab_size=_require(d, "vocab_size", int),
            hidden_size=hidden_size,
            intermediate_size=_require(d, "intermediate_size", int),
            num_hidden_layers=_require(d, "num_hidden_layers", int),
            num_attention_heads=num_heads,
            num_key_value_heads=num_kv_heads,
            head_dim=int(head_dim),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=int(d.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            bos_token_id=None if bos is None else int(bos),
            eos_token_ids=eos_ids,
            attention_bias=bool(d.get("attention_bias", False)),
            mlp_bias=bool(d.get("mlp_bias", False)),
            torch_dtype=d.get("torch_dtype", d.get("dtype")),
        )

    def to_dict(self) -> dict[str, Any]:
        """A Hugging Face `config.json` that :meth:`from_dict` reads back into this config."""
        return {
            "architectures": [self.architecture], "model_type": "llama", "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size, "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers, "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads, "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps, "rope_theta": self.rope_theta, "rope_scaling": self.rope_scaling,
            "max_position_embeddings": self.max_position_embeddings, "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id, "eos_token_id": list(self.eos_token_ids),
            "attention_bias": self.attention_bias, "mlp_bias": self.mlp_bias, "torch_dtype": self.torch_dtype,
        }  # fmt: skip


def load_config(path: str | Path) -> ModelConfig:
    """Read a `config.json`, given either the file or the checkpoint directory holding it."""
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"no config.json at {file}")
    try:
        d = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}: not valid JSON ({e})") from e
    try:
        return ModelConfig.from_dict(d)
    except ValueError as e:
        raise ValueError(f"{file}: {e}") from e


def _require(d: dict, key: str, typ: type) -> Any:
    if d.get(key) is None:
        raise ValueError(f"config is missing required key {key!r}")
    return typ(d[key])


def _architecture(d: dict) -> str:
    archs = d.get("architectures") or []
    if not archs:
        model_type = d.get("model_type")
        if model_type is None:
            raise ValueError("config is missing required key 'architectures' (and has no 'model_type')")
        if model_type not in _MODEL_TYPE_TO_ARCHITECTURE:
            raise ValueError(f"unsupported model_type {model_type!r}; supported: llama, mistral")
        return _MODEL_TYPE_TO_ARCHITECTURE[model_type]
    for arch in archs:
        if arch in SUPPORTED_ARCHITECTURES:
            return arch
    raise ValueError(f"unsupported architecture {archs[0]!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")


def _rope(d: dict) -> tuple[float, dict | None]:
    """(rope_theta, normalised rope_scaling) from either the transformers 5 or the classic form."""
    params = d.get("rope_parameters")
    if params is not None:  # transformers 5: theta and scaling live together
        theta = params.get("rope_theta", d.get("rope_theta", 10000.0))
        scaling = params
    else:  # published checkpoints: top-level rope_theta, rope_scaling (possibly null)
        theta = d.get("rope_theta", 10000.0)
        scaling = d.get("rope_scaling")
    if scaling is None:
        return float(theta), None
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "default":
        return float(theta), None
    if rope_type != "llama3":
        raise ValueError(f"unsupported rope type {rope_type!r}; supported: default, llama3")
    missing = [k for k in _LLAMA3_KEYS if scaling.get(k) is None]
    if missing:
        raise ValueError(f"llama3 rope scaling is missing key(s) {missing}")
    normalised = {"rope_type": "llama3"}
    normalised.update({k: float(scaling[k]) for k in _LLAMA3_KEYS[:3]})
    normalised["original_max_position_embeddings"] = int(scaling["original_max_position_embeddings"])
    return float(theta), normalised
