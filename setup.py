"""Build tinyvllm, and its CUDA extension ``tinyvllm._C`` when it can be built.

Project metadata lives in pyproject.toml; this file only decides how to build
the kernels. Both of these work:

    pip install --no-build-isolation -e .          # editable install
    python setup.py build_ext --inplace            # just compile tinyvllm/_C*.so in the tree

The extension is built when torch is a CUDA build and nvcc is found; otherwise
tinyvllm installs as pure Python (every op then runs its torch reference).

What was decided must be visible, and pip hides a build's output unless it fails or
runs with -v. So it is said twice: in the version pip prints ("Successfully installed
tinyvllm-0.1.0+cu130.sm90": built for CUDA 13.0, sm_90; "tinyvllm-0.1.0+nokernels": not
built), the way torch marks its builds, and as one sentence written to the terminal
(/dev/tty, which pip does not capture) as well as to stderr (pip -v, logs).
Everything is found automatically; these environment variables override:

    CUDA_HOME / CUDA_PATH      the CUDA toolkit (default: /usr/local/cuda, else nvcc's prefix)
    TORCH_CUDA_ARCH_LIST       GPU targets (default: the visible GPU's, or "9.0" with no GPU)
    MAX_JOBS                   parallel compile jobs (default 2)
    TINYVLLM_NO_EXTENSION=1    skip the extension entirely
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
# Commands that build (pip's metadata step runs dist_info/egg_info first: it stays quiet).
_BUILD_COMMANDS = {"build", "build_ext", "bdist_wheel", "editable_wheel", "develop", "install"}


def _notice(msg: str) -> None:
    """One line on stderr, and on the terminal when pip captures stderr (only while building)."""
    if not _BUILD_COMMANDS.intersection(sys.argv[1:]):
        return
    line = f"tinyvllm setup: {msg}"
    print(line, file=sys.stderr, flush=True)
    if sys.stderr.isatty():
        return
    try:
        with open("/dev/tty", "w") as tty:
            tty.write(line + "\n")
    except OSError:
        pass  # no terminal (CI): the version label says it


def base_version() -> str:
    """tinyvllm.__version__, read without importing the package."""
    text = (ROOT / "tinyvllm" / "__init__.py").read_text()
    return re.search(r'^__version__ = "([^"]+)"', text, re.M).group(1)


def version_label(cuda: str | None, targets: list[str]) -> str:
    """The local version label that tells what was built: 'cu130.sm80.sm90' or 'nokernels'."""
    if cuda is None:
        return "nokernels"
    sms = [("sm" + t.replace(".", "").replace("+", "").lower()) for t in targets]
    return ".".join([f"cu{cuda.replace('.', '')}", *sms])


def cuda_targets() -> list[str]:
    """The GPU architectures the kernels are compiled for: TORCH_CUDA_ARCH_LIST, else the
    visible GPUs', else (no GPU) 9.0, which is then put in TORCH_CUDA_ARCH_LIST for torch."""
    import torch

    listed = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if listed:
        return [t for t in re.split(r"[;\s]+", listed) if t]
    if torch.cuda.is_available():
        caps = {torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}
        return [f"{major}.{minor}" for major, minor in sorted(caps)]
    os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0"  # H100 / H200
    return ["9.0"]


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


def _pure_python(reason: str) -> dict:
    _notice(f"CUDA kernels NOT built: {reason}; installing pure Python (every op runs its torch reference).")
    return {"version": f"{base_version()}+{version_label(None, [])}"}


def cuda_extension_setup() -> dict:
    """setup() keyword arguments: the version (with its label) and, when it can be built, the
    CUDA extension."""
    if os.environ.get("TINYVLLM_NO_EXTENSION") == "1":
        return _pure_python("TINYVLLM_NO_EXTENSION=1")
    try:
        import torch
    except ImportError:
        return _pure_python("torch is not importable")
    if torch.version.cuda is None:
        return _pure_python(f"torch {torch.__version__} is not a CUDA build")
    cuda_home = find_cuda_home()
    if cuda_home is None:
        return _pure_python("nvcc not found (set CUDA_HOME)")

    # Must be set before torch.utils.cpp_extension is imported: it reads CUDA_HOME once, at import.
    os.environ["CUDA_HOME"] = cuda_home
    os.environ.setdefault("MAX_JOBS", "2")
    where = ("TORCH_CUDA_ARCH_LIST" if "TORCH_CUDA_ARCH_LIST" in os.environ
             else "the visible GPUs" if torch.cuda.is_available() else "no GPU visible: H100/H200 by default")
    targets = cuda_targets()
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
        f"building the CUDA kernels (tinyvllm._C) for {', '.join('sm_' + t.replace('.', '') for t in targets)} "
        f"(from {where}) with CUDA {torch.version.cuda} at {cuda_home}: {len(sources)} files, MAX_JOBS={os.environ['MAX_JOBS']}"
    )
    return {
        "version": f"{base_version()}+{version_label(torch.version.cuda, targets)}",
        "ext_modules": [ext],
        "cmdclass": {"build_ext": BuildExtension.with_options(use_ninja=True)},
    }


if __name__ == "__main__":  # pip runs this file as __main__; tests import it for its functions
    setup(**cuda_extension_setup())
