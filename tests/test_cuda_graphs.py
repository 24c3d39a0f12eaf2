"""Decode through static buffers and captured CUDA graphs gives what the plain eager step gives.

A graph replays one recorded step for every batch it is given: the batch is padded up to a
captured size, its block tables to a captured width, and the inputs go through static
buffers (tinyvllm/engine/cuda_graphs.py). Each of those can go wrong without an error, so
the graph path is held to the eager path step by step: same logits (same greedy tokens in
float32) at batch sizes on and between the captured ones, with sequences joining and
finishing, lengths crossing block boundaries and context buckets, up to the longest
sequence the cache holds.

On CPU the same static-buffer path runs eagerly (``capture=False``): CI checks the padding
and the buffers. On a GPU the graphs are captured and replayed.
"""

from __future__ import annotations

import logging
import random

import pytest
import torch

from fixtures import random_weights, tiny_config_dict
from tinyvllm import SamplingParams
from tinyvllm.config import ModelConfig
from tinyvllm.engine.cuda_graphs import DecodeGraphs, batch_sizes, context_buckets
from tinyvllm.engine.engine_config import EngineConfig
from tinyvllm.engine.model_runner import ModelRunner
from tinyvllm.engine.scheduler import SchedulerOutput
from tinyvllm.engine.sequence import Sequence

BLOCK_SIZE = 8
NUM_BLOCKS = 40  # 320 tokens: the longest sequence
BUCKETS = (32, 128)  # tokens: widths of 4, 16 and 40 blocks
MAX_NUM_SEQS = 12  # captured batch sizes 1, 2, 4, 8, 12
VOCAB = 96

CASES = [pytest.param("cpu", torch.float32, id="cpu-fp32-static-buffers")]
if torch.cuda.is_available():
    CASES += [pytest.param("cuda", torch.float32, id="cuda-fp32-graphs"),
              pytest.param("cuda", torch.bfloat16, id="cuda-bf16-graphs")]


def test_the_ladders():
    assert batch_sizes(1) == [1]
    assert batch_sizes(12) == [1, 2, 4, 8, 12]
    assert batch_sizes(256) == [1, 2, 4, 8] + list(range(16, 257, 16))
    assert batch_sizes(40) == [1, 2, 4, 8, 16, 32, 40]
    assert context_buckets(320, 8, (32, 128)) == [4, 16, 40]
    assert context_buckets(100, 16, (32, 128)) == [2, 7]  # 100 tokens: 7 blocks, the last bucket
    assert context_buckets(131072, 16) == [32, 256, 2048, 8192]


def runners(device: str, dtype: torch.dtype, num_blocks: int = NUM_BLOCKS) -> tuple[ModelRunner, ModelRunner]:
    """Two runners over the same weights: one plain eager, one whose decode goes through DecodeGraphs."""
    config = ModelConfig.from_dict(tiny_config_dict(hidden_size=256, num_attention_heads=4, num_key_value_heads=2,
                                                    vocab_size=VOCAB, max_position_embeddings=512))
    weights = {k: 0.05 * w if w.dim() == 2 else 1 + 0.1 * w for k, w in random_weights(config, seed=3).items()}

    def make(graphs: bool) -> ModelRunner:
        engine_config = EngineConfig(dtype=dtype, device=device, block_size=BLOCK_SIZE, num_kv_blocks=num_blocks,
                                     max_num_seqs=MAX_NUM_SEQS, enforce_eager=True)
        engine_config.fit_model(config)
        runner = ModelRunner(engine_config, config, weights)
        if graphs:
            runner.graphs = DecodeGraphs(runner.model, runner.kv_caches, max_num_seqs=MAX_NUM_SEQS,
                                         max_seq_len=engine_config.max_seq_len, block_size=BLOCK_SIZE,
                                         capture=device == "cuda", buckets=BUCKETS)
        return runner

    return make(False), make(True)


class Pool:
    """Hands out shuffled blocks and grows each sequence's table to cover its tokens."""

    def __init__(self, seed: int, num_blocks: int = NUM_BLOCKS) -> None:
        self.free = list(range(num_blocks))
        random.Random(seed).shuffle(self.free)

    def cover(self, seq: Sequence) -> None:
        while len(seq.block_table) * BLOCK_SIZE < seq.num_tokens:
            seq.block_table.append(self.free.pop())

    def release(self, seq: Sequence) -> None:
        self.free += seq.block_table
        seq.block_table = []


def twin(seq: Sequence) -> Sequence:
    """The same sequence for the other runner (same tokens, same blocks)."""
    other = Sequence(seq.request_id, list(seq.prompt_token_ids), SamplingParams())
    other.block_table = seq.block_table
    return other


def step_both(eager: ModelRunner, graphed: ModelRunner, seqs: list[Sequence], twins: list[Sequence],
              counts: list[int], dtype: torch.dtype) -> list[int]:
    """One step on both runners; their logits must agree. Returns the eager greedy tokens, which both
    sequences then take (teacher forcing: the two runs never drift apart)."""
    a = eager.compute_logits(SchedulerOutput(seqs, counts))
    b = graphed.compute_logits(SchedulerOutput(twins, counts))
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=0.03, atol=0.03)
    torch.testing.assert_close(b, a, **tol)
    tokens = a.argmax(-1).tolist()
    if dtype == torch.float32:
        assert b.argmax(-1).tolist() == tokens
    for s, t, n, tok in zip(seqs, twins, counts, tokens):
        for x in (s, t):
            x.num_computed_tokens += n
            x.token_ids.append(tok)
    return tokens


