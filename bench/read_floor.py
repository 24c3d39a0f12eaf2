"""The read floor of the attention benchmark: dev/cuda/read_floor.cu, loaded with ctypes.

A kernel that only reads the pages a decode kernel reads (dev/cuda/read_floor.cu says why
that is a floor). It is no part of the product, so it is not in the extension: on first use
this module compiles it with nvcc as a shared library into build/dev/ (one file per version
of its sources, reused afterwards) and calls it on torch tensors, on torch's current stream.

    from read_floor import read_pages, bad_page_seen
    fit = read_pages(checksum, pool_k, pool_v, table, page_mult, stream_stride, threads, unroll, blocks_per_sm)
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib.util
import os
import subprocess
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("dev_cuda_build", ROOT / "dev" / "cuda" / "build.py")
dev_build = importlib.util.module_from_spec(_spec)  # nvcc and the extension's flags, as the dev programs use them
_spec.loader.exec_module(dev_build)
SOURCES = [ROOT / "dev" / "cuda" / "read_floor.cu", ROOT / "csrc" / "errors.cu"]
HEADERS = [ROOT / "dev" / "cuda" / "common.h", ROOT / "csrc" / "attention" / "attention_utils.cuh",
           ROOT / "csrc" / "attention" / "device_limits.h", ROOT / "csrc" / "common.cuh", ROOT / "csrc" / "ops.h",
           ROOT / "csrc" / "cuda_check.h"]
BUILD_DIR = ROOT / "build" / "dev"


def build_library(arch: str, out_dir: Path = BUILD_DIR) -> Path:
    """The library for sm_<arch> (e.g. "90"), compiled unless a build of the same sources and flags exists."""
    # The extension's flags, so the kernel compiles to what it did inside the extension.
    flags = [*dev_build.FLAGS, f"-gencode=arch=compute_{arch},code=sm_{arch}", "-DREAD_FLOOR_LIBRARY", "-shared",
             "-Xcompiler", "-fPIC"]
    digest = hashlib.sha1(" ".join(flags).encode())
    for f in SOURCES + HEADERS:
        digest.update(f.read_bytes())
    lib = out_dir / f"libread_floor-{digest.hexdigest()[:12]}.so"
    if not lib.exists():
        out_dir.mkdir(parents=True, exist_ok=True)
        tmp = lib.with_suffix(f".{os.getpid()}.tmp")
        cmd = [dev_build.nvcc(), *flags, *map(str, SOURCES), "-o", str(tmp)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"read_floor: building {lib.name} failed:\n{' '.join(cmd)}\n{done.stderr}")
        tmp.replace(lib)
    return lib


@functools.lru_cache(maxsize=None)
def _library() -> ctypes.CDLL:
    """The library for the current GPU, built on first use, with its C signatures."""
    major, minor = torch.cuda.get_device_capability()
    dll = ctypes.CDLL(str(build_library(f"{major}{minor}")))
    i64, i32, ptr = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p
    dll.tinyvllm_read_pages.argtypes = [ptr, ptr, ptr, i64, i64, ptr, i32, i32, i32, i64, i64, i32, i32, i32, ptr]
    dll.tinyvllm_read_pages.restype = i32
    dll.tinyvllm_read_floor_error.restype = ctypes.c_char_p
    dll.tinyvllm_read_floor_bad_page.argtypes = [i32]
    dll.tinyvllm_read_floor_bad_page.restype = i32
    return dll


def read_pages(checksum: torch.Tensor, pool_a: torch.Tensor, pool_b: torch.Tensor, table: torch.Tensor,
               page_mult: int, stream_stride: int, threads: int = 128, unroll: int = 4, blocks_per_sm: int = 0) -> int:
    """Read pages of pool_a and pool_b (equal contiguous tensors whose dimension 0 counts pages of a
    power-of-two size >= 16 bytes) as table [num_rows, pages_per_row] int32 names them: stream s of
    row r reads pages table[r][j] * page_mult + s * stream_stride, and checksum [num_rows,
    streams_per_row] int32 gets the XOR of every 32-bit word it read. threads 128 or 256, unroll
    (16-byte loads in flight per thread and pool) 2, 4 or 8, blocks_per_sm 0 (as many as fit) or
    the most that may share an SM. Returns how many blocks fit on an SM. A page outside the pools
    reads page 0 instead; :func:`bad_page_seen` tells."""
    for name, t in (("pool_a", pool_a), ("pool_b", pool_b), ("table", table), ("checksum", checksum)):
        if not t.is_cuda or t.device != pool_a.device:
            raise ValueError(f"{name} must be a CUDA tensor on pool_a's device, got {t.device}")
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
    if table.dtype != torch.int32 or checksum.dtype != torch.int32:
        raise ValueError(f"table and checksum must be int32, got {table.dtype} and {checksum.dtype}")
    if pool_b.shape != pool_a.shape or pool_b.dtype != pool_a.dtype or pool_a.dim() < 1 or pool_a.shape[0] == 0:
        raise ValueError(f"pool_b must have the shape and dtype of pool_a {tuple(pool_a.shape)}, got {tuple(pool_b.shape)}")
    if table.dim() != 2 or checksum.dim() != 2 or checksum.shape[0] != table.shape[0]:
        raise ValueError(f"table must be [num_rows, pages_per_row] and checksum [num_rows, streams_per_row], got "
                         f"{tuple(table.shape)} and {tuple(checksum.shape)}")
    if pool_a.data_ptr() % 16 or pool_b.data_ptr() % 16:
        raise ValueError("pool_a and pool_b must start on a 16-byte boundary")
    if threads not in (128, 256) or unroll not in (2, 4, 8):
        raise ValueError(f"threads must be 128 or 256 and unroll 2, 4 or 8, got {threads} and {unroll}")
    num_pages = pool_a.shape[0]
    page_bytes = pool_a.numel() // num_pages * pool_a.element_size()
    with torch.cuda.device(pool_a.device):
        fit = _library().tinyvllm_read_pages(
            checksum.data_ptr(), pool_a.data_ptr(), pool_b.data_ptr(), page_bytes, num_pages, table.data_ptr(),
            table.shape[0], table.shape[1], checksum.shape[1], page_mult, stream_stride, threads, unroll,
            blocks_per_sm, torch.cuda.current_stream().cuda_stream)
    if fit < 0:
        raise ValueError(_library().tinyvllm_read_floor_error().decode())
    return fit


def bad_page_seen(clear: bool = True) -> bool:
    """True if a read_pages kernel met a page outside its pools since the last clear (waits for the GPU)."""
    torch.cuda.synchronize()
    return bool(_library().tinyvllm_read_floor_bad_page(int(clear)))
