"""Chunked prefill end to end: prompts longer than the token budget are split across steps, with
the same tokens as unchunked, and a long prompt arriving stalls running decodes by one step of
the budget at most."""

import random

import pytest

from engine_helpers import make_fake_engine, run_to_completion
from tinyvllm import SamplingParams

GREEDY = dict(temperature=0.0, ignore_eos=True)


def workload(seed=0, n=8, vocab=60, lengths=(1, 3, 9, 17, 26, 33)):
    rng = random.Random(seed)
    arrivals, reqs = {}, []
    for i in range(n):
        prompt = [rng.randrange(2, vocab) for _ in range(rng.choice(lengths))]
        params = SamplingParams(max_tokens=rng.randint(1, 8), **GREEDY)
        reqs.append((f"r{i}", {"prompt_token_ids": prompt}, params))
        arrivals.setdefault(rng.randint(0, 6), []).append(reqs[-1])
    return arrivals, reqs


@pytest.mark.parametrize("budget", [4, 6, 13, 64])  # 1 block of 4, not a multiple of 4, ...
@pytest.mark.parametrize("caching", [False, True])
def test_chunked_gives_the_unchunked_greedy_tokens_at_any_budget_fake(budget, caching):
    arrivals, reqs = workload()
    common = dict(block_size=4, max_model_len=48, max_num_seqs=4, enable_prefix_caching=caching)
    ref = run_to_completion(make_fake_engine(enable_chunked_prefill=False, **common), arrivals)
    eng = make_fake_engine(enable_chunked_prefill=True, max_num_batched_tokens=budget, **common)
    final = run_to_completion(eng, arrivals)
    for rid, _, params in reqs:
        assert final[rid].outputs[0].token_ids == ref[rid].outputs[0].token_ids, rid
        assert len(final[rid].outputs[0].token_ids) == params.max_tokens
    steps = eng.model_runner.batches
    assert all(sum(n for _, n in batch) <= budget for batch in steps)
    if budget < 33:  # some prompt really was split
        assert any(sum(1 for batch in steps for r, _ in batch if r == rid) > params.max_tokens for rid, _, params in reqs)
    assert eng.block_manager.num_free_blocks == eng.block_manager.num_blocks
    eng.block_manager.check_invariants()


def test_a_seeded_request_samples_the_same_tokens_chunked_or_not():
    """A prompt chunk samples nothing, so a seeded request's generator draws the same numbers."""
    params = SamplingParams(temperature=1.0, seed=7, max_tokens=12, ignore_eos=True)
    prompt = [(i * 7) % 50 + 2 for i in range(30)]
    outs = []
    for chunked, budget in ((False, None), (True, 4), (True, 9)):
        eng = make_fake_engine(enable_chunked_prefill=chunked, max_num_batched_tokens=budget, max_num_seqs=4)
        outs.append(run_to_completion(eng, {0: [("s", prompt, params)]})["s"].outputs[0].token_ids)
    assert outs[0] == outs[1] == outs[2]


@pytest.mark.parametrize("chunked", [False, True])
def test_a_long_prompt_delays_32_decodes_by_at_most_one_step_of_the_budget(chunked):
    """32 requests decode; a 300-token prompt arrives. Chunked (budget 48): every decode gets its
    token in every step, each step holds at most 48 tokens, and the prompt takes
    ceil(300 / 16) steps. Unchunked: one step of 300 prompt tokens in which no decode advances."""
    budget = 48 if chunked else 512
    eng = make_fake_engine(num_blocks=512, block_size=4, max_model_len=512, max_num_seqs=40,
                           max_num_batched_tokens=budget, enable_chunked_prefill=chunked)
    for i in range(32):
        eng.add_request(f"d{i}", [2 + i, 3], SamplingParams(max_tokens=60, **GREEDY))
    eng.step()  # the 32 prompts
    eng.step()  # a decode step
    eng.add_request("long", [5] * 300, SamplingParams(max_tokens=2, **GREEDY))
    stalled_steps, prompt_steps, step_tokens = 0, 0, []
    while "long" in eng.requests and not eng.requests["long"].seqs[0].num_output_tokens:
        got = {o.request_id for o in eng.step()}
        batch = eng.model_runner.batches[-1]
        step_tokens.append(sum(n for _, n in batch))
        prompt_steps += any(r == "long" for r, _ in batch)
        stalled_steps += len({f"d{i}" for i in range(32)} - got) > 0
    if chunked:
        assert stalled_steps == 0 and prompt_steps == -(-300 // (budget - 32)) and max(step_tokens) <= budget
    else:
        assert stalled_steps == 1 and prompt_steps == 1 and max(step_tokens) == 300


# ---- the real model: chunks attend over their own earlier chunks through the paged cache ------------
def test_chunked_gives_the_unchunked_greedy_tokens_real_model(tiny_llama_dir):
    from tinyvllm import LLM

    rng = random.Random(5)
    prompts = [{"prompt_token_ids": [rng.randrange(0, 256) for _ in range(n)]} for n in (5, 19, 11)]
    params = SamplingParams(max_tokens=3, **GREEDY)
    # float32: on a GPU the default bf16 rounds chunked and whole-prompt attention sums apart,
    # and a random model's near-tied logits then pick different tokens.
    common = dict(model=str(tiny_llama_dir), block_size=4, max_model_len=32, num_kv_blocks=32, max_num_seqs=4,
                  dtype="float32")
    ref = LLM(enable_chunked_prefill=False, **common).generate(prompts, params, use_tqdm=False)
    for budget in (4, 7):  # one block; not a multiple of the block size
        llm = LLM(enable_chunked_prefill=True, max_num_batched_tokens=budget, **common)
        outs = llm.generate(prompts, params, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in ref], budget
        assert llm.llm_engine.num_steps >= 35 // budget
