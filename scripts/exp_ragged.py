"""EXP (temporary): ragged decode batches. Default plan vs forced partition sizes vs longest-first order."""
import json, math, os, random, statistics, sys
import torch
sys.path.insert(0, "bench")
import tinyvllm._C  # noqa
from common import _L2Flusher, copy_bandwidth, device_info
import tinyvllm.ops as tops

H, HK, BS, D = 32, 8, 16, 64
op = torch.ops.tinyvllm.paged_attention_decode
fl = _L2Flusher()


def run_interleaved(fns, reps):
    times = {k: [] for k in fns}
    for f in fns.values():
        f(); f()
    for _ in range(reps):
        for name, f in fns.items():
            fl()
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record(); f(); e.record()
            e.synchronize()
            times[name].append(s.elapsed_time(e) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def lengths(kind, B, rng):
    if kind == "u100-2048":
        return [rng.randint(100, 2048) for _ in range(B)]
    if kind == "u1024-4096":
        return [rng.randint(1024, 4096) for _ in range(B)]
    if kind == "half512-4096":
        return [512 if i % 2 else 4096 for i in range(B)]
    if kind == "one8192-rest1024":
        return [8192 if i == B // 2 else 1024 for i in range(B)]
    if kind == "u1-8192":
        return [rng.randint(1, 8192) for _ in range(B)]
    raise ValueError(kind)


def main():
    bw = copy_bandwidth()
    rng = random.Random(0)
    rows = []
    for B in (64, 128, 256):
        for kind in ("u100-2048", "u1024-4096", "half512-4096", "one8192-rest1024", "u1-8192"):
            lens_l = lengths(kind, B, rng)
            nbl = [math.ceil(L / BS) for L in lens_l]
            total = sum(nbl)
            maxb = max(nbl)
            perm = torch.randperm(total).tolist()
            tab = torch.zeros(B, maxb, dtype=torch.int32)
            o = 0
            for i, n in enumerate(nbl):
                tab[i, :n] = torch.tensor(perm[o:o + n], dtype=torch.int32)
                o += n
            kc = torch.randn(total, HK, BS, D, device="cuda", dtype=torch.bfloat16)
            vc = torch.randn_like(kc)
            q = torch.randn(B, H, D, device="cuda", dtype=torch.bfloat16)
            tables = tab.cuda()
            lens = torch.tensor(lens_l, dtype=torch.int32, device="cuda")
            order = sorted(range(B), key=lambda i: -lens_l[i])
            q_s, tables_s, lens_s = q[order].contiguous(), tables[order].contiguous(), lens[order].contiguous()
            S = sum(lens_l)
            scale = 1 / math.sqrt(D)
            out = torch.empty_like(q)
            out_s = torch.empty_like(q)

            def mk(part, sorted_=False, s_arg=S):
                def f():
                    os.environ["TVLLM_FORCE_PART"] = str(part)
                    if sorted_:
                        op(out_s, q_s, kc, vc, tables_s, lens_s, scale, -1, s_arg)
                    else:
                        op(out, q, kc, vc, tables, lens, scale, -1, s_arg)
                    os.environ["TVLLM_FORCE_PART"] = "0"
                return f

            fns = {"plan": mk(0), "plan longest-first": mk(0, True)}
            for part in (256, 512, 1024, 2048):
                if part < maxb * BS:
                    fns[f"part{part}"] = mk(part)
                    fns[f"part{part} longest-first"] = mk(part, True)
            fns["plan"]()
            ref = out.clone()
            for name, f in fns.items():
                f()
                got = out_s[torch.argsort(torch.tensor(order))] if "longest" in name else out
                assert torch.allclose(got.float(), ref.float(), atol=1e-2, rtol=1e-2), name
            plan = tops.decode_plan(q, HK, maxb * BS, sum_seq_lens=S) if hasattr(tops, "decode_plan") else None
            t = run_interleaved(fns, 30)
            nbytes = 2 * S * HK * D * 2 + 2 * B * H * D * 2
            row = {"batch": B, "lengths": kind, "sum": S, "max": max(lens_l), "plan": str(plan), "us": t,
                   "pct_copy_bw": {k: 100 * nbytes / (v * 1e-6) / 1e9 / bw for k, v in t.items()}}
            rows.append(row)
            print(f"B={B} {kind} (sum {S}, max {max(lens_l)}) plan={plan}\n   " +
                  "  ".join(f"{k} {v:.1f} ({row['pct_copy_bw'][k]:.0f}%)" for k, v in t.items()), flush=True)
            del kc, vc
            torch.cuda.empty_cache()
    json.dump({"device": device_info(), "copy_GBps": bw, "labels": {
        "plan": "the committed plan, with the true sum_seq_lens",
        "partN": "4-warp blocks with the context forced into N-token partitions and merged (temporary knob)",
        "longest-first": "the same batch with its sequences sorted longest first"}, "rows": rows},
        open(os.path.join(os.environ.get("OUT", "."), "exp14_ragged.json"), "w"), indent=1)


main()
