"""Continuous batching: requests that join and leave at different steps get exactly the
tokens each gets alone, and every KV block is free again at the end.

First against FakeRunner (history-dependent toy logits read back through the paged
"cache"), then against the real ModelRunner on a tiny random Llama."""

import random

import pytest

from engine_helpers import FakeTokenizer, make_fake_engine, run_to_completion
from tinyvllm import SamplingParams

GREEDY = dict(temperature=0.0, ignore_eos=True)


def alone(make, rid, prompt, params):
    eng = make()
    return run_to_completion(eng, {0: [(rid, prompt, params)]})[rid].outputs[0].token_ids


def mixed_workload(n=10, seed=0, vocab=60):
    rng = random.Random(seed)
    reqs = []
    for i in range(n):
        prompt = [rng.randrange(2, vocab) for _ in range(rng.randint(1, 20))]
        params = SamplingParams(max_tokens=rng.randint(1, 25), **GREEDY)
        reqs.append((rng.randint(0, 15), (f"r{i}", {"prompt_token_ids": prompt}, params)))
    arrivals = {}
    for step, r in reqs:
        arrivals.setdefault(step, []).append(r)
    return arrivals, [r for _, r in reqs]


@pytest.mark.parametrize("longest_first", [False, True])
@pytest.mark.parametrize("num_blocks, max_num_seqs, budget", [(64, 8, None), (12, 8, 64), (64, 3, 48)])
def test_continuous_batching_matches_alone_fake(num_blocks, max_num_seqs, budget, longest_first):
    make = lambda **kw: make_fake_engine(
        num_blocks=num_blocks, max_num_seqs=max_num_seqs, max_num_batched_tokens=budget, max_model_len=48, **kw
    )
    arrivals, reqs = mixed_workload()
    # longest_first: every decode batch of 2 or more longest first; outputs still go to their own requests
    eng = make(longest_first=2 if longest_first else None)
    final = run_to_completion(eng, arrivals)
    assert set(final) == {r[0] for r in reqs}
    for rid, prompt, params in reqs:
        out = final[rid].outputs[0]
        assert out.token_ids == alone(make, rid, prompt, params), rid
        assert len(out.token_ids) == params.max_tokens and out.finish_reason == "length"
    assert eng.block_manager.num_free_blocks == num_blocks
    eng.block_manager.check_invariants()
    assert not eng.has_unfinished_requests() and not eng.scheduler.has_unfinished()
    # the batches really were mixed: some step ran several sequences
    assert max(len(b) for b in eng.model_runner.batches) > 1
    if num_blocks == 12:
        assert eng.scheduler.num_preemptions > 0  # the small cache forced recomputation
    for batch in eng.model_runner.batches:
        assert len(batch) <= max_num_seqs
        if budget:
            assert sum(n for _, n in batch) <= budget


def test_decode_order_threshold_is_configuration():
    """The scheduler reads decode_longest_first_min_seqs from the EngineConfig; the real runner
    sets it from its GPU (two attention blocks per SM), and leaves it None on CPU."""
    assert make_fake_engine().scheduler.config.decode_longest_first_min_seqs is None  # arrival order
    eng = make_fake_engine(longest_first=3)
    assert eng.scheduler.config is eng.config and eng.config.decode_longest_first_min_seqs == 3
    # The real runner's threshold (H100/H200: 132 SMs; Llama 3.2 1B: 8 kv heads).
    from tinyvllm.engine.model_runner import decode_longest_first_min_seqs

    assert decode_longest_first_min_seqs(8, 132) == 33 and decode_longest_first_min_seqs(2, 132) == 132


def test_runner_step_raises_what_the_kernels_flagged(monkeypatch):
    """After each step's token copy the model runner reads the kernels' flags for indices they
    refused to follow (block tables, slots, positions, query runs it built itself) and
    raises them instead of returning tokens computed from a bad index."""
    from tinyvllm import ops

    eng = make_fake_engine()
    eng.add_request("a", [3] * 5, SamplingParams(max_tokens=4, **GREEDY))
    calls = []

    def flagged(synchronize: bool = True) -> None:
        calls.append(synchronize)
        raise ops.KernelInputError("block_tables: an entry that seq_lens covers is outside the cache")

    monkeypatch.setattr(ops, "check_kernel_errors", flagged)
    with pytest.raises(ops.KernelInputError, match="block_tables"):
        eng.step()
    assert calls == [False]  # no extra wait: the token copy already waited for the step


def test_engine_does_not_import_ops():
    """The engine's seams: kernels (and their error flags) are the model runner's business."""
    import tinyvllm.engine.llm_engine as llm_engine

    assert "ops" not in vars(llm_engine)


