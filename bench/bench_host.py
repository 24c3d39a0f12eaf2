"""The host's time per engine step, with a model too small to matter: what the CPU spends on a step
(scheduling, inputs, sampling bookkeeping, stop checks, detokenization, outputs) outside the model.

At batch 256 on a GPU the decode step's kernels take about 2.5 ms (Llama-3.2-1B shape, H100); a
host that needs longer leaves the GPU idle between steps, however well the two overlap (course
chapter 24). This benchmark measures that host time on any machine, GPU or not: `LLM.generate` of
--batch requests on a 1-layer random Llama of hidden size 32 on the CPU, one thread, the wall time
minus the time inside the model's forward pass, divided by the steps. Best of --repeats runs.

    python bench/bench_host.py [--batch 256] [--prompt-len 16] [--max-tokens 128] [--out host.json]
        [--outputs final|objects|wire]

``--outputs``: ``final`` (the default) is `LLM.generate`: an output per request at its end only.
The server needs one per running request per step (DELTA): ``objects`` steps the LLMEngine that way
and pickles each step's RequestOutputs, as an engine process used to send them; ``wire`` does the
same with the engine's wire form (``LLMEngine.wire_outputs``: tuples) and with its text left to the
server's side (``LLMEngine.text_in_client``: these requests have no stop strings, so the engine
detokenizes nothing), as an engine process runs.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from random_llama import NEGLIGIBLE_LLAMA, make_random_llama  # noqa: E402


def measure(batch: int, prompt_len: int, max_tokens: int, repeats: int, outputs: str = "final") -> dict:
    import pickle

    from tinyvllm import LLM, SamplingParams
    from tinyvllm.engine.gc_heap import frozen_heap
    from tinyvllm.sampling_params import RequestOutputKind

    path = tempfile.mkdtemp(prefix="tinyvllm-host-")
    make_random_llama(path, NEGLIGIBLE_LLAMA, device="cpu")
    max_len = prompt_len + max_tokens + 16
    llm = LLM(model=path, device="cpu", max_num_seqs=batch, max_model_len=max_len,
              num_kv_blocks=batch * (max_len // 16 + 2), disable_log_stats=True)  # fmt: skip
    runner = llm.llm_engine.model_runner
    in_model = [0.0]
    run_model = runner.run_model

    def timed_run_model(*args, **kwargs):
        t0 = time.perf_counter()
        out = run_model(*args, **kwargs)
        in_model[0] += time.perf_counter() - t0
        return out

    runner.run_model = timed_run_model
    rng = random.Random(0)

    def new_prompts(n: int) -> list[dict]:  # (new ones for every run: a prompt seen before is a prefix-cache hit)
        return [{"prompt_token_ids": [rng.randrange(3, 500) for _ in range(prompt_len)]} for _ in range(n)]

    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    llm.generate(new_prompts(8), params, use_tqdm=False)  # warm-up
    engine = llm.llm_engine
    if outputs == "wire":  # as engine_core_main sets its engine up (the text left to the server's side)
        from tinyvllm.engine.engine_core import configure_engine_process

        configure_engine_process(engine)
    delta = params.clone()
    delta.output_kind = RequestOutputKind.DELTA

    def serve_like(run: int, prompts: list[dict]) -> None:
        """The engine process's loop: every step's outputs (one per running request) pickled."""
        for i, p in enumerate(prompts):
            engine.add_request(f"{run}-{i}", p, delta)
        with frozen_heap():
            while engine.has_unfinished_requests():
                pickle.dumps(engine.step(), protocol=pickle.HIGHEST_PROTOCOL)

    runs = []
    for run in range(repeats):
        prompts = new_prompts(batch)
        in_model[0] = 0.0
        steps0 = llm.llm_engine.num_steps
        t0 = time.perf_counter()
        if outputs == "final":
            llm.generate(prompts, params, use_tqdm=False)
        else:
            serve_like(run, prompts)
        wall = time.perf_counter() - t0
        steps = llm.llm_engine.num_steps - steps0
        runs.append({"steps": steps, "wall_s": wall, "model_s": in_model[0],
                     "host_us_per_step": (wall - in_model[0]) / steps * 1e6})  # fmt: skip
    best = min(r["host_us_per_step"] for r in runs)
    return {"batch": batch, "prompt_len": prompt_len, "max_tokens": max_tokens, "threads": torch.get_num_threads(),
            "outputs": outputs, "runs": runs, "host_us_per_step": best}  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--outputs", default="final", choices=["final", "objects", "wire"],
                    help="final: LLM.generate; objects / wire: an output per request per step, pickled (a server's engine)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    result = measure(a.batch, a.prompt_len, a.max_tokens, a.repeats, a.outputs)
    for r in result["runs"]:
        print(f"{r['steps']} steps in {r['wall_s']:.2f} s, {r['model_s']:.2f} s in the model: "
              f"{r['host_us_per_step']:.0f} us of host per step")  # fmt: skip
    print(f"batch {a.batch}, {a.outputs} outputs: host time per step {result['host_us_per_step']:.0f} us "
          f"(best of {a.repeats})")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
