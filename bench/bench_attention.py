"""Benchmark the attention kernels against torch SDPA on the same data.

    python bench/bench_attention.py            # full sweep (~1-2 min on an H100)
    python bench/bench_attention.py --quick    # smoke run
    python bench/bench_attention.py --out bench/results/attention.json

Decode (paged_attention_decode), Llama 3.2 1B shapes (32 q heads, 8 kv heads, head_dim 64,
block 16, bf16), batch 1/8/64/256 x context 128/512/1024/4096. Reported: time, GB/s of the
ideal traffic (every k/v byte of the context read once, plus q and out) and its percent of the
copy bandwidth measured in this run. Peer: torch SDPA (enable_gqa, else repeated kv) on the
same k/v laid out contiguously [B, kv_heads, L, D] (it does not pay for the block table).
Our op is given the sum of the lengths (sum_seq_lens), as the engine gives it.
Targets: >= 80% of copy bandwidth once batch * context >= 64k tokens; faster than SDPA at batch >= 8.

Read floors (from 64k tokens on; --no-read-floor skips them): the time of a kernel that only READS
the same k/v (dev/cuda/read_floor.cu, built on first use by bench/read_floor.py), in the fastest
of a few shapes (READ_FLOOR_CONFIGS),
over the paged cache through its block tables (the floor under our kernel) and over SDPA's
contiguous copy (the floor under SDPA). The table after the main one shows each kernel's time over
its floor, and SDPA's time over the paged floor: above 1, a kernel reading our pages could still
beat SDPA.

Prefill (prefill_attention), batch 1, 512..8192 tokens, causal, 32 q / 8 kv heads, head_dim 64
and 128. TFLOP/s counts the causal half: 2 * n^2 * head_dim * num_heads. Peer: SDPA's flash
backend, is_causal=True, on contiguous q/k/v (kv repeated to 32 heads outside the timing).
Target: >= 0.7x SDPA flash.

Ragged decode (--ragged): batches of 8 to 256 sequences of unequal lengths (RAGGED), run as the
engine runs them: with sum_seq_lens, and longest first from two blocks per SM on. Beside it the
same batch in arrival order without the sum (the JSON's given_order_no_sum_us), and the peer: SDPA
on a contiguous cache padded to the longest length with a key-padding mask.

Every repetition starts with a cold L2 (common.time_us first reads a buffer several times the
size of the L2), so the numbers are HBM numbers. Inputs are random, never zeros.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (Result, copy_bandwidth, device_info, fixed_and_rate, matmul_tflops, print_table,  # noqa: E402
                    time_us, try_plot, write_json)
from read_floor import read_pages  # noqa: E402

NUM_HEADS, NUM_KV_HEADS, BLOCK = 32, 8, 16


def paged_from_contiguous(k: torch.Tensor, v: torch.Tensor, block_size: int, gen: torch.Generator,
                          shuffle: bool = True):
    """k, v [B, Hk, L, D] -> paged caches [num_blocks, Hk, bs, D] and block tables [B, nb].

    shuffle: blocks in random order (a long-running server's fragmented cache); else in order."""
    b, hk, length, d = k.shape
    nb = math.ceil(length / block_size)
    pad = nb * block_size - length
    perm = torch.randperm(b * nb, generator=gen, device="cpu") if shuffle else torch.arange(b * nb)
    perm = perm.to(k.device)
    tables = perm.view(b, nb).to(torch.int32)
    caches = []
    for x in (k, v):
        xp = torch.nn.functional.pad(x, (0, 0, 0, pad))  # [B, Hk, nb*bs, D]
        blocks = xp.view(b, hk, nb, block_size, d).permute(0, 2, 1, 3, 4).reshape(b * nb, hk, block_size, d)
        cache = torch.empty(blocks.shape, dtype=blocks.dtype, device=blocks.device)  # contiguous, like the engine's
        cache[perm] = blocks
        caches.append(cache)
    return caches[0], caches[1], tables


def sdpa_gqa(q, k, v, is_causal=False):
    try:
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=is_causal, enable_gqa=True)
    except (TypeError, RuntimeError):
        g = q.shape[1] // k.shape[1]
        return torch.nn.functional.scaled_dot_product_attention(
            q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1), is_causal=is_causal
        )


# The shapes of the read-only kernel (dev/cuda/read_floor.cu) tried for each floor:
# (threads, 16-byte loads of k and of v in flight per thread, blocks per SM; 0 = as many as fit).
# A floor is only as low as the best reader that found it, so the fastest one counts.
READ_FLOOR_CONFIGS = [(t, u, r) for t in (128, 256) for u in (2, 4, 8) for r in (0, 4)]


