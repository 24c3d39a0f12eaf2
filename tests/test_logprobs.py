"""logprobs and prompt_logprobs: against log_softmax of the reference model's logits.

The oracle for the real model is transformers' LlamaForCausalLM with the tiny random Llama's
weights (float32, CPU): one forward over prompt + completion gives, at row t, the logits that
scored token t + 1 (teacher forcing on our tokens), so every generated position and every prompt
position has a reference ``log_softmax``. Through FakeRunner the oracle is the toy logits
themselves, which the test recomputes from each history. Log-probabilities are the raw model's:
temperature and penalties must not change them.
"""

from __future__ import annotations

import math

import pytest
import torch

from engine_helpers import FakeTokenizer, make_fake_engine, run_to_completion, toy_logits
from tinyvllm import LLM, Logprob, SamplingParams
from tinyvllm.engine.logprobs import (
    LogprobsTensors, SamplerOutput, compute_logprobs, gather_logprobs, prompt_logprob_spans,
)  # fmt: skip
from tinyvllm.engine.sequence import Sequence

TOL = dict(rtol=1e-4, atol=1e-4)  # float32 model on CPU against float32 transformers
# The engine's tests here run the float32 model on the CPU on any machine (the oracle's dtype);
# the device path is test_sampler_on_the_gpu_matches_the_cpu_in_one_copy.


def close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=TOL["rtol"], abs_tol=TOL["atol"])


def check_position(entry: dict[int, Logprob], token: int, ref: torch.Tensor, k: int, decode=None) -> None:
    """``entry`` is vLLM's per-position dict for the scored ``token``; ``ref`` the reference
    log-probabilities [V] at that position; k the number of top tokens asked for."""
    assert token in entry and len(entry) in (k, k + 1)
    for t, e in entry.items():  # every listed token: its own reference value and text
        assert close(e.logprob, float(ref[t])), (t, e.logprob, float(ref[t]))
        if decode is not None:
            assert e.decoded_token == decode(t)
    # the scored token's rank: how many tokens are at least as likely (a window for float noise)
    r = entry[token].rank
    assert int((ref > ref[token] + 1e-5).sum()) + 1 <= r <= int((ref >= ref[token] - 1e-5).sum()), r
    # the top k: ranks 1..k, the reference's k largest values in order (the scored token is one
    # of them when the dict has only k entries)
    top = sorted((e.rank, e.logprob) for t, e in entry.items() if len(entry) == k or t != token)
    assert [rank for rank, _ in top] == list(range(1, k + 1))
    if k:
        torch.testing.assert_close(torch.tensor([v for _, v in top], dtype=torch.float64), ref.topk(k).values, **TOL)


# ---- the device functions ----------------------------------------------------------------------------
def test_gather_logprobs_matches_a_direct_computation():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 50, generator=g) * 4
    logits[2, 7] = logits[2, 9] = 30.0  # a tie at the top: both count, the rank is 2
    tokens = torch.tensor([0, 5, 7, 49, 13, 2])
    out = gather_logprobs(compute_logprobs(logits), tokens, 3)
    ref = torch.log_softmax(logits.double(), -1)
    for i in range(6):
        t = int(tokens[i])
        assert out.token_ids[i, 0] == t
        assert math.isclose(float(out.logprobs[i, 0]), float(ref[i, t]), abs_tol=1e-5)
        assert int(out.ranks[i]) == int((ref[i] >= ref[i, t]).sum())
        torch.testing.assert_close(out.logprobs[i, 1:].double(), ref[i].topk(3).values, atol=1e-5, rtol=0)
        assert set(out.token_ids[i, 1:].tolist()) == set(ref[i].topk(3).indices.tolist()) or i == 2
    assert int(out.ranks[2]) == 2
    assert gather_logprobs(compute_logprobs(logits), tokens, 0).token_ids.shape == (6, 1)


