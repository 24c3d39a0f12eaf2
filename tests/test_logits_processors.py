"""Penalties, logit_bias, allowed_token_ids, bad_words and min_tokens against a direct computation.

The oracle (``reference_process``) applies vLLM's definitions one token at a time in plain
Python/torch on one row; the engine's version is vectorised over the batch on the device
(tinyvllm/engine/logits_processors.py). Then the same through the Sampler and the whole engine
(greedy tokens against the oracle's argmax at every step, FakeRunner's toy logits), and the
promise that a batch using none of it pays nothing.
"""

from __future__ import annotations

import random

import pytest
import torch

from engine_helpers import FakeTokenizer, make_fake_engine, run_to_completion, toy_logits
from tinyvllm import SamplingParams
from tinyvllm.engine import logits_processors as lp
from tinyvllm.engine.logits_processors import (
    apply_logits_processors, bad_words_banned, tokenize_bad_words,
)  # fmt: skip
from tinyvllm.engine.sampler import Sampler
from tinyvllm.engine.sequence import Sequence

NEG = float("-inf")
EOS = [1]


def reference_process(logits: torch.Tensor, seq: Sequence, eos=EOS) -> torch.Tensor:
    """One row, one rule at a time, in vLLM's order (float64)."""
    p = seq.sampling_params
    z = logits.double().clone()
    prompt, output = list(seq.prompt_token_ids), list(seq.output_token_ids)
    if p.allowed_token_ids is not None:
        for t in range(len(z)):
            if t not in p.allowed_token_ids:
                z[t] = NEG
    for word in p.bad_words_token_ids or []:
        *before, last = word
        if len(before) <= len(output) and (not before or output[len(output) - len(before):] == before):
            z[last] = NEG
    if len(output) < p.min_tokens:
        for t in list(p.stop_token_ids) + ([] if p.ignore_eos else eos):
            z[t] = NEG
    for t, b in (p.logit_bias or {}).items():
        z[t] += b
    for t in set(prompt) | set(output):
        z[t] = z[t] / p.repetition_penalty if z[t] > 0 else z[t] * p.repetition_penalty
    for t in output:
        z[t] -= p.frequency_penalty
    for t in set(output):
        z[t] -= p.presence_penalty
    return z


def make_seq(prompt, output, **params) -> Sequence:
    seq = Sequence("s", list(prompt), SamplingParams(**params))
    seq.token_ids = list(prompt) + list(output)
    return seq


def with_bad_words(seq: Sequence, words: list[list[int]]) -> Sequence:
    seq.sampling_params._bad_words_token_ids = words
    return seq


def random_batch(seed: int, V: int = 40) -> list[Sequence]:
    """Rows mixing every processor, including none, with repeated tokens and negative logits."""
    rng = random.Random(seed)
    ids = lambda n: [rng.randrange(V) for _ in range(n)]  # noqa: E731
    return [
        make_seq(ids(5), ids(9), presence_penalty=1.5, frequency_penalty=0.7, repetition_penalty=1.3),
        make_seq(ids(3), [], repetition_penalty=0.6),
        make_seq(ids(4), ids(2)),  # nothing
        make_seq(ids(6), ids(12), frequency_penalty=-1.2, logit_bias={3: 5.0, 7: -2.5, 39: 100.0}),
        make_seq(ids(2), ids(1), allowed_token_ids=[4, 9, 11, 30], presence_penalty=-0.5),
        with_bad_words(make_seq(ids(3), [5, 6, 7, 5], min_tokens=8, stop_token_ids=[2, 3]),
                       [[9], [5, 8], [7, 5, 12], [6, 6, 6, 6, 6, 6, 6]]),
        make_seq(ids(1), ids(20), repetition_penalty=2.0, presence_penalty=2.0, frequency_penalty=2.0),
    ]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_processors_match_the_direct_computation(seed):
    g = torch.Generator().manual_seed(seed)
    seqs = random_batch(seed)
    logits = torch.randn(len(seqs), 40, generator=g) * 3
    before = logits.clone()
    out = apply_logits_processors(logits, seqs, EOS)
    assert torch.equal(logits, before)  # out of place: the raw logits are still needed for logprobs
    for i, seq in enumerate(seqs):
        ref = reference_process(logits[i], seq)
        assert torch.equal(torch.isinf(out[i]), torch.isinf(ref)), i
        finite = ~torch.isinf(ref)
        torch.testing.assert_close(out[i][finite].double(), ref[finite], rtol=1e-6, atol=1e-5)


