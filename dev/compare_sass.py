r"""Compare two builds of tinyvllm._C kernel by kernel: machine code (SASS) and resources.

A refactor of csrc/ that must not change a kernel's speed should leave every kernel's
machine code as it was. This reads `cuobjdump -sass` and `cuobjdump -res-usage` of both
builds, keys each kernel by its demangled name (without the anonymous-namespace hash and
the parameter list, which change when a file or a parameter moves), and compares the
instructions (addresses and encodings included) and the registers / stack / shared /
local memory per kernel. CONSTANT[0] (the kernel's parameter bytes) is reported but not
judged: removing an unused parameter changes it and nothing else.

    python dev/compare_sass.py /tmp/base tinyvllm/_C*.so \
        --rename 'paged_attention_decode_kernel<=decode_cuda_cores_kernel<' \
        --rename 'paged_attention_decode_reduce_kernel<=decode_merge_kernel<' \
        --rename 'paged_attention_decode_mma_kernel<([^,]+), (\d+), (true|false), false, (\d+), (true|false)>=decode_tensor_cores_kernel<\1, \2, \3, \4, \5>'

Each argument is a .so (cuobjdump is run on it) or a directory holding sass*.txt and res*.txt.
--rename OLD_REGEX=NEW renames kernels of the OLD build (Python re.sub on the key) before
matching; a kernel only in one build is listed. Exit status 1 if any kernel found in both
builds differs, else 0.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path


def _cuobjdump(path: Path, flag: str, pattern: str) -> str:
    if path.is_dir():
        return next(path.glob(pattern)).read_text()
    return subprocess.run(["cuobjdump", flag, str(path)], check=True, capture_output=True, text=True).stdout


def _demangle(names: list[str]) -> dict[str, str]:
    out = subprocess.run(["c++filt"], input="\n".join(names), check=True, capture_output=True, text=True).stdout
    return dict(zip(names, out.splitlines()))


def _key(demangled: str) -> str:
    """'void tinyvllm::(anonymous namespace)::k<float, 64>(Params)' -> 'k<float, 64>'."""
    name = demangled.removeprefix("void ")
    name = re.sub(r"\(anonymous namespace\)::", "", name)
    name = re.sub(r"^(\w+::)+", "", name)  # namespaces (a kernel may move between them)
    depth = 0
    for i, ch in enumerate(name):  # cut the parameter list: the first '(' outside <...>
        depth += ch == "<"
        depth -= ch == ">"
        if ch == "(" and depth == 0:
            return name[:i]
    return name


def sass_by_kernel(text: str) -> dict[str, list[str]]:
    kernels: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        m = re.match(r"\s*Function : (\S+)", line)
        if m:
            current = kernels.setdefault(m.group(1), [])
        elif current is not None and re.match(r"\s*/\*[0-9a-f]{4,}\*/", line):
            current.append(" ".join(line.split()))
        elif current is not None and re.match(r"\s*/\* 0x[0-9a-f]+ \*/", line):
            current.append(" ".join(line.split()))  # the second half of an instruction's encoding
    return kernels


def res_by_kernel(text: str) -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = {}
    lines = text.splitlines()
    for i, line in enumerate(lines):
        m = re.match(r"\s*Function (\S+):", line)
        if m and i + 1 < len(lines):
            out[m.group(1)] = dict(re.findall(r"(\w+(?:\[\d+\])?):(\d+)", lines[i + 1]))
    return out


def load(path: Path, renames: list[tuple[str, str]]) -> tuple[dict[str, list[str]], dict[str, dict[str, str]]]:
    sass = sass_by_kernel(_cuobjdump(path, "-sass", "sass*.txt"))
    res = res_by_kernel(_cuobjdump(path, "-res-usage", "res*.txt"))
    names = _demangle(sorted(set(sass) | set(res)))

    def keyed(d: dict) -> dict:
        out = {}
        for mangled, v in d.items():
            k = _key(names[mangled])
            for old, new in renames:
                k = re.sub(old, new, k)
            if k in out:
                sys.exit(f"two kernels of {path} have the key {k!r}: refine --rename")
            out[k] = v
        return out

    return keyed(sass), keyed(res)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("old", type=Path)
    ap.add_argument("new", type=Path)
    ap.add_argument("--rename", action="append", default=[], metavar="OLD_REGEX=NEW")
    args = ap.parse_args()
    renames = [tuple(r.split("=", 1)) for r in args.rename]
    old_sass, old_res = load(args.old, renames)
    new_sass, new_res = load(args.new, [])
    both = sorted(set(old_sass) & set(new_sass))
    bad = 0
    for k in both:
        judged = ("REG", "STACK", "SHARED", "LOCAL")
        ro, rn = old_res.get(k, {}), new_res.get(k, {})
        res_same = all(ro.get(f) == rn.get(f) for f in judged)
        if old_sass[k] != new_sass[k] or not res_same:
            bad += 1
            n_diff = sum(a != b for a, b in zip(old_sass[k], new_sass[k])) + abs(len(old_sass[k]) - len(new_sass[k]))
            ro, rn = ({f: r.get(f) for f in judged} for r in (ro, rn))
            print(f"DIFFERS  {k}: {n_diff} instruction lines differ; resources {ro} -> {rn}")
        elif ro.get("CONSTANT[0]") != rn.get("CONSTANT[0]"):
            print(f"same SASS, parameter bytes {ro.get('CONSTANT[0]')} -> {rn.get('CONSTANT[0]')}: {k}")
    for k in sorted(set(old_sass) - set(new_sass)):
        print(f"only in old: {k}")
    for k in sorted(set(new_sass) - set(old_sass)):
        print(f"only in new: {k}")
    print(f"{len(both)} kernels in both builds: {len(both) - bad} identical (SASS and registers/stack/shared/local), "
          f"{bad} differ; {len(set(old_sass) - set(new_sass))} only in old, {len(set(new_sass) - set(old_sass))} only in new")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