def test_to_host_is_one_exact_copy(monkeypatch):
    """Ids, log-probabilities (bit-exact, -inf and subnormals too) and ranks come back from one
    copy; each row keeps only its own k of the batch's largest."""
    lps = torch.tensor([[-0.1, -1e-40, float("-inf")], [-3.25, -1 / 3, -7.0]])
    out = SamplerOutput(
        torch.tensor([4, 8, 15]),
        logprobs=LogprobsTensors(torch.tensor([[8, 1, 2], [15, 3, 4]]), lps, torch.tensor([5, 1])),
        logprob_rows=[1, 2], num_logprobs=[2, 0],
    )  # fmt: skip
    copies = []
    real_cpu = torch.Tensor.cpu
    monkeypatch.setattr(torch.Tensor, "cpu", lambda self, *a, **k: copies.append(self.shape) or real_cpu(self, *a, **k))
    host = out.to_host()
    assert len(copies) == 1
    assert host.sampled_token_ids == [4, 8, 15] and host.logprobs[0] is None
    ids, values, rank = host.logprobs[1]
    assert ids == [8, 1, 2] and rank == 5
    assert torch.equal(torch.tensor(values), lps[0])  # bit for bit
    assert host.logprobs[2] == ([15], [-3.25], 1)  # k = 0: the sampled token only


def test_prompt_rows_are_the_prompt_positions_not_yet_reported():
    def seq(n_prompt, computed, outputs=0, k=2):
        s = Sequence("s", list(range(n_prompt)), SamplingParams(prompt_logprobs=k))
        s.token_ids += [7] * outputs
        s.num_computed_tokens = computed
        return s

    plain = Sequence("p", [1, 2, 3], SamplingParams())
    seqs = [seq(5, 0), plain, seq(6, 2), seq(1, 0), seq(4, 0, outputs=1)]
    # scheduled: whole prompt | whole prompt | a chunk of positions 2..3 | 1-token prompt | a recompute
    spans = prompt_logprob_spans(seqs, [5, 3, 2, 1, 5])
    assert [(s.seq_index, s.first, s.count, s.row) for s in spans] == [(0, 0, 4, 0), (2, 2, 2, 8)]
    assert prompt_logprob_spans(seqs[2:3], [4]) == [(0, 2, 3, 0)]  # chunk reaching the end: positions 2..4


# ---- through the engine on FakeRunner -----------------------------------------------------------------
@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0, logprobs=3, max_tokens=10),
    SamplingParams(temperature=0.7, logprobs=5, seed=3, repetition_penalty=1.5, presence_penalty=1.0, max_tokens=10),
    SamplingParams(temperature=1.0, logprobs=0, n=3, seed=11, max_tokens=8, logit_bias={2: 3.0}),
], ids=["greedy", "sampled-penalised", "n3-bias"])  # fmt: skip
def test_engine_logprobs_are_the_raw_models(params):
    V = 30
    eng = make_fake_engine(vocab_size=V, eos=(1,))
    prompt = [5, 6, 7]
    out = run_to_completion(eng, {0: [("r", prompt, params)]})["r"]
    assert len(out.outputs) == params.n and out.prompt_logprobs is None
    for comp in out.outputs:
        assert len(comp.logprobs) == len(comp.token_ids)
        history = list(prompt)
        total = 0.0
        for token, entry in zip(comp.token_ids, comp.logprobs):
            ref = torch.log_softmax(toy_logits(history, V).double(), -1)
            check_position(entry, token, ref, params.logprobs, decode=lambda t: FakeTokenizer().decode([t]))
            total += entry[token].logprob
            history.append(token)
        assert math.isclose(comp.cumulative_logprob, total, rel_tol=1e-9, abs_tol=1e-9)


def test_no_logprobs_means_none():
    out = run_to_completion(make_fake_engine(), {0: [("r", [3, 4], SamplingParams(max_tokens=3))]})["r"]
    assert out.outputs[0].logprobs is None and out.outputs[0].cumulative_logprob is None and out.prompt_logprobs is None


