"""Build tinyvllm, and its CUDA extension ``tinyvllm._C`` when it can be built.

Project metadata lives in pyproject.toml; this file only decides how to build
the kernels. Both of these work:

    pip install --no-build-isolation -e .          # editable install
    python setup.py build_ext --inplace            # just compile tinyvllm/_C*.so in the tree

The extension is built when torch is a CUDA build and nvcc is found; otherwise
tinyvllm installs as pure Python (every op then runs its torch reference).
Everything is found automatically; these environment variables override:

    CUDA_HOME / CUDA_PATH      the CUDA toolkit (default: /usr/local/cuda, else nvcc's prefix)
    TORCH_CUDA_ARCH_LIST       GPU targets (default: the visible GPU's, or "9.0" with no GPU)
    MAX_JOBS                   parallel compile jobs (default 2)
    TINYVLLM_NO_EXTENSION=1    skip the extension entirely
"""

from __future__ import annotations

import glob
import os
import shutil
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent


def _notice(msg: str) -> None:
    print(f"tinyvllm setup: {msg}", file=sys.stderr)


def _looks_like_cuda_home(path: str | None) -> bool:
    return bool(path) and os.path.isfile(os.path.join(path, "bin", "nvcc")) and os.path.isfile(
        os.path.join(path, "include", "cuda_runtime.h")
    )


def find_cuda_home() -> str | None:
    """The CUDA toolkit root. torch's own guess follows `which nvcc`, which is wrong
    when nvcc is a wrapper script (here /usr/local/bin/nvcc -> CUDA_HOME=/usr/local),
    so we look for a directory that really holds bin/nvcc AND include/cuda_runtime.h."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(os.path.realpath(nvcc)).parent.parent))
    candidates += sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for c in candidates:
        if _looks_like_cuda_home(c):
            return os.path.realpath(c)
    return None


def find_cublas(cuda_home: str) -> tuple[list[str], list[str], list[str]]:
    """(include_dirs, library_dirs, link_args) for cuBLAS.

    A full toolkit has cublas_v2.h and libcublas.so. A minimal one (this dev
    machine) has neither, but torch's CUDA wheel brings both under
    site-packages/nvidia/cu*/ (only the versioned libcublas.so.NN, hence -l:).
    """
    inc = os.path.join(cuda_home, "include")
    for libdir in ("lib64", "lib", os.path.join("targets", "x86_64-linux", "lib")):
        if os.path.isfile(os.path.join(inc, "cublas_v2.h")) and glob.glob(
            os.path.join(cuda_home, libdir, "libcublas.so*")
        ):
            return [], [os.path.join(cuda_home, libdir)], ["-lcublas"]
    import torch

    site = Path(torch.__file__).resolve().parent.parent
    for nv in sorted(site.glob("nvidia/cu*"), reverse=True) + [site / "nvidia" / "cublas"]:
        libs = sorted(nv.glob("lib/libcublas.so*"))
        if (nv / "include" / "cublas_v2.h").is_file() and libs:
            lib = libs[0].name  # e.g. libcublas.so.13
            libdir = str(nv / "lib")
            return [str(nv / "include")], [libdir], [f"-l:{lib}", f"-Wl,-rpath,{libdir}"]
    raise RuntimeError(f"cuBLAS headers/libraries not found in {cuda_home} nor in torch's nvidia wheels")


def cuda_extension_setup() -> dict:
    """setup() keyword arguments for the CUDA extension, or {} when it cannot be built."""
    if os.environ.get("TINYVLLM_NO_EXTENSION") == "1":
        _notice("TINYVLLM_NO_EXTENSION=1: installing pure Python (ops run their torch reference).")
        return {}
    try:
        import torch
    except ImportError:
        _notice("torch is not importable: installing pure Python (ops run their torch reference).")
        return {}
    if torch.version.cuda is None:
        _notice(f"torch {torch.__version__} is not a CUDA build: installing pure Python (reference ops).")
        return {}
    cuda_home = find_cuda_home()
    if cuda_home is None:
        _notice("nvcc not found (set CUDA_HOME): installing pure Python (reference ops).")
        return {}

    # Must be set before torch.utils.cpp_extension is imported: it reads CUDA_HOME once, at import.
    os.environ["CUDA_HOME"] = cuda_home
    os.environ.setdefault("MAX_JOBS", "2")
    if "TORCH_CUDA_ARCH_LIST" not in os.environ and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0"  # H100 / H200
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    cublas_inc, cublas_libdirs, cublas_link = find_cublas(cuda_home)
    # Every .cu and .cpp under csrc/ (csrc/attention/ included). dev/cuda/ is not part of it.
    sources = sorted(
        os.path.relpath(p, ROOT)
        for ext in ("cu", "cpp")
        for p in glob.glob(str(ROOT / "csrc" / "**" / f"*.{ext}"), recursive=True)
    )
    ext = CUDAExtension(
        name="tinyvllm._C",
        sources=sources,
        include_dirs=[str(ROOT / "csrc")] + cublas_inc,
        library_dirs=cublas_libdirs,
        # No -std flag: torch adds the C++ standard its own headers need (C++20 for torch 2.14).
        extra_compile_args={
            "cxx": ["-O3"],
            "nvcc": ["-O3", "-lineinfo", "--expt-relaxed-constexpr"],
        },
        # rpath to torch's libraries: `import tinyvllm._C` then works even before `import torch`.
        extra_link_args=cublas_link + [f"-Wl,-rpath,{os.path.join(os.path.dirname(torch.__file__), 'lib')}"],
    )
    _notice(
        f"building tinyvllm._C from {len(sources)} files with CUDA_HOME={cuda_home}, "
        f"TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST', '(visible GPU)')}, "
        f"MAX_JOBS={os.environ['MAX_JOBS']}"
    )
    return {"ext_modules": [ext], "cmdclass": {"build_ext": BuildExtension.with_options(use_ninja=True)}}


setup(**cuda_extension_setup())
