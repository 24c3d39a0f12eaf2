"""Tensor parallelism on CPU: gloo, two processes (docs/course/22-tensor-parallelism.md).

- the collectives, each parallel layer and the whole sliced model against the unsharded reference,
  in two ranks started with an explicit rank/world/port, and again under torchrun (env://);
- LLM(tensor_parallel_size=2) against tensor_parallel_size=1: the same greedy tokens and the same
  logits (fp32 summation noise) at every step, requests joining and finishing;
- the errors before any process starts, a dead worker named in the engine's error, and no process
  left behind (after del llm, a killed worker, Ctrl-C, or a rank 0 that is SIGKILLed).
"""

from __future__ import annotations

import gc
import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from engine_helpers import make_tiny_llama
from fixtures import tiny_config_dict
from tinyvllm.config import ModelConfig
from tinyvllm.engine.engine_config import EngineConfig
from tinyvllm.sampling_params import SamplingParams

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent


def _gone(pid: int, wait_s: float = 10.0) -> bool:
    """True once ``pid`` no longer runs (reaped, or a zombie that no one waits for)."""
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().split(")")[-1].split()[0] in ("Z", "X"):
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.1)
    return False


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    """A tiny random Llama with 4 heads and 2 KV heads: both split evenly over 2 ranks."""
    return make_tiny_llama(tmp_path_factory.mktemp("tp") / "tiny")


# ---- layers and the sliced model, in two ranks -----------------------------------------------------------
def test_parallel_layers_and_sliced_model_match_the_unsharded_reference_in_two_ranks():
    import torch.multiprocessing as mp

    import tp_checks
    from tinyvllm.engine.multiproc_executor import _free_port

    mp.spawn(tp_checks.spawned, args=(2, _free_port()), nprocs=2, join=True)  # a failing rank raises here