@pytest.mark.parametrize("device,dtype", CASES)
def test_graph_decode_equals_eager_decode_with_requests_joining_and_finishing(device, dtype):
    """12 requests of ragged prompt lengths arrive and finish at different steps: the decode batch
    runs through sizes 1 to 12 (padded to 2, 4, 8, 12) and widths of 4 and 16 blocks."""
    eager, graphed = runners(device, dtype, num_blocks=160)
    rng = random.Random(0)
    pool = Pool(seed=1, num_blocks=160)
    plan = [(rng.randrange(0, 30), rng.randrange(1, 60), rng.randrange(5, 40)) for _ in range(12)]  # start, prompt, steps
    active: list[tuple[Sequence, Sequence, int]] = []
    shapes = set()
    for step in range(80):
        for i, (start, prompt_len, steps) in enumerate(plan):
            if start == step:  # joins: its prompt is prefilled (the eager prefill path on both runners)
                seq = Sequence(str(i), [rng.randrange(VOCAB) for _ in range(prompt_len)], SamplingParams())
                pool.cover(seq)
                other = twin(seq)
                step_both(eager, graphed, [seq], [other], [prompt_len], dtype)
                active.append((seq, other, step + steps))
        active = [(s, t, end) for s, t, end in active if end > step or pool.release(s)]
        if not active:
            continue
        for s, t, _ in active:
            pool.cover(s)
            t.block_table = s.block_table
        step_both(eager, graphed, [s for s, _, _ in active], [t for _, t, _ in active], [1] * len(active), dtype)
        shapes.add((len(active), max(len(s.block_table) for s, _, _ in active)))
    sizes = {n for n, _ in shapes}
    assert {1, 2, 4} <= sizes and sizes & {3, 5, 6, 7} and sizes & {9, 10, 11}, sizes  # on and between the ladder
    assert {graphed.graphs.shape_for(*shape)[1] for shape in shapes} == {4, 16}, shapes  # two context buckets


@pytest.mark.parametrize("device,dtype", CASES)
def test_graph_decode_is_right_at_every_length_up_to_the_longest(device, dtype):
    """One sequence decoded from 1 token to the cache's 320: every length, every context bucket."""
    eager, graphed = runners(device, dtype)
    pool = Pool(seed=2)
    seq = Sequence("0", [5], SamplingParams())
    other = twin(seq)
    while seq.num_tokens < NUM_BLOCKS * BLOCK_SIZE:
        pool.cover(seq)
        other.block_table = seq.block_table
        step_both(eager, graphed, [seq], [other], [1], dtype)


def test_a_batch_larger_than_every_graph_runs_eagerly():
    eager, graphed = runners("cpu", torch.float32)
    assert graphed.graphs.shape_for(MAX_NUM_SEQS + 1, 1) is None
    assert graphed.graphs.shape_for(5, 17) == (8, 40)
    assert graphed.graphs.shape_for(1, 41) is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_engine_with_graphs_generates_the_eager_engines_tokens(tiny_llama_dir):
    """LLM.generate end to end: 20 requests of ragged prompts and lengths (so the decode batch shrinks
    as they finish), float32, greedy and seeded sampling: the same tokens with CUDA graphs and async
    scheduling (the GPU's default) as with enforce_eager=True and the synchronous engine."""
    from tinyvllm import LLM

    rng = random.Random(3)
    prompts = [{"prompt_token_ids": [rng.randrange(3, 60) for _ in range(rng.randrange(1, 90))]} for _ in range(20)]
    params = [SamplingParams(temperature=0 if i % 3 else 0.8, seed=i, ignore_eos=True, max_tokens=rng.randrange(1, 60))
              for i in range(len(prompts))]
    outs = {}
    for eager, overlap in ((True, False), (False, False), (False, True), (True, True)):
        llm = LLM(str(tiny_llama_dir), dtype="float32", enforce_eager=eager, async_scheduling=overlap, max_num_seqs=16,
                  block_size=16, num_kv_blocks=256)
        assert (llm.llm_engine.model_runner.graphs is None) == eager
        outs[eager, overlap] = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        assert llm.llm_engine.block_manager.num_free_blocks == 256
        del llm
    for key, tokens in outs.items():
        assert tokens == outs[True, False], key
    assert [len(t) for t in outs[False, True]] == [p.max_tokens for p in params]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_startup_logs_where_the_cards_memory_went(tiny_llama_dir, caplog):
    """One line: the weights, the graphs and the KV cache (blocks and tokens)."""
    from tinyvllm import LLM

    with caplog.at_level(logging.INFO, logger="tinyvllm"):
        llm = LLM(str(tiny_llama_dir), max_num_seqs=4, num_kv_blocks=64, block_size=16)
    lines = [r.getMessage() for r in caplog.records if "GPU memory" in r.getMessage()]
    assert len(lines) == 1 and "64 blocks of 16 tokens (1024 tokens" in lines[0], lines
    assert llm.llm_engine.model_runner.graphs.memory_bytes > 0
