"""A GGUF model parsed once, then started from a converted copy in the cache.

Opening the default model straight from its GGUF took about 7 s on every start: gguf's
pure-Python reader parses the metadata (a 49,152-token vocabulary and its merges: ~3.8 s, and
this was done twice, for the weights and again for the tokenizer), then the Q4_1 weights are
dequantized (~2.6 s on 2 cores). Now the file is parsed once, and a model whose float32 copy
is at most ``MAX_CONVERTED_BYTES`` is written once as a Hugging Face directory

    $TINYVLLM_CACHE/converted/<file stem>-<key>/    (default cache: ~/.cache/tinyvllm)
        config.json  model.safetensors (float32)  tokenizer.json  tokenizer_config.json
        generation_config.json

that later starts read through the ordinary safetensors path, in a fraction of a second. The
first start says so on stderr. float32 keeps the dequantized values exactly, so both ways
give the same weights. ``<key>`` hashes the GGUF's absolute path, size and modification time
and this module's ``FORMAT``: an edited file, or a new way of converting, gets a new copy.
``TINYVLLM_GGUF_CACHE=0`` never writes one (every start then parses the GGUF, once).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
from pathlib import Path

import torch

from tinyvllm.checkpoint import CheckpointError
from tinyvllm.config import ModelConfig
from tinyvllm.default_model import cache_dir
from tinyvllm.gguf_loader import load_gguf, open_gguf
from tinyvllm.tokenizer import Tokenizer

FORMAT = 1  # bump when the converted files change, so old copies are not read
MAX_CONVERTED_BYTES = 2 << 30  # larger models (a float32 copy of a 7B model is 28 GB) are not copied

Model = tuple[ModelConfig, dict[str, torch.Tensor], Tokenizer]


def converted_dir(gguf: str | Path) -> Path:
    """Where the converted copy of ``gguf`` lives (whether or not it exists yet)."""
    gguf = Path(gguf).resolve()
    st = gguf.stat()
    key = hashlib.sha256(f"{FORMAT}:{gguf}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]
    return cache_dir() / "converted" / f"{gguf.stem}-{key}"


def load_gguf_model(path: str | Path, dtype: torch.dtype) -> Model:
    """(config, {HF name: CPU tensor in ``dtype``}, tokenizer) of a GGUF file, from its converted
    copy when there is one; otherwise parsed once, and the copy written for next time."""
    path = Path(path)
    target = converted_dir(path)
    if (target / "model.safetensors").is_file():  # copies appear whole (renamed into place)
        try:
            return _load_converted(target, dtype)
        except (CheckpointError, OSError, ValueError) as e:
            print(f"tinyvllm: the converted copy {target} is damaged ({e}); converting {path.name} again", file=sys.stderr)
            shutil.rmtree(target, ignore_errors=True)
    reader = open_gguf(path)
    config, weights = load_gguf(path, torch.float32, reader)
    tokenizer = Tokenizer.from_gguf(path, reader)
    size = sum(w.numel() * w.element_size() for w in weights.values())
    if os.environ.get("TINYVLLM_GGUF_CACHE") != "0" and size <= MAX_CONVERTED_BYTES:
        try:
            _write_converted(target, config, weights, tokenizer)
            print(
                f"tinyvllm: converted {path.name} into {target} ({size / 1e6:.0f} MB of float32 safetensors) "
                "so that later starts skip parsing and dequantizing it (delete that folder to undo)",
                file=sys.stderr,
            )
        except OSError as e:  # a read-only or full cache costs speed, not the run
            print(f"tinyvllm: could not keep a converted copy of {path.name} in {target.parent} ({e})", file=sys.stderr)
    return config, {name: w.to(dtype) for name, w in weights.items()}, tokenizer


def _load_converted(directory: Path, dtype: torch.dtype) -> Model:
    from tinyvllm.loader import load_checkpoint

    config, weights = load_checkpoint(directory, dtype)
    return config, weights, Tokenizer.from_pretrained(directory)


def _write_converted(target: Path, config: ModelConfig, weights: dict[str, torch.Tensor], tokenizer: Tokenizer) -> None:
    """Write the directory under a temporary name, then rename it into place: a reader never sees
    half a copy, and of two processes converting at once the first rename wins."""
    import json

    from safetensors.torch import save_file

    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        (tmp / "config.json").write_text(json.dumps(config.to_dict(), indent=1))
        tokenizer.save_pretrained(tmp)
        save_file({n: w.contiguous() for n, w in weights.items()}, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "model.safetensors").is_file():
                raise  # not "another process was first"
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
