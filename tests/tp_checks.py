"""Checks run inside tensor-parallel ranks (spawned by tests/test_tensor_parallel.py, or by torchrun:
``torchrun --nproc-per-node 2 tests/tp_checks.py``). Not collected by pytest (no test_ prefix).

Each rank builds the same random full weights (same seed), keeps its slice, and compares the
parallel result with the unsharded torch reference computed on the same rank.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))  # fixtures, under torchrun

ATOL = 1e-5


def check_collectives(rank: int, world: int) -> None:
    from tinyvllm.distributed import (broadcast_step_header, tensor_model_parallel_all_gather,
                                      tensor_model_parallel_all_reduce, tensor_model_parallel_gather)

    x = torch.full((2, 3), float(rank + 1))
    assert torch.equal(tensor_model_parallel_all_reduce(x.clone()), torch.full((2, 3), float(sum(range(1, world + 1)))))
    g = tensor_model_parallel_all_gather(x, dim=-1)
    assert torch.equal(g, torch.cat([torch.full((2, 3), float(r + 1)) for r in range(world)], dim=-1))
    g0 = tensor_model_parallel_gather(x, dst=0, dim=0)
    assert (g0 is None) == (rank != 0)
    if rank == 0:
        assert torch.equal(g0, torch.cat([torch.full((2, 3), float(r + 1)) for r in range(world)], dim=0))
    header = broadcast_step_header([7, 11, 13] if rank == 0 else None)
    assert header[:4] == [7, 11, 13, 0], header


def check_parallel_layers(rank: int, world: int) -> None:
    """Column, row, vocab embedding and lm_head against the unsharded reference; odd sizes."""
    from tinyvllm.model.parallel_layers import (ColumnParallelLinear, ParallelLMHead, RowParallelLinear,
                                                VocabParallelEmbedding, vocab_range)
    from tinyvllm.distributed import tensor_model_parallel_all_gather

    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 7, generator=g)
    # Column: out 6 = 3 per rank, in 7.
    w, b = torch.randn(6, 7, generator=g), torch.randn(6, generator=g)
    per = 6 // world
    col = ColumnParallelLinear(w[rank * per:(rank + 1) * per], b[rank * per:(rank + 1) * per])
    y = col(x)
    torch.testing.assert_close(y, (x @ w.T + b)[:, rank * per:(rank + 1) * per], atol=ATOL, rtol=0)
    torch.testing.assert_close(tensor_model_parallel_all_gather(y), x @ w.T + b, atol=ATOL, rtol=0)
    # Row: in 6 (the column layer's output), out 5; the bias is added once, after the all-reduce.
    w2, b2 = torch.randn(5, 6, generator=g), torch.randn(5, generator=g)
    row = RowParallelLinear(w2[:, rank * per:(rank + 1) * per], b2, tp_size=world)
    torch.testing.assert_close(row(y), (x @ w.T + b) @ w2.T + b2, atol=ATOL, rtol=0)
    # Vocab-parallel embedding and lm_head over an odd vocabulary (11 rows: 6 + 5, padded to 6 + 6).
    table = torch.randn(11, 5, generator=g)
    start, end, _ = vocab_range(11, rank, world)
    emb = VocabParallelEmbedding(table[start:end], 11, rank, world)
    ids = torch.tensor([0, 10, 5, 6, 3, 10])
    torch.testing.assert_close(emb(ids), F.embedding(ids, table), atol=0, rtol=0)
    h = torch.randn(4, 5, generator=g)
    logits = ParallelLMHead(emb.weight, 11, world).compute_logits(h)
    if rank == 0:
        torch.testing.assert_close(logits, (h @ table.T).float(), atol=ATOL, rtol=0)
    else:
        assert logits is None


def _prefill(model, ids: torch.Tensor, block_size: int = 4) -> torch.Tensor:
    """One sequence's prefill through ``model`` with a fresh paged cache: the last token's logits."""
    from tinyvllm.model.attention_metadata import AttentionMetadata

    T = ids.numel()
    nb = -(-T // block_size)
    shape = (nb, model.num_kv_heads, block_size, model.head_dim)
    caches = [(torch.zeros(shape), torch.zeros(shape)) for _ in range(model.num_layers)]
    attn = AttentionMetadata(
        is_prefill=True, slot_mapping=torch.arange(T), block_tables=torch.arange(nb, dtype=torch.int32)[None],
        seq_lens=torch.tensor([T], dtype=torch.int32), max_seqlen_q=T,
        cu_seqlens_q=torch.tensor([0, T], dtype=torch.int32), logits_indices=torch.tensor([T - 1]), sum_seq_lens=T,
    )
    hidden = model.forward(ids, torch.arange(T), caches, attn)
    return model.compute_logits(hidden.index_select(0, attn.logits_indices))


def check_sharded_model(rank: int, world: int) -> None:
    """The whole tiny model at tp = world against tp = 1, sliced by the loader's rules: KV heads split
    (2 KV heads) and replicated (1 KV head), biases, tied and untied embeddings, an odd vocabulary."""
    from fixtures import random_weights, tiny_config_dict
    from tinyvllm.config import ModelConfig
    from tinyvllm.model.llama import LlamaForCausalLM
    from tinyvllm.model.weight_sharding import shard_spec, slice_tensor

    for overrides in ({}, {"num_key_value_heads": 1, "attention_bias": True, "mlp_bias": True, "vocab_size": 97},
                      {"tie_word_embeddings": True, "vocab_size": 95}):
        config = ModelConfig.from_dict(tiny_config_dict(**overrides))
        full = random_weights(config, seed=1)
        shards = {n: slice_tensor(w, shard_spec(n, config, rank, world)).clone() for n, w in full.items()}
        ids = torch.tensor([3, 1, 4, 1, 5, 9, 2, 6, 5])
        ref = _prefill(LlamaForCausalLM(config, full, torch.float32, "cpu"), ids)
        got = _prefill(LlamaForCausalLM(config, shards, torch.float32, "cpu", tp_rank=rank, tp_size=world), ids)
        if rank == 0:
            torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4, msg=lambda m: f"{overrides}: {m}")
        else:
            assert got is None


def run_all(rank: int, world: int) -> None:
    check_collectives(rank, world)
    check_parallel_layers(rank, world)
    check_sharded_model(rank, world)


def spawned(rank: int, world: int, port: int) -> None:
    """mp.spawn's entry: explicit rank / world / port (tcp://) initialisation."""
    from tinyvllm.distributed import destroy_distributed_environment, init_distributed_environment

    tp = init_distributed_environment(world, rank, f"tcp://127.0.0.1:{port}", backend="gloo")
    assert (tp.rank, tp.world_size, tp.backend) == (rank, world, "gloo")
    try:
        run_all(rank, world)
    finally:
        destroy_distributed_environment()


if __name__ == "__main__":  # torchrun: env:// initialisation
    from tinyvllm.distributed import (destroy_distributed_environment, get_tensor_model_parallel_rank,
                                      get_tensor_model_parallel_world_size, init_distributed_environment)

    init_distributed_environment(backend="gloo")
    rank, world = get_tensor_model_parallel_rank(), get_tensor_model_parallel_world_size()
    run_all(rank, world)
    destroy_distributed_environment()
    print(f"rank {rank} of {world}: OK")
