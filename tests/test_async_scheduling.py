"""Async scheduling (the host one step behind the GPU) against the synchronous engine.

The overlapped engine launches step N before it knows step N-1's tokens (placeholders on the
host, the real ids read on the device) and learns them while step N runs. Its outputs must be
the synchronous engine's, token for token and text for text: greedy and seeded sampling, every
stop condition at exactly the same token, requests joining, finishing, preempted and aborted
mid-run, nothing lost or doubled, every block free at the end.
"""

from __future__ import annotations

import random

import pytest

from engine_helpers import make_fake_engine, run_to_completion
from tinyvllm import SamplingParams
from tinyvllm.engine.sequence import PLACEHOLDER


def stopping_workload(n=16, seed=0, vocab=60):
    """Requests of every kind: greedy and seeded sampling; stopping on eos, on stop token ids,
    on stop strings (of the fake tokenizer's letters), on max_tokens, with min_tokens; arriving
    at different steps."""
    rng = random.Random(seed)
    arrivals: dict[int, list] = {}
    for i in range(n):
        prompt = [rng.randrange(2, vocab) for _ in range(rng.randint(1, 20))]
        kind = i % 6
        kw = dict(max_tokens=rng.randint(1, 30))
        if kind == 0:
            kw.update(temperature=0.0, ignore_eos=True)
        elif kind == 1:
            kw.update(temperature=0.0)  # eos (id 1) stops it
        elif kind == 2:
            kw.update(temperature=1.0, seed=100 + i, stop_token_ids=[7, 8, 9])
        elif kind == 3:
            kw.update(temperature=0.0, ignore_eos=True, stop=["a", "bc"], max_tokens=30)
        elif kind == 4:
            kw.update(temperature=1.0, seed=100 + i, min_tokens=3)
        else:
            kw.update(temperature=0.0, stop=["q"], include_stop_str_in_output=True)
        arrivals.setdefault(rng.randint(0, 12), []).append((f"r{i}", {"prompt_token_ids": prompt}, SamplingParams(**kw)))
    return arrivals


def summary(out):
    c = out.outputs[0]
    return c.token_ids, c.text, c.finish_reason, c.stop_reason


@pytest.mark.parametrize("num_blocks, max_num_seqs", [(64, 8), (12, 8), (64, 2)])
def test_async_engine_gives_the_sync_engines_outputs(num_blocks, max_num_seqs):
    results = {}
    for overlap in (False, True):
        eng = make_fake_engine(num_blocks=num_blocks, max_num_seqs=max_num_seqs, max_model_len=48,
                               max_num_batched_tokens=64, async_scheduling=overlap)
        final = run_to_completion(eng, stopping_workload())
        results[overlap] = {rid: summary(o) for rid, o in final.items()}
        assert eng.block_manager.num_free_blocks == num_blocks
        eng.block_manager.check_invariants()
        assert not eng.has_unfinished_requests() and not eng.scheduler.has_unfinished()
        if num_blocks == 12:
            assert eng.scheduler.num_preemptions > 0
    assert len(results[True]) == 16
    assert results[True] == results[False]
    reasons = {r[2] for r in results[True].values()}
    assert {"stop", "length"} <= reasons


def test_streamed_outputs_are_the_sync_engines_and_never_show_a_placeholder():
    """Every intermediate output of a request (what a server streams) is the synchronous engine's,
    in the same order: only when they come differs (one step later)."""
    streams = {}
    for overlap in (False, True):
        eng = make_fake_engine(async_scheduling=overlap)
        for i in range(6):
            eng.add_request(f"s{i}", [3 + i, 4, 5], SamplingParams(max_tokens=12, temperature=0.0, stop=["k"]))
        seen: dict[str, list] = {}
        while eng.has_unfinished_requests():
            for out in eng.step():
                seen.setdefault(out.request_id, []).append((list(out.outputs[0].token_ids), out.outputs[0].text))
                assert all(t >= 0 for t in out.outputs[0].token_ids)
        streams[overlap] = seen
    assert streams[True] == streams[False]


def test_a_stopped_request_costs_at_most_one_extra_step():
    """The request that stops on eos at step N was already scheduled for step N+1: one wasted
    token, discarded, never more."""
    free_run = run_to_completion(make_fake_engine(), {0: [("a", [5, 6, 7], SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True))]})
    stop_id = free_run["a"].outputs[0].token_ids[5]
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True, stop_token_ids=[stop_id])
    ref = run_to_completion(make_fake_engine(), {0: [("a", [5, 6, 7], params)]})["a"]
    assert ref.outputs[0].finish_reason == "stop" and len(ref.outputs[0].token_ids) <= 6
    eng = make_fake_engine(async_scheduling=True)
    out = run_to_completion(eng, {0: [("a", [5, 6, 7], params)]})["a"]
    assert summary(out) == summary(ref)
    scheduled = sum(1 for b in eng.model_runner.batches for rid, _ in b if rid == "a")
    assert scheduled == len(ref.outputs[0].token_ids) + 1
    assert eng.block_manager.num_free_blocks == 64


