import math

import pytest
import torch

from tinyvllm import SamplingParams
from tinyvllm.engine.sampler import Sampler, apply_min_p, apply_top_k_top_p, sample
from tinyvllm.engine.sequence import Sequence

NEG = float("-inf")


def ref_keep_top_k(row: list[float], k: int) -> set[int]:
    if k <= 0:
        return set(range(len(row)))
    kth = sorted(row, reverse=True)[min(k, len(row)) - 1]  # k > vocab keeps everything
    return {i for i, x in enumerate(row) if x >= kth}


def ref_keep_top_p(row: list[float], p: float) -> set[int]:
    """Smallest set of most-likely tokens whose mass reaches p (mass strictly before a token < p)."""
    m = max(x for x in row if x != NEG)
    e = [math.exp(x - m) if x != NEG else 0.0 for x in row]
    z = sum(e)
    order = sorted(range(len(row)), key=lambda i: -row[i])
    keep, before = set(), 0.0
    for i in order:
        if e[i] == 0.0:
            break
        if before < p or not keep:
            keep.add(i)
        before += e[i] / z
    return keep


def ref_keep_min_p(row: list[float], min_p: float) -> set[int]:
    m = max(row)
    probs = [math.exp(x - m) for x in row]
    z = sum(probs)
    probs = [q / z for q in probs]
    return {i for i, q in enumerate(probs) if q >= min_p * max(probs)}


def kept(t: torch.Tensor) -> list[set[int]]:
    return [set(torch.nonzero(r != NEG).flatten().tolist()) for r in t]


def test_greedy_is_argmax():
    torch.manual_seed(0)
    logits = torch.randn(7, 100)
    ids = sample(logits, temperature=[0.0] * 7)
    assert torch.equal(ids, logits.argmax(-1))


def test_mixed_batch_greedy_rows_still_argmax():
    torch.manual_seed(1)
    logits = torch.randn(6, 50)
    temps = [0.0, 1.0, 0.0, 2.0, 0.0, 0.7]
    g = torch.Generator().manual_seed(0)
    ids = sample(logits, temperature=temps, top_k=[0, 5, 3, 0, 0, 2], top_p=[1.0, 0.5, 0.3, 1.0, 0.9, 1.0],
                 min_p=[0.0, 0.1, 0.5, 0.0, 0.0, 0.0], default_generator=g)
    for i, t in enumerate(temps):
        if t == 0.0:
            assert ids[i] == logits[i].argmax()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_top_k_top_p_masks_match_reference(seed):
    g = torch.Generator().manual_seed(seed)
    B, V = 16, 40
    logits = torch.randn(B, V, generator=g) * 2
    logits[0, :5] = 10.0  # five tied top tokens: top_k=3 keeps all five (threshold rule)
    ks = [3, 1, 3, 5, 7, 40, 50, 2, 0, 10, 1, 4, 6, 8, 0, 3]
    ps = [1.0, 0.5, 0.9, 0.2, 0.99, 0.6, 0.05, 1.0, 0.3, 0.75, 1.0, 0.95, 0.4, 0.8, 0.1, 1.0]
    out = apply_top_k_top_p(logits, torch.tensor(ks), torch.tensor(ps))
    for i, row in enumerate(kept(out)):
        r = logits[i].double().tolist()
        after_k = [x if j in ref_keep_top_k(r, ks[i]) else NEG for j, x in enumerate(r)]
        assert row == ref_keep_top_p(after_k, ps[i]), i
    # surviving values are unchanged
    assert torch.equal(out[out != NEG], logits[out != NEG])
    # top-k only / top-p only
    assert kept(apply_top_k_top_p(logits, torch.tensor(ks), None)) == [
        ref_keep_top_k(logits[i].tolist(), ks[i]) for i in range(B)
    ]
    assert kept(apply_top_k_top_p(logits, None, torch.tensor(ps))) == [
        ref_keep_top_p(logits[i].double().tolist(), ps[i]) for i in range(B)
    ]
    assert kept(apply_top_k_top_p(logits, torch.tensor(ks), None))[0] == set(range(5))


def test_min_p_mask_matches_reference():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(8, 30, generator=g) * 3
    mps = [0.0, 0.01, 0.05, 0.1, 0.3, 0.5, 0.9, 1.0]
    out = apply_min_p(logits, torch.tensor(mps))
    for i, row in enumerate(kept(out)):
        assert row == ref_keep_min_p(logits[i].double().tolist(), mps[i]), i


