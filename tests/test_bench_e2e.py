"""The end-to-end benchmark (bench/bench_e2e.py) runs every part in its --tiny CPU mode.

The numbers of a tiny CPU run mean nothing; what is checked is that every engine and peer runs
every workload through the same code the GPU run uses, that the JSON holds what the table and the
chart read, that the floors and bounds are the bench/bounds.py arithmetic of the run's own
ceilings, and that the engine's recorded schedule is the ideal one (no preemption here)."""

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "bench"))

import bench_e2e  # noqa: E402
import e2e_report  # noqa: E402
from bounds import ModelShape, latency_steps, schedule_bound  # noqa: E402
from random_llama import TINY_LLAMA  # noqa: E402
from workloads import TINY_LATENCY, nano_requests, token_counts  # noqa: E402


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("e2e") / "e2e.json"
    rc = bench_e2e.main(["--tiny", "--out", str(out)])
    with open(out) as f:
        return rc, json.load(f)


def test_tiny_run_completes_every_part_without_errors(tiny_run):
    rc, r = tiny_run
    assert rc == 0, r["errors"]
    assert r["errors"] == {}
    assert list(r["part_seconds"]) == bench_e2e.planned_parts(bench_e2e.parse_args(["--tiny"]))
    assert r["ceilings"]["copy_GBps"] > 0 and r["ceilings"]["matmul_TFLOPs"] > 0


def test_latency_floors_are_the_bound_of_the_decode_steps_at_the_runs_ceilings(tiny_run):
    _, r = tiny_run
    shape = ModelShape.from_config(TINY_LLAMA, dtype_bytes=4)
    assert r["model"]["params"] == shape.params
    bw, rate = r["ceilings"]["copy_GBps"] * 1e9, r["ceilings"]["matmul_TFLOPs"] * 1e12
    spec = TINY_LATENCY
    for b in spec.batches:
        want = schedule_bound(latency_steps(b, spec.prompt_len, spec.decode_tokens), shape, bw, rate)["bound_s"]
        assert r["latency"]["floors"][str(b)]["floor_ms"] == pytest.approx(want / spec.decode_tokens * 1e3)


def test_every_engine_reports_its_decode_step_against_the_floor(tiny_run):
    _, r = tiny_run
    lat = r["latency"]
    assert set(lat["engines"]) == {"tinyvllm", "tinyvllm_eager", "transformers", "torch_compile"}
    for name, e in lat["engines"].items():
        batches = ["1"] if name == "transformers" else [str(b) for b in TINY_LATENCY.batches]
        assert list(e["batches"]) == batches, name
        for b in batches:
            x = e["batches"][b]
            assert x["x_floor"] == pytest.approx(x["decode_step_ms"] / lat["floors"][b]["floor_ms"])
    for name in ("tinyvllm", "tinyvllm_eager", "transformers"):
        assert lat["engines"][name]["ttft_long_ms"] > 0
    for name in ("tinyvllm", "tinyvllm_eager"):  # every timed prompt computed in full (prefix caching is on)
        assert lat["engines"][name]["prefix_cache_hits"] == 0
    assert lat["engines"]["torch_compile"]["compiled"] is False  # tiny mode: the peer's code, eagerly


def test_throughput_runs_the_whole_workload_and_its_recorded_schedule_is_the_ideal_one(tiny_run):
    _, r = tiny_run
    reqs = nano_requests(bench_e2e.TINY_REQUESTS, tiny=True, vocab_size=TINY_LLAMA["vocab_size"])
    prompt_tokens, output_tokens = token_counts(reqs)
    nano = r["nano"]
    assert nano["workload"]["output_tokens"] == output_tokens
    assert nano["workload"]["trimmed_from"] == bench_e2e.FULL_NANO_REQUESTS
    ours = nano["engines"]["tinyvllm"]
    assert (ours["prompt_tokens"], ours["output_tokens"]) == (prompt_tokens, output_tokens)
    assert ours["preemptions"] == 0
    assert ours["bound"]["bound_s"] == pytest.approx(nano["ideal_bound"]["bound_s"], rel=1e-12)
    assert ours["bound"]["decode_steps"] == max(q.max_tokens for q in reqs) - 1  # all prefilled in one step
    assert ours["fraction_of_ideal"] == pytest.approx(nano["ideal_bound"]["bound_s"] / ours["seconds"])
    peer = nano["engines"]["torch_compile"]
    assert peer["output_tokens"] == output_tokens and peer["batch"] == len(reqs)
    assert peer["decode_steps"] == max(q.max_tokens for q in reqs) - 1
    assert r["random"]["engines"]["tinyvllm"]["output_tokens"] == bench_e2e.TINY_REQUESTS * 8
    assert "skipped" in r["random"]["engines"]["torch_compile"]


def test_tables_print_every_engine(tiny_run, capsys):
    _, r = tiny_run
    e2e_report.print_tables(r)
    out = capsys.readouterr().out
    for name in ("floor", "tinyvllm eager", "transformers", "torch.compile", "nano", "random"):
        assert name in out


def test_chart_draws_decode_step_against_batch(tiny_run, tmp_path):
    pytest.importorskip("matplotlib")
    _, r = tiny_run
    e2e_report.plot(r, str(tmp_path / "e2e.png"))
    assert (tmp_path / "e2e.png").stat().st_size > 0


def test_a_failing_part_is_recorded_and_the_rest_still_run(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("transformers is broken today")

    monkeypatch.setattr(bench_e2e.runs, "transformers_latency", broken)
    out = tmp_path / "e2e.json"
    rc = bench_e2e.main(["--tiny", "--out", str(out), "--workloads", "latency", "--skip-compile", "--skip-eager"])
    r = json.loads(out.read_text())
    assert rc == 1
    assert list(r["errors"]) == ["transformers latency"]
    assert "transformers is broken today" in r["errors"]["transformers latency"]
    assert set(r["latency"]["engines"]) == {"tinyvllm"}
    assert "nano" not in r and "random" not in r


def test_options_choose_the_parts_and_scale_the_estimates():
    args = bench_e2e.parse_args(["--skip-hf", "--skip-compile", "--workloads", "latency,random",
                                 "--random-requests", "500"])
    assert bench_e2e.planned_parts(args) == [
        "setup", "tinyvllm build", "tinyvllm latency", "tinyvllm random", "tinyvllm_eager build",
        "tinyvllm_eager latency"]
    est = bench_e2e.estimate_seconds(args)
    assert est["tinyvllm random"] == round(bench_e2e.ESTIMATE_S["tinyvllm random"] / 2)
    full = bench_e2e.estimate_seconds(bench_e2e.parse_args([]))
    assert set(full) == set(bench_e2e.ESTIMATE_S)
    assert sum(full.values()) <= 8 * 60  # the whole e2e phase fits a 10-minute device call


@pytest.mark.parametrize("argv, match", [
    (["--workloads", "latency,online"], "unknown"), (["--batches", "1,x"], "integers"),
    (["--batches", "0"], "positive"), (["--random-requests", "0"], "at least 1"),
])
def test_bad_options_are_refused_with_the_option_named(argv, match, capsys):
    with pytest.raises(SystemExit):
        bench_e2e.parse_args(argv)
    assert match in capsys.readouterr().err