def test_each_processor_changes_what_it_should():
    """Small hand-checked cases: the formulas' signs and which tokens they touch."""
    z = torch.tensor([[2.0, -2.0, 1.0, 0.5, 0.0]])
    rep = apply_logits_processors(z, [make_seq([0], [1], repetition_penalty=2.0)], [])
    assert rep.tolist() == [[1.0, -4.0, 1.0, 0.5, 0.0]]  # positive / 2, negative * 2, others untouched
    freq = apply_logits_processors(z, [make_seq([0], [2, 2, 3], frequency_penalty=0.5, presence_penalty=0.25)], [])
    assert freq.tolist() == [[2.0, -2.0, 1.0 - 1.0 - 0.25, 0.5 - 0.5 - 0.25, 0.0]]  # prompt token 0 untouched
    bias = apply_logits_processors(z, [make_seq([0], [], logit_bias={4: -3.0, 0: 1.5})], [])
    assert bias.tolist() == [[3.5, -2.0, 1.0, 0.5, -3.0]]
    allowed = apply_logits_processors(z, [make_seq([0], [], allowed_token_ids=[1, 3])], [])
    assert allowed.tolist() == [[NEG, -2.0, NEG, 0.5, NEG]]


def test_bad_words_ban_the_last_token_after_its_prefix():
    words = [[9], [5, 8], [7, 5, 12]]
    assert bad_words_banned(words, []) == [9]  # a one-token word is always banned
    assert bad_words_banned(words, [1, 5]) == [9, 8]  # "5 8": 8 is banned right after 5
    assert bad_words_banned(words, [5, 1]) == [9]
    assert bad_words_banned(words, [7, 5]) == [9, 8, 12]
    assert bad_words_banned(words, [5]) == [9, 8]  # a prefix longer than the output never matches
    assert bad_words_banned([[6, 6, 6]], [6]) == []


def test_tokenize_bad_words_is_vllms_rule():
    """The word as given, plus its with-a-leading-space spelling when that gives another first token
    and the same length (a word-initial token in the middle of a text)."""

    class SpaceTokenizer:  # "foo" -> [f, o, o]; " foo" -> [SPACE+f, o, o] (one token for " f")
        def encode(self, text, add_special_tokens=False):
            ids, i = [], 0
            while i < len(text):
                if text[i] == " " and i + 1 < len(text):
                    ids.append(100 + ord(text[i + 1]))
                    i += 2
                else:
                    ids.append(ord(text[i]))
                    i += 1
            return ids

    assert tokenize_bad_words(["foo", "  bar"], SpaceTokenizer()) == [
        [102, 111, 111], [202, 111, 111], [98, 97, 114], [198, 97, 114],
    ]  # fmt: skip
    # FakeTokenizer spells " x" as two tokens: the spaced form differs in length and is not added
    assert tokenize_bad_words(["ab"], FakeTokenizer()) == [[0, 1]]


def test_sampler_greedy_is_the_argmax_of_the_processed_logits_and_other_rows_are_untouched():
    g = torch.Generator().manual_seed(7)
    seqs = random_batch(3)
    for s in seqs:
        s.sampling_params.temperature = 0.0
    logits = torch.randn(len(seqs), 40, generator=g) * 3
    ids = Sampler(EOS)(logits, seqs).sampled_token_ids.tolist()
    for i, seq in enumerate(seqs):
        assert ids[i] == int(reference_process(logits[i], seq).argmax()), i
    assert ids[2] == int(logits[2].argmax())  # the row without parameters: its raw argmax