def test_samples_only_from_kept_tokens():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 20, generator=g).repeat(2000, 1)
    ids = sample(logits, temperature=[1.5] * 2000, top_k=[4] * 2000, default_generator=g)
    assert set(ids.tolist()) == set(logits[0].topk(4).indices.tolist())  # all 4 seen, nothing else
    ids = sample(logits, temperature=[1.0] * 2000, top_p=[0.5] * 2000, default_generator=g)
    assert set(ids.tolist()) == ref_keep_top_p(logits[0].double().tolist(), 0.5)


def chi2(counts: torch.Tensor, probs: torch.Tensor) -> float:
    n = counts.sum().item()
    exp = probs * n
    return float(((counts - exp) ** 2 / exp).sum())


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_temperature_distribution(temperature):
    # Sampling N rows of the same logits must follow softmax(logits / T). chi-square with
    # V-1 = 5 degrees of freedom: the 99.9th percentile is 20.5. The wrong temperature must fail.
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -0.5, -1.0])
    N = 20000
    g = torch.Generator().manual_seed(1234)
    ids = sample(logits.repeat(N, 1), temperature=[temperature] * N, default_generator=g)
    counts = torch.bincount(ids, minlength=6).double()
    right = torch.softmax(logits.double() / temperature, -1)
    wrong = torch.softmax(logits.double() / (temperature * 1.25), -1)
    assert chi2(counts, right) < 20.5
    assert chi2(counts, wrong) > 20.5


def test_seeded_rows_reproducible_and_batch_independent():
    g = torch.Generator().manual_seed(0)
    V = 1000
    logits = torch.randn(4, V, generator=g)

    def draw(rows, seeds, default_seed):
        gens = [torch.Generator().manual_seed(s) if s is not None else None for s in seeds]
        dg = torch.Generator().manual_seed(default_seed)
        return [
            sample(logits[rows], temperature=[1.0] * len(rows), generators=gens, default_generator=dg).tolist()
            for _ in range(5)
        ]

    alone = [step[0] for step in draw([2], [42], 0)]
    mixed = [step[1] for step in draw([0, 2, 3], [None, 42, 7], 99)]
    assert alone == mixed
    assert alone == [step[0] for step in draw([2], [42], 5)]  # the default generator does not matter
    assert alone != [step[0] for step in draw([2], [43], 0)]  # another seed, other tokens


def test_sampler_bans_eos_and_stop_ids_before_min_tokens():
    V = 10
    logits = torch.zeros(3, V)
    logits[:, 1] = 100.0  # eos is by far the most likely
    logits[:, 2] = 50.0  # then a stop token id
    seqs = [
        Sequence("a", [5], SamplingParams(temperature=0, min_tokens=3, stop_token_ids=[2])),
        Sequence("b", [5], SamplingParams(temperature=0, min_tokens=3, ignore_eos=True)),
        Sequence("c", [5, 6, 6, 6], SamplingParams(temperature=0, min_tokens=3)),
    ]
    seqs[2].prompt_token_ids = [5]  # three tokens generated already
    ids = Sampler([1])(logits, seqs).sampled_token_ids.tolist()
    assert ids == [0, 1, 1]  # a: eos and 2 banned; b: ignore_eos, eos not banned; c: past min_tokens


def test_shared_plain_params_take_a_shortcut_with_the_same_tokens(monkeypatch):
    """A batch whose rows share plain params (greedy, or sampling with one temperature and top-k/p)
    skips the per-row lists; a row with a processor (here a logit bias) sends the whole batch the
    long way. Both give the same tokens, the random ones from the same generator state."""
    import tinyvllm.engine.sampler as sampler_module

    torch.manual_seed(0)
    logits = torch.randn(64, 300)
    cases = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.7),
             SamplingParams(temperature=1.3, top_k=20, top_p=0.9, min_p=0.05)]  # fmt: skip
    fast = {}
    for i, params in enumerate(cases):
        fast[i] = Sampler(seed=5)(logits, [Sequence(str(j), [1, 2, 3], params) for j in range(64)]).sampled_token_ids
    biased = SamplingParams(temperature=0.0, logit_bias={7: 100.0})
    greedy_seqs = [Sequence(str(j), [1, 2, 3], cases[0]) for j in range(63)] + [Sequence("b", [1, 2, 3], biased)]
    fast_biased = Sampler()(logits, greedy_seqs).sampled_token_ids
    assert torch.equal(fast[0], logits.argmax(dim=-1))
    assert fast_biased[-1].item() == 7 and torch.equal(fast_biased[:-1], fast[0][:-1])
    monkeypatch.setattr(sampler_module, "_plain", lambda p: False)  # every batch the long way
    for i, params in enumerate(cases):
        slow = Sampler(seed=5)(logits, [Sequence(str(j), [1, 2, 3], params) for j in range(64)]).sampled_token_ids
        assert torch.equal(fast[i], slow), params
    assert not torch.equal(fast[1], fast[0])  # (the sampled case really sampled)
