"""The ideal-bound arithmetic of the end-to-end benchmark (bench/bounds.py) and its workloads.

CPU only, no model: the bound is arithmetic, checked on cases small enough to do by hand, on
perf.md's published Llama-3.2-1B numbers, and against the schedule the real engine makes."""

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "bench"))

from bounds import (  # noqa: E402
    ModelShape, ScheduleRecorder, Step, ideal_schedule, latency_steps, schedule_bound, step_cost,
)
from random_llama import LLAMA_1B  # noqa: E402
from workloads import nano_requests, random_requests, token_counts  # noqa: E402

# A made-up model small enough to compute by hand: 1000 weight bytes, 10 KV bytes per token,
# 50 linear params, a 20-param lm_head, 4 attention FLOPs per (query, key) pair.
HAND = ModelShape(weight_bytes=1000, kv_bytes_per_token=10, linear_params=50, lm_head_params=20,
                  attention_flops_per_pair=4)
BW, RATE = 1000.0, 1000.0  # bytes/s, FLOP/s


def test_a_decode_step_reads_the_weights_and_every_sequences_kv_and_is_memory_bound():
    # Two sequences holding 3 and 5 tokens decode one token each.
    cost = step_cost(Step((3, 5), (1, 1)), HAND, BW, RATE)
    assert cost.bytes == 1000 + 10 * (4 + 6)  # seq_lens after the step: 4 and 6
    # linear 2*50*2 tokens, lm_head 2*20*2 sequences, attention 4 * (4 + 6) pairs
    assert cost.flops == 200 + 80 + 40
    assert cost.memory_s == pytest.approx(1.1)
    assert cost.compute_s == pytest.approx(0.32)
    assert cost.bound_s == pytest.approx(1.1)


def test_a_prefill_step_counts_causal_pairs_and_the_lm_head_once_per_sequence():
    # One 10-token prompt: 55 causal pairs; the lm_head runs on its last token only.
    cost = step_cost(Step((0,), (10,)), HAND, BW, RATE)
    assert cost.bytes == 1000 + 10 * 10
    assert cost.flops == 2 * 50 * 10 + 2 * 20 * 1 + 4 * 55
    assert cost.bound_s == pytest.approx(1.26)  # compute-bound


def test_a_prompt_after_a_cached_prefix_attends_to_the_prefix_too():
    # 2 new tokens after 3 cached: pairs 2*3 + 2*3/2 = 9.
    cost = step_cost(Step((3,), (2,)), HAND, BW, RATE)
    assert cost.flops == 2 * 50 * 2 + 2 * 20 + 4 * 9


def test_schedule_bound_sums_the_larger_time_of_each_step():
    b = schedule_bound([Step((3, 5), (1, 1)), Step((0,), (10,))], HAND, BW, RATE)
    assert b["bound_s"] == pytest.approx(1.1 + 1.26)
    assert (b["decode_s"], b["prefill_s"]) == pytest.approx((1.1, 1.26))
    assert (b["decode_steps"], b["prefill_steps"]) == (1, 1)
    assert (b["memory_bound_steps"], b["compute_bound_steps"]) == (1, 1)


def test_llama_1b_shape_matches_perf_md():
    shape = ModelShape.from_config(LLAMA_1B)
    assert shape.params == 1_235_814_400  # tied embeddings
    assert shape.weight_bytes == 2_471_628_800
    assert shape.kv_bytes_per_token == 32_768
    # about 1.95 GFLOP of linear layers per prompt token (perf.md: ~1.98 with attention)
    assert 2 * shape.linear_params == pytest.approx(1.946e9, rel=1e-3)


def test_llama_1b_batch_1_floor_is_the_weight_read_at_copy_bandwidth():
    shape = ModelShape.from_config(LLAMA_1B)
    bw = 3.0206e12  # an H100's copy bandwidth (bench/results/e2e.json)
    floor = schedule_bound(latency_steps(1, 32, 128), shape, bw, 790e12)["bound_s"] / 128
    # perf.md: 0.82 ms on an H100; the KV of <= 160 tokens adds about 0.1%
    assert floor == pytest.approx(2_471_628_800 / bw, rel=2e-3)
    assert floor * 1e3 == pytest.approx(0.818, abs=0.002)


def test_nano_ideal_bound_on_an_h100_is_about_perf_mds_53k_output_tokens_per_second():
    shape = ModelShape.from_config(LLAMA_1B)
    reqs = nano_requests()
    steps = ideal_schedule([len(r.prompt_token_ids) for r in reqs], [r.max_tokens for r in reqs], 256, 8192)
    b = schedule_bound(steps, shape, 3.0e12, 790e12)
    assert 133_966 / b["bound_s"] == pytest.approx(53_000, rel=0.05)


