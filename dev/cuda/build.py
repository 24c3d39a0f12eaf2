"""Build the dev/cuda programs: each is its own main() plus the product sources it links.

    python dev/cuda/build.py                       # every program, into build/dev/, for the visible GPU (else sm_90a)
    python dev/cuda/build.py rmsnorm --arch sm_90a # one program, for one architecture
    python dev/cuda/build.py --list                # the programs and the sources of each

Each source is compiled once per build (the programs share csrc/errors.cu), as many at a
time as there are cores, with the product's flags; then each program is linked. The same
commands by hand are in dev/cuda/README.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# program -> its sources (the dev/cuda file first, then what it links from csrc/)
PROGRAMS: dict[str, list[str]] = {
    "rmsnorm": ["dev/cuda/rmsnorm.cu", "csrc/rmsnorm.cu"],
    "paged_attention_decode": [
        "dev/cuda/paged_attention_decode.cu", "csrc/attention/paged_attention.cu",
        "csrc/attention/decode_cuda_cores.cu", "csrc/attention/decode_tensor_cores.cu",
        "csrc/attention/decode_merge.cu", "csrc/attention/decode_plan.cpp", "csrc/errors.cu",
    ],
    "read_floor": ["dev/cuda/read_floor.cu", "csrc/errors.cu"],
    "skinny_gemm": ["dev/cuda/skinny_gemm.cu", "csrc/gemm/skinny_gemm.cu", "csrc/gemm.cpp"],
}
NEEDS_CUBLAS = {"skinny_gemm"}  # programs that time cuBLAS beside their own versions
FLAGS = ["-O3", "-std=c++20", "--expt-relaxed-constexpr", "-I", str(ROOT / "csrc")]  # the extension's


def nvcc() -> str:
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and os.path.isfile(os.path.join(home, "bin", "nvcc")):
            return os.path.join(home, "bin", "nvcc")
    found = shutil.which("nvcc")
    if found is None:
        raise RuntimeError("nvcc not found (set CUDA_HOME)")
    return found


def cublas_flags() -> tuple[list[str], list[str]]:
    """(compile flags, link flags) for cuBLAS, found as setup.py finds it: in the CUDA toolkit
    beside nvcc, else in the copy torch's CUDA wheel brings (site-packages/nvidia/cu*/, where
    only the versioned libcublas.so.NN exists, hence -l:)."""
    home = Path(os.path.realpath(nvcc())).parent.parent
    for libdir in ("lib64", "lib", "targets/x86_64-linux/lib"):
        if (home / "include" / "cublas_v2.h").is_file() and list((home / libdir).glob("libcublas.so*")):
            return [], [f"-L{home / libdir}", "-lcublas"]
    import torch

    site = Path(torch.__file__).resolve().parent.parent
    for nv in sorted(site.glob("nvidia/cu*"), reverse=True) + [site / "nvidia" / "cublas"]:
        libs = sorted(nv.glob("lib/libcublas.so*"))
        if (nv / "include" / "cublas_v2.h").is_file() and libs:
            lib = nv / "lib"
            return ["-I", str(nv / "include")], [f"-L{lib}", f"-l:{libs[0].name}", f"-Xlinker=-rpath={lib}"]
    raise RuntimeError(f"cuBLAS headers/libraries not found beside {home} nor in torch's nvidia wheels")


def default_arch() -> str:
    """The visible GPU's architecture (sm_90a on Hopper), else sm_90a."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30).stdout.split()
        major, minor = out[0].split(".")
        return f"sm_{major}{minor}" + ("a" if major == "9" else "")
    except (OSError, IndexError, ValueError, subprocess.SubprocessError):
        return "sm_90a"


def _run(cmd: list[str]) -> str | None:
    """None if cmd succeeded, else its command line and output."""
    done = subprocess.run(cmd, capture_output=True, text=True)
    return None if done.returncode == 0 else " ".join(cmd) + "\n" + done.stdout + done.stderr


def build(names: list[str], out: Path, arch: str, jobs: int | None = None) -> dict[str, str | None]:
    """Build the named programs into out/; {name: None if it built, else the compiler's message}."""
    obj = out / "obj" / arch
    obj.mkdir(parents=True, exist_ok=True)
    sources = sorted({s for n in names for s in PROGRAMS[n]})
    objects = {s: obj / (s.replace("/", "_") + ".o") for s in sources}
    cublas_cc, cublas_link, no_cublas = [], [], None
    if NEEDS_CUBLAS & set(names):
        try:
            cublas_cc, cublas_link = cublas_flags()
        except (RuntimeError, ImportError) as e:
            no_cublas = str(e)
    cc = [nvcc(), *FLAGS, *cublas_cc, f"-arch={arch}"]
    with ThreadPoolExecutor(jobs or os.cpu_count() or 2) as pool:
        errors = dict(zip(sources, pool.map(lambda s: _run([*cc, "-c", str(ROOT / s), "-o", str(objects[s])]), sources)))
    result = {}
    for n in names:
        failed = [errors[s] for s in PROGRAMS[n] if errors[s]]
        if n in NEEDS_CUBLAS and no_cublas:
            failed.append(no_cublas)
        link = cublas_link if n in NEEDS_CUBLAS else []
        result[n] = "\n".join(failed) if failed else _run([*cc, *(str(objects[s]) for s in PROGRAMS[n]),
                                                             "-o", str(out / n), *link])
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("names", nargs="*", help=f"programs (default: all of {', '.join(PROGRAMS)})")
    ap.add_argument("--arch", default=None, help="e.g. sm_90a (default: the visible GPU's, else sm_90a)")
    ap.add_argument("--out", type=Path, default=ROOT / "build" / "dev")
    ap.add_argument("--list", action="store_true")
    args = ap.parse_args()
    if args.list:
        for n, srcs in PROGRAMS.items():
            print(f"{n}: {' '.join(srcs)}")
        return 0
    unknown = [n for n in args.names if n not in PROGRAMS]
    if unknown:
        sys.exit(f"unknown program(s) {unknown}; programs: {list(PROGRAMS)}")
    arch = args.arch or default_arch()
    result = build(args.names or list(PROGRAMS), args.out, arch)
    for n, err in result.items():
        print(f"{n}: {'built ' + str(args.out / n) if err is None else 'FAILED'} ({arch})")
        if err:
            print(err)
    return 0 if all(e is None for e in result.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
