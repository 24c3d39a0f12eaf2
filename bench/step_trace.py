"""Where a decode step's time goes, read from a torch.profiler Chrome trace (bench/profile_step.py).

The trace holds, for each profiled ``engine.step()``, a CPU range ``decode_step_<i>`` (a
``record_function``), the CUDA runtime calls made inside it (``cudaGraphLaunch``,
``cudaLaunchKernel``, ``cudaMemcpyAsync``...) and the GPU activities they caused (kernels,
memcpys, memsets), each tied to its runtime call by a ``correlation`` id: every kernel of a
replayed CUDA graph carries the id of the ``cudaGraphLaunch`` that replayed it. So a GPU activity
belongs to the step whose range holds the runtime call that launched it, wherever on the GPU
timeline it ran.

Per step, on the GPU timeline:

    first ........ kernels (busy: the union of their intervals) ........ last
    span = last - first;   idle inside the step = span - busy
    gap between steps N and N+1 = first(N+1) - last(N): the GPU waits for the host
                                   (scheduling, input preparation, the sampled-token sync)
    period = first(N+1) - first(N) = span + gap (when the steps do not overlap)

A CPU-only trace (no GPU: the ``--tiny`` runs) has no device activities; the outermost CPU ops
(``aten::linear``, ``aten::softmax``...: ops no other op contains) stand in for kernels, on the
same arithmetic, so the code is exercised in CI. Everything here is plain lists of trace-event dicts: no torch, tested on synthetic events.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict

# Kernel kinds, first match wins (case-insensitive, on the kernel name). Our kernels' names come
# from csrc/; cuBLAS names gemms sm90_xmma_gemm_*, nvjet_*, cutlass*, gemv*, splitKreduce...;
# torch's sampling kernels carry softmax / ArgMax / exponential (distribution) in theirs.
KINDS: list[tuple[str, str]] = [
    ("memcpy", r"memcpy|memset"),
    ("skinny gemm (ours)", r"skinny"),
    ("gemm (cuBLAS)", r"gemm|gemv|cublas|cutlass|nvjet|xmma|splitk|dot_kernel|aten::(mm|addmm|bmm|matmul|linear|mv)$|_linear_pointwise"),
    ("merge", r"merge"),
    ("attention prefill", r"prefill"),
    ("attention decode", r"decode_(tensor|cuda)_cores|paged_attention|attention"),
    ("rms_norm", r"rms_?norm"),
    ("rope", r"rotary|rope"),
    ("cache write", r"reshape_and_cache|cache_kernel"),
    ("silu", r"silu|act_and_mul"),
    ("sampling", r"softmax|argmax|argmin|sampl|multinomial|exponential|distribution|topk|sort|cumsum"),
]
OTHER = "elementwise/other"
KIND_ORDER = [k for k, _ in KINDS] + [OTHER]
_COMPILED = [(k, re.compile(p, re.IGNORECASE)) for k, p in KINDS]

GPU_CATS = {"kernel", "gpu_memcpy", "gpu_memset"}
RUNTIME_CATS = {"cuda_runtime", "cuda_driver"}


def classify(name: str, cat: str = "") -> str:
    """The kind of one kernel (or CPU op) by its name; memcpy/memset activities by their category."""
    if cat in ("gpu_memcpy", "gpu_memset"):
        return "memcpy"
    for kind, pattern in _COMPILED:
        if pattern.search(name):
            return kind
    return OTHER


def load_trace(path: str) -> list[dict]:
    """The complete events ("ph": "X") of a Chrome trace written by torch.profiler."""
    with open(path) as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    return [e for e in events if e.get("ph") == "X"]


def step_windows(events: list[dict], prefix: str = "decode_step") -> list[tuple[float, float]]:
    """The (start, end) of each ``record_function`` range named ``prefix...``, in time order."""
    wins = [(e["ts"], e["ts"] + e["dur"]) for e in events
            if e.get("cat") == "user_annotation" and e.get("name", "").startswith(prefix)]
    return sorted(wins)


def cpu_top_ops(events: list[dict]) -> list[dict]:
    """CPU ops that no other op of their thread contains (``aten::linear``, not the ``aten::mm``
    inside it): they split the host's op time without counting any of it twice."""
    by_thread: dict[object, list[dict]] = defaultdict(list)
    for e in events:
        if e.get("cat") == "cpu_op":
            by_thread[(e.get("pid"), e.get("tid"))].append(e)
    tops = []
    for ops in by_thread.values():
        ops.sort(key=lambda e: (e["ts"], -e["dur"]))  # a parent before its children
        end = float("-inf")
        for e in ops:
            if e["ts"] >= end:  # starts after the last outermost op ended: outermost too
                tops.append(e)
                end = e["ts"] + e["dur"]
    return tops


def device_events(events: list[dict]) -> tuple[list[dict], str]:
    """The GPU activities of the trace ("gpu"), or its outermost CPU ops if it has none ("cpu_ops")."""
    gpu = [e for e in events if e.get("cat") in GPU_CATS]
    return (gpu, "gpu") if gpu else (cpu_top_ops(events), "cpu_ops")


def _window_of(t: float, windows: list[tuple[float, float]]) -> int | None:
    for i, (a, b) in enumerate(windows):
        if a <= t <= b:
            return i
    return None


