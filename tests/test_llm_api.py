"""The user-facing LLM API on a tiny random Llama (saved with transformers, loaded by LLM(model=dir))."""

import logging

import pytest
import torch

from tinyvllm import LLM, CompletionOutput, RequestOutput, SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(tiny_llama_dir):
    return LLM(model=str(tiny_llama_dir), max_model_len=64, num_kv_blocks=64, block_size=8)


def texts(outs):
    return [o.outputs[0].text for o in outs]


def test_generate_prompt_forms_and_order(llm):
    tok = llm.get_tokenizer()
    prompts = ["hello world", "a", "The quick brown fox"]
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert [type(o) for o in outs] == [RequestOutput] * 3
    assert isinstance(outs[0].outputs[0], CompletionOutput)
    assert [o.prompt for o in outs] == prompts
    for o, p in zip(outs, prompts):
        assert o.prompt_token_ids == tok.encode(p) and o.prompt_token_ids[0] == tok.bos_token_id
        assert o.finished and len(o.outputs[0].token_ids) == 8 and o.outputs[0].finish_reason == "length"
    # each prompt alone gives the same completion (batching does not change greedy tokens)
    for o, p in zip(outs, prompts):
        assert llm.generate(p, GREEDY, use_tqdm=False)[0].outputs[0].token_ids == o.outputs[0].token_ids
    # token-id prompts: vLLM's TokensPrompt dict, a list of them, a flat list of ints
    ids = [tok.encode(p) for p in prompts]
    by_ids = llm.generate([{"prompt_token_ids": i} for i in ids], GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in by_ids] == [o.outputs[0].token_ids for o in outs]
    assert by_ids[0].prompt is None
    one = llm.generate({"prompt_token_ids": ids[1]}, GREEDY, use_tqdm=False)
    assert one[0].outputs[0].token_ids == outs[1].outputs[0].token_ids
    assert llm.generate(ids[2], GREEDY, use_tqdm=False)[0].outputs[0].token_ids == outs[2].outputs[0].token_ids
    assert llm.generate({"prompt": prompts[0]}, GREEDY, use_tqdm=False)[0].outputs[0].token_ids == outs[0].outputs[0].token_ids
    assert llm.generate([], GREEDY) == []
    assert llm.llm_engine.block_manager.num_free_blocks == 64


def test_params_list(llm):
    outs = llm.generate(["x", "y"], [SamplingParams(temperature=0, max_tokens=2, ignore_eos=True),
                                     SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)], use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outs] == [2, 5]
    with pytest.raises(ValueError, match="sampling_params has 1 entries but there are 2 prompts"):
        llm.generate(["x", "y"], [GREEDY])
    with pytest.raises(TypeError, match=r"sampling_params\[0\] must be a SamplingParams or a dict of its fields, got int"):
        llm.generate(["x"], [3])
    with pytest.raises(TypeError):
        llm.generate(3.5)
    # default SamplingParams: vLLM's max_tokens=16 (EOS may stop it earlier)
    out = llm.generate("x", use_tqdm=True)[0].outputs[0]
    assert 1 <= len(out.token_ids) <= 16


def test_sampling_params_as_a_dict(llm):
    """vLLM users sometimes pass a dict: it stands for SamplingParams(**dict); a typo is named."""
    want = llm.generate(["x", "y"], SamplingParams(temperature=0, max_tokens=3), use_tqdm=False)
    got = llm.generate(["x", "y"], {"temperature": 0, "max_tokens": 3}, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]
    got = llm.generate(["x", "y"], [{"temperature": 0, "max_tokens": 3}, SamplingParams(temperature=0, max_tokens=3)],
                       use_tqdm=False)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]
    with pytest.raises(TypeError, match="sampling_params has no field 'temprature'; SamplingParams' fields are .*temperature"):
        llm.generate("x", {"temprature": 0})
    with pytest.raises(TypeError, match="^temperature must be a number"):
        llm.generate("x", {"temperature": "hot"})
    with pytest.raises(TypeError, match="sampling_params must be a SamplingParams, a dict of its fields, or a list"):
        llm.generate("x", 0.5)