def test_abort_while_a_step_is_in_flight_frees_everything():
    eng = make_fake_engine(async_scheduling=True)
    for i in range(4):
        eng.add_request(f"r{i}", [3 + i, 4], SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True))
    for _ in range(5):
        eng.step()
    assert eng.has_in_flight_step()
    eng.abort_request(["r1", "r2"])
    final = run_to_completion(eng)
    assert final["r1"].outputs[0].finish_reason == "abort" and final["r2"].outputs[0].finish_reason == "abort"
    assert all(t >= 0 for t in final["r1"].outputs[0].token_ids)
    assert len(final["r0"].outputs[0].token_ids) == 20 and len(final["r3"].outputs[0].token_ids) == 20
    assert eng.block_manager.num_free_blocks == 64 and not eng.has_unfinished_requests()


def test_placeholders_name_rows_of_the_previous_step():
    """The contract between the engine and the runner: row i's token is PLACEHOLDER - i, negative."""
    assert PLACEHOLDER < 0 and [PLACEHOLDER - i for i in range(3)] == [-1, -2, -3]


def test_llm_generate_async_equals_sync_on_a_tiny_llama(tiny_llama_dir):
    """The real ModelRunner on CPU (its placeholders filled by _fill_placeholders): greedy and
    seeded sampling give the same tokens with and without async scheduling."""
    from tinyvllm import LLM

    rng = random.Random(5)
    prompts = [{"prompt_token_ids": [rng.randrange(3, 200) for _ in range(rng.randrange(1, 30))]} for _ in range(8)]
    params = [SamplingParams(temperature=0.0 if i % 2 else 0.9, seed=i, max_tokens=rng.randrange(1, 20),
                             logprobs=2 if i % 3 == 0 else None, prompt_logprobs=1 if i == 3 else None) for i in range(8)]
    outs = {}
    for overlap in (False, True):
        llm = LLM(str(tiny_llama_dir), async_scheduling=overlap, max_num_seqs=4, block_size=4, num_kv_blocks=40,
                  max_model_len=64)
        outs[overlap] = [(summary(o), o.outputs[0].logprobs, o.prompt_logprobs)
                         for o in llm.generate(prompts, params, use_tqdm=False)]
        assert llm.llm_engine.block_manager.num_free_blocks == 40
    assert outs[True] == outs[False]


def test_async_engine_keeps_parallel_sampling_and_logprobs():
    """n > 1 and logprobs ride with the step's one copy; one step late they are the same."""
    results = {}
    for overlap in (False, True):
        eng = make_fake_engine(async_scheduling=overlap)
        arrivals = {0: [("p", [5, 6, 7], SamplingParams(n=3, seed=7, temperature=1.0, max_tokens=9, logprobs=2)),
                        ("q", [8, 9], SamplingParams(temperature=0.0, max_tokens=6, logprobs=0, stop_token_ids=[3]))],
                    2: [("r", [4, 4, 4], SamplingParams(n=2, seed=1, temperature=0.8, max_tokens=5))]}
        final = run_to_completion(eng, arrivals)
        results[overlap] = {rid: ([(c.token_ids, c.text, c.finish_reason, c.logprobs, c.cumulative_logprob)
                                   for c in o.outputs], o.prompt_logprobs) for rid, o in final.items()}
        assert eng.block_manager.num_free_blocks == 64
    assert results[True] == results[False]
    assert len(results[True]["p"][0]) == 3 and results[True]["p"][0][0][3] is not None


def test_prefix_cache_never_hashes_a_placeholder():
    """A block filled by a token still in flight is hashed (and published) only once the token is
    known: with sampling, preemption and blocks filling at every fourth token, every hash in the
    prefix cache is the hash of some request's real tokens."""
    from tinyvllm.engine.block_manager import hash_block_tokens

    eng = make_fake_engine(async_scheduling=True, num_blocks=24, block_size=4, max_num_seqs=6)
    arrivals = {k: [(f"r{k}{i}", [5, 6, 7, 8, 9], SamplingParams(max_tokens=23, temperature=1.0, seed=k * 10 + i,
                                                                  ignore_eos=True)) for i in range(3)] for k in (0, 3)}
    final = run_to_completion(eng, arrivals)
    assert len(final) == 6 and eng.scheduler.num_preemptions > 0
    real = set()
    for out in final.values():
        ids = list(out.prompt_token_ids) + list(out.outputs[0].token_ids)
        parent = None
        for i in range(len(ids) // 4):
            parent = hash_block_tokens(parent, ids[4 * i : 4 * i + 4])
            real.add(parent)
    eng.block_manager.check_invariants()
    assert eng.block_manager.cached and set(eng.block_manager.cached) <= real


def test_penalties_and_bad_words_see_real_tokens_under_async_scheduling():
    """Sampling that reads the generated tokens on the host (penalties, bad words) never sees a
    placeholder: the engine resolves such a step before scheduling the next, same tokens as sync."""
    results = {}
    for overlap in (False, True):
        eng = make_fake_engine(async_scheduling=overlap)
        arrivals = {0: [("p", [5, 6, 7], SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True,
                                                        presence_penalty=1.5, frequency_penalty=0.5,
                                                        repetition_penalty=1.3)),
                        ("b", [8, 9], SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True, bad_words=["ab"])),
                        ("g", [4, 4], SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True))]}
        results[overlap] = {rid: summary(o) for rid, o in run_to_completion(eng, arrivals).items()}
    assert results[True] == results[False]