@pytest.mark.parametrize("chunked", [False, True])
def test_requests_join_while_others_decode_and_blocks_free_at_once(chunked):
    eng = make_fake_engine(num_blocks=16, block_size=4, enable_chunked_prefill=chunked)
    eng.add_request("long", [3] * 8, SamplingParams(max_tokens=30, **GREEDY))
    eng.step()  # prefill long
    eng.step()  # decode long
    used = eng.block_manager.num_used_blocks
    eng.add_request("short", [4] * 5, SamplingParams(max_tokens=2, **GREEDY))
    outs = eng.step()
    if chunked:  # one step: long's next token and short's whole prompt
        assert sorted(o.request_id for o in outs) == ["long", "short"]
    else:  # a prefill step: the newcomer runs alone, long waits one step
        assert [o.request_id for o in outs] == ["short"]
    outs = eng.step()  # decode both
    assert sorted(o.request_id for o in outs) == ["long", "short"]
    short = next(o for o in outs if o.request_id == "short")
    assert short.finished and short.outputs[0].finish_reason == "length"
    # the finished request's blocks are back right away
    assert eng.block_manager.num_used_blocks == len(eng.requests["long"].seqs[0].block_table)
    assert eng.block_manager.num_used_blocks >= used
    run_to_completion(eng)
    assert eng.block_manager.num_free_blocks == 16


def test_seeded_request_independent_of_batch():
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=20, ignore_eos=True)
    eng = make_fake_engine(seed=0)
    solo = run_to_completion(eng, {0: [("x", [5, 6, 7], params)]})["x"].outputs[0].token_ids
    eng = make_fake_engine(seed=99)
    others = [(f"o{i}", [i + 2] * (i + 1), SamplingParams(temperature=1.0, max_tokens=15)) for i in range(4)]
    final = run_to_completion(eng, {0: others[:2], 1: [("x", [5, 6, 7], params)], 3: others[2:]})
    assert final["x"].outputs[0].token_ids == solo
    # unseeded requests follow LLM(seed=...): same engine seed, same tokens
    a = run_to_completion(make_fake_engine(seed=5), {0: others})
    b = run_to_completion(make_fake_engine(seed=5), {0: others})
    assert {k: v.outputs[0].token_ids for k, v in a.items()} == {k: v.outputs[0].token_ids for k, v in b.items()}


# ---- stop conditions (FakeTokenizer: token t is one letter) ------------------------------------
def greedy_tokens(n=30, prompt=(5, 6, 7)):
    eng = make_fake_engine()
    return run_to_completion(eng, {0: [("g", list(prompt), SamplingParams(max_tokens=n, **GREEDY))]})["g"]


def run_one(params, prompt=(5, 6, 7), **kw):
    eng = make_fake_engine(**kw)
    out = run_to_completion(eng, {0: [("q", list(prompt), params)]})["q"]
    assert eng.block_manager.num_free_blocks == eng.config.num_kv_blocks
    return out


def test_max_tokens_and_text():
    ref = greedy_tokens(12).outputs[0]
    assert len(ref.token_ids) == 12 and ref.finish_reason == "length" and ref.stop_reason is None
    assert ref.text == "".join(FakeTokenizer.tok2str(t) for t in ref.token_ids)


def test_stop_token_ids():
    ref = greedy_tokens().outputs[0].token_ids
    target = ref[5]
    first = ref.index(target)
    out = run_one(SamplingParams(max_tokens=30, stop_token_ids=[target], **GREEDY)).outputs[0]
    assert out.token_ids == ref[: first + 1]  # the stop token is in token_ids...
    assert out.finish_reason == "stop" and out.stop_reason == target
    assert out.text == "".join(FakeTokenizer.tok2str(t) for t in ref[:first])  # ...but not in the text


def test_eos_stops_unless_ignore_eos():
    ref = greedy_tokens(40).outputs[0].token_ids
    eos = ref[7]
    first = ref.index(eos)
    out = run_one(SamplingParams(max_tokens=40, temperature=0), eos=(eos,)).outputs[0]
    assert out.token_ids == ref[: first + 1] and out.finish_reason == "stop" and out.stop_reason is None
    out = run_one(SamplingParams(max_tokens=40, temperature=0, ignore_eos=True), eos=(eos,)).outputs[0]
    assert out.token_ids == ref and out.finish_reason == "length"


def test_min_tokens_suppresses_eos():
    ref = greedy_tokens(40).outputs[0].token_ids
    eos = ref[0]  # the very first greedy token is "EOS"
    out = run_one(SamplingParams(max_tokens=40, temperature=0), eos=(eos,)).outputs[0]
    assert out.token_ids == [eos]
    out = run_one(SamplingParams(max_tokens=40, min_tokens=5, temperature=0), eos=(eos,)).outputs[0]
    assert len(out.token_ids) > 5 and eos not in out.token_ids[:5]
    assert out.finish_reason == "stop" or len(out.token_ids) == 40


