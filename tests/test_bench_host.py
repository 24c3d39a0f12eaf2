"""bench/bench_host.py: the host's time per step at a small batch (a smoke test of the script;
its time means nothing on a shared CI machine)."""

import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "bench"))

import bench_host  # noqa: E402


def test_small_run_reports_host_time_per_step(tmp_path):
    out = tmp_path / "host.json"
    result = bench_host.main(["--batch", "4", "--max-tokens", "5", "--repeats", "2", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert [r["steps"] for r in result["runs"]] == [5, 5]  # one prefill step, then 4 decode steps
    assert all(0 < r["model_s"] < r["wall_s"] for r in result["runs"])
    assert result["host_us_per_step"] == min(r["host_us_per_step"] for r in result["runs"]) > 0


def test_the_servers_way_outputs_every_step_in_either_form():
    for outputs in ("objects", "wire"):
        result = bench_host.main(["--batch", "4", "--max-tokens", "5", "--repeats", "1", "--outputs", outputs])
        assert result["outputs"] == outputs and [r["steps"] for r in result["runs"]] == [5]
        assert result["host_us_per_step"] > 0
