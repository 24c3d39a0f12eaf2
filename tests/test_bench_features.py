"""bench/bench_features.py --tiny: the prefix and chunked workloads end to end on a tiny random
Llama on CPU (a smoke test of the script the GPU run uses; its times mean nothing here)."""

import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "bench"))

import bench_features  # noqa: E402


def test_tiny_run_writes_both_workloads_on_and_off(tmp_path, capsys):
    out = tmp_path / "features.json"
    result = bench_features.main(["--tiny", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    w = bench_features.TINY
    on, off = result["prefix"]
    assert (on["enable_prefix_caching"], off["enable_prefix_caching"]) == (True, False)
    # All but the first request find the system prompt's full blocks (32 tokens, blocks of 8).
    assert on["cached_prompt_tokens"] == (w["prefix_requests"] - 1) * w["system_len"] and off["cached_prompt_tokens"] == 0
    assert on["prefix_cache_hit_rate"] > 0.5 and off["prefix_cache_hit_rate"] == 0.0
    assert on["output_tokens"] == off["output_tokens"] == w["prefix_requests"] * w["prefix_out"]
    chunked, whole = result["chunked"]
    assert chunked["max_num_batched_tokens"] == 12 and chunked["steps"] > whole["steps"]
    # Chunked: every decoder got a token in every step. Whole prompts: not in the prefill steps.
    assert chunked["inter_token_latency"]["n"] == w["decoders"] * chunked["steps"]
    assert whole["inter_token_latency"]["n"] == w["decoders"] * (whole["steps"] - w["long_prompts"])
    table = capsys.readouterr().out
    assert "prefix caching" in table and "chunked prefill" in table
