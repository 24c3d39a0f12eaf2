"""Observability: RequestOutput.metrics (a request's timeline), the periodic stats line, and
get_metrics() (vLLM's counter and gauge names)."""

import logging

from engine_helpers import make_fake_engine, run_to_completion
from tinyvllm import SamplingParams

GREEDY = dict(temperature=0.0, ignore_eos=True)


def by_name(eng) -> dict:
    return {(m.name, tuple(m.labels.items())): m.value for m in eng.get_metrics()}


def test_request_metrics_follow_the_request():
    eng = make_fake_engine(max_num_batched_tokens=8, max_num_seqs=4)
    eng.add_request("a", [3] * 20, SamplingParams(max_tokens=3, **GREEDY))  # 3 prompt chunks of 8
    seen = []
    while eng.has_unfinished_requests():
        seen += eng.step()
    first, last = seen[0], seen[-1]
    assert [o.outputs[0].token_ids for o in seen] == [last.outputs[0].token_ids[:k] for k in (1, 2, 3)]
    assert not first.finished and first.metrics.finished_time is None
    m = last.metrics
    assert m.arrival_time <= m.first_scheduled_time <= m.first_token_time <= m.last_token_time <= m.finished_time
    assert m.time_in_queue == m.first_scheduled_time - m.arrival_time
    assert first.metrics.first_token_time == m.first_token_time and first.metrics.last_token_time < m.last_token_time
    assert last.num_cached_tokens == m.num_cached_tokens == 0


def test_get_metrics_counts_tokens_requests_and_preemptions():
    eng = make_fake_engine(num_blocks=6, block_size=4, max_model_len=24, max_num_seqs=4)
    p = SamplingParams(max_tokens=10, **GREEDY)
    eng.add_request("a", [3] * 7, p)
    eng.add_request("b", [4] * 7, p)
    eng.add_request("c", [5] * 2, SamplingParams(max_tokens=30, **GREEDY))
    eng.add_request("bad", [], p)
    eng.step()
    m = by_name(eng)
    assert m[("vllm:num_requests_running", ())] == 3 and m[("vllm:num_requests_waiting", ())] == 0
    assert m[("vllm:kv_cache_usage_perc", ())] == 5 / 6
    eng.abort_request("c")
    final = run_to_completion(eng)
    m = by_name(eng)
    assert m[("vllm:prompt_tokens", ())] == 16  # a, b and c's first tokens came with their prompts
    assert m[("vllm:generation_tokens", ())] == sum(len(o.outputs[0].token_ids) for o in final.values())  # c: 1
    assert m[("vllm:num_preemptions", ())] == eng.scheduler.num_preemptions > 0
    assert m[("vllm:request_success", (("finished_reason", "length"),))] == 2
    assert m[("vllm:request_success", (("finished_reason", "abort"),))] == 1
    assert m[("vllm:request_success", (("finished_reason", "error"),))] == 1
    assert m[("vllm:kv_cache_usage_perc", ())] == 0.0


def test_the_stats_line_is_logged_while_work_runs_unless_disabled(caplog):
    for disabled in (False, True):
        eng = make_fake_engine(disable_log_stats=disabled)
        eng.stats.interval_s = 0.0  # every step
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="tinyvllm"):
            run_to_completion(eng, {0: [("a", [3] * 9, SamplingParams(max_tokens=4, **GREEDY))],
                                    1: [("b", [3] * 9, SamplingParams(max_tokens=2, **GREEDY))]})
            lines = [r.getMessage() for r in caplog.records if "Avg prompt throughput" in r.getMessage()]
            if disabled:
                assert lines == []
                continue
            assert len(lines) >= 2
            assert "Running: 2 reqs, Waiting: 0 reqs" in lines[1] and "Prefix cache hit rate: " in lines[1]
            assert all("KV cache usage: " in s and "Avg generation throughput: " in s and "Preemptions: 0" in s
                       for s in lines)
            n = len(caplog.records)
            eng.step()  # idle: no line
            assert len(caplog.records) == n


def test_the_stats_line_reports_rates_over_its_interval():
    eng = make_fake_engine()
    clock = iter([0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0])
    eng.stats.clock = lambda: next(clock)
    eng.stats.interval_s = 100.0  # no line: read it by hand
    eng.add_request("a", [3] * 9, SamplingParams(max_tokens=4, **GREEDY))
    eng.step()  # t=0: the interval starts; 9 prompt tokens, 1 generated
    eng.step()  # t=1
    eng.step()  # t=2
    line = eng.stats.format_line(2.0)
    assert line.startswith("Avg prompt throughput: 4.5 tokens/s, Avg generation throughput: 1.5 tokens/s, Running: 1 reqs")
