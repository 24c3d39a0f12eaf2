"""Every dev/cuda program compiles and links, and the read floor also as the library the
attention benchmark loads (this machine and CI have nvcc but no GPU; the GPU machine builds
and runs them: `bash scripts/gpu_check.sh dev`).

One architecture, sm_90a; about a minute on 2 cores, most of it the decode program, which
compiles the product's tensor-core kernels. Skips without nvcc.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
_spec = importlib.util.spec_from_file_location("dev_cuda_build", ROOT / "dev" / "cuda" / "build.py")
build = importlib.util.module_from_spec(_spec)  # dev/cuda/build.py (not PyPA's `build`)
_spec.loader.exec_module(build)

HAS_NVCC = shutil.which("nvcc") is not None or any(
    h and os.path.isfile(os.path.join(h, "bin", "nvcc")) for h in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"))


def test_every_dev_cuda_program_is_listed_for_the_build():
    assert {p.stem for p in (ROOT / "dev" / "cuda").glob("*.cu")} == set(build.PROGRAMS)
    for sources in build.PROGRAMS.values():
        assert all((ROOT / s).is_file() for s in sources), sources


@pytest.mark.skipif(not HAS_NVCC, reason="needs nvcc")
def test_every_dev_cuda_program_compiles_and_links(tmp_path):
    result = build.build(list(build.PROGRAMS), tmp_path, "sm_90a")
    failed = {name: err for name, err in result.items() if err}
    assert not failed, "\n".join(f"{name}:\n{err}" for name, err in failed.items())
    assert all((tmp_path / name).is_file() for name in build.PROGRAMS)


@pytest.mark.skipif(not HAS_NVCC, reason="needs nvcc")
def test_the_read_floor_builds_as_the_benchmarks_library(tmp_path):
    from read_floor import build_library

    lib = build_library("90", tmp_path)
    symbols = lib.read_bytes()
    for entry in (b"tinyvllm_read_pages", b"tinyvllm_read_floor_error", b"tinyvllm_read_floor_bad_page"):
        assert entry in symbols, entry
    assert build_library("90", tmp_path) == lib  # built once, then reused
