"""The torch.compile peer's static batch of ragged requests (bench/static_batch.py) computes the
same Llama as transformers, row by row.

Each row of the static batch has its own prompt length and position; its logits must match
transformers run on that row alone, at the prefill and at every decode step through the shared
static cache. CPU, float32, a tiny random Llama, the forward checked eagerly (torch.compile only
changes how the same function runs)."""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "bench"))

from random_llama import TINY_LLAMA, make_random_llama  # noqa: E402
from static_batch import StaticBatchLlama, run_static_batch, sample  # noqa: E402


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    make_random_llama(str(path), TINY_LLAMA, device="cpu")
    return str(path)


def test_every_row_matches_transformers_on_that_row_alone(checkpoint):
    from transformers import LlamaForCausalLM

    peer = StaticBatchLlama(checkpoint, max_batch=3, max_seq_len=32, device="cpu", dtype=torch.float32, compile=False)
    ref = LlamaForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(0, 512, (n,), generator=g).tolist() for n in (5, 9, 2)]  # ragged prompts
    with torch.no_grad():
        for r, p in enumerate(rows):  # each prompt into its own cache row
            got = peer.forward_rows(torch.tensor([p]), torch.arange(len(p))[None], row0=r)
            torch.testing.assert_close(got[0], ref(torch.tensor([p])).logits[0, -1], rtol=1e-4, atol=1e-4)
        for step in range(3):  # then the whole batch decodes, each row at its own position
            nxt = torch.randint(0, 512, (3,), generator=g).tolist()
            pos = torch.tensor([[len(p)] for p in rows])
            got = peer.forward_rows(torch.tensor(nxt)[:, None], pos)
            rows = [p + [t] for p, t in zip(rows, nxt)]
            for r, p in enumerate(rows):
                torch.testing.assert_close(got[r], ref(torch.tensor([p])).logits[0, -1], rtol=1e-4, atol=1e-4)


def test_run_static_batch_decodes_until_the_longest_request_is_done(checkpoint):
    peer = StaticBatchLlama(checkpoint, max_batch=4, max_seq_len=32, device="cpu", dtype=torch.float32, compile=False)
    res = run_static_batch(peer, [[1, 2, 3], [4] * 7, [5, 6]], [4, 2, 6], temperature=0.6)
    assert res["decode_steps"] == 5 and res["output_tokens"] == 12 and res["batch"] == 3
    assert 0 < res["prefill_s"] <= res["seconds"]


def test_run_static_batch_refuses_what_its_static_cache_cannot_hold(checkpoint):
    peer = StaticBatchLlama(checkpoint, max_batch=2, max_seq_len=16, device="cpu", dtype=torch.float32, compile=False)
    with pytest.raises(ValueError, match="static batch of 2"):
        run_static_batch(peer, [[1]] * 3, [2] * 3, temperature=0)
    run_static_batch(peer, [[1] * 10], [7], temperature=0)  # positions 0..15: fits exactly
    with pytest.raises(ValueError, match="needs 17 positions"):
        run_static_batch(peer, [[1] * 10], [8], temperature=0)
    # Each request alone fits, but the 10-token prompt keeps decoding until the 8-token output is done.
    with pytest.raises(ValueError, match="needs 17 positions"):
        run_static_batch(peer, [[1] * 10, [1] * 2], [2, 8], temperature=0)


def test_sample_is_argmax_at_temperature_0_and_follows_the_distribution_otherwise():
    logits = torch.tensor([[0.0, 3.0, 1.0], [2.0, 0.0, 0.0]])
    assert sample(logits, 0).tolist() == [1, 0]
    torch.manual_seed(0)
    draws = sample(logits[:1].expand(4000, -1), 1.0)  # 4000 independent draws from row 0
    freq = (draws == 1).float().mean().item()
    want = torch.softmax(logits[0], -1)[1].item()
    assert freq == pytest.approx(want, abs=0.03)
