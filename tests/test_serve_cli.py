"""`tinyvllm serve` from the outside, one server for the module: the chat page in a real headless
Chromium, `tinyvllm bench serve` against it, and last, SIGTERM with a request still running.

The model is a tiny random Llama with a 4096-token context: its greedy replies run to max_tokens
(it does not emit EOS early), so a reply can be long enough to be stopped mid-way."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time

import httpx
import pytest

pytest.importorskip("uvicorn", reason="`tinyvllm serve` needs the serve extra: pip install -e '.[serve]'")

from server_helpers import REPO, serve
from tinyvllm import SamplingParams
from tinyvllm.benchmarks.serve import RequestResult, compute_metrics


@pytest.fixture(scope="module")
def long_llama_dir(tmp_path_factory):
    from engine_helpers import make_tiny_llama

    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama-4k"), max_position_embeddings=4096)


@pytest.fixture(scope="module")
def server(long_llama_dir, tmp_path_factory):
    with serve(long_llama_dir, "--max-model-len", "4096", tmp_dir=tmp_path_factory.mktemp("serve")) as s:
        yield s


@pytest.fixture(scope="module")
def llm(long_llama_dir):
    from tinyvllm import LLM

    return LLM(model=str(long_llama_dir), max_model_len=4096)


def find_chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.skip("no system Chromium (Debian: apt-get install chromium); .ci/run installs it")
    return path


@pytest.fixture(scope="module")
def page(server):
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
    executable = find_chromium()
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=["--no-sandbox"])  # root in CI needs no-sandbox
        page = browser.new_page()
        page.goto(server.url + "/")
        page.wait_for_function("document.getElementById('model').textContent.length > 0")
        yield page
        browser.close()


def test_chat_page_streams_the_reply_offline_chat_gives(page, server, llm):
    want = llm.chat([{"role": "user", "content": "Hello"}], SamplingParams(temperature=0, max_tokens=24), use_tqdm=False)
    page.fill("#temperature", "0")
    page.fill("#max-tokens", "24")
    page.fill("#input", "Hello")
    page.press("#input", "Enter")
    # The reply is visible while it streams (not only at the end) ...
    page.wait_for_selector('.msg.assistant[data-state="streaming"]')
    page.wait_for_selector('.msg.assistant[data-state="done"]', timeout=60_000)
    assert page.text_content(".msg.user") == "Hello"
    # ... and ends as exactly the offline reply, with the speed of the last reply shown.
    assert page.text_content(".msg.assistant") == want[0].outputs[0].text
    assert "24 tokens" in page.text_content("#speed") and "tokens/s" in page.text_content("#speed")


def test_chat_page_stop_button_aborts_the_reply_on_the_server(page, server):
    before = server.wait_idle()
    page.click("#clear")
    page.fill("#max-tokens", "3000")
    page.fill("#input", "Tell me a story")  # its greedy reply runs past 1500 tokens (no early EOS)
    page.click("#send")
    page.wait_for_function(
        "document.querySelector('.msg.assistant') && document.querySelector('.msg.assistant').textContent.length > 3"
    )
    page.click("#stop")
    page.wait_for_selector('.msg.assistant[data-state="stopped"]', timeout=30_000)
    assert "stopped" in page.text_content("#speed")
    after = server.wait_idle()
    aborts = 'tinyvllm:request_success_total{finished_reason="abort"}'
    assert after.get(aborts, 0) == before.get(aborts, 0) + 1
    assert after["tinyvllm:generation_tokens_total"] - before["tinyvllm:generation_tokens_total"] < 3000
    assert after["tinyvllm:num_free_kv_blocks"] == after["tinyvllm:num_kv_blocks"]
    assert not page.is_disabled("#send")  # ready for the next message


# ---- tinyvllm bench serve ---------------------------------------------------------------------------
def test_benchmark_metrics_follow_vllms_definitions():
    results = [RequestResult(True, 10, 5, ttft=0.1, latency=0.5, itl=[0.1] * 4),
               RequestResult(True, 20, 3, ttft=0.3, latency=0.7, itl=[0.2, 0.2]),
               RequestResult(False, 7, error="HTTP 500")]  # fmt: skip
    m = compute_metrics(results, duration=2.0, percentiles=[50, 99])
    assert (m["completed"], m["failed"], m["total_input_tokens"], m["total_output_tokens"]) == (2, 1, 30, 8)
    assert m["request_throughput"] == 1.0 and m["output_throughput"] == 4.0 and m["total_token_throughput"] == 19.0
    assert m["mean_ttft_ms"] == pytest.approx(200.0) and m["median_ttft_ms"] == pytest.approx(200.0)
    assert m["mean_tpot_ms"] == pytest.approx((400 / 4 + 400 / 2) / 2)  # (e2e - ttft) / (tokens - 1)
    assert m["mean_itl_ms"] == pytest.approx(1000 * (0.4 + 0.4) / 6) and m["p99_itl_ms"] == pytest.approx(200.0, abs=1)
    assert m["mean_e2el_ms"] == pytest.approx(600.0)


def run_bench(server, tmp_path, *args):
    out = tmp_path / "result.json"
    r = subprocess.run([sys.executable, "-m", "tinyvllm", "bench", "serve", "--base-url", server.url, *args,
                        "--result-file", str(out)], capture_output=True, text=True, timeout=300, cwd=REPO)  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout, json.loads(out.read_text())


def test_bench_serve_random_at_two_rates(server, tmp_path):
    stdout, result = run_bench(server, tmp_path, "--num-prompts", "6", "--random-input-len", "12",
                               "--random-output-len", "5", "--ignore-eos", "--request-rate", "20", "inf")  # fmt: skip
    assert [r["request_rate"] for r in result["runs"]] == [20.0, "inf"]
    for run in result["runs"]:
        assert (run["completed"], run["failed"], run["total_input_tokens"], run["total_output_tokens"]) == (6, 0, 72, 30)
        assert 0 < run["median_ttft_ms"] <= run["p99_ttft_ms"] and run["mean_tpot_ms"] > 0 and run["mean_itl_ms"] > 0
        assert run["mean_e2el_ms"] >= run["mean_ttft_ms"] and run["output_throughput"] > 0
    assert stdout.count("Serving Benchmark Result") == 2 and "P99 TPOT (ms)" in stdout
    assert stdout.index("initial single prompt test run") < stdout.index("Serving Benchmark Result")


def test_bench_serve_stops_at_a_failed_initial_request(server):
    r = subprocess.run([sys.executable, "-m", "tinyvllm", "bench", "serve", "--base-url", server.url,
                        "--num-prompts", "2", "--random-input-len", "8", "--random-output-len", "100000"],
                       capture_output=True, text=True, timeout=120, cwd=REPO)  # fmt: skip
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.startswith("tinyvllm: error: the initial test request failed: HTTP 400")  # max_tokens too large
    assert "Serving Benchmark Result" not in r.stdout


def test_bench_serve_sharegpt_file_with_max_concurrency(server, tmp_path):
    convs = [{"conversations": [{"from": "human", "value": f"Question {i}: what is {i} plus {i}?"},
                                {"from": "gpt", "value": f"The answer is {2 * i}, of course."}]} for i in range(5)]
    convs.append({"conversations": [{"from": "human", "value": "hi"}]})  # one turn: skipped
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(convs))
    _, result = run_bench(server, tmp_path, "--dataset-name", "sharegpt", "--dataset-path", str(path),
                          "--num-prompts", "5", "--max-concurrency", "2", "--ignore-eos")  # fmt: skip
    run = result["runs"][0]
    expected = sorted(len(httpx.post(server.url + "/tokenize", json={"prompt": c["conversations"][1]["value"]}).json()["tokens"])
                      for c in convs[:5])  # fmt: skip
    assert run["completed"] == 5 and run["max_concurrency"] == 2 and sorted(run["output_lens"]) == expected


def test_bench_serve_unreachable_server_is_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "tinyvllm", "bench", "serve", "--base-url", "http://127.0.0.1:9"],
                       capture_output=True, text=True, timeout=60, cwd=REPO)  # fmt: skip
    assert r.returncode == 1 and r.stderr.startswith("tinyvllm: error:") and "Traceback" not in r.stderr


# ---- shutdown (last: it stops the module's server) -------------------------------------------------
def test_sigterm_ends_running_requests_with_an_error_and_exits(server):
    events, first = [], threading.Event()

    def stream():
        body = {"prompt": "go", "max_tokens": 3000, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
                    first.set()

    t = threading.Thread(target=stream)
    t.start()
    assert first.wait(60)
    start = time.time()
    server.proc.terminate()
    t.join(30)
    server.proc.wait(30)
    assert not t.is_alive() and time.time() - start < 20
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["code"] == 503 and "shutting down" in error["message"]
    assert server.proc.returncode in (0, -15)


def test_random_dataset_lengths_and_distinct_prompts():
    from tinyvllm.benchmarks.datasets import random_requests

    words = lambda text: [len(w) for w in text.split()]  # a stand-in tokenizer: one id per word
    reqs = random_requests(words, 20, 30, 7, range_ratio=0.5, seed=1)
    assert all(15 <= r.prompt_len <= 45 and len(r.prompt) == r.prompt_len and 3 <= r.expected_output_len <= 10 for r in reqs)
    by_vocab = random_requests(words, 20, 30, 7, seed=1, vocab_size=100)
    assert all(len(r.prompt) == 30 and all(0 <= t < 100 for t in r.prompt) for r in by_vocab)
    assert len({tuple(r.prompt) for r in by_vocab}) == 20
