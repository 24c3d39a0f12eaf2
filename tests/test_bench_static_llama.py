"""The engine benchmark's torch.compile peer (bench/static_llama.py) computes the same Llama.

A peer is only a fair yardstick if it does the same work: its logits must match transformers'
on the same checkpoint, at the prefill and at every decode step through its static cache.
CPU, float32, a tiny random Llama; the forward is checked eagerly (torch.compile only
changes how the same function runs)."""

import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "bench"))

from bench_e2e import LLAMA_1B, make_random_llama  # noqa: E402
from static_llama import StaticLlama  # noqa: E402

TINY = dict(LLAMA_1B, vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=2048,
            bos_token_id=1, eos_token_id=[2])


def test_static_llama_matches_transformers_at_prefill_and_every_decode_step(tmp_path):
    from transformers import LlamaForCausalLM

    make_random_llama(str(tmp_path), TINY, device="cpu")
    peer = StaticLlama(str(tmp_path), max_batch=2, max_seq_len=32, device="cpu", dtype=torch.float32)
    ref = LlamaForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    ids = torch.randint(0, 512, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = peer.forward(ids, torch.arange(7))
        for step in range(4):
            want = ref(ids).logits[:, -1]
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
            nxt = torch.randint(0, 512, (2, 1), generator=torch.Generator().manual_seed(step + 1))
            ids = torch.cat([ids, nxt], 1)  # teacher-forced: the next token need not be the argmax
            got = peer.forward(nxt, torch.tensor([ids.shape[1] - 1]))