def test_stop_string_truncates_text():
    ref = greedy_tokens(30).outputs[0]
    text = ref.text
    stop = text[10:12]
    idx = text.index(stop)
    out = run_one(SamplingParams(max_tokens=30, stop=["zzzzzz", stop], **GREEDY)).outputs[0]
    assert out.text == text[:idx] and out.finish_reason == "stop" and out.stop_reason == stop
    assert out.token_ids == ref.token_ids[: idx + len(stop)]
    out = run_one(SamplingParams(max_tokens=30, stop=stop, include_stop_str_in_output=True, **GREEDY)).outputs[0]
    assert out.text == text[: idx + len(stop)]


def test_streamed_text_never_shows_a_cut_stop_string():
    ref = greedy_tokens(30).outputs[0].text
    stop = ref[12:15]
    eng = make_fake_engine()
    eng.add_request("s", [5, 6, 7], SamplingParams(max_tokens=30, stop=[stop], **GREEDY))
    seen = []
    while eng.has_unfinished_requests():
        seen += [o.outputs[0].text for o in eng.step()]
    final = ref[: ref.index(stop)]
    assert seen[-1] == final
    assert all(final.startswith(t) for t in seen)  # every partial text is a prefix of the final one


def test_invalid_requests_fail_alone_and_abort():
    eng = make_fake_engine(num_blocks=4, block_size=4, max_model_len=64)  # cache holds 16 tokens
    eng.add_request("ok", [3, 4], SamplingParams(max_tokens=5, **GREEDY))
    eng.add_request("too-long", [3] * 64, SamplingParams(max_tokens=5))
    eng.add_request("no-room", [3] * 16, SamplingParams(max_tokens=5))
    eng.add_request("empty", [], SamplingParams(max_tokens=5))
    eng.add_request("oov", [3, 1000], SamplingParams(max_tokens=5))
    eng.add_request("aborted", [3, 4, 5], SamplingParams(max_tokens=5))
    with pytest.raises(ValueError, match="already in use"):
        eng.add_request("ok", [1], SamplingParams())
    eng.abort_request("aborted")
    final = run_to_completion(eng)
    for rid, needle in [("too-long", "maximum model length of 64"), ("no-room", "KV cache"), ("empty", "empty"),
                        ("oov", "out of vocabulary")]:
        assert final[rid].finished and final[rid].outputs[0].finish_reason == "error"
        assert needle in final[rid].error and final[rid].outputs[0].token_ids == []
    assert final["aborted"].outputs[0].finish_reason == "abort"
    assert final["ok"].outputs[0].finish_reason == "length" and len(final["ok"].outputs[0].token_ids) == 5
    assert eng.block_manager.num_free_blocks == 4


def test_length_capped_by_max_model_len():
    eng = make_fake_engine(max_model_len=20, num_blocks=64)
    out = run_to_completion(eng, {0: [("a", [3] * 15, SamplingParams(max_tokens=None, **GREEDY))]})["a"]
    assert out.outputs[0].finish_reason == "length" and len(out.outputs[0].token_ids) == 5


# ---- the real ModelRunner on a tiny random Llama --------------------------------------------------
@pytest.fixture(scope="module")
def tiny_llm_factory(tiny_llama_dir):
    from tinyvllm import LLM

    def make(**kw):
        return LLM(model=str(tiny_llama_dir), **kw)

    return make


@pytest.mark.parametrize("longest_first", [False, True])
@pytest.mark.parametrize("num_kv_blocks, max_num_seqs", [(64, 256), (14, 4)])
def test_continuous_batching_matches_alone_real_model(tiny_llm_factory, num_kv_blocks, max_num_seqs, longest_first):
    llm = tiny_llm_factory(num_kv_blocks=num_kv_blocks, max_num_seqs=max_num_seqs, block_size=4, max_model_len=48)
    eng = llm.llm_engine
    # The runner's own threshold (2 blocks per SM of kv heads) is far above this batch; force the order.
    eng.config.decode_longest_first_min_seqs = 2 if longest_first else None
    rng = random.Random(1)
    vocab = eng.vocab_size
    reqs = []
    for i in range(8):
        prompt = [rng.randrange(0, 256) for _ in range(rng.choice([1, 3, 4, 5, 8, 15, 16, 17]))]
        reqs.append((f"r{i}", {"prompt_token_ids": prompt}, SamplingParams(max_tokens=rng.randint(1, 14), **GREEDY)))
    assert vocab > 256
    solo = {}
    for rid, prompt, params in reqs:
        solo[rid] = run_to_completion(eng, {0: [(rid, prompt, params)]})[rid].outputs[0].token_ids
        assert eng.block_manager.num_free_blocks == num_kv_blocks
    arrivals = {0: reqs[:3], 2: reqs[3:5], 3: reqs[5:6], 7: reqs[6:]}
    final = run_to_completion(eng, arrivals)
    for rid, _, params in reqs:
        assert final[rid].outputs[0].token_ids == solo[rid], rid
        assert len(solo[rid]) == params.max_tokens
    assert eng.block_manager.num_free_blocks == num_kv_blocks
    eng.block_manager.check_invariants()
    if num_kv_blocks == 14:
        assert eng.scheduler.num_preemptions > 0
