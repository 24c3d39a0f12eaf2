"""SamplingParams.n: several completions of one prompt, fanned out inside the LLMEngine.

The oracle is vLLM's rule for seeds: completion i of ``n=k, seed=s`` is the completion a single
request with ``seed=s+i`` gets. Beyond that: one RequestOutput per request with ``index``
0..n-1, finished only when every completion is, and abort stopping them all.
"""

from __future__ import annotations

import pytest

from engine_helpers import make_fake_engine, run_to_completion
from tinyvllm import LLM, SamplingParams

PROMPT = [5, 6, 7, 8]


def completions(out) -> list[list[int]]:
    return [c.token_ids for c in out.outputs]


def test_n_seeded_completions_differ_and_are_reproducible():
    params = SamplingParams(n=4, temperature=1.0, seed=42, max_tokens=12, ignore_eos=True)
    first = run_to_completion(make_fake_engine(seed=0), {0: [("r", PROMPT, params)]})["r"]
    assert [c.index for c in first.outputs] == [0, 1, 2, 3] and first.finished
    assert len({tuple(t) for t in completions(first)}) == 4  # four different completions
    # reproducible, whatever the engine's own seed and whatever shares the batch
    others = [(f"o{i}", [i + 2] * 3, SamplingParams(temperature=1.0, max_tokens=5)) for i in range(3)]
    again = run_to_completion(make_fake_engine(seed=9), {0: others[:2], 1: [("r", PROMPT, params)], 2: others[2:]})["r"]
    assert completions(again) == completions(first)
    # completion i is the single request seeded seed + i (vLLM's ParentRequest rule)
    for i, tokens in enumerate(completions(first)):
        single = SamplingParams(temperature=1.0, seed=42 + i, max_tokens=12, ignore_eos=True)
        assert completions(run_to_completion(make_fake_engine(), {0: [("s", PROMPT, single)]})["s"]) == [tokens]


def test_unseeded_n_completions_differ():
    params = SamplingParams(n=3, temperature=1.0, max_tokens=10, ignore_eos=True)
    out = run_to_completion(make_fake_engine(), {0: [("r", PROMPT, params)]})["r"]
    assert len({tuple(t) for t in completions(out)}) == 3


def test_one_output_per_request_per_step_finished_when_all_are():
    """Completions of different lengths: the request's output comes once per step, holds all n,
    and is finished only at the last one; the early ones' blocks are freed at once."""
    eng = make_fake_engine(num_blocks=64)
    params = SamplingParams(n=3, temperature=1.0, seed=1, max_tokens=20, stop_token_ids=[2, 3, 4, 5, 6])
    eng.add_request("r", PROMPT, params)
    eng.add_request("other", [3, 3], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    seen_finished = []
    while eng.has_unfinished_requests():
        outs = eng.step()
        ids = [o.request_id for o in outs]
        assert len(ids) == len(set(ids))  # one output per request
        for o in outs:
            if o.request_id == "r":
                assert len(o.outputs) == 3
                seen_finished.append((o.finished, [c.finish_reason is not None for c in o.outputs]))
    assert seen_finished[-1][0] and all(seen_finished[-1][1])
    assert all(not fin for fin, _ in seen_finished[:-1])
    # (this seed: the completions stop after 15, 20 and 3 tokens) the request ran on with some done
    assert [done for fin, done in seen_finished][3] == [False, False, True]
    assert eng.block_manager.num_free_blocks == 64
    assert not eng.requests and not eng._owner


def test_abort_stops_every_completion_and_frees_their_blocks():
    eng = make_fake_engine(num_blocks=64)
    eng.add_request("r", PROMPT, SamplingParams(n=4, temperature=1.0, max_tokens=30, ignore_eos=True))
    eng.step()
    eng.step()
    assert eng.scheduler.num_unfinished() == 4 and eng.get_num_unfinished_requests() == 1
    eng.abort_request("r")
    assert eng.scheduler.num_unfinished() == 0 and eng.block_manager.num_free_blocks == 64
    (out,) = eng.step()
    assert out.finished and [c.finish_reason for c in out.outputs] == ["abort"] * 4
    assert all(len(c.token_ids) == 2 for c in out.outputs)
    assert not eng.has_unfinished_requests()


def test_failed_prompt_fails_every_completion():
    eng = make_fake_engine(max_model_len=16)
    eng.add_request("r", [3] * 20, SamplingParams(n=2, temperature=0.5))
    (out,) = eng.step()
    assert out.finished and "maximum model length" in out.error
    assert [(c.index, c.finish_reason, c.token_ids) for c in out.outputs] == [(0, "error", []), (1, "error", [])]


@pytest.mark.parametrize("num_kv_blocks", [64, 10])
def test_llm_generate_with_n_on_the_real_model(tiny_llama_dir, num_kv_blocks):
    """LLM.generate returns one RequestOutput per prompt with n completions, the same as the
    seed + i single requests, also when the small cache preempts some of them."""
    llm = LLM(model=str(tiny_llama_dir), device="cpu", dtype="float32", max_model_len=48, num_kv_blocks=num_kv_blocks,
              block_size=4)
    params = SamplingParams(n=3, temperature=0.8, seed=7, max_tokens=10, ignore_eos=True)
    outs = llm.generate(["hello", "The sky"], params, use_tqdm=False)
    assert [len(o.outputs) for o in outs] == [3, 3]
    for o, prompt in zip(outs, ["hello", "The sky"]):
        assert len({tuple(t) for t in completions(o)}) == 3
        for i, tokens in enumerate(completions(o)):
            single = SamplingParams(temperature=0.8, seed=7 + i, max_tokens=10, ignore_eos=True)
            assert llm.generate(prompt, single, use_tqdm=False)[0].outputs[0].token_ids == tokens
    assert llm.llm_engine.block_manager.num_free_blocks == num_kv_blocks
    if num_kv_blocks == 10:
        assert llm.llm_engine.scheduler.num_preemptions > 0