# ---- the real model against transformers -----------------------------------------------------------
@pytest.fixture(scope="module")
def hf_model(tiny_llama_dir):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.float32).eval()


def reference_logprobs(hf_model, token_ids: list[int]) -> torch.Tensor:
    """Row t: log_softmax of the logits after tokens 0..t (float64 for the comparison)."""
    with torch.no_grad():
        logits = hf_model(torch.tensor([token_ids])).logits[0]
    return torch.log_softmax(logits.double(), -1)


@pytest.mark.parametrize("num_kv_blocks", [64, 12], ids=["roomy", "preempting"])
def test_logprobs_and_prompt_logprobs_match_transformers(tiny_llama_dir, hf_model, num_kv_blocks):
    llm = LLM(model=str(tiny_llama_dir), device="cpu", dtype="float32", max_model_len=64, num_kv_blocks=num_kv_blocks,
              block_size=4)
    prompts = ["The quick brown fox", "a", "hello world, hello", "Zebras"]
    params = [
        SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=4, prompt_logprobs=3),
        SamplingParams(temperature=0.9, seed=1, max_tokens=9, ignore_eos=True, logprobs=2, prompt_logprobs=0),
        SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),  # asks for nothing, shares the batch
        SamplingParams(temperature=1.0, seed=2, n=2, max_tokens=10, ignore_eos=True, logprobs=1, prompt_logprobs=5,
                       frequency_penalty=1.0),
    ]  # fmt: skip
    outs = llm.generate(prompts, params, use_tqdm=False)
    if num_kv_blocks == 12:
        assert llm.llm_engine.scheduler.num_preemptions > 0
    decode = lambda t: llm.get_tokenizer().decode([t], skip_special_tokens=False)  # noqa: E731
    for out, p in zip(outs, params):
        L = len(out.prompt_token_ids)
        if p.prompt_logprobs is None:
            assert out.prompt_logprobs is None
        else:
            assert len(out.prompt_logprobs) == L and out.prompt_logprobs[0] is None
            ref = reference_logprobs(hf_model, out.prompt_token_ids)
            for pos in range(1, L):
                token = out.prompt_token_ids[pos]
                check_position(out.prompt_logprobs[pos], token, ref[pos - 1], p.prompt_logprobs, decode)
        for comp in out.outputs:
            if p.logprobs is None:
                assert comp.logprobs is None and comp.cumulative_logprob is None
                continue
            ref = reference_logprobs(hf_model, out.prompt_token_ids + comp.token_ids)
            assert len(comp.logprobs) == len(comp.token_ids)
            for j, (token, entry) in enumerate(zip(comp.token_ids, comp.logprobs)):
                check_position(entry, token, ref[L - 1 + j], p.logprobs, decode)
            total = sum(float(ref[L - 1 + j, t]) for j, t in enumerate(comp.token_ids))
            assert math.isclose(comp.cumulative_logprob, total, abs_tol=1e-3)
            if p.temperature == 0:  # greedy picks the reference's argmax: rank 1
                assert all(entry[t].rank == 1 for t, entry in zip(comp.token_ids, comp.logprobs))
    assert llm.llm_engine.block_manager.num_free_blocks == num_kv_blocks


def test_one_token_prompt_has_only_the_leading_none(tiny_llama_dir):
    llm = LLM(model=str(tiny_llama_dir), device="cpu", dtype="float32", max_model_len=32, num_kv_blocks=16,
              block_size=4)
    out = llm.generate({"prompt_token_ids": [65]}, SamplingParams(max_tokens=2, prompt_logprobs=2), use_tqdm=False)[0]
    assert out.prompt_logprobs == [None]


