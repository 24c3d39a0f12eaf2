"""Shared benchmark helpers: ceilings measured in the same run, timing, table / JSON / PNG output.

Rules these helpers enforce (docs/course/15-measuring-speed.md explains why):

* Time on the GPU with CUDA events, take the MEDIAN of many repetitions, after warm-up.
* Before every repetition, read a buffer larger than the L2 cache, so each
  repetition reads its inputs from HBM (as the model does: every layer's
  activations and weights are new to the cache). That flush also keeps the GPU
  busy while the CPU enqueues the timed call, so launch overhead is not timed.
* Report speed as a fraction of a ceiling measured IN THE SAME RUN on the same card:
  bandwidth from a >= 1 GiB device-to-device copy (bytes read + bytes written over
  time), matrix rate from a large bf16 torch.matmul.

Used by bench/bench_kernels.py and bench/bench_attention.py:

    from common import Bench, copy_bandwidth, matmul_tflops, write_json, print_table
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

GiB = 1 << 30


def device_info() -> dict:
    """The card and software the numbers came from (always store it next to them)."""
    props = torch.cuda.get_device_properties(0)
    return {
        "device": torch.cuda.get_device_name(0),
        "sm_count": props.multi_processor_count,
        "memory_GiB": round(props.total_memory / GiB, 1),
        "l2_MiB": round(getattr(props, "L2_cache_size", 0) / (1 << 20), 1),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


class _L2Flusher:
    """Reads a buffer several times the L2 size (H100: 50 MiB, H200: 60 MiB), evicting everything else."""

    def __init__(self) -> None:
        l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 << 20) or (50 << 20)
        self.buf = torch.randint(0, 255, (max(4 * l2, 256 << 20),), dtype=torch.uint8, device="cuda")
        self.sink = torch.empty((), dtype=torch.uint8, device="cuda")

    def __call__(self) -> None:
        # READ the buffer rather than write it: a write would leave L2 full of dirty
        # lines, and the timed kernel would then pay for writing them back to HBM
        # (~50 MB, ~12 us on an H200) on top of its own traffic.
        torch.amax(self.buf, dim=0, out=self.sink)
        # Then keep the GPU busy ~0.5 ms more, so that even a peer made of many small
        # torch ops is fully enqueued before its start event runs: the events then
        # time GPU work only, not the CPU's launch overhead.
        torch.cuda._sleep(1_000_000)


_flusher: _L2Flusher | None = None


def time_us(fn: Callable[[], object], *, warmup: int = 5, reps: int = 50, flush_l2: bool = True,
            max_seconds: float = 2.0) -> float:
    """Median GPU time of fn() in microseconds (CUDA events around each call, cold L2).

    reps shrinks for slow functions so one measurement stays under ~max_seconds."""
    global _flusher
    if flush_l2 and _flusher is None:
        _flusher = _L2Flusher()
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    # Rough per-call estimate to cap the number of repetitions.
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    est = time.perf_counter() - t0
    reps = max(5, min(reps, int(max_seconds / max(est, 1e-6))))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for i in range(reps):
        if flush_l2:
            _flusher()
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends)) * 1e3


def copy_bandwidth(nbytes: int = 2 * GiB, reps: int = 20) -> float:
    """Device-to-device copy bandwidth in GB/s (1e9 bytes/s): (read + written) / time.

    The practical ceiling of a memory-bound kernel on this card: a kernel that
    reads and writes each byte once can at best match a copy."""
    nbytes = max(nbytes, GiB)
    src = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    t = time_us(lambda: dst.copy_(src), warmup=3, reps=reps, flush_l2=False)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * nbytes / (t * 1e-6) / 1e9


def matmul_tflops(n: int = 8192, dtype: torch.dtype = torch.bfloat16, reps: int = 20) -> float:
    """Dense matrix rate of torch.matmul on an n x n x n problem, in TFLOP/s."""
    a = torch.randn(n, n, device="cuda", dtype=dtype)
    b = torch.randn(n, n, device="cuda", dtype=dtype)
    t = time_us(lambda: torch.matmul(a, b), warmup=3, reps=reps, flush_l2=False)
    del a, b
    torch.cuda.empty_cache()
    return 2 * n**3 / (t * 1e-6) / 1e12


def fixed_and_rate(points: list[tuple[float, float]]) -> tuple[float, float]:
    """Least-squares fit of time = fixed + rate * x to (x, time) points; returns (fixed, rate).

    A kernel's time over one dimension of its work (say, the context length at one batch) splits
    into what it pays once (the launch, every block's start and end, the last partial wave) and
    what it pays per unit once its data streams. Two kernels can tie at one length and differ in
    both parts; the split tells which part a change should go after (course, chapter 15)."""
    if len({x for x, _ in points}) < 2:
        raise ValueError(f"fixed_and_rate needs points at two or more different x, got {points}")
    rate, fixed = statistics.linear_regression([x for x, _ in points], [y for _, y in points])
    return fixed, rate


@dataclass
class Result:
    """One row of a benchmark: our op against a torch peer on the same inputs."""

    op: str
    shape: str
    dtype: str
    ours_us: float
    torch_us: float | None = None
    torch_peer: str = ""
    bytes: int = 0  # ideal traffic: every input byte read once, every output byte written once
    flops: int = 0
    correct: bool | None = None
    extra: dict = field(default_factory=dict)

    @property
    def speedup(self) -> float | None:
        return self.torch_us / self.ours_us if self.torch_us else None

    def gbps(self) -> float:
        return self.bytes / (self.ours_us * 1e-6) / 1e9 if self.bytes else 0.0

    def tflops(self) -> float:
        return self.flops / (self.ours_us * 1e-6) / 1e12 if self.flops else 0.0

    def to_dict(self, ceilings: dict) -> dict:
        d = asdict(self)
        d["speedup"] = self.speedup
        d["GBps"] = self.gbps()
        d["pct_copy_bw"] = 100 * self.gbps() / ceilings["copy_GBps"] if self.bytes else None
        d["torch_GBps"] = self.bytes / (self.torch_us * 1e-6) / 1e9 if self.bytes and self.torch_us else None
        if self.flops:
            d["TFLOPs"] = self.tflops()
            d["pct_matmul_peak"] = 100 * self.tflops() / ceilings["matmul_bf16_TFLOPs"]
        return d


def print_table(results: list[Result], ceilings: dict, file=sys.stdout) -> None:
    head = f"{'op':<26} {'shape':<30} {'ours us':>9} {'torch us':>9} {'speedup':>8} {'GB/s':>7} {'%copy':>6} {'TFLOP/s':>8} ok"
    print(head, file=file)
    print("-" * len(head), file=file)
    for r in results:
        sp = f"{r.speedup:.2f}x" if r.speedup else "-"
        tu = f"{r.torch_us:9.1f}" if r.torch_us else f"{'-':>9}"
        pct = f"{100 * r.gbps() / ceilings['copy_GBps']:5.1f}%" if r.bytes else f"{'-':>6}"
        tf = f"{r.tflops():8.1f}" if r.flops else f"{'-':>8}"
        ok = {True: "ok", False: "WRONG", None: ""}[r.correct]
        print(f"{r.op:<26} {r.shape:<30} {r.ours_us:9.1f} {tu} {sp:>8} {r.gbps():7.0f} {pct} {tf} {ok}", file=file)


def write_json(path: str, info: dict, ceilings: dict, results: list[Result], **extra) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    payload = {**info, "ceilings": ceilings, **extra, "results": [r.to_dict(ceilings) for r in results]}
    with open(path, "w") as f:
        json.dump(payload, f, indent=1)
    print(f"wrote {path}")


def try_plot(path: str, title: str, panels: list[tuple[str, list[str], dict[str, list[float]], str]]) -> None:
    """Bar charts, one panel per (title, x labels, {series: values}, y label). Skipped without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not importable: no chart")
        return
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(10, 0.45 * max(len(p[1]) for p in panels)), 4.5 * len(panels)))
    axes = [axes] if len(panels) == 1 else axes
    for ax, (ptitle, labels, series, ylabel) in zip(axes, panels):
        width = 0.8 / max(1, len(series))
        for i, (name, vals) in enumerate(series.items()):
            ax.bar([x + i * width for x in range(len(labels))], vals, width, label=name)
        ax.set_xticks([x + 0.4 - width / 2 for x in range(len(labels))])
        ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=7)
        ax.set_ylabel(ylabel)
        ax.set_title(ptitle)
        ax.legend(fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")
