"""The decode plan (csrc/attention/decode_plan.cpp): which kernel, how many splits, how many
warps per block and blocks per SM the decode op picks for a batch, on this GPU.

Each rule was measured (bench/results/README.md); these tests pin what the plan does where
the rule says so, through tinyvllm._C.decode_plan (attention_helpers.decode_plan), and on a
132-SM GPU (H100/H200 SXM) at the measured shapes. Where a test also runs the kernel, it
checks that the plan's launch computes what the reference does.

The first tests run everywhere (CI has nvcc but no GPU); the GPU tests skip without a GPU or
without the built extension (`pip install -e .`).
Run:  pytest tests/test_decode_plan.py -q
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from attention_helpers import decode_plan, head_per_warp_pays, llama_plan, needs_kernels
from tinyvllm.ops._kernels import extension_loaded


# ---- the plan as a function of the extension (the first two run without a GPU) ----
def test_decode_plan_says_what_it_needs():
    # Runs everywhere: without the extension, or with it but without a GPU tensor, the
    # tests' plan query fails with a message that names what is missing.
    q = torch.empty(4, 32, 64, dtype=torch.bfloat16)
    match = "query must be a CUDA tensor" if extension_loaded() else "needs the compiled extension"
    with pytest.raises(RuntimeError, match=match):
        decode_plan(q, 8, 1024)


@pytest.mark.skipif(not extension_loaded(), reason="extension not built")
def test_decode_plan_is_a_function_of_the_extension_not_an_op():
    # tinyvllm._C.decode_plan (for tests and benchmarks): checks its arguments before it asks
    # the GPU, and without one says that it needs one. The op namespace has no plan.
    from tinyvllm import _C

    assert not hasattr(torch.ops.tinyvllm, "paged_attention_decode_plan")
    args = [96, 32, 8, 64, 1024, -1, "bfloat16", -1]
    for i, bad, words in ((7, 2, r"impl=2 \(tensor cores with TMA loads\) is no longer"), (7, 5, "impl must be -1"),
                          (6, "int8", "dtype_name must be"), (2, 5, "multiple of num_kv_heads"),
                          (3, 80, "head_dim must be 64 or 128"), (5, 96 * 1024 + 1, "sum_seq_lens must be")):
        with pytest.raises(RuntimeError, match=words):
            _C.decode_plan(*args[:i], bad, *args[i + 1:])
    if torch.cuda.is_available():
        assert _C.decode_plan(*args)["warps"] == 4
    else:
        with pytest.raises(RuntimeError, match="decode_plan needs a CUDA GPU"):
            _C.decode_plan(*args)


@needs_kernels
def test_decode_plan_works_in_a_fresh_interpreter():
    # tinyvllm._C.decode_plan works in a fresh interpreter (importing the module loads what it needs).
    code = ("from tinyvllm import _C; p = _C.decode_plan(96, 32, 8, 64, 1024, -1, 'bfloat16', -1); "
            "print(p['num_splits'], p['warps'], p['blocks_per_sm'] > 0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["1", "4", "True"], out


# ---- the plan's rules (GPU) ----
def wave_units(blocks: int, per_sm: int, sms: int) -> int:
    # The plan's model (decode_plan.cpp, "Blocks per SM"): one wave spreads over every
    # SM; past it, each partial wave costs per_sm units on the SMs that took it.
    slots = per_sm * sms
    if blocks <= slots:
        return -(-blocks // sms)
    return blocks // slots * per_sm + (per_sm if blocks % slots else 0)


@needs_kernels
@pytest.mark.parametrize("head_dim", [64, 128])
def test_decode_plan_holds_blocks_per_sm_down_where_that_saves_a_wave(head_dim):
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    fit = llama_plan(4 * sms, 1024, head_dim)["blocks_per_sm"]  # past two waves: what fits
    assert llama_plan(sms // 8 * fit, 1024, head_dim)["blocks_per_sm"] == fit  # one wave
    held = 0
    for batch in range(fit * sms // 8 + 1, 2 * fit * sms // 8):  # 8 kv heads: 8 blocks per sequence
        plan = llama_plan(batch, 1024, head_dim)
        assert plan["num_splits"] == 1 and plan["warps"] == 4, plan
        blocks = 8 * batch
        expected = fit
        for r in range(fit - 1, max(2, fit - 2) - 1, -1):
            if fit > 2 and wave_units(blocks, r, sms) < wave_units(blocks, expected, sms):
                expected = r
        assert plan["blocks_per_sm"] == expected, (batch, plan)
        # 512-1023 tokens: only if the model promises at least a fifth less time
        short = llama_plan(batch, 512, head_dim)["blocks_per_sm"]
        promised = 5 * wave_units(blocks, expected, sms) <= 4 * wave_units(blocks, fit, sms)
        assert short == (expected if promised else fit), (batch, short)
        if expected < fit:
            held += 1
            # held down by asking for more shared memory than the kernel uses
            assert plan["smem_bytes"] > llama_plan(4 * sms, 1024, head_dim)["smem_bytes"], plan
        # short contexts keep every block that fits: their blocks are mostly start-up
        assert llama_plan(batch, 256, head_dim)["blocks_per_sm"] == fit
    if sms == 132 and head_dim == 64:  # H100 / H200 SXM: the shapes measured for the rule
        assert fit == 5 and held > 0
        assert [llama_plan(b, 1024)["blocks_per_sm"] for b in (64, 96, 128, 256)] == [5, 3, 4, 5]
        assert llama_plan(96, 1024)["smem_bytes"] == 76800


@needs_kernels
def test_decode_plan_gives_each_warp_a_kv_head_at_one_full_wave_of_equal_lengths():
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    q = torch.empty(4 * sms, 32, 64, device="cuda", dtype=torch.bfloat16)
    fit = decode_plan(q, 8, 1024, impl=3)["blocks_per_sm"]
    chosen = []
    for batch in range(sms, fit * sms // 2 + 3):  # 8 kv heads: 2 blocks per sequence
        for tokens in (128, 2048):
            plan = llama_plan(batch, tokens, sum_seq_lens=batch * tokens)
            assert plan["head_per_warp"] == head_per_warp_pays(batch, sms, fit), (batch, tokens, plan)
        if plan["head_per_warp"]:
            chosen.append(batch)
            assert plan["num_splits"] == 1 and plan["warps"] == 4 and plan["partition_size"] >= 2048, plan
        # Past 2048 tokens the fixed cost it saves no longer pays for its slower stream.
        assert not llama_plan(batch, 2049, sum_seq_lens=batch * 2049)["head_per_warp"]
    assert chosen, "no batch of Llama heads gives each warp a kv head on this GPU"
    for batch in chosen[:: max(1, len(chosen) // 4)]:
        # Only with the word that the lengths are about equal, only automatically, only at
        # head_dim 64 (where it was measured).
        assert not llama_plan(batch, 1024)["head_per_warp"]
        assert not llama_plan(batch, 1024, sum_seq_lens=batch * 1024 * 3 // 4)["head_per_warp"]
        assert not llama_plan(batch, 1024, head_dim=128, sum_seq_lens=batch * 1024)["head_per_warp"]
        q1 = torch.empty(batch, 32, 64, device="cuda", dtype=torch.bfloat16)
        assert not decode_plan(q1, 8, 1024, impl=1, sum_seq_lens=batch * 1024)["head_per_warp"]
    # impl 3 forces it anywhere, and splits only where fewer than 2 blocks per SM would be left.
    few = decode_plan(torch.empty(8, 32, 64, device="cuda", dtype=torch.bfloat16), 8, 4096, impl=3)
    assert few["head_per_warp"] and few["num_splits"] > 1, few
    many = decode_plan(torch.empty(sms, 32, 64, device="cuda", dtype=torch.bfloat16), 8, 4096, impl=3)
    assert many["head_per_warp"] and many["num_splits"] == 1, many
    if sms == 132:  # H100 / H200 SXM: the measured shapes
        assert fit == 5
        assert chosen == [*range(182, 199), *range(248, 265), *range(314, 331)]


@needs_kernels
def test_decode_plan_checks_its_arguments():
    q = torch.empty(4, 32, 64, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="multiple of num_kv_heads"):
        decode_plan(q, 5, 1024)
    with pytest.raises(RuntimeError, match="head_dim must be 64 or 128"):
        decode_plan(torch.empty(4, 32, 80, device="cuda", dtype=torch.bfloat16), 8, 1024)
    with pytest.raises(RuntimeError, match="impl must be"):
        decode_plan(q, 8, 1024, impl=4)
    with pytest.raises(RuntimeError, match="impl=2 .* no longer"):
        decode_plan(q, 8, 1024, impl=2)
    with pytest.raises(RuntimeError, match=r"impl=0 \(CUDA cores\) runs float32 caches only"):
        decode_plan(q, 8, 1024, impl=0)
    assert not decode_plan(q.float(), 8, 1024)["tensor_cores"]  # float32 caches: the CUDA-core kernel
    for impossible in (-2, 4 * 1024 + 1):  # 4 sequences of at most 1024 tokens
        with pytest.raises(RuntimeError, match="sum_seq_lens must be -1 .* between 0 and num_seqs x max_seq_len"):
            decode_plan(q, 8, 1024, sum_seq_lens=impossible)


@needs_kernels
@pytest.mark.parametrize("head_dim", [64, 128])
def test_decode_plan_does_not_split_equal_lengths_with_two_blocks_per_sm(head_dim):
    # From 2 (head_dim 64) or 2.5 (128) 4-warp blocks per SM on, a batch of about equal
    # lengths (mean >= 4/5 of the table's capacity, known from sum_seq_lens) runs one block
    # per (sequence, kv head). Without the sum, or with one long sequence among short ones,
    # the plan cannot rule out a long sequence whose blocks would run alone at the end,
    # and keeps what it had.
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    tokens, changed = 4096, 0
    first = -(-(4 if head_dim == 64 else 5) * sms // 16)  # 8 kv heads: 8 blocks per sequence
    for batch in range(first, 4 * sms // 8 + 1):
        blind = llama_plan(batch, tokens, head_dim)
        equal = llama_plan(batch, tokens, head_dim, sum_seq_lens=batch * tokens)
        assert equal["num_splits"] == 1 and equal["warps"] == 4, (batch, equal)
        edge = -(-4 * batch * tokens // 5)  # the smallest sum whose mean is 4/5 of the capacity
        assert llama_plan(batch, tokens, head_dim, sum_seq_lens=edge) == equal
        assert llama_plan(batch, tokens, head_dim, sum_seq_lens=edge - 1) == blind
        # One long sequence among short ones (mean under a third of the longest): the
        # skewed rule cuts it into 4-warp pieces of at most twice the mean (no wide blocks).
        skewed = llama_plan(batch, tokens, head_dim, sum_seq_lens=tokens + (batch - 1) * 1024)
        assert skewed["num_splits"] >= 2 and skewed["warps"] == 4 and skewed["partition_size"] <= 2304, skewed
        changed += equal != blind
    # Below that the sum changes nothing (wide blocks or splits stay).
    few = first - 1
    assert llama_plan(few, tokens, head_dim, sum_seq_lens=few * tokens) == llama_plan(few, tokens, head_dim)
    if sms == 132:  # H100 / H200 SXM: the measured shapes (batch 34-59) were split before
        assert changed > 0 and first == (33 if head_dim == 64 else 42)
        assert llama_plan(44, 1024, head_dim)["num_splits"] == 2
        assert llama_plan(44, 1024, head_dim, sum_seq_lens=44 * 1024)["num_splits"] == 1


@needs_kernels
@pytest.mark.parametrize("head_dim", [64, 128])
def test_decode_plan_cuts_the_long_sequences_of_a_skewed_batch(head_dim):
    # The mean (sum_seq_lens / batch) under a third of the longest: every context is cut
    # into pieces of at most twice the mean (rounded up to 256 tokens), smaller where the
    # batch's total work spread over the blocks the GPU wants asks for it; never below 128.
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for batch in (8, 16, 32, 48, 4 * sms // 8 + 8, 256):
        blind = llama_plan(batch, 8192, head_dim)
        one_long = 8192 + (batch - 1) * 1024  # one sequence of 8192 tokens among 1024s
        plan = llama_plan(batch, 8192, head_dim, sum_seq_lens=one_long)
        mean = -(-one_long // batch)
        assert plan["warps"] == 4 and plan["num_splits"] > max(1, blind["num_splits"]), (batch, plan, blind)
        assert 128 <= plan["partition_size"] <= -(-2 * mean // 256) * 256, (batch, plan)
        assert plan["num_splits"] * plan["partition_size"] >= 8192
        # A step later every sequence is one token longer: almost always the same plan.
        later = llama_plan(batch, 8192, head_dim, sum_seq_lens=one_long + batch)
        assert abs(later["partition_size"] - plan["partition_size"]) <= 256, (plan, later)
        # Not skewed (mean at least a third of the longest), the sum unknown, or equal
        # lengths: the sum changes no split (equal lengths may drop one, see above).
        for hint in (8192 * batch // 3 + batch, -1):
            assert llama_plan(batch, 8192, head_dim, sum_seq_lens=hint) == blind, (batch, hint)
        assert llama_plan(batch, 8192, head_dim, sum_seq_lens=8192 * batch)["num_splits"] <= blind["num_splits"]
    # Never below the tensor-core kernel's shortest partition.
    tiny = llama_plan(256, 1024, head_dim, sum_seq_lens=256)  # mean 1
    assert tiny["partition_size"] >= 128 and tiny["num_splits"] > 1, tiny
    if sms == 132 and head_dim == 64:  # the measured shapes (H100 / H200 SXM): 256-token pieces at batch 8 ...
        assert [llama_plan(b, 8192, sum_seq_lens=8192 + (b - 1) * 1024)["partition_size"] for b in (8, 16, 48, 256)] \
            == [256, 512, 1024, 2048]