def read_floor(pool_k: torch.Tensor, pool_v: torch.Tensor, table: torch.Tensor, page_mult: int,
               stream_stride: int, streams: int) -> tuple[float, str, dict, torch.Tensor]:
    """The fastest time (us) in which a kernel that only reads can read these pages.

    pool_k / pool_v [num_pages, ...]: the pages; stream s of table row r reads pages
    table[r][j] * page_mult + s * stream_stride of both (dev/cuda/read_floor.cu).
    Returns (best us, best config, {config: us}, the checksums [rows, streams])."""
    op = read_pages
    checksum = torch.empty(table.shape[0], streams, dtype=torch.int32, device=table.device)
    times = {}
    for threads, unroll, per_sm in READ_FLOOR_CONFIGS:
        fit = op(checksum, pool_k, pool_v, table, page_mult, stream_stride, threads, unroll, per_sm)
        times[f"{threads} threads, {unroll} in flight, {fit} blocks/SM"] = time_us(
            lambda: op(checksum, pool_k, pool_v, table, page_mult, stream_stride, threads, unroll, per_sm))
    best = min(times, key=times.get)
    return times[best], best, times, checksum


def decode_read_floors(k: torch.Tensor, v: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor,
                       tables: torch.Tensor) -> dict:
    """The read floor of the paged cache (our kernel's layout, through its block tables) and
    of the contiguous copy SDPA reads, cut into the same pages (one block of one kv head).

    Both read the same k/v bytes, so their checksums must agree (a check on the floor kernel).
    The read kernel runs one block per (sequence, kv head) and never splits a context, so it is a
    floor only where those blocks fill the GPU: the sweep times it from 64k tokens on."""
    b, hk, length, d = k.shape
    bs = kc.shape[2]
    nb = length // bs
    paged = read_floor(kc.view(kc.shape[0] * hk, -1), vc.view(vc.shape[0] * hk, -1), tables[:, :nb].contiguous(),
                       hk, 1, hk)
    rows = torch.arange(nb, device=k.device, dtype=torch.int32) + (hk * nb) * torch.arange(
        b, device=k.device, dtype=torch.int32).unsqueeze(1)
    contiguous = read_floor(k.reshape(b * hk * nb, -1), v.reshape(b * hk * nb, -1), rows, 1, nb, hk)
    return {
        "read_floor_paged_us": paged[0], "read_floor_paged_best": paged[1],
        "read_floor_contiguous_us": contiguous[0], "read_floor_contiguous_best": contiguous[1],
        "read_floor_paged_all": paged[2], "read_floor_contiguous_all": contiguous[2],
        "read_floor_checksums_agree": bool(torch.equal(paged[3], contiguous[3])),
    }


def bench_decode(batch: int, ctx: int, dtype=torch.bfloat16, d: int = 64, shuffle: bool = True,
                 block_size: int = BLOCK, impl: int = -1, floors: bool = False) -> Result:
    """One decode shape: our op against SDPA; floors: also the read floors (decode_read_floors)."""
    gen = torch.Generator(device="cpu").manual_seed(batch * 100003 + ctx)
    q = torch.randn(batch, NUM_HEADS, d, device="cuda", dtype=dtype)
    k = torch.randn(batch, NUM_KV_HEADS, ctx, d, device="cuda", dtype=dtype)
    v = torch.randn(batch, NUM_KV_HEADS, ctx, d, device="cuda", dtype=dtype)
    kc, vc, tables = paged_from_contiguous(k, v, block_size, gen, shuffle=shuffle)
    lens = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
    scale = 1.0 / math.sqrt(d)
    out = torch.empty_like(q)
    op = torch.ops.tinyvllm.paged_attention_decode

    def ours():  # sum_seq_lens: the host's sum of the lengths, as the engine passes it
        op(out, q, kc, vc, tables, lens, scale, impl, batch * ctx)

    q4 = q.unsqueeze(2)  # [B, H, 1, D]

    def peer():
        return sdpa_gqa(q4, k, v)

    ours()
    ref = peer().squeeze(2)
    correct = bool(torch.allclose(out.float(), ref.float(), atol=2e-2, rtol=2e-2))
    t_ours = time_us(ours)
    t_peer = time_us(peer)
    esize = q.element_size()
    nbytes = 2 * batch * ctx * NUM_KV_HEADS * d * esize + 2 * batch * NUM_HEADS * d * esize
    extra = {"batch": batch, "context": ctx, "tokens": batch * ctx}
    if floors and ctx % block_size == 0:
        extra.update(decode_read_floors(k, v, kc, vc, tables))
        correct = correct and extra["read_floor_checksums_agree"]
    del k, v, kc, vc
    tag = ("" if shuffle else " ordered") + ("" if block_size == BLOCK else f" bs{block_size}")
    tag += {-1: "", 1: " tensor-cores shared-kv-head", 3: " tensor-cores head-per-warp"}[impl]
    return Result("paged_attention_decode", f"B={batch} L={ctx} {NUM_HEADS}/{NUM_KV_HEADS}x{d}{tag}", str(dtype)[6:],
                  t_ours, t_peer, "sdpa(enable_gqa)", bytes=nbytes, correct=correct, extra=extra)


