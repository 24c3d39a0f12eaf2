"""The decode step (cache write + attention) captured in a CUDA graph and replayed with new
inputs, for each kind of plan: split (with the merge kernel, launched with PDL), unsplit, and
one kv head per warp. The launchers must size their grids from host values only and allocate
through torch; each replay is checked against the reference.

GPU tests skip without a GPU or without the built extension (`pip install -e .`).
Run:  pytest tests/test_decode_graphs.py -q
"""

from __future__ import annotations

import math

import pytest
import torch

from attention_helpers import assert_close, decode_plan, gen, head_per_warp_pays, needs_kernels
from tinyvllm.ops import check_kernel_errors, reference

pytestmark = needs_kernels


def _graph_case(case: str, sms: int) -> tuple[int, int, bool]:
    """(batch, the table's capacity in tokens, pass the sum?) for a decode plan of each kind."""
    if case == "split":  # 2 long sequences: context splits and the merge kernel (launched with PDL)
        return 2, 4096, False
    if case == "unsplit":  # a one-wave batch of equal lengths: no split
        return 64, 512, True
    q = torch.empty(4 * sms, 32, 64, device="cuda", dtype=torch.bfloat16)
    fit = decode_plan(q, 8, 160, impl=3)["blocks_per_sm"]
    return next(b for b in range(sms, 4 * sms) if head_per_warp_pays(b, sms, fit)), 160, True


@pytest.mark.parametrize("case", ["split", "unsplit", "head_per_warp"])
def test_decode_step_replays_in_a_cuda_graph_with_new_inputs(case):
    # The decode step that CUDA graphs will capture: write the new token's k/v into the
    # cache, then attend. Captured once on static buffers, replayed with new contents in
    # them (new tokens, lengths, block tables), each replay against the reference. The
    # launchers must size their grids from host values only and allocate through torch.
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    batch, capacity, with_sum = _graph_case(case, sms)
    hq, hk, d, bs = 32, 8, 64, 16
    width = capacity // bs
    num_blocks = batch * width + 1
    dt = torch.bfloat16
    g = gen(len(case))
    kc = torch.empty(num_blocks, hk, bs, d, device="cuda", dtype=dt)
    vc = torch.empty_like(kc)
    q = torch.empty(batch, hq, d, device="cuda", dtype=dt)
    k_new = torch.empty(batch, hk, d, device="cuda", dtype=dt)
    v_new = torch.empty_like(k_new)
    tables = torch.empty(batch, width, device="cuda", dtype=torch.int32)
    lens = torch.empty(batch, device="cuda", dtype=torch.int32)
    slots = torch.empty(batch, device="cuda", dtype=torch.int64)
    out = torch.empty_like(q)
    scale = 1.0 / math.sqrt(d)
    full = batch * capacity  # the sum the engine would pass for a batch of full tables

    def fill(step: int) -> None:  # new contents in the same buffers
        lo = capacity if step == 0 else 1  # the first fill: every table full; later: any lengths
        n = torch.randint(lo, capacity + 1, (batch,), generator=g, device="cuda", dtype=torch.int32)
        lens.copy_(n)
        tables.copy_(torch.randperm(num_blocks - 1, generator=g, device="cuda")[: batch * width]
                     .view(batch, width).to(torch.int32))
        pos = n.long() - 1  # the new token's position
        slots.copy_(tables.gather(1, (pos // bs).unsqueeze(1)).squeeze(1).long() * bs + pos % bs)
        for x in (kc, vc, q, k_new, v_new):
            x.copy_(torch.randn(x.shape, generator=g, device="cuda", dtype=torch.float32))

    def step() -> None:
        torch.ops.tinyvllm.reshape_and_cache(k_new, v_new, kc, vc, slots)
        torch.ops.tinyvllm.paged_attention_decode(out, q, kc, vc, tables, lens, scale, -1, full if with_sum else -1)

    def expected() -> torch.Tensor:
        kr, vr = kc.float(), vc.float()
        reference.reshape_and_cache(k_new.float(), v_new.float(), kr, vr, slots)
        ref = torch.empty(q.shape, device="cuda", dtype=torch.float32)
        reference.paged_attention_decode(ref, q.float(), kr, vr, tables, lens, scale)
        return ref

    qp = torch.empty(batch, hq, d, device="cuda", dtype=dt)
    plan = decode_plan(qp, hk, capacity, sum_seq_lens=full if with_sum else None)
    want = {"split": plan["num_splits"] > 1, "unsplit": plan["num_splits"] == 1 and not plan["head_per_warp"],
            "head_per_warp": bool(plan["head_per_warp"])}[case]
    assert want, (case, batch, capacity, plan)

    fill(0)
    side = torch.cuda.Stream()  # warm up off the capture stream, as torch asks
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for i in range(3):
        fill(i)
        ref = expected()
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert_close(out, ref, dt, f"decode replayed in a CUDA graph ({case}, batch {batch}, replay {i})")
    check_kernel_errors()
