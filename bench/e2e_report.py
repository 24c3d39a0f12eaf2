"""The end-to-end benchmark's output (bench/bench_e2e.py): the printed tables and the chart.

Both read only the result dict that bench_e2e.py writes as JSON, so they can be re-run on a
saved ``e2e.json``:

    python -c "import sys, json; sys.path.insert(0, 'bench'); import e2e_report as r; \
               d = json.load(open('e2e.json')); r.print_tables(d); r.plot(d, 'e2e.png')"
"""

from __future__ import annotations

import os
import traceback

ENGINE_NAMES = {"tinyvllm": "tinyvllm", "tinyvllm_eager": "tinyvllm eager", "torch_compile": "torch.compile",
                "transformers": "transformers"}


def print_tables(result: dict) -> None:
    c = result["ceilings"]
    print(f"\ncard {result['card']}  copy {c['copy_GBps']:.4g} GB/s  matmul {c['matmul_TFLOPs']:.4g} TFLOP/s  "
          f"weights {result['model']['weight_bytes'] / 1e9:.3f} GB")
    lat = result.get("latency")
    if lat:
        sp, batches = lat["spec"], [str(b) for b in lat["spec"]["batches"]]
        print(f"\nlatency: decode ms per step (x floor), batch B of {sp['prompt_len']}-token prompts, "
              f"{sp['decode_tokens']} tokens; TTFT of a {sp['ttft_prompt_len']}-token prompt")
        print(f"{'engine':<16}" + "".join(f"{'B=' + b:>17}" for b in batches) + f"{'TTFT long ms':>14}")
        print(f"{'floor':<16}" + "".join(f"{lat['floors'][b]['floor_ms']:>17.3f}" for b in batches)
              + f"{lat['ttft_long_bound_ms']:>14.2f}")
        for key, r in lat["engines"].items():
            cells = []
            for b in batches:
                x = r.get("batches", {}).get(b, {})
                cells.append(f"{x['decode_step_ms']:9.3f} ({x['x_floor']:4.2f}x)" if "x_floor" in x
                             else ("error" if "error" in x else "-"))
            ttft = f"{r['ttft_long_ms']:>14.2f}" if "ttft_long_ms" in r else f"{'-':>14}"
            print(f"{ENGINE_NAMES.get(key, key):<16}" + "".join(f"{s:>17}" for s in cells) + ttft)
    rows = [(w, k, r) for w in ("nano", "random") if w in result for k, r in result[w]["engines"].items()]
    if rows:
        print(f"\n{'workload':<9}{'engine':<15}{'requests':>9}{'out tok':>9}{'seconds':>9}{'out tok/s':>11}"
              f"{'ideal tok/s':>12}{'% ideal':>9}{'% own sched':>12}")
        for w, k, r in rows:
            if "seconds" not in r:
                print(f"{w:<9}{ENGINE_NAMES.get(k, k):<15} {r.get('skipped') or r.get('error', '')}")
                continue
            ideal = result[w]["ideal_bound"]
            own = f"{100 * r['fraction_of_bound']:11.1f}%" if "fraction_of_bound" in r else f"{'-':>12}"
            print(f"{w:<9}{ENGINE_NAMES.get(k, k):<15}{r['requests']:>9}{r['output_tokens']:>9}{r['seconds']:>9.2f}"
                  f"{r['output_tok_s']:>11.0f}{ideal['output_tok_s']:>12.0f}{100 * r['fraction_of_ideal']:>8.1f}%{own}")
        for w, k, r in rows:  # where a run's time went: its prefill steps and its decode steps, each against its bound
            if "step_seconds" in r and "bound" in r:
                t, b = r["step_seconds"], r["bound"]
                print(f"  {w} {ENGINE_NAMES.get(k, k)}: steps with prompt tokens {t['prefill_s']:.2f} s (bound "
                      f"{b['prefill_s']:.2f} s, {b['prefill_steps']} steps), decode steps {t['decode_s']:.2f} s "
                      f"(bound {b['decode_s']:.2f} s, {b['decode_steps']} steps)")
    if result.get("errors"):
        print(f"\nfailed parts: {', '.join(result['errors'])} (tracebacks in the JSON)")


def plot(result: dict, path: str) -> None:
    """Decode step time against batch (tinyvllm graphs, eager, torch.compile, the floor), and the
    same as a multiple of the floor. Skipped (with a line) without matplotlib."""
    lat = result.get("latency")
    if not lat:
        return
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not importable: no chart")
        return
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    bs = [int(b) for b in lat["floors"]]
    ax.plot(bs, [lat["floors"][str(b)]["floor_ms"] for b in bs], "k--", label="floor (weights + KV at copy BW)")
    for key, style in (("tinyvllm", "o-"), ("tinyvllm_eager", "s-"), ("torch_compile", "^-"), ("transformers", "x")):
        r = lat["engines"].get(key, {}).get("batches", {})
        pts = [(int(b), v["decode_step_ms"], v["x_floor"]) for b, v in r.items() if "x_floor" in v]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=ENGINE_NAMES[key])
            ax2.plot([p[0] for p in pts], [p[2] for p in pts], style, label=ENGINE_NAMES[key])
    for a, ylabel in ((ax, "decode ms per step"), (ax2, "x floor")):
        a.set_xscale("log", base=2)
        a.set_xticks(bs, [str(b) for b in bs])
        a.set_xlabel("batch")
        a.set_ylabel(ylabel)
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    ax.set_yscale("log")
    ax2.axhline(1.0, color="k", ls="--", lw=1)
    fig.suptitle(f"decode step, {result['model']['shape']} model, {result['card']} "
                 f"(copy {result['ceilings']['copy_GBps']:.0f} GB/s)")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")


def print_tables_safe(result: dict) -> None:
    """The tables, or the reason they could not be printed (the JSON is already written)."""
    try:
        print_tables(result)
    except Exception:  # noqa: BLE001
        traceback.print_exc()