def test_overlong_prompt_fails_only_that_request(llm, caplog):
    long_prompt = "z" * 200  # > max_model_len=64 tokens
    with caplog.at_level(logging.WARNING, logger="tinyvllm"):
        outs = llm.generate(["hi", long_prompt, "there"], GREEDY, use_tqdm=False)
    assert [o.outputs[0].finish_reason for o in outs] == ["length", "error", "length"]
    bad = outs[1]
    assert bad.finished and bad.outputs[0].token_ids == [] and bad.outputs[0].text == ""
    assert "longer than the maximum model length of 64" in bad.error
    assert outs[0].error is None and len(outs[2].outputs[0].token_ids) == 8
    failed = [r.getMessage() for r in caplog.records if "failed" in r.getMessage()]
    assert len(failed) == 1 and "prompt 1 failed" in failed[0]  # reported once, not by the engine too
    # exactly max_model_len - 1 tokens still fits (room for one generated token)
    tok = llm.get_tokenizer()
    ids = tok.encode("z" * 62)
    assert len(ids) == 63
    out = llm.generate({"prompt_token_ids": ids}, SamplingParams(temperature=0, max_tokens=5), use_tqdm=False)[0]
    assert out.error is None and len(out.outputs[0].token_ids) == 1 and out.outputs[0].finish_reason == "length"
    assert llm.llm_engine.block_manager.num_free_blocks == 64


def test_stop_token_ids_and_stop_strings_real_model(llm):
    ref = llm.generate("hello", SamplingParams(temperature=0, max_tokens=20, ignore_eos=True), use_tqdm=False)[0]
    ref_ids = ref.outputs[0].token_ids
    target = ref_ids[4]
    out = llm.generate("hello", SamplingParams(temperature=0, max_tokens=20, stop_token_ids=[target]), use_tqdm=False)[0]
    assert out.outputs[0].token_ids == ref_ids[: ref_ids.index(target) + 1]
    assert out.outputs[0].finish_reason == "stop" and out.outputs[0].stop_reason == target
    # a stop string taken from the middle of the greedy text: the text is cut before it
    text = ref.outputs[0].text
    assert len(text) >= 4, text
    stop = text[len(text) // 2]
    out = llm.generate("hello", SamplingParams(temperature=0, max_tokens=20, stop=[stop], ignore_eos=True),
                       use_tqdm=False)[0].outputs[0]
    assert out.text == text[: text.index(stop)] and out.finish_reason == "stop" and out.stop_reason == stop


def test_seeded_sampling_through_llm(tiny_llama_dir, llm):
    p = SamplingParams(temperature=1.0, max_tokens=10, ignore_eos=True, seed=7)
    a = llm.generate(["hello", "world"], p, use_tqdm=False)
    b = llm.generate(["world", "x", "hello"], p, use_tqdm=False)
    assert a[0].outputs[0].token_ids == b[2].outputs[0].token_ids
    # unseeded requests follow LLM(seed=...)
    q = SamplingParams(temperature=1.0, max_tokens=10, ignore_eos=True)
    l1 = LLM(model=str(tiny_llama_dir), max_model_len=64, num_kv_blocks=32, seed=3)
    l2 = LLM(model=str(tiny_llama_dir), max_model_len=64, num_kv_blocks=32, seed=3)
    l3 = LLM(model=str(tiny_llama_dir), max_model_len=64, num_kv_blocks=32, seed=4)
    r1, r2, r3 = (x.generate(["hello", "world"], q, use_tqdm=False) for x in (l1, l2, l3))
    ids = lambda r: [o.outputs[0].token_ids for o in r]
    assert ids(r1) == ids(r2) and ids(r1) != ids(r3)


def test_chat_single_and_batch_no_double_bos(llm):
    tok = llm.get_tokenizer()
    conv = [{"role": "user", "content": "hi"}]
    out = llm.chat(conv, GREEDY, use_tqdm=False)
    assert len(out) == 1
    ids = out[0].prompt_token_ids
    assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id
    assert out[0].prompt == "<s><|user|>hi</s><|assistant|>"
    batch = [conv, [{"role": "system", "content": "be brief"}, {"role": "user", "content": "yo"}]]
    outs = llm.chat(batch, GREEDY, use_tqdm=False)
    assert len(outs) == 2 and outs[0].outputs[0].token_ids == out[0].outputs[0].token_ids
    assert outs[1].prompt.startswith("<s><|system|>be brief</s>")
    no_gen = llm.chat(conv, GREEDY, use_tqdm=False, add_generation_prompt=False)
    assert not no_gen[0].prompt.endswith("<|assistant|>")
    begun = conv + [{"role": "assistant", "content": "Sure"}]  # a reply the caller began: continued, not closed
    cont = llm.chat(begun, GREEDY, use_tqdm=False, add_generation_prompt=False, continue_final_message=True)
    assert cont[0].prompt == "<s><|user|>hi</s><|assistant|>Sure"
    assert cont[0].prompt_token_ids == tok.encode(cont[0].prompt, add_special_tokens=False)
    with pytest.raises(ValueError):
        llm.chat([], GREEDY)


def test_dtype_and_bad_arguments(tiny_llama_dir):
    l = LLM(model=str(tiny_llama_dir), dtype=torch.float32, max_model_len=32, num_kv_blocks=8)
    assert l.llm_engine.config.dtype == torch.float32
    assert l.llm_engine.config.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="dtype"):
        LLM(model=str(tiny_llama_dir), dtype="int8")
    with pytest.raises(ValueError, match="max_model_len"):
        LLM(model=str(tiny_llama_dir), max_model_len=100_000)