def group_by_step(events: list[dict], windows: list[tuple[float, float]]) -> tuple[list[list[dict]], str, int]:
    """Device events per step window; the source ("gpu" or "cpu_ops"); how many events fell in no
    window. A GPU activity goes to the window holding its launching runtime call (same
    ``correlation``); a CPU op to the window holding its own start."""
    dev, source = device_events(events)
    launch_ts = {}
    if source == "gpu":
        for e in events:
            if e.get("cat") in RUNTIME_CATS and "correlation" in e.get("args", {}):
                launch_ts[e["args"]["correlation"]] = e["ts"]
    steps: list[list[dict]] = [[] for _ in windows]
    unassigned = 0
    for e in dev:
        t = launch_ts.get(e.get("args", {}).get("correlation")) if source == "gpu" else e["ts"]
        i = None if t is None else _window_of(t, windows)
        if i is None:
            unassigned += 1
        else:
            steps[i].append(e)
    return steps, source, unassigned


def busy_time(events: list[dict]) -> float:
    """Length of the union of the events' [ts, ts + dur] intervals (overlaps counted once)."""
    total, end = 0.0, float("-inf")
    for e in sorted(events, key=lambda e: e["ts"]):
        a, b = e["ts"], e["ts"] + e["dur"]
        if a > end:
            total += b - a
            end = b
        elif b > end:
            total += b - end
            end = b
    return total


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def anatomy(steps: list[list[dict]], windows: list[tuple[float, float]] | None = None) -> dict:
    """Per kind: time (us) and count per step; the busy time, the idle time inside a step and the
    gap between steps (module docstring), as means over the steps (gaps: over consecutive pairs)."""
    steps = [s for s in steps if s]
    n = len(steps)
    if n == 0:
        return {"steps": 0}
    kinds: dict[str, dict[str, float]] = {}
    names: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for s in steps:
        for e in s:
            k = kinds.setdefault(classify(e.get("name", ""), e.get("cat", "")), {"us_per_step": 0.0, "count_per_step": 0.0})
            k["us_per_step"] += e["dur"] / n
            k["count_per_step"] += 1 / n
            names[e.get("name", "")][0] += e["dur"] / n
            names[e.get("name", "")][1] += 1 / n
    first = [min(e["ts"] for e in s) for s in steps]
    last = [max(e["ts"] + e["dur"] for e in s) for s in steps]
    busy = [busy_time(s) for s in steps]
    span = [b - a for a, b in zip(first, last)]
    gaps = [first[i + 1] - last[i] for i in range(n - 1)]
    periods = [first[i + 1] - first[i] for i in range(n - 1)]
    out = {
        "steps": n,
        "kinds": {k: kinds[k] for k in KIND_ORDER if k in kinds},
        "events_per_step": sum(len(s) for s in steps) / n,
        "busy_us": _mean(busy),
        "span_us": _mean(span),
        "idle_inside_us": _mean([s - b for s, b in zip(span, busy)]),
        "gap_between_us": _mean([max(0.0, g) for g in gaps]),  # a negative gap: steps overlap (no idle)
        "gap_between_min_max_us": [min(gaps), max(gaps)] if gaps else None,
        "period_us": _mean(periods),
        "top": sorted(([name[:100], round(t, 2), round(c, 2)] for name, (t, c) in names.items()),
                      key=lambda r: -r[1])[:12],
    }
    if out["period_us"]:
        out["gap_fraction_of_period"] = out["gap_between_us"] / out["period_us"]
        out["idle_fraction_of_period"] = (out["gap_between_us"] + out["idle_inside_us"]) / out["period_us"]
    if windows:
        out["host_step_us"] = _mean([b - a for a, b in windows])
    return out


def markdown_table(anatomies: dict[str, dict], source: str = "gpu") -> str:
    """One markdown table: a row per kind and per gap, a column pair (us/step, count/step) per batch."""
    cols = list(anatomies)
    unit = "kernels" if source == "gpu" else "outermost CPU ops, no GPU"
    lines = ["| kind | " + " | ".join(f"B={c} us/step | n/step" for c in cols) + " |",
             "|---|" + "---:|---:|" * len(cols)]
    present = [k for k in KIND_ORDER if any(k in a.get("kinds", {}) for a in anatomies.values())]
    for k in present:
        cells = []
        for c in cols:
            v = anatomies[c].get("kinds", {}).get(k)
            cells += [f"{v['us_per_step']:.1f}", f"{v['count_per_step']:.1f}"] if v else ["-", "-"]
        lines.append(f"| {k} | " + " | ".join(cells) + " |")

    def row(label: str, key: str, fmt: str = "{:.1f}", count_key: str | None = None) -> None:
        cells = []
        for c in cols:
            v = anatomies[c].get(key)
            n = anatomies[c].get(count_key) if count_key else None
            cells += [fmt.format(v) if v is not None else "-", f"{n:.1f}" if n is not None else ""]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")

    row(f"**busy** ({unit}, union)", "busy_us", count_key="events_per_step")
    row("idle inside the step", "idle_inside_us")
    row("**gap between steps** (host)", "gap_between_us")
    row("step period (first to first)", "period_us")
    row("gap / period", "gap_fraction_of_period", "{:.1%}")
    row("all idle / period", "idle_fraction_of_period", "{:.1%}")
    row("engine.step() on the host (profiled)", "host_step_us")
    row("step period, unprofiled (host clock)", "unprofiled_period_us")
    return "\n".join(lines)
