"""The sampling defaults a model's creators ship in its ``generation_config.json``.

Llama 3.2 1B Instruct ships ``{"temperature": 0.6, "top_p": 0.9, ...}``: the settings its makers
tuned it for. vLLM reads them by default (``--generation-config auto``) and uses them wherever a
request leaves a field unset: a server request without ``temperature`` samples at 0.6, not at
OpenAI's 1.0; ``LLM.generate(prompts)`` without SamplingParams uses
``LLM.get_default_sampling_params()``. tinyvllm does the same (``EngineConfig.generation_config``):

    "auto"    the generation_config.json beside the weights (a GGUF has none: no defaults)
    "vllm"    none: SamplingParams' own defaults (vLLM's name for that choice)
    a folder  that folder's generation_config.json

Only the fields vLLM takes are read: temperature, top_p, top_k, min_p, repetition_penalty, and
max_new_tokens (transformers' name), which becomes max_tokens. ``do_sample`` is not one of them
(as in vLLM): a file's temperature counts even where transformers would decode greedily.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

GENERATION_CONFIG = "generation_config.json"
_FIELDS = ("repetition_penalty", "temperature", "top_k", "top_p", "min_p", "max_new_tokens")


def check_generation_config(value: Any) -> None:
    """``EngineConfig.generation_config``: "auto", "vllm" or a folder holding generation_config.json."""
    if not isinstance(value, str):
        raise ValueError(f'generation_config must be "auto", "vllm" or a folder, got {value!r}')
    if value not in ("auto", "vllm") and not (Path(os.path.expanduser(value)) / GENERATION_CONFIG).is_file():
        raise ValueError(f'generation_config must be "auto", "vllm" or a folder holding {GENERATION_CONFIG}; '
                         f"{value!r} holds none")  # fmt: skip


def load_sampling_defaults(model_path: str, generation_config: str = "auto") -> dict[str, Any]:
    """The SamplingParams fields the model's generation config sets, by SamplingParams' names
    (``{"temperature": 0.6, "top_p": 0.9}``); empty where there is none or it is turned off."""
    if generation_config == "vllm":
        return {}
    folder = Path(os.path.expanduser(model_path if generation_config == "auto" else generation_config))
    file = folder / GENERATION_CONFIG
    if not file.is_file():  # (a .gguf file, or a checkpoint without one)
        return {}
    try:
        with open(file) as f:
            config = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{file} is not valid JSON ({e}); generation_config='vllm' ignores it") from e
    if not isinstance(config, dict):
        raise ValueError(f"{file} holds {type(config).__name__}, not a JSON object; generation_config='vllm' ignores it")
    defaults = {name: config[name] for name in _FIELDS if config.get(name) is not None}
    if "max_new_tokens" in defaults:
        defaults["max_tokens"] = defaults.pop("max_new_tokens")
    from tinyvllm.sampling_params import SamplingParams

    try:  # (checked once here: a bad value would otherwise fail every request that leaves it unset)
        SamplingParams(**defaults)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{file}: {e} (generation_config='vllm' ignores the file)") from e
    return defaults