def test_params_the_vocabulary_refuses_raise_and_leave_the_engine_clean(llm):
    """A params list whose second entry biases a token the model does not have: a ValueError
    naming the field, and the first prompt, already added, is withdrawn."""
    vocab = llm.llm_engine.vocab_size
    bad = SamplingParams(logit_bias={vocab: 5.0})
    with pytest.raises(ValueError, match="^logit_bias"):
        llm.generate(["x", "y"], [GREEDY, bad], use_tqdm=False)
    with pytest.raises(ValueError, match="^logprobs"):
        llm.generate("x", SamplingParams(logprobs=vocab + 1), use_tqdm=False)
    assert not llm.llm_engine.has_unfinished_requests()
    assert llm.llm_engine.block_manager.num_free_blocks == 64
    assert len(llm.generate(["x", "y"], GREEDY, use_tqdm=False)) == 2


def test_engine_from_model_takes_the_config_fields_as_keywords(tiny_llama_dir):
    """LLMEngine.from_model(model, **EngineConfig fields) = from_config(EngineConfig(...)); the
    config is completed from the model (eos ids) and the cache (max_seq_len)."""
    from tinyvllm.engine.llm_engine import LLMEngine

    eng = LLMEngine.from_model(str(tiny_llama_dir), max_model_len=48, num_kv_blocks=4, block_size=8, device="cpu")
    c = eng.config
    assert (c.max_model_len, c.cache_capacity, c.max_seq_len) == (48, 32, 32)
    assert c.eos_token_ids == (eng.tokenizer.eos_token_ids[0],) and eng.scheduler.config is c
    eng.add_request("a", [5, 6, 7], SamplingParams(temperature=0, max_tokens=100, ignore_eos=True))
    while eng.has_unfinished_requests():
        outs = eng.step()
    assert outs[0].outputs[0].finish_reason == "length" and len(outs[0].outputs[0].token_ids) == 32 - 3
    assert eng.block_manager.num_free_blocks == 4


def test_half_precision_on_cpu_warns(tiny_llama_dir, caplog):
    with caplog.at_level(logging.WARNING, logger="tinyvllm"):
        LLM(model=str(tiny_llama_dir), dtype="float16", device="cpu", max_model_len=32, num_kv_blocks=8)
    assert "tinyvllm: float16 on a CPU is slow" in caplog.text and "use float32" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="tinyvllm"):
        LLM(model=str(tiny_llama_dir), dtype="float32", device="cpu", max_model_len=32, num_kv_blocks=8)
    assert "slow" not in caplog.text


def test_generate_builds_each_request_output_once_and_leaves_the_params_alone(llm):
    """LLM.generate asks for FINAL_ONLY outputs: the engine builds one RequestOutput per request
    (not one per request per step), and the caller's SamplingParams keep their output_kind."""
    from tinyvllm.sampling_params import RequestOutputKind

    engine = llm.llm_engine
    built = []
    make_output = engine._make_output
    engine._make_output = lambda state: built.append(state.request_id) or make_output(state)
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    try:
        outs = llm.generate(["a b", "c d e", "f"], params, use_tqdm=False)
    finally:
        del engine._make_output
    assert len(built) == 3 and sorted(built) == sorted(o.request_id for o in outs)
    assert all(len(o.outputs[0].token_ids) == 6 for o in outs)
    assert params.output_kind == RequestOutputKind.CUMULATIVE


def test_step_returns_cumulative_outputs_every_step_by_default(llm):
    """The engine's default (what a server streams from): an output per request per step."""
    engine = llm.llm_engine
    engine.add_request("cumulative", "a b", SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    lengths = []
    while engine.has_unfinished_requests():
        lengths += [len(o.outputs[0].token_ids) for o in engine.step() if o.request_id == "cumulative"]
    assert lengths == [1, 2, 3, 4]