def test_latency_steps_run_one_token_per_sequence_from_the_prompt_on():
    steps = latency_steps(2, 32, 3)
    assert steps == [Step((32, 32), (1, 1)), Step((33, 33), (1, 1)), Step((34, 34), (1, 1))]
    assert all(s.is_decode for s in steps)


def test_ideal_schedule_admits_first_come_first_served_within_both_budgets():
    # prompts 4, 6, 3; outputs 2, 1, 3; at most 2 sequences and 10 prompt tokens per step.
    steps = ideal_schedule([4, 6, 3], [2, 1, 3], max_num_seqs=2, max_num_batched_tokens=10)
    assert steps == [
        Step((0, 0), (4, 6)),  # both fit; request 1 is done (1 output token), request 0 needs 1 more
        Step((0,), (3,)),  # a slot is free: request 2 is prefilled before anyone decodes
        Step((4, 3), (1, 1)),  # request 0 is done
        Step((4,), (1,)),  # request 2's third token
    ]


def test_ideal_schedule_stops_admitting_at_the_first_prompt_over_the_token_budget():
    steps = ideal_schedule([6, 6, 1], [1, 1, 1], max_num_seqs=8, max_num_batched_tokens=10)
    assert steps == [Step((0,), (6,)), Step((0, 0), (6, 1))]


@pytest.mark.parametrize("prompts, outputs, budget, match", [
    ([4], [1, 2], 10, "prompt lengths"), ([0], [1], 10, "at least 1"), ([4], [0], 10, "at least 1"),
    ([11], [1], 10, "never fits"),
])
def test_ideal_schedule_rejects_impossible_workloads(prompts, outputs, budget, match):
    with pytest.raises(ValueError, match=match):
        ideal_schedule(prompts, outputs, 4, budget)


def test_nano_workload_has_perf_mds_token_counts():
    assert token_counts(nano_requests()) == (142_827, 133_966)
    r = random_requests(3)
    assert [(len(x.prompt_token_ids), x.max_tokens) for x in r] == [(1024, 128)] * 3


def test_the_engines_recorded_schedule_is_the_ideal_one_when_the_cache_is_large_enough():
    from engine_helpers import make_fake_engine, run_to_completion

    from tinyvllm import SamplingParams

    # (the ideal schedule knows no prefix cache and no chunks: the same prompts would share blocks)
    engine = make_fake_engine(num_blocks=256, block_size=4, max_model_len=20, max_num_seqs=3,
                              max_num_batched_tokens=20, enable_prefix_caching=False, enable_chunked_prefill=False)
    reqs = [(7, 5), (9, 2), (4, 6), (12, 3), (3, 4)]  # (prompt length, output tokens)
    recorder = ScheduleRecorder(engine.scheduler)
    run_to_completion(engine, {0: [(f"r{i}", [3] * p, SamplingParams(max_tokens=o, ignore_eos=True))
                                   for i, (p, o) in enumerate(reqs)]})
    steps = recorder.detach()
    assert "schedule" not in vars(engine.scheduler)  # the scheduler has its own method back
    ideal = ideal_schedule([p for p, _ in reqs], [o for _, o in reqs], max_num_seqs=3, max_num_batched_tokens=20)
    assert [(sorted(s.cached), sorted(s.new)) for s in steps] == [(sorted(s.cached), sorted(s.new)) for s in ideal]


def test_the_recorder_splits_the_runs_wall_time_between_prefill_and_decode_steps():
    # Three steps scheduled at t = 1, 3 and 4 s, the run ending at 10 s: the prefill step owns
    # 1 -> 3, the decode steps 3 -> 4 and 4 -> 10.
    class FakeScheduler:
        def __init__(self) -> None:
            self.out = iter([((0,), (5,)), ((5,), (1,)), ((6,), (1,))])

        def schedule(self):
            cached, new = next(self.out)
            seq = type("Seq", (), {"num_computed_tokens": cached[0]})()
            return type("Out", (), {"seqs": [seq], "num_scheduled_tokens": list(new)})()

    sched = FakeScheduler()
    recorder = ScheduleRecorder(sched)
    for t in (1.0, 3.0, 4.0):
        sched.schedule()
        recorder.times[-1] = t  # (the clock, made up)
    assert recorder.seconds_by_kind(end=10.0) == {"prefill_s": 2.0, "decode_s": 7.0}
    assert [s.is_decode for s in recorder.detach()] == [False, True, True]
