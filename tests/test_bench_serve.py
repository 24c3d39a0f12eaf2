"""bench/bench_serve.py --tiny: a real `tinyvllm serve` process loaded by `tinyvllm bench serve` at
three rates, then offline LLM.generate of the same requests, on a tiny random Llama on CPU (a smoke
test of the script the GPU run uses; its times mean nothing here)."""

import json
import os
import sys

import pytest

pytest.importorskip("uvicorn", reason="`tinyvllm serve` needs the serve extra: pip install -e '.[serve]'")
pytest.importorskip("aiohttp", reason="`tinyvllm bench serve` needs the serve extra")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "bench"))

import bench_serve  # noqa: E402


def test_tiny_run_measures_every_rate_and_the_offline_peer(tmp_path, capsys):
    out = tmp_path / "serve.json"
    result = bench_serve.main(["--tiny", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    rates = [r["request_rate"] for r in result["online"]]
    assert rates == [1.0, 4.0, "inf"]
    assert all(r["failed"] == 0 and r["rc"] == 0 for r in result["online"])
    sat = result["online"][-1]
    assert sat["completed"] == result["offline"]["num_prompts"] == 6
    # The server and LLM.generate produced the same number of tokens (greedy, ignore_eos).
    assert sat["total_output_tokens"] == result["offline"]["output_tokens"] == 6 * 4
    assert result["saturation_vs_offline"] > 0 and result["offline"]["prefill_ms_one_prompt"] > 0
    # prefix caching is on: each run has prompts of its own (the saturation run offline's), and the
    # one-prompt prefill is timed on prompts never computed before (no cache hit: a real prefill)
    assert [r["seed"] for r in result["online"]] == [1, 2, 0]
    assert result["offline"]["prefill_probes_cached_tokens"] == 0
    assert "saturation / offline" in capsys.readouterr().out


def test_host_bound_run_counts_the_model_steps_and_a_stream_interval(tmp_path, capsys):
    """--host-bound (the CPU proxy of a slow host: a model too small to matter, 256 running
    sequences) with a second server at --stream-interval 4 and the in-process run (no HTTP): every
    run's model steps are counted (the server's tinyvllm:engine_steps_total, the engines'), and
    each gives every token offline does."""
    result = bench_serve.main(["--host-bound", "--num-prompts", "24", "--output-len", "9", "--stream-intervals", "4",
                               "--in-process", "--out", str(tmp_path / "serve.json")])  # fmt: skip
    sat, thinned = result["online"][0], result["stream_interval_runs"]["4"]
    assert sat["request_rate"] == thinned["request_rate"] == "inf"
    assert sat["total_output_tokens"] == thinned["total_output_tokens"] == result["offline"]["output_tokens"] == 24 * 9
    # 24 requests of 9 tokens fit one batch: offline 1 prompt step + 8 more (+1 for async); served at least that
    assert 9 <= result["offline"]["engine_steps"] <= 10
    assert sat["engine_steps"] >= 9 and thinned["engine_steps"] >= 9
    assert result["saturation_by_stream_interval"]["4"] > 0
    # --in-process: the same requests through AsyncLLMEngine here, all at once: offline's tokens and steps
    assert result["in_process"]["output_tokens"] == 24 * 9 and 9 <= result["in_process"]["engine_steps"] <= 10
    assert result["in_process_vs_offline"] > 0
    # how busy each process was over the run (CPU seconds / duration): the server, its engine process, the client
    for run in (sat, thinned):
        assert all(0 < run[f"{k}_cpu_busy"] < 64 for k in ("server", "engine", "client")), run
    assert "model steps" in capsys.readouterr().out


def test_paced_run_waits_like_a_gpu_and_counts_only_the_runs_steps(tmp_path, monkeypatch):
    """--paced: every model step of the server's engine process and of offline's waits as long as
    an H100's (bench/paced_step.py, installed in the server's processes by its sitecustomize); a
    run's model steps and CPU are counted from its start (bench serve's initial test request, one
    more request of 20 tokens before it, is not the run's)."""
    import paced_step

    monkeypatch.setenv(paced_step.ENV, "10")  # (steps 10x an H100's: 11 ms and more, far above the CPU's own)
    result = bench_serve.main(["--paced", "--num-prompts", "1", "--input-len", "16", "--output-len", "20",
                               "--out", str(tmp_path / "serve.json")])  # fmt: skip
    sat, off = result["online"][0], result["offline"]
    assert sat["total_output_tokens"] == off["output_tokens"] == 20
    assert 20 <= off["engine_steps"] <= 21 and 20 <= sat["engine_steps"] <= 21, (sat["engine_steps"], off["engine_steps"])
    floor = 20 * paced_step.step_ms(1, 0) / 1e3  # (20 steps of one sequence, each at least this long)
    assert off["seconds"] >= floor and sat["duration"] >= floor
