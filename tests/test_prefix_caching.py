"""Prefix caching end to end: a request skips the prefill of its longest cached prefix, with the
same greedy tokens as without the cache, and every block is free or cached after any run.

The FakeRunner's "logits" depend on the token history read back through the block tables, so a
shared block holding other tokens than the request's own would change its tokens."""

import random

import pytest

from engine_helpers import make_fake_engine, run_to_completion
from tinyvllm import SamplingParams

GREEDY = dict(temperature=0.0, ignore_eos=True)


def computed_tokens(eng) -> int:
    """Tokens the FakeRunner ran through its model, over every step so far."""
    return sum(n for batch in eng.model_runner.batches for _, n in batch)


def metrics(eng) -> dict:
    return {(m.name, tuple(m.labels.items())): m.value for m in eng.get_metrics()}


def assert_no_block_leaked(eng):
    bm = eng.block_manager
    bm.check_invariants()
    assert all(b.ref_count == 0 for b in bm.blocks)
    assert len(bm.free_block_ids) + len(bm.evictable) == bm.num_blocks == bm.num_free_blocks  # free + cached


def test_prefix_hit_and_miss_give_identical_greedy_tokens_and_skip_the_cached_blocks():
    system = [7, 3, 9, 4, 4, 8, 2, 5, 6, 11]  # 10 tokens: 2 full blocks of 4
    reqs = [(f"r{i}", {"prompt_token_ids": system + [20 + i] * (1 + i % 3)}, SamplingParams(max_tokens=6, **GREEDY))
            for i in range(5)]
    results = {}
    for caching in (False, True):
        eng = make_fake_engine(block_size=4, enable_prefix_caching=caching)
        final = run_to_completion(eng, {0: reqs[:1], 3: reqs[1:3], 9: reqs[3:]})  # r0 runs ahead, then the rest
        results[caching] = {rid: out.outputs[0].token_ids for rid, out in final.items()}
        prompts = sum(len(p["prompt_token_ids"]) for _, p, _ in reqs)
        decodes = sum(5 for _ in reqs)  # max_tokens - 1 tokens each after the prompt step
        hit = 0 if not caching else 4 * 8  # r1..r4 find the system prompt's 2 full blocks
        assert computed_tokens(eng) == prompts + decodes - hit
        assert [final[r].num_cached_tokens for r, _, _ in reqs] == [0] + [8 if caching else 0] * 4
        assert all(final[r].metrics.num_cached_tokens == final[r].num_cached_tokens for r, _, _ in reqs)
        assert_no_block_leaked(eng)
    assert results[True] == results[False]


def test_hit_rate_is_counted_and_reported():
    eng = make_fake_engine(block_size=4, disable_log_stats=True)
    shared = [5] * 12  # 3 full blocks
    p = SamplingParams(max_tokens=2, **GREEDY)
    run_to_completion(eng, {0: [("a", shared + [1], p)], 2: [("b", shared + [2], p)], 4: [("c", [9] * 13, p)]})
    m = metrics(eng)
    # a and c miss; b finds 12 of its 13 tokens.
    assert m[("vllm:prefix_cache_queries", ())] == 39 and m[("vllm:prefix_cache_hits", ())] == 12
    assert eng.stats.recent_hit_rate == pytest.approx(12 / 39)
    assert "Prefix cache hit rate: 30.8%" in eng.stats.format_line(0.0)


@pytest.mark.parametrize("chunked", [False, True])
def test_64_shared_prefix_requests_in_a_small_cache_finish_like_alone_and_leak_nothing(chunked):
    """A cache of 12 blocks (48 tokens) forces preemptions; aborts come mid-run; the prefixes are
    shared by many requests. Every request gets its tokens alone; no block is leaked."""
    rng = random.Random(3)
    systems = [[rng.randrange(2, 60) for _ in range(n)] for n in (9, 14, 5)]
    kw = dict(num_blocks=12, block_size=4, max_model_len=40, max_num_seqs=8, enable_chunked_prefill=chunked,
              max_num_batched_tokens=16 if chunked else None)
    reqs, arrivals = [], {}
    for i in range(64):
        prompt = rng.choice(systems) + [rng.randrange(2, 60) for _ in range(rng.randint(1, 8))]
        params = SamplingParams(max_tokens=rng.randint(1, 10), **GREEDY)
        reqs.append((f"r{i}", {"prompt_token_ids": prompt}, params))
        arrivals.setdefault(rng.randint(0, 40), []).append(reqs[-1])
    aborted = {"r5", "r17", "r40"}
    eng = make_fake_engine(**kw)
    final, step = {}, 0
    while eng.has_unfinished_requests() or any(k >= step for k in arrivals):
        for r in arrivals.get(step, []):
            eng.add_request(*r)
        if step == 30:
            eng.abort_request([r for r in aborted if r in eng.requests])
        for out in eng.step():
            if out.finished:
                final[out.request_id] = out
        step += 1
    assert set(final) == {r for r, _, _ in reqs}
    assert eng.scheduler.num_preemptions > 0 and eng.scheduler.prefix_cache_hits > 0
    for rid, prompt, params in reqs:
        out = final[rid].outputs[0]
        if out.finish_reason == "abort":
            assert rid in aborted
            continue
        alone = run_to_completion(make_fake_engine(**kw), {0: [(rid, prompt, params)]})[rid].outputs[0]
        assert out.token_ids == alone.token_ids, rid
    assert_no_block_leaked(eng)
    assert eng.block_manager.num_cached_blocks > 0


def test_llm_generate_computes_a_shared_system_prompt_once(tiny_llama_dir):
    """64 requests sharing a 37-token system prompt: its 4 full blocks of 8 are computed by the
    first request only; every token is the same as with the cache off."""
    from tinyvllm import LLM

    rng = random.Random(0)
    system = [rng.randrange(0, 256) for _ in range(37)]
    prompts = [{"prompt_token_ids": system + [rng.randrange(0, 256) for _ in range(rng.randint(2, 6))]}
               for _ in range(64)]
    params = SamplingParams(max_tokens=3, **GREEDY)
    tokens = {}
    for caching in (True, False):
        llm = LLM(model=str(tiny_llama_dir), block_size=8, num_kv_blocks=512, enable_prefix_caching=caching)
        scheduler = llm.llm_engine.scheduler
        counted = []  # tokens each step computes (whichever way the engine runs it: sync or async)
        schedule = scheduler.schedule
        scheduler.schedule = lambda: (lambda out: counted.append(out.num_batched_tokens) or out)(schedule())
        outs = llm.generate(prompts, params, use_tqdm=False)
        tokens[caching] = [o.outputs[0].token_ids for o in outs]
        prompt_tokens = sum(len(p["prompt_token_ids"]) for p in prompts)
        shared = 63 * 32 if caching else 0
        assert sum(counted) == prompt_tokens - shared + 64 * 2  # + 2 decode steps of each request
        assert [o.num_cached_tokens for o in outs] == [0] + [32 if caching else 0] * 63
        m = {mt.name: mt.value for mt in llm.get_metrics()}
        assert m["vllm:prefix_cache_hits"] == shared and m["vllm:prompt_tokens"] == prompt_tokens
        assert m["vllm:generation_tokens"] == 64 * 3 and m["vllm:num_requests_running"] == 0
        assert_no_block_leaked(llm.llm_engine)
    assert tokens[True] == tokens[False]