def test_the_same_checks_under_torchrun_env_init():
    """init_distributed_environment() with no arguments reads torchrun's RANK/WORLD_SIZE/MASTER_*."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        str(TESTS / "tp_checks.py")], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "rank 0 of 2: OK" in r.stdout and "rank 1 of 2: OK" in r.stdout


# ---- the engine ------------------------------------------------------------------------------------------
def _run_engine(path: Path, tp: int, async_scheduling: bool = False):
    """Ragged prompts joining at different steps, finishing at different lengths; every step's
    logits as rank 0 saw them. Chunked prefill with a small budget mixes prompt chunks and decodes."""
    from tinyvllm.engine.llm_engine import LLMEngine

    engine = LLMEngine.from_model(str(path), device="cpu", max_model_len=128, max_num_batched_tokens=16,
                                  max_num_seqs=4, tensor_parallel_size=tp, async_scheduling=async_scheduling)
    logits_per_step = []
    runner = engine.model_runner
    compute = runner.compute_logits

    def recording(out, *spans):
        logits = compute(out, *spans)
        logits_per_step.append(logits.clone())
        return logits

    runner.compute_logits = recording
    arrivals = {0: [("a", "Hello there, tensor parallel world", 9), ("b", "x", 5)],
                2: [("c", "The quick brown fox jumps over", 7)], 5: [("d", "ab", 3)]}
    tokens, step = {}, 0
    while engine.has_unfinished_requests() or any(k >= step for k in arrivals):
        for rid, prompt, n in arrivals.pop(step, []):
            engine.add_request(rid, prompt, SamplingParams(max_tokens=n, temperature=0))
        for out in engine.step():
            if out.finished:
                tokens[out.request_id] = out.outputs[0].token_ids
        step += 1
    pids = runner.executor.pids if runner.executor is not None else []
    return engine, tokens, logits_per_step, pids


def test_tp2_gives_tp1s_greedy_tokens_and_logits_and_leaves_no_process(tiny_llama):
    _, ref_tokens, ref_logits, _ = _run_engine(tiny_llama, 1)
    engine, tokens, logits, pids = _run_engine(tiny_llama, 2)
    assert tokens == ref_tokens
    assert {k: len(v) for k, v in tokens.items()} == {"a": 9, "b": 5, "c": 7, "d": 3}
    assert len(logits) == len(ref_logits)
    for step, (got, want) in enumerate(zip(logits, ref_logits)):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4, msg=lambda m: f"step {step}: {m}")
    assert len(pids) == 1 and not _gone(pids[0], wait_s=0)
    del engine
    gc.collect()
    assert _gone(pids[0]), "the worker outlived the engine"
    assert not multiprocessing.active_children()


def test_tp2_with_async_scheduling_and_llm_generate(tiny_llama):
    """LLM.generate at tp=2 with async scheduling (placeholders filled on rank 0 before the broadcast)."""
    from tinyvllm import LLM

    prompts = ["Hello there", "a", "The quick brown fox"]
    params = SamplingParams(max_tokens=6, temperature=0)
    ref = [o.outputs[0].token_ids for o in LLM(str(tiny_llama), device="cpu", max_model_len=128).generate(
        prompts, params, use_tqdm=False)]
    llm = LLM(str(tiny_llama), device="cpu", max_model_len=128, tensor_parallel_size=2, async_scheduling=True)
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)] == ref
    pid = llm.llm_engine.model_runner.executor.pids[0]
    del llm
    assert _gone(pid), "the worker outlived `del llm`"


def test_a_killed_worker_is_an_error_naming_its_rank_not_a_hang(tiny_llama):
    from tinyvllm import LLM

    llm = LLM(str(tiny_llama), device="cpu", max_model_len=128, tensor_parallel_size=2)
    params = SamplingParams(max_tokens=3, temperature=0)
    llm.generate(["hi"], params, use_tqdm=False)
    pid = llm.llm_engine.model_runner.executor.pids[0]
    os.kill(pid, signal.SIGKILL)
    assert _gone(pid)
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match=r"tensor parallel worker rank 1 \(pid \d+\) died"):
        llm.generate(["hi again"], params, use_tqdm=False)
    assert time.monotonic() - t0 < 30
    llm.llm_engine.shutdown()
    assert not multiprocessing.active_children()


_RANK0 = textwrap.dedent("""
    import sys
    from tinyvllm import LLM, SamplingParams
    if __name__ == "__main__":
        llm = LLM(sys.argv[1], device="cpu", max_model_len=128, tensor_parallel_size=2)
        print("WORKER", llm.llm_engine.model_runner.executor.pids[0], flush=True)
        while True:
            llm.generate(["hello"], SamplingParams(max_tokens=4), use_tqdm=False)
""")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["ctrl-c", "sigkill"])
def test_no_worker_outlives_rank_0_interrupted_or_killed(tiny_llama, tmp_path, sig):
    script = tmp_path / "rank0.py"
    script.write_text(_RANK0)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, str(script), str(tiny_llama)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("WORKER"), line + proc.stderr.read()[-2000:]
        worker = int(line.split()[1])
        time.sleep(0.5)  # mid-generation
        proc.send_signal(sig)
        proc.wait(timeout=30)
        assert _gone(worker), f"worker {worker} outlived rank 0 after {sig.name}"
    finally:
        if proc.poll() is None:
            proc.kill()


# ---- errors before any process starts ------------------------------------------------------------------
def test_heads_not_divisible_is_a_clear_error_before_any_process_starts():
    """SmolLM2-135M's shape: 9 heads, 3 KV heads; tensor_parallel_size=2 cannot split them."""
    smollm2 = ModelConfig.from_dict(tiny_config_dict(hidden_size=576, num_attention_heads=9, num_key_value_heads=3,
                                                     intermediate_size=1536))
    config = EngineConfig(device="cpu", tensor_parallel_size=2)
    with pytest.raises(ValueError, match=r"^tensor_parallel_size=2 does not divide the model's num_attention_heads \(9\)"):
        config.fit_model(smollm2)