RAGGED = {  # name -> lengths of a batch of b (random.Random(b)), Llama-1B heads
    "uniform 100-2048": lambda b, r: [r.randint(100, 2048) for _ in range(b)],
    "one 8192 among 1024s": lambda b, r: [8192 if i == b // 2 else 1024 for i in range(b)],
    "uniform 1-8192": lambda b, r: [r.randint(1, 8192) for _ in range(b)],
}


def bench_decode_ragged(batch: int, kind: str, d: int = 64, dtype=torch.bfloat16) -> Result:
    """A batch of unequal lengths, as the engine runs it: with sum_seq_lens, and longest first
    from two blocks per SM on (ModelRunner.decode_longest_first_min_seqs; smaller batches keep
    their order).

    extra["given_order_no_sum_us"]: the same batch in arrival order without the sum (what the
    op did before the ragged rule and the scheduler's order). The peer: SDPA on a contiguous
    cache padded to the longest length, with a key-padding mask (what a non-paged engine does)."""
    lens_l = RAGGED[kind](batch, random.Random(batch))
    L = max(lens_l)
    gen = torch.Generator(device="cpu").manual_seed(batch)
    q = torch.randn(batch, NUM_HEADS, d, device="cuda", dtype=dtype)
    k = torch.randn(batch, NUM_KV_HEADS, L, d, device="cuda", dtype=dtype)
    v = torch.randn(batch, NUM_KV_HEADS, L, d, device="cuda", dtype=dtype)
    kc, vc, tables = paged_from_contiguous(k, v, BLOCK, gen)  # padding blocks are stored, never read
    lens = torch.tensor(lens_l, dtype=torch.int32, device="cuda")
    from tinyvllm.engine.model_runner import decode_longest_first_min_seqs

    sms = torch.cuda.get_device_properties(0).multi_processor_count
    longest_first = batch >= decode_longest_first_min_seqs(NUM_KV_HEADS, sms)  # as the engine orders it
    idx = sorted(range(batch), key=lambda i: -lens_l[i]) if longest_first else list(range(batch))  # stable
    order = torch.tensor(idx, device="cuda")
    q_s, tables_s, lens_s = q[order].contiguous(), tables[order].contiguous(), lens[order].contiguous()
    scale, total = 1.0 / math.sqrt(d), sum(lens_l)
    out, out_s = torch.empty_like(q), torch.empty_like(q)
    op = torch.ops.tinyvllm.paged_attention_decode

    def ours():
        op(out_s, q_s, kc, vc, tables_s, lens_s, scale, -1, total)

    def before():
        op(out, q, kc, vc, tables, lens, scale, -1, -1)

    mask = (torch.arange(L, device="cuda")[None, :] < lens[:, None])[:, None, None, :]  # [B, 1, 1, L]
    q4 = q.unsqueeze(2)
    kr, vr = k.repeat_interleave(NUM_HEADS // NUM_KV_HEADS, 1), v.repeat_interleave(NUM_HEADS // NUM_KV_HEADS, 1)

    def peer():
        return torch.nn.functional.scaled_dot_product_attention(q4, kr, vr, attn_mask=mask)

    ours()
    before()
    ref = peer().squeeze(2)
    got = torch.empty_like(out_s)
    got[order] = out_s
    correct = all(bool(torch.allclose(x.float(), ref.float(), atol=2e-2, rtol=2e-2)) for x in (got, out))
    t_ours, t_before, t_peer = time_us(ours), time_us(before), time_us(peer)
    esize = q.element_size()
    nbytes = 2 * total * NUM_KV_HEADS * d * esize + 2 * batch * NUM_HEADS * d * esize
    del k, v, kr, vr, kc, vc
    return Result("paged_attention_decode", f"B={batch} {kind} {NUM_HEADS}/{NUM_KV_HEADS}x{d} ragged", str(dtype)[6:],
                  t_ours, t_peer, "sdpa padded + mask", bytes=nbytes, correct=correct,
                  extra={"batch": batch, "context": L, "tokens": total, "ragged": kind, "longest_first": longest_first,
                         "given_order_no_sum_us": t_before})


def bench_prefill(n: int, d: int, dtype=torch.bfloat16, impl: int = -1) -> Result:
    gen = torch.Generator(device="cpu").manual_seed(n + d)
    q = torch.randn(n, NUM_HEADS, d, device="cuda", dtype=dtype)
    k = torch.randn(1, NUM_KV_HEADS, n, d, device="cuda", dtype=dtype)
    v = torch.randn(1, NUM_KV_HEADS, n, d, device="cuda", dtype=dtype)
    kc, vc, tables = paged_from_contiguous(k, v, BLOCK, gen)
    cu = torch.tensor([0, n], dtype=torch.int32, device="cuda")
    lens = torch.tensor([n], dtype=torch.int32, device="cuda")
    scale = 1.0 / math.sqrt(d)
    out = torch.empty_like(q)
    op = torch.ops.tinyvllm.prefill_attention

    def ours():
        op(out, q, kc, vc, tables, cu, lens, n, scale, impl)

    g = NUM_HEADS // NUM_KV_HEADS
    qs = q.transpose(0, 1).unsqueeze(0).contiguous()  # [1, H, n, D]
    ks = k.repeat_interleave(g, 1).contiguous()
    vs = v.repeat_interleave(g, 1).contiguous()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def peer():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=True)

    ours()
    ref = peer()[0].transpose(0, 1)
    correct = bool(torch.allclose(out.float(), ref.float(), atol=3e-2, rtol=3e-2))
    t_ours = time_us(ours, reps=30)
    t_peer = time_us(peer, reps=30)
    flops = 2 * n * n * d * NUM_HEADS  # causal half of 4 n^2 d per head
    tag = {-1: "", 1: " 16-rows-per-warp", 2: " 32-rows-per-warp"}[impl]
    return Result("prefill_attention", f"n={n} {NUM_HEADS}/{NUM_KV_HEADS}x{d}{tag}", str(dtype)[6:], t_ours, t_peer,
                  "sdpa flash causal", flops=flops, correct=correct, extra={"tokens": n, "head_dim": d})


def print_read_floors(rows: list[Result]) -> None:
    """Each decode shape beside the floors under it: the fastest read of the same pages."""
    if not rows:
        return
    print("\nread floors: a kernel that only reads the same k/v (us); x = time / floor, 1.00 = at the floor")
    head = (f"{'shape':<30} {'ours':>8} {'paged floor':>12} {'ours x':>7} {'sdpa':>8} {'contig floor':>13} "
            f"{'sdpa x':>7} {'sdpa / paged floor':>19}")
    print(head)
    print("-" * len(head))
    for r in rows:
        fp, fc = r.extra["read_floor_paged_us"], r.extra["read_floor_contiguous_us"]
        print(f"{r.shape:<30} {r.ours_us:8.1f} {fp:12.1f} {r.ours_us / fp:7.3f} {r.torch_us:8.1f} {fc:13.1f} "
              f"{r.torch_us / fc:7.3f} {r.torch_us / fp:19.3f}")


RATE_TOKENS = 512  # the fit's unit of work: 512 tokens of every sequence


def decode_fixed_and_rate(rows: list[Result]) -> dict:
    """Per batch: each kernel's decode time fitted to fixed + rate x (context / 512), over the
    contexts of at least 64k tokens in all (where the read floors are timed, and the data streams).

    {batch: {"ours" | "sdpa" | "paged floor" | "contiguous floor": (fixed us, us per 512 tokens)}},
    only for batches with two or more such contexts."""
    columns = {"ours": lambda r: r.ours_us, "sdpa": lambda r: r.torch_us,
               "paged floor": lambda r: r.extra.get("read_floor_paged_us"),
               "contiguous floor": lambda r: r.extra.get("read_floor_contiguous_us")}
    out = {}
    for b in sorted({r.extra["batch"] for r in rows}):
        mine = [r for r in rows if r.extra["batch"] == b]
        if len({r.extra["context"] for r in mine}) < 2:
            continue
        fits = {}
        for name, get in columns.items():
            pts = [(r.extra["context"] / RATE_TOKENS, get(r)) for r in mine if get(r) is not None]
            if len({x for x, _ in pts}) >= 2:
                fits[name] = fixed_and_rate(pts)
        out[b] = fits
    return out


def print_fixed_and_rate(fits: dict) -> None:
    """The table of decode_fixed_and_rate: one row per batch, "fixed + rate" per kernel."""
    if not fits:
        return
    print(f"\nfixed cost + rate: time = fixed + rate x (context / {RATE_TOKENS}), fitted per batch over contexts "
          "of >= 64k tokens in all (us; course, chapter 15)")
    names = ["ours", "sdpa", "paged floor", "contiguous floor"]
    head = f"{'batch':>6} " + " ".join(f"{n:>20}" for n in names)
    print(head)
    print("-" * len(head))
    for b, f in fits.items():
        print(f"{b:>6} " + " ".join(f"{f[n][0]:9.1f} + {f[n][1]:8.2f}" if n in f else f"{'-':>20}" for n in names))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a few shapes only (smoke run)")
    ap.add_argument("--out", default="bench/results/attention.json")
    ap.add_argument("--decode-only", action="store_true", help="skip prefill")
    ap.add_argument("--prefill-only", action="store_true", help="skip decode")
    ap.add_argument("--batches", type=int, nargs="*", help="decode batch sizes (default 1 8 64 256)")
    ap.add_argument("--impl", type=int, default=-1, choices=[-1, 1, 3],
                    help="decode kernel (bf16): -1 automatic (the product's plan), 1 tensor cores with the block's "
                         "warps sharing a kv head, 3 tensor cores with one kv head per warp. The CUDA-core and TMA "
                         "versions: dev/cuda/paged_attention_decode.cu")
    ap.add_argument("--prefill-impl", type=int, default=-1, choices=[-1, 1, 2],
                    help="prefill kernel: -1 automatic, 1 = 16 query rows per warp, 2 = 32 rows per warp")
    ap.add_argument("--block-sizes", type=int, nargs="*", default=[],
                    help="also time decode with these cache block sizes (the sweep uses 16)")
    ap.add_argument("--ragged", action="store_true",
                    help="also time decode batches of unequal lengths (8 to 256 sequences; see RAGGED)")
    ap.add_argument("--ragged-only", action="store_true", help="only the ragged decode batches")
    ap.add_argument("--no-read-floor", action="store_true",
                    help="skip the read floors (a kernel that only reads the same pages: paged and contiguous)")
    ap.add_argument("--ordered-blocks", action="store_true",
                    help="also time decode with each sequence's blocks in order (what random placement costs)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_attention: needs a CUDA GPU")
    from tinyvllm.ops._kernels import extension_loaded

    assert extension_loaded(), "tinyvllm._C is not built"  # registers torch.ops.tinyvllm

    info = device_info()
    print(f"{info['device']}  ({info['sm_count']} SMs)  torch {info['torch']}")
    ceilings = {"copy_GBps": copy_bandwidth(), "matmul_bf16_TFLOPs": matmul_tflops()}
    print(f"copy bandwidth {ceilings['copy_GBps']:.0f} GB/s, bf16 matmul {ceilings['matmul_bf16_TFLOPs']:.0f} TFLOP/s")

    args.ragged = args.ragged or args.ragged_only
    batches = [] if args.prefill_only or args.ragged_only else args.batches or ([1, 64] if args.quick else [1, 8, 64, 256])
    contexts = [512, 4096] if args.quick else [128, 512, 1024, 4096]
    prefill_ns = [] if args.decode_only or args.ragged_only else [1024, 4096] if args.quick else [512, 1024, 2048, 4096, 8192]
    prefill_ds = [64] if args.quick else [64, 128]

    results: list[Result] = []
    for b in batches:
        for L in contexts:
            floors = not args.no_read_floor and b * L >= 65536  # (see decode_read_floors)
            results.append(bench_decode(b, L, impl=args.impl, floors=floors))
            torch.cuda.empty_cache()
            if args.ordered_blocks and b * L >= 65536:
                results.append(bench_decode(b, L, shuffle=False, floors=floors))
                torch.cuda.empty_cache()
            for bs in args.block_sizes:
                if b * L >= 65536:
                    results.append(bench_decode(b, L, block_size=bs))
                    torch.cuda.empty_cache()
    for b in [8, 16, 32, 64, 128, 256] if args.ragged else []:
        for kind in RAGGED:
            results.append(bench_decode_ragged(b, kind))
            torch.cuda.empty_cache()
    for d in prefill_ds:
        for n in prefill_ns:
            results.append(bench_prefill(n, d, impl=args.prefill_impl))
            torch.cuda.empty_cache()

    print()
    print_table(results, ceilings)
    print_read_floors([r for r in results if "read_floor_paged_us" in r.extra])
    # The summary and the chart use the standard sweep (shuffled blocks of 16 tokens) only.
    dec = [r for r in results if r.op == "paged_attention_decode" and "ordered" not in r.shape and " bs" not in r.shape
           and "ragged" not in r.extra]
    ragged = [r for r in results if "ragged" in r.extra]
    big = [r for r in dec if r.extra["tokens"] >= 65536]
    pre = [r for r in results if r.op == "prefill_attention"]
    summary = {
        "decode_min_pct_copy_bw_at_64k_tokens": min((100 * r.gbps() / ceilings["copy_GBps"] for r in big), default=None),
        "decode_min_speedup_vs_sdpa_batch_ge_8": min((r.speedup for r in dec if r.extra["batch"] >= 8), default=None),
        "prefill_min_ratio_vs_sdpa_flash": min((r.speedup for r in pre), default=None),
        "all_correct": all(r.correct for r in results),
    }
    floored = [r for r in big if "read_floor_paged_us" in r.extra]
    if floored:
        # SDPA's time over the fastest pure read of the paged cache: above 1, a kernel that
        # reads our pages could still beat SDPA; below 1, not even a plain read of them does.
        # And how far above that floor our kernel is (1.00 = at the floor).
        summary["decode_min_sdpa_over_paged_read_floor_at_64k_tokens"] = min(
            r.torch_us / r.extra["read_floor_paged_us"] for r in floored)
        summary["decode_max_ours_over_paged_read_floor_at_64k_tokens"] = max(
            r.ours_us / r.extra["read_floor_paged_us"] for r in floored)
    fits = decode_fixed_and_rate(big)
    print_fixed_and_rate(fits)
    if fits:
        summary["decode_fixed_us_and_us_per_512_tokens"] = {
            str(b): {n: [round(v, 2) for v in fr] for n, fr in f.items()} for b, f in fits.items()}
    if ragged:  # the engine's way (its order, with the sum) against the op's old way, same batch
        summary["ragged_speedup_vs_given_order_no_sum"] = {
            r.shape: round(r.extra["given_order_no_sum_us"] / r.ours_us, 3) for r in ragged}
    print()
    for k_, v_ in summary.items():
        print(f"{k_}: {v_:.3f}" if isinstance(v_, float) else f"{k_}: {v_}")
    write_json(args.out, info, ceilings, results, summary=summary)
    def pct(us: float, r: Result) -> float:  # the ideal traffic at this time, in % of the copy bandwidth
        return 100 * r.bytes / (us * 1e-6) / 1e9 / ceilings["copy_GBps"]

    panels = [
        ("decode: % of copy bandwidth", [r.shape for r in dec],
         {"ours": [pct(r.ours_us, r) for r in dec], "sdpa": [pct(r.torch_us, r) for r in dec],
          # (0 where the read floor was not timed: below 64k tokens)
          "read floor, paged": [pct(r.extra["read_floor_paged_us"], r) if "read_floor_paged_us" in r.extra else 0
                                for r in dec],
          "read floor, contiguous": [pct(r.extra["read_floor_contiguous_us"], r)
                                     if "read_floor_contiguous_us" in r.extra else 0 for r in dec]}, "% copy BW"),
        ("prefill: TFLOP/s (causal)", [r.shape for r in pre],
         {"ours": [r.tflops() for r in pre], "sdpa flash": [r.flops / (r.torch_us * 1e-6) / 1e12 for r in pre]},
         "TFLOP/s"),
        ("ragged decode: % of copy bandwidth (of the real lengths' bytes)", [r.shape for r in ragged],
         {"ours (the engine's order, sum)": [pct(r.ours_us, r) for r in ragged],
          "ours (given order, no sum)": [pct(r.extra["given_order_no_sum_us"], r) for r in ragged],
          "sdpa padded + mask": [pct(r.torch_us, r) for r in ragged]}, "% copy BW"),
    ]
    panels = [p for p in panels if p[1]]
    if panels:
        try_plot(os.path.splitext(args.out)[0] + ".png", f"attention on {info['device']}", panels)


if __name__ == "__main__":
    main()