def test_a_batch_without_processors_pays_nothing(monkeypatch):
    """No row uses a processor: the logits come back as the very same tensor, and neither a
    device copy nor a penalty kernel runs."""

    def forbidden(*a, **k):
        raise AssertionError("no row asked for this")

    for name in ("to_device", "ints_to_device", "apply_penalties", "token_counts"):
        monkeypatch.setattr(lp, name, forbidden)
    seqs = [make_seq([3, 4], [5, 5], temperature=0.0), make_seq([1], [], temperature=0.8, top_k=3, min_tokens=0)]
    logits = torch.randn(2, 16)
    assert apply_logits_processors(logits, seqs, EOS) is logits
    assert Sampler(EOS)(logits[:1], seqs[:1]).sampled_token_ids.tolist() == [int(logits[0].argmax())]


def test_penalised_rows_only_are_gathered(monkeypatch):
    """Penalties run on the rows that asked (here 1 of 3), and leave the others bit-identical."""
    seen = []
    real = lp.apply_penalties
    monkeypatch.setattr(lp, "apply_penalties", lambda rows, *a: seen.append(rows.shape) or real(rows, *a))
    seqs = [make_seq([3], [4]), make_seq([3], [4, 4], frequency_penalty=1.0), make_seq([5], [6])]
    logits = torch.randn(3, 10)
    out = apply_logits_processors(logits, seqs, EOS)
    assert seen == [torch.Size([1, 10])]
    assert torch.equal(out[0], logits[0]) and torch.equal(out[2], logits[2])
    assert out[1, 4] == logits[1, 4] - 2.0


# ---- through the engine (FakeRunner: toy logits that the test can recompute) ----------------------
ENGINE_CASES = [
    dict(presence_penalty=1.0, frequency_penalty=0.5),
    dict(repetition_penalty=1.8),
    dict(repetition_penalty=0.5, frequency_penalty=-0.3),
    dict(logit_bias={5: 4.0, 9: 2.5, 11: -100}),
    dict(allowed_token_ids=[2, 5, 7, 13, 20]),
    dict(bad_words=["f", "hi"], presence_penalty=0.4),
    dict(min_tokens=6, stop_token_ids=[4]),
]


@pytest.mark.parametrize("extra", ENGINE_CASES, ids=[",".join(c) for c in ENGINE_CASES])
def test_engine_greedy_tokens_follow_the_direct_computation(extra):
    V = 24
    prompts = {"a": [5, 6, 7, 5], "b": [9, 9], "plain": [3, 4, 8]}
    eng = make_fake_engine(vocab_size=V, eos=EOS)
    params = SamplingParams(temperature=0, max_tokens=14, **extra)
    plain = SamplingParams(temperature=0, max_tokens=14)
    reqs = [(rid, p, params if rid != "plain" else plain) for rid, p in prompts.items()]
    final = run_to_completion(eng, {0: reqs})
    bad_words = tokenize_bad_words(params.bad_words, FakeTokenizer()) if params.bad_words else None
    for rid, prompt, p in reqs:
        seq = make_seq(prompt, [], **{k: v for k, v in vars(p).items() if not k.startswith("_")})
        seq.sampling_params._bad_words_token_ids = bad_words if p is params else None
        expected = []
        for _ in range(len(final[rid].outputs[0].token_ids)):
            z = reference_process(toy_logits(seq.token_ids, V), seq)
            expected.append(int(z.argmax()))
            seq.token_ids.append(expected[-1])
        assert final[rid].outputs[0].token_ids == expected, rid
    if "bad_words" in extra:  # FakeTokenizer: "f" is token 5, "hi" is 7 then 8
        out = final["a"].outputs[0].token_ids
        assert 5 not in out and all(out[i:i + 2] != [7, 8] for i in range(len(out)))


def test_vocabulary_checks_at_add_request():
    eng = make_fake_engine(vocab_size=32)
    for params, field in [
        (SamplingParams(logprobs=33), "logprobs"),
        (SamplingParams(prompt_logprobs=40), "prompt_logprobs"),
        (SamplingParams(logit_bias={32: 1.0}), "logit_bias"),
        (SamplingParams(allowed_token_ids=[0, 31, 32]), "allowed_token_ids"),
    ]:
        with pytest.raises(ValueError) as e:
            eng.add_request("r", [3, 4], params)
        assert str(e.value).startswith(field), str(e.value)
    assert not eng.has_unfinished_requests()
    eng.add_request("ok", [3, 4], SamplingParams(logprobs=32, logit_bias={31: 1.0}, allowed_token_ids=[31]))