def test_runner_adds_lm_head_rows_only_for_prompt_logprobs(tiny_llama_dir):
    """The lm_head runs on each sequence's last row, plus the prompt rows of the sequences that
    ask; those extra rows are the logits the full prompt's forward gives at those positions."""
    from tinyvllm.engine.scheduler import SchedulerOutput

    llm = LLM(model=str(tiny_llama_dir), device="cpu", dtype="float32", max_model_len=32, num_kv_blocks=16,
              block_size=4)
    runner = llm.llm_engine.model_runner

    def seqs_with(prompt_logprobs):
        a = Sequence("a", [10, 11, 12, 13, 14], SamplingParams(prompt_logprobs=prompt_logprobs))
        b = Sequence("b", [20, 21, 22], SamplingParams())
        a.block_table, b.block_table = [0, 1], [2]
        return [a, b]

    plain = runner.compute_logits(SchedulerOutput(seqs_with(None), [5, 3]))
    with_rows = runner.compute_logits(SchedulerOutput(seqs_with(1), [5, 3]))
    assert plain.shape[0] == 2 and with_rows.shape[0] == 2 + 4
    torch.testing.assert_close(with_rows[:2], plain, rtol=1e-5, atol=1e-5)
    full = llm.llm_engine.model_runner  # every prefix of "a" alone: its last row is the reference
    for p in range(4):
        s = Sequence("x", [10, 11, 12, 13, 14][: p + 1], SamplingParams())
        s.block_table = [3, 4]
        alone = full.compute_logits(SchedulerOutput([s], [p + 1]))[0]
        torch.testing.assert_close(with_rows[2 + p], alone, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_sampler_on_the_gpu_matches_the_cpu_in_one_copy():
    """The whole sampler on CUDA logits (processors, logprobs, prompt logprobs) gives the CPU's
    results, and the host receives them in exactly one device-to-host copy."""
    from torch.profiler import ProfilerActivity, profile

    from tinyvllm.engine.logprobs import PromptSpan
    from tinyvllm.engine.sampler import Sampler

    def batch():
        greedy = dict(temperature=0)
        seqs = [
            Sequence("a", [3, 4, 5], SamplingParams(**greedy, logprobs=5, repetition_penalty=1.4, prompt_logprobs=2)),
            Sequence("b", [6], SamplingParams(**greedy, logit_bias={7: 2.0}, allowed_token_ids=list(range(0, 90, 3)))),
            Sequence("c", [8, 9], SamplingParams(**greedy, logprobs=0, presence_penalty=1.0, frequency_penalty=0.5)),
        ]
        seqs[2].token_ids += [10, 10, 11]
        return seqs

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 100, generator=g) * 3
    prompt_logits = torch.randn(2, 100, generator=g) * 3
    spans = [PromptSpan(0, 0, 2, 0)]
    cpu = Sampler([1])(logits, batch(), prompt_logits, spans).to_host()
    sampler = Sampler([1], device="cuda")
    d_logits, d_prompt = logits.cuda(), prompt_logits.cuda()
    sampler(d_logits, batch(), d_prompt, spans).to_host()  # warm-up (allocator, kernels)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        gpu = sampler(d_logits, batch(), d_prompt, spans).to_host()
        torch.cuda.synchronize()
    dtoh = [e for e in prof.events() if "DtoH" in e.name]  # "Memcpy DtoH (Device -> Pinned/Pageable)"
    assert len(dtoh) == 1, [e.name for e in dtoh]
    assert gpu.sampled_token_ids == cpu.sampled_token_ids

    def scored(out):  # every scored position of a ModelRunnerOutput, in order
        return [lp for lp in out.logprobs if lp is not None] + [
            p for chunk in out.prompt_logprobs if chunk is not None for p in chunk.positions]

    assert len(scored(gpu)) == len(scored(cpu)) == 4
    for x, y in zip(scored(gpu), scored(cpu)):
        assert x.token_ids == y.token_ids and x.rank == y.rank
        torch.testing.assert_close(torch.tensor(x.logprobs), torch.tensor(y.logprobs), rtol=1e-5, atol=1e-5)