def test_llm_refuses_a_model_it_cannot_split_without_starting_a_worker(tmp_path, tiny_llama):
    import json
    import shutil

    from tinyvllm import LLM

    bad = tmp_path / "nine_heads"
    shutil.copytree(tiny_llama, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg.update(num_attention_heads=9, num_key_value_heads=3, head_dim=16)
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="num_attention_heads \\(9\\)"):
        LLM(str(bad), device="cpu", tensor_parallel_size=2)
    assert not multiprocessing.active_children()


def test_kv_heads_neither_split_nor_replicated_evenly_is_an_error():
    config = ModelConfig.from_dict(tiny_config_dict(num_attention_heads=12, num_key_value_heads=6, hidden_size=96,
                                                    intermediate_size=96))
    with pytest.raises(ValueError, match=r"num_key_value_heads \(6\): one must divide the other"):
        EngineConfig(device="cpu", tensor_parallel_size=4).fit_model(config)


def test_more_ranks_than_gpus_is_an_error(monkeypatch):
    from tinyvllm.distributed.utils import check_devices

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match=r"tensor_parallel_size=2 needs 2 GPUs \(one per rank\), but 1 are visible"):
        check_devices(2, torch.device("cuda"))
    check_devices(2, torch.device("cpu"))  # CPU ranks are processes: any number


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_nccl_without_cuda_is_an_error():
    from tinyvllm.distributed import init_distributed_environment, model_parallel_is_initialized

    with pytest.raises(ValueError, match="the nccl backend needs CUDA GPUs"):
        init_distributed_environment(1, 0, "tcp://127.0.0.1:1", backend="nccl")
    assert not model_parallel_is_initialized()


@pytest.mark.parametrize("value, error", [(0, ValueError), (-1, ValueError), (1.5, TypeError), (True, TypeError)])
def test_tensor_parallel_size_is_validated(value, error):
    """A range is a ValueError, a wrong type a TypeError (tinyvllm.validation), each naming the field."""
    with pytest.raises(error, match="^tensor_parallel_size "):
        EngineConfig(device="cpu", tensor_parallel_size=value)


def test_kv_heads_are_replicated_when_ranks_exceed_them():
    from tinyvllm.distributed.utils import kv_head_range, num_kv_heads_per_rank

    assert [kv_head_range(2, 4, r) for r in range(4)] == [(0, 1), (0, 1), (1, 2), (1, 2)]  # vLLM's layout
    assert [kv_head_range(4, 2, r) for r in range(2)] == [(0, 2), (2, 4)]
    assert num_kv_heads_per_rank(2, 4) == 1 and num_kv_heads_per_rank(8, 2) == 4


def test_loader_reads_each_ranks_slice_and_the_slices_make_the_whole(tiny_llama):
    from tinyvllm.loader import load_checkpoint

    config, full = load_checkpoint(tiny_llama)
    r0 = load_checkpoint(tiny_llama, tp_rank=0, tp_size=2)[1]
    r1 = load_checkpoint(tiny_llama, tp_rank=1, tp_size=2)[1]
    for name, w in full.items():
        if "norm" in name:
            assert torch.equal(r0[name], w) and torch.equal(r1[name], w)
            continue
        dim = 1 if ("o_proj" in name or "down_proj" in name) else 0
        assert r0[name].shape[dim] + r1[name].shape[dim] == w.shape[dim], name
        assert torch.equal(torch.cat([r0[name], r1[name]], dim=dim), w), name


def test_the_serve_flag_sets_tensor_parallel_size():
    import argparse

    from tinyvllm.engine.arg_utils import add_engine_args, engine_config_from_args

    parser = add_engine_args(argparse.ArgumentParser())
    config = engine_config_from_args(parser.parse_args(["--tensor-parallel-size", "2", "--device", "cpu"]))
    assert config.tensor_parallel_size == 2
    assert engine_config_from_args(parser.parse_args(["--device", "cpu"])).tensor_parallel_size == 1
