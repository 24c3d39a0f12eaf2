"""The decode-step anatomy (bench/step_trace.py, bench/profile_step.py).

The grouping and gap arithmetic is checked on synthetic Chrome-trace events built by hand (as
torch.profiler writes them on a GPU: runtime calls inside ``decode_step_<i>`` ranges, kernels
tied to them by ``correlation``); the script itself runs in its --tiny CPU mode, where the
outermost CPU ops stand in for kernels."""

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "bench"))

import profile_step  # noqa: E402
from step_trace import (  # noqa: E402
    OTHER, anatomy, busy_time, classify, cpu_top_ops, group_by_step, markdown_table, step_windows,
)


def ev(name, ts, dur, cat="kernel", corr=None, tid=7):
    e = {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "pid": 0, "tid": tid, "args": {}}
    if corr is not None:
        e["args"]["correlation"] = corr
    return e


@pytest.mark.parametrize("name, kind", [
    ("void rms_norm_fast_kernel<__nv_bfloat16, 8, 1, true>(...)", "rms_norm"),
    ("void rotary_embedding_kernel<__nv_bfloat16, 8>(...)", "rope"),
    ("void reshape_and_cache_kernel<__nv_bfloat16, 8, 4>(...)", "cache write"),
    ("void attn::decode_tensor_cores_kernel<__nv_bfloat16, 64, 4, 4, true>(attn::DecodeParams)", "attention decode"),
    ("void attn::decode_merge_kernel<__nv_bfloat16, 64>(attn::DecodeParams)", "merge"),
    ("void tinyvllm::prefill::prefill_attention_mma_kernel<__nv_bfloat16, 64, 4>(PrefillParams)", "attention prefill"),
    ("void silu_and_mul_kernel<__nv_bfloat16, 8>(...)", "silu"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize64x64x64_warpgroupsize1x1x1", "gemm (cuBLAS)"),
    ("nvjet_tst_64x8_64x16_4x1_v_bz_splitK_TNT", "gemm (cuBLAS)"),
    ("void gemv2T_kernel_val<int, int, __nv_bfloat16, float, 128, 16, 4, 4, false, false>", "gemm (cuBLAS)"),
    ("skinny_gemm_kernel<__nv_bfloat16, 4>", "skinny gemm (ours)"),
    ("void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float, at::native::ArgMaxOps<float>>>", "sampling"),
    ("void at::native::(anonymous namespace)::cunn_SoftMaxForward<4, float, float>", "sampling"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<long>>", OTHER),
    ("aten::linear", "gemm (cuBLAS)"),
])
def test_kernel_names_group_into_kinds(name, kind):
    assert classify(name) == kind


def test_memcpy_and_memset_activities_group_by_category():
    assert classify("Memcpy HtoD (Pinned -> Device)", "gpu_memcpy") == "memcpy"
    assert classify("Memset (Device)", "gpu_memset") == "memcpy"


def test_busy_time_counts_overlapping_kernels_once():
    assert busy_time([ev("a", 0, 10), ev("b", 5, 10), ev("c", 30, 5), ev("d", 31, 1)]) == 20


def synthetic_trace():
    """Two decode steps on the host; each launches a graph (3 kernels) and a sampling kernel.
    Step 0's host range is 0-100 us; its graph launch at 10 is correlation 1, its argmax launch
    at 60 correlation 2. Step 1's range is 150-250 (launches at 160: 3, 210: 4). On the GPU:
    step 0 runs 20-30, 32-42, 42-52 (graph) and 70-75 (argmax); step 1 runs 170-180,
    185-195, 195-205 and 220-225."""
    e = [ev("decode_step_0", 0, 100, "user_annotation"), ev("decode_step_1", 150, 100, "user_annotation"),
         ev("cudaGraphLaunch", 10, 5, "cuda_runtime", 1), ev("cudaLaunchKernel", 60, 3, "cuda_runtime", 2),
         ev("cudaGraphLaunch", 160, 5, "cuda_runtime", 3), ev("cudaLaunchKernel", 210, 3, "cuda_runtime", 4)]
    for base, g, s in ((0, 1, 2), (150, 3, 4)):
        e += [ev("sm90_xmma_gemm_bf16", base + 20, 10, corr=g), ev("rms_norm_fast_kernel", base + 32 + (3 if base else 0), 10, corr=g),
              ev("decode_tensor_cores_kernel", base + 42 + (3 if base else 0), 10, corr=g),
              ev("reduce_kernel<ArgMaxOps>", base + 70, 5, corr=s)]
    e.append(ev("Memcpy DtoH (Device -> Pinned)", 76, 1, "gpu_memcpy", corr=2))
    return e


def test_kernels_go_to_the_step_whose_host_range_launched_them():
    events = synthetic_trace()
    windows = step_windows(events)
    assert windows == [(0, 100), (150, 250)]
    steps, source, unassigned = group_by_step(events, windows)
    assert source == "gpu" and unassigned == 0
    assert [len(s) for s in steps] == [5, 4]
    assert {e["name"] for e in steps[1]} == {"sm90_xmma_gemm_bf16", "rms_norm_fast_kernel",
                                             "decode_tensor_cores_kernel", "reduce_kernel<ArgMaxOps>"}


def test_a_kernel_running_after_its_steps_host_range_still_belongs_to_that_step():
    events = synthetic_trace()
    events.append(ev("late_kernel", 140, 5, corr=2))  # launched at 60 (step 0), runs after step 0's range
    steps, _, _ = group_by_step(events, step_windows(events))
    assert "late_kernel" in {e["name"] for e in steps[0]}


def test_a_kernel_with_no_launch_in_any_step_is_counted_as_unassigned():
    events = synthetic_trace() + [ev("stray", 300, 1, corr=99)]
    _, _, unassigned = group_by_step(events, step_windows(events))
    assert unassigned == 1


def test_anatomy_splits_a_step_into_kinds_idle_time_and_the_gap_between_steps():
    events = synthetic_trace()
    windows = step_windows(events)
    steps, _, _ = group_by_step(events, windows)
    a = anatomy(steps, windows)
    # step 0: 20..77, busy 10+20(32-52)+5+1 = 36, span 57, idle 21
    # step 1: 170..225, busy 10+20(185-205)+5 = 35, span 55, idle 20
    assert a["busy_us"] == pytest.approx((36 + 35) / 2)
    assert a["span_us"] == pytest.approx((57 + 55) / 2)
    assert a["idle_inside_us"] == pytest.approx((21 + 20) / 2)
    assert a["gap_between_us"] == pytest.approx(170 - 77)  # last of step 0 to first of step 1
    assert a["period_us"] == pytest.approx(150)
    assert a["gap_fraction_of_period"] == pytest.approx(93 / 150)
    assert a["kinds"]["gemm (cuBLAS)"] == {"us_per_step": 10, "count_per_step": 1}
    assert a["kinds"]["memcpy"] == {"us_per_step": 0.5, "count_per_step": 0.5}
    assert a["kinds"]["sampling"]["count_per_step"] == 1
    assert a["host_step_us"] == 100
    assert a["top"][0][1] == 10  # the 10 us kernels first


def test_overlapping_steps_have_no_gap():
    steps = [[ev("k", 0, 10)], [ev("k", 8, 10)], [ev("k", 30, 10)]]
    a = anatomy(steps)
    assert a["gap_between_min_max_us"] == [-2, 12]
    assert a["gap_between_us"] == pytest.approx((0 + 12) / 2)


def test_cpu_only_traces_use_the_outermost_ops_in_place_of_kernels():
    # aten::linear (0-10) holds aten::matmul (1-9) which holds aten::mm (2-8); aten::add at 12 alone.
    events = [ev("decode_step_0", 0, 20, "user_annotation"),
              ev("aten::linear", 0, 10, "cpu_op"), ev("aten::matmul", 1, 8, "cpu_op"), ev("aten::mm", 2, 6, "cpu_op"),
              ev("aten::add", 12, 2, "cpu_op"), ev("aten::mul", 5, 1, "cpu_op", tid=8)]
    assert sorted(e["name"] for e in cpu_top_ops(events)) == ["aten::add", "aten::linear", "aten::mul"]  # per thread
    steps, source, _ = group_by_step(events, step_windows(events))
    assert source == "cpu_ops"
    assert sorted(e["name"] for e in steps[0]) == ["aten::add", "aten::linear", "aten::mul"]


def test_markdown_table_has_a_column_pair_per_batch_and_the_gap_rows():
    events = synthetic_trace()
    windows = step_windows(events)
    a = anatomy(group_by_step(events, windows)[0], windows)
    table = markdown_table({"1": a, "64": a})
    lines = table.splitlines()
    assert lines[0].startswith("| kind | B=1 us/step | n/step | B=64 us/step | n/step |")
    assert all(line.count("|") == lines[0].count("|") for line in lines)
    gap = next(line for line in lines if line.startswith("| **gap between steps**"))
    assert "93.0" in gap
    assert any(line.startswith("| gemm (cuBLAS) | 10.0 | 1.0 |") for line in lines)


def test_tiny_profile_runs_the_engine_and_writes_the_table(tmp_path):
    out = tmp_path / "anatomy.json"
    assert profile_step.main(["--tiny", "--out", str(out), "--steps", "3"]) == 0
    r = json.loads(out.read_text())
    assert r["source"] == "cpu_ops" and set(r["batches"]) == {"1", "2"}
    for b, a in r["batches"].items():
        assert a["steps"] == 3 and a["unassigned_events"] == 0
        assert a["all_decode_steps_of_batch"] is True
        assert a["cuda_graphs"] is False  # CPU: the eager step
        # every linear of the tiny Llama (2 layers x qkv, o, gate_up, down; the lm_head) is in the step
        assert round(a["kinds"]["gemm (cuBLAS)"]["count_per_step"], 6) >= 2 * 4 + 1  # (a mean over steps)
        assert a["period_us"] > 0 and a["unprofiled_period_us"] > 0 and a["gc_us_per_step"] >= 0
        # the host's Python functions by own time, each (name, calls, own us, cumulative us)
        names = [f[0] for f in a["host_functions"]]
        assert len(names) > 5 and all(f[1] >= 0 and f[2] >= 0 and f[3] >= f[2] for f in a["host_functions"])
        assert os.path.exists(a["trace"])
    assert (tmp_path / "anatomy.md").read_text().count("| **gap between steps** (host) |") == 1


def test_tiny_profile_of_a_prompt_wave_profiles_prompt_steps(tmp_path):
    out = tmp_path / "anatomy.json"
    assert profile_step.main(["--tiny", "--out", str(out), "--steps", "3", "--batches", "1", "--prefill-len", "32"]) == 0
    r = json.loads(out.read_text())
    wave = r["batches"]["256x32 prompts"]
    assert wave["steps"] == 3 and wave["unprofiled_period_us"] > 0
    n, tokens = wave["step_shapes"][0]
    assert tokens > n  # the first profiled step carries prompt tokens
    assert "256x32 prompts" in (tmp_path / "anatomy.md").read_text()
