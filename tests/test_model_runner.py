"""The ModelRunner's two input builders and its step, on a tiny random Llama.

prepare_decode (one token per sequence: the CUDA-graph step) and prepare_prefill (any
number) are two constructions of the same thing; on a decode batch they must give the same
device inputs and the same logits. The layouts themselves (hand-computed slots, padded
block tables, query offsets) are pinned in test_model_vs_transformers.py::test_prepare_inputs_layout,
and the logits against transformers there too.
"""

from __future__ import annotations

import random

import pytest
import torch

from fixtures import random_weights, tiny_config_dict
from tinyvllm import SamplingParams
from tinyvllm.config import ModelConfig
from tinyvllm.engine.engine_config import EngineConfig
from tinyvllm.engine.model_runner import ModelRunner
from tinyvllm.engine.scheduler import SchedulerOutput
from tinyvllm.engine.sequence import Sequence

DEVICES = [pytest.param("cpu", torch.float32, id="cpu-fp32")]
if torch.cuda.is_available():
    DEVICES.append(pytest.param("cuda", torch.bfloat16, id="cuda-bf16"))
BLOCK_SIZE = 8  # the smallest block the CUDA kernels take
NUM_BLOCKS = 64


def tiny_runner(device: str, dtype: torch.dtype) -> ModelRunner:
    """head_dim 64 (a size the CUDA kernels support), GQA 2:1, random weights scaled as a trained
    model's are (matrices std 0.05, norms near 1), so that logits are O(1) and bf16 noise small."""
    config = ModelConfig.from_dict(tiny_config_dict(hidden_size=256, num_attention_heads=4, num_key_value_heads=2))
    weights = {k: 0.05 * w if w.dim() == 2 else 1 + 0.1 * w for k, w in random_weights(config, seed=3).items()}
    engine_config = EngineConfig(dtype=dtype, device=device, block_size=BLOCK_SIZE, num_kv_blocks=NUM_BLOCKS)
    engine_config.fit_model(config)
    return ModelRunner(engine_config, config, weights)


def decode_batch(seed: int = 0) -> list[Sequence]:
    """Ragged sequences (lengths around block boundaries) whose last token is new, each in its
    own shuffled, non-contiguous blocks."""
    rng = random.Random(seed)
    free = list(range(NUM_BLOCKS))
    rng.shuffle(free)
    seqs = []
    for i, n in enumerate([1, 7, 8, 9, 16, 17, 30]):
        seq = Sequence(str(i), [rng.randrange(96) for _ in range(n)], SamplingParams())
        seq.num_computed_tokens = n - 1
        seq.block_table = [free.pop() for _ in range(-(-n // BLOCK_SIZE))]
        seqs.append(seq)
    return seqs


@pytest.mark.parametrize("device,dtype", DEVICES)
def test_prepare_decode_and_prepare_prefill_agree_on_a_decode_batch(device, dtype):
    runner = tiny_runner(device, dtype)
    seqs = decode_batch()
    ids_d, pos_d, attn_d = runner.prepare_decode(seqs)
    ids_p, pos_p, attn_p = runner.prepare_prefill(seqs, [1] * len(seqs))
    assert not attn_d.is_prefill and attn_p.is_prefill
    for a, b in [(ids_d, ids_p), (pos_d, pos_p), (attn_d.slot_mapping, attn_p.slot_mapping),
                 (attn_d.block_tables, attn_p.block_tables), (attn_d.seq_lens, attn_p.seq_lens)]:  # fmt: skip
        assert a.dtype == b.dtype and a.device.type == device and torch.equal(a, b)
    assert attn_d.sum_seq_lens == attn_p.sum_seq_lens == sum(s.num_tokens for s in seqs)
    assert attn_p.logits_indices.tolist() == list(range(len(seqs)))  # one row each: row s is sequence s

    # Through the model: the decode attention and the prefill attention give the same logits.
    # (Both write the same k/v into the same slots, so the second run sees the same cache.)
    prefix = [s for s in seqs if s.num_tokens > 1]
    for s in prefix:
        s.num_computed_tokens = 0
    runner.compute_logits(SchedulerOutput(prefix, [s.num_tokens - 1 for s in prefix]))  # all but the last tokens
    for s in prefix:
        s.num_computed_tokens = s.num_tokens - 1
    decode = runner.run_model(*runner.prepare_decode(seqs))
    prefill = runner.run_model(*runner.prepare_prefill(seqs, [1] * len(seqs)))
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=0.05, atol=0.05)
    torch.testing.assert_close(decode, prefill, **tol)
    assert decode.shape == (len(seqs), 96) and decode.dtype == torch.float32


def test_compute_logits_takes_the_decode_path_when_every_sequence_brings_one_token(monkeypatch):
    """The runner reads num_scheduled_tokens: all ones is a decode (even a prefill step of one-token
    prompts), anything else a prefill of exactly the scheduled tokens."""
    runner = tiny_runner("cpu", torch.float32)
    calls = []

    def recorded(name):
        real = getattr(runner, name)

        def prepare(seqs, *counts):
            calls.append((name, *counts))
            return real(seqs, *counts)

        return prepare

    for name in ("prepare_decode", "prepare_prefill"):
        monkeypatch.setattr(runner, name, recorded(name))
    seqs = decode_batch()
    for s in seqs:
        s.num_computed_tokens = 0
    runner.compute_logits(SchedulerOutput(seqs[:1], [1]))  # a one-token prompt
    runner.compute_logits(SchedulerOutput(seqs[1:3], [7, 8]))  # two prompts
    assert [c[0] for c in calls] == ["prepare_decode", "prepare_prefill"] and calls[1][1] == [7, 8]
    with pytest.raises(ValueError, match="at least one sequence"):
        runner.compute_logits(SchedulerOutput())


def test_execute_samples_one_token_per_sequence_as_python_ints():
    """execute = logits, sampling, one copy to the host: greedy ids equal the logits' argmax."""
    runner = tiny_runner("cpu", torch.float32)
    seqs = decode_batch()[1:4]
    for s in seqs:
        s.num_computed_tokens = 0
        s.sampling_params = SamplingParams(temperature=0)
    out = SchedulerOutput(seqs, [s.num_tokens for s in seqs])
    logits = runner.compute_logits(out)
    token_ids = runner.execute(out).sampled_token_ids  # recomputes the same k/v into the same slots
    assert token_ids == logits.argmax(-1).tolist() and all(type(t) is int for t in token_ids)


def test_flatten_block_tables_pads_each_row():
    from tinyvllm.model.attention_metadata import flatten_block_tables

    assert flatten_block_tables([[3, 4], [5], []], 3) == [3, 4, 0, 5, 0, 0, 0, 0, 0]
    assert flatten_block_tables([[7]], 2) == [7, 0]
