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
    assert "saturation / offline" in capsys.readouterr().out
