"""The CPU fast path (tinyvllm/ops/cpu.py) against its specification, the reference ops.

Attention: random caches with the blocks shuffled, ragged lengths (0, one token, block
boundaries, the longest sequence), GQA ratios from 1 to 4, several block sizes and dtypes,
block-table entries past a sequence's length that point nowhere, and a query that is a
row-strided view of a fused qkv output, as the model passes it. The other ops on random
inputs of the model's shapes, on both sides of the oneDNN threshold for linear. The same bad
inputs must raise the same errors. (The engine on this path against transformers:
tests/test_model_vs_transformers.py and tests/test_smollm2.py on CPU.)
"""

from __future__ import annotations

import pytest
import torch

from tinyvllm import ops
from tinyvllm.ops import cpu, reference

SCALE = 0.125
TOL = {torch.float32: dict(atol=2e-6, rtol=2e-6), torch.bfloat16: dict(atol=1e-2, rtol=1e-2),
       torch.float16: dict(atol=2e-3, rtol=2e-3)}  # fmt: skip


def paged_inputs(lens: list[int], heads: int, kv_heads: int, head_dim: int, block_size: int, dtype, seed: int):
    """Caches with shuffled blocks, block tables padded with -1 and out-of-range ids past each length."""
    g = torch.Generator().manual_seed(seed)
    width = max(1, max(-(-n // block_size) for n in lens)) + 1  # one spare column: never read
    num_blocks = len(lens) * width + 3
    shape = (num_blocks, kv_heads, block_size, head_dim)
    key_cache = torch.randn(shape, generator=g).to(dtype)
    value_cache = torch.randn(shape, generator=g).to(dtype)
    perm = torch.randperm(num_blocks, generator=g)
    tables = torch.full((len(lens), width), -1, dtype=torch.int32)
    for i, n in enumerate(lens):
        used = -(-n // block_size)
        tables[i, :used] = perm[i * width : i * width + used].int()
        tables[i, used:] = num_blocks + 7 if i % 2 else -1  # garbage a kernel must not follow
    return key_cache, value_cache, tables


def strided_query(tokens: int, heads: int, kv_heads: int, head_dim: int, dtype, seed: int) -> torch.Tensor:
    """[tokens, heads, head_dim] as a view into a fused [tokens, (heads + 2 * kv_heads) * head_dim] qkv."""
    g = torch.Generator().manual_seed(seed + 1)
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, generator=g).to(dtype)
    return qkv[:, : heads * head_dim].view(tokens, heads, head_dim)


SHAPES = [(4, 4, 64, 16), (8, 2, 64, 16), (9, 3, 64, 16), (8, 2, 128, 32), (4, 1, 32, 1), (6, 2, 16, 4)]


@pytest.mark.parametrize("heads, kv_heads, head_dim, block_size", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_decode_matches_reference(heads, kv_heads, head_dim, block_size, dtype):
    lens = [1, block_size, block_size + 1, 3 * block_size, 0, 37, 2]
    kc, vc, tables = paged_inputs(lens, heads, kv_heads, head_dim, block_size, dtype, seed=heads + block_size)
    q = strided_query(len(lens), heads, kv_heads, head_dim, dtype, seed=head_dim)
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    want = torch.empty(q.shape, dtype=dtype)
    got = torch.empty(q.shape, dtype=dtype)
    reference.paged_attention_decode(want, q, kc, vc, tables, seq_lens, SCALE)
    cpu.paged_attention_decode(got, q, kc, vc, tables, seq_lens, SCALE)
    torch.testing.assert_close(got, want, **TOL[dtype])
    assert got[4].abs().max() == 0  # a sequence with nothing cached attends to nothing


def test_decode_plan_is_shared_by_the_layers_of_a_step_only():
    """Every layer of a step passes the same block_tables and seq_lens: the plan made for the
    first is reused; other tensors, or the same ones edited in place, get a new plan."""
    lens = [3, 17, 9]
    kc, vc, tables = paged_inputs(lens, 4, 2, 16, 4, torch.float32, seed=1)
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    q = torch.randn(3, 4, 16)

    def check(table, seq_lens, kc, vc):
        want, got = torch.empty_like(q), torch.empty_like(q)
        reference.paged_attention_decode(want, q, kc, vc, table, seq_lens, SCALE)
        cpu.paged_attention_decode(got, q, kc, vc, table, seq_lens, SCALE)
        torch.testing.assert_close(got, want, **TOL[torch.float32])

    check(tables, seq_lens, kc, vc)
    check(tables, seq_lens, vc, kc)  # "the next layer": other caches, same plan
    seq_lens[0] = 4  # edited in place: a new plan
    check(tables, seq_lens, kc, vc)
    check(tables.clone(), torch.tensor([1, 2, 3], dtype=torch.int32), kc, vc)  # the next step's new tensors


def test_inference_mode_tensors_work_without_caching():
    """Tensors made under torch.inference_mode have no version counter: nothing is cached for them."""
    with torch.inference_mode():
        lens = [3, 17]
        kc, vc, tables = paged_inputs(lens, 4, 2, 16, 4, torch.float32, seed=2)
        q, seq_lens = torch.randn(2, 4, 16), torch.tensor(lens, dtype=torch.int32)
        want, got = torch.empty_like(q), torch.empty_like(q)
        reference.paged_attention_decode(want, q, kc, vc, tables, seq_lens, SCALE)
        for _ in range(2):
            cpu.paged_attention_decode(got, q, kc, vc, tables, seq_lens, SCALE)
            torch.testing.assert_close(got, want, **TOL[torch.float32])
        x, w = torch.randn(16, 64), torch.randn(256, 64)
        for _ in range(cpu.PACK_AT_USE + 1):
            torch.testing.assert_close(cpu.linear(x, w), x @ w.t(), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("heads, kv_heads, head_dim, block_size", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefill_matches_reference(heads, kv_heads, head_dim, block_size, dtype):
    # (new tokens, cached + new): whole prompts, a cached prefix (chunked prefill / prefix cache),
    # a single token, and a sequence with no new tokens this step.
    runs = [(5, 5), (7, 7 + 2 * block_size), (1, 1), (0, 9), (block_size + 3, block_size + 3), (4, 30)]
    lens = [n for _, n in runs]
    kc, vc, tables = paged_inputs(lens, heads, kv_heads, head_dim, block_size, dtype, seed=7)
    cu = torch.tensor([0] + torch.tensor([q for q, _ in runs]).cumsum(0).tolist(), dtype=torch.int32)
    q = strided_query(int(cu[-1]), heads, kv_heads, head_dim, dtype, seed=3)
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    max_q = max(q_len for q_len, _ in runs)
    want = torch.zeros(q.shape, dtype=dtype)
    got = torch.zeros(q.shape, dtype=dtype)
    reference.prefill_attention(want, q, kc, vc, tables, cu, seq_lens, max_q, SCALE)
    cpu.prefill_attention(got, q, kc, vc, tables, cu, seq_lens, max_q, SCALE)
    torch.testing.assert_close(got, want, **TOL[dtype])


@pytest.mark.parametrize("rows, n", [(1, 96), (1, cpu.ONEDNN_MIN_OUTPUTS), (2, 96), (16, 960), (37, 576), (0, 64)])
def test_linear_matches_reference(rows, n):
    g = torch.Generator().manual_seed(rows + n)
    x, w = torch.randn(rows, 576, generator=g), torch.randn(n, 576, generator=g)
    for _ in range(cpu.PACK_AT_USE + 1):  # before and after the weight is packed
        torch.testing.assert_close(cpu.linear(x, w), reference.linear(x, w), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(cpu.linear(x[:, ::2], w[:, ::2]), reference.linear(x[:, ::2], w[:, ::2]), atol=1e-4, rtol=1e-5)
    half = cpu.linear(x.bfloat16(), w.bfloat16())  # other dtypes: the reference
    assert half.dtype == torch.bfloat16 and torch.equal(half, reference.linear(x.bfloat16(), w.bfloat16()))


def test_linear_packs_a_weight_once_and_again_when_changed_in_place(monkeypatch):
    packs = []
    real = torch.ops.mkldnn._reorder_linear_weight
    monkeypatch.setattr(cpu.torch.ops.mkldnn, "_reorder_linear_weight", lambda w, b: packs.append(1) or real(w, b),
                        raising=False)  # fmt: skip
    x, w = torch.randn(16, 64), torch.randn(1024, 64)
    for _ in range(cpu.PACK_AT_USE + 3):
        torch.testing.assert_close(cpu.linear(x, w), x @ w.t(), atol=1e-4, rtol=1e-5)
    assert len(packs) == 1  # at the PACK_AT_USE-th product, then reused
    w.mul_(-2)  # a packed copy made before must not be used now
    for _ in range(cpu.PACK_AT_USE):
        torch.testing.assert_close(cpu.linear(x, w), x @ w.t(), atol=1e-4, rtol=1e-5)
    assert len(packs) == 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_elementwise_ops_match_reference(dtype):
    g = torch.Generator().manual_seed(0)
    T, hidden, heads, kv_heads, head_dim = 7, 96, 4, 2, 16

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(dtype)

    x, weight = rand(T, hidden), rand(hidden)
    want, got = torch.empty_like(x), torch.empty_like(x)
    reference.rms_norm(want, x, weight, 1e-5)
    cpu.rms_norm(got, x, weight, 1e-5)
    torch.testing.assert_close(got, want, **TOL[dtype])

    pairs = [(rand(T, hidden), rand(T, hidden)) for _ in range(2)]
    pairs[1] = (pairs[0][0].clone(), pairs[0][1].clone())
    reference.fused_add_rms_norm(*pairs[0], weight, 1e-5)
    cpu.fused_add_rms_norm(*pairs[1], weight, 1e-5)
    for a, b in zip(pairs[0], pairs[1]):
        torch.testing.assert_close(b, a, **TOL[dtype])

    gate_up = rand(T, 2 * hidden)
    want, got = torch.empty(T, hidden, dtype=dtype), torch.empty(T, hidden, dtype=dtype)
    reference.silu_and_mul(want, gate_up)
    cpu.silu_and_mul(got, gate_up)
    torch.testing.assert_close(got, want, **TOL[dtype])

    from tinyvllm.model.rope import build_cos_sin_cache

    cos_sin = build_cos_sin_cache(head_dim, 10000.0, 64, None, "cpu")
    positions = torch.tensor([0, 5, 63, 1, 2, 2, 40])
    qkv = rand(T, (heads + 2 * kv_heads) * head_dim)
    views = []
    for t in (qkv.clone(), qkv.clone()):  # q and k as row-strided views of the fused output
        views.append((t[:, : heads * head_dim].view(T, heads, head_dim),
                      t[:, heads * head_dim : (heads + kv_heads) * head_dim].view(T, kv_heads, head_dim), t))  # fmt: skip
    reference.rotary_embedding(positions, *views[0][:2], head_dim, cos_sin)
    cpu.rotary_embedding(positions, *views[1][:2], head_dim, cos_sin)
    torch.testing.assert_close(views[1][2], views[0][2], **TOL[dtype])  # v untouched by both

    caches = [(torch.zeros(6, kv_heads, 4, head_dim, dtype=dtype), torch.zeros(6, kv_heads, 4, head_dim, dtype=dtype))
              for _ in range(2)]  # fmt: skip
    key, value = rand(T, kv_heads, head_dim), rand(T, kv_heads, head_dim)
    for slots in (torch.tensor([3, 0, 23, 9, 4, 17, 8]), torch.tensor([3, -1, 23, -1, 4, 17, 8])):
        reference.reshape_and_cache(key, value, *caches[0], slots)
        cpu.reshape_and_cache(key, value, *caches[1], slots)
        assert torch.equal(caches[0][0], caches[1][0]) and torch.equal(caches[0][1], caches[1][1])


def test_same_errors_as_reference():
    lens = [5, 20]
    kc, vc, tables = paged_inputs(lens, 4, 2, 16, 4, torch.float32, seed=0)
    q = torch.randn(2, 4, 16)
    out = torch.empty_like(q)
    bad = tables.clone()
    bad[1, 2] = kc.shape[0]  # a covered entry outside the cache
    cases = [
        (bad, torch.tensor(lens, dtype=torch.int32), "block_tables: an entry that seq_lens covers"),
        (tables, torch.tensor([5, tables.shape[1] * 4 + 1], dtype=torch.int32), "seq_lens: an entry below 0"),
        (tables, torch.tensor([-1, 20], dtype=torch.int32), "seq_lens: an entry below 0"),
    ]
    for table, seq_lens, words in cases:
        for impl in (reference, cpu):
            with pytest.raises(ValueError, match=words):
                impl.paged_attention_decode(out, q, kc, vc, table, seq_lens, SCALE)
    k = torch.randn(3, 2, 16)
    for impl in (reference, cpu):
        with pytest.raises(ValueError, match="slot_mapping"):
            impl.reshape_and_cache(k, k, kc, vc, torch.tensor([0, 1, kc.shape[0] * 4]))
        with pytest.raises(ValueError, match="positions"):
            impl.rotary_embedding(torch.tensor([0, 64, 1]), torch.randn(3, 4, 16), k.clone(), 16,
                                  torch.randn(64, 16))  # fmt: skip
    qp = torch.randn(25, 4, 16)
    for cu in ([0, 5, 26], [0, 6, 25]):  # a run past the query; a run longer than its sequence
        for impl in (reference, cpu):
            with pytest.raises(ValueError, match="cu_seqlens_q"):
                impl.prefill_attention(torch.empty_like(qp), qp, kc, vc, tables, torch.tensor(cu, dtype=torch.int32),
                                       torch.tensor(lens, dtype=torch.int32), 20, SCALE)


def test_ops_pick_the_cpu_path_unless_the_reference_is_forced(monkeypatch):
    calls = []
    monkeypatch.setattr(cpu, "paged_attention_decode", lambda *a: calls.append("cpu"))
    monkeypatch.setattr(reference, "paged_attention_decode", lambda *a: calls.append("reference"))
    kc, vc, tables = paged_inputs([3], 4, 2, 16, 4, torch.float32, seed=0)
    args = (torch.randn(1, 4, 16), kc, vc, tables, torch.tensor([3], dtype=torch.int32), SCALE)
    monkeypatch.delenv("TINYVLLM_REFERENCE_OPS", raising=False)
    ops.paged_attention_decode(*args)
    monkeypatch.setenv("TINYVLLM_REFERENCE_OPS", "1")
    ops.paged_attention_decode(*args)
    assert calls == ["cpu", "reference"]
