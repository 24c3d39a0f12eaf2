"""Real weights: SmolLM2-135M-Instruct (the default model, a Q4_1 GGUF) end to end.

Every test that loads this model (here, in test_gguf.py and test_tokenizer.py) is marked
smollm2: `pytest -m smollm2` runs only those, `pytest -m "not smollm2"` everything else;
they are part of the default run too."""

import pytest
import torch

pytestmark = pytest.mark.smollm2


@pytest.fixture(scope="module")
def llm(smollm2_path):
    from tinyvllm import LLM

    return LLM()  # the default model (smollm2_path: already in the cache, or skip if offline), on CPU in CI


def test_capital_of_france(llm):
    from tinyvllm import SamplingParams

    out = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                   SamplingParams(temperature=0, max_tokens=32), use_tqdm=False)[0]
    assert "Paris" in out.outputs[0].text, out.outputs[0].text
    assert out.outputs[0].finish_reason == "stop"  # ended on <|im_end|>, which is not in the text
    assert "<|im_end|>" not in out.outputs[0].text
    ids = out.prompt_token_ids
    assert ids[:2] != [ids[0], ids[0]]  # the chat template's first token is not doubled


def hf_model(config, weights):
    """transformers' LlamaForCausalLM built from OUR ModelConfig and loaded with OUR dequantized weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_cfg = LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads, head_dim=config.head_dim, rms_norm_eps=config.rms_norm_eps,
        rope_theta=config.rope_theta, rope_scaling=config.rope_scaling,
        max_position_embeddings=config.max_position_embeddings, tie_word_embeddings=config.tie_word_embeddings,
        attention_bias=config.attention_bias, mlp_bias=config.mlp_bias,
    )
    model = LlamaForCausalLM(hf_cfg).float().eval()
    missing, unexpected = model.load_state_dict(weights, strict=False)
    assert not unexpected, unexpected
    assert set(missing) <= {"lm_head.weight"}, missing  # tied embeddings
    if config.tie_word_embeddings:
        model.tie_weights()
        assert torch.equal(model.lm_head.weight, weights["model.embed_tokens.weight"])
    return model


def test_logits_match_transformers_prefill_and_decode(smollm2_checkpoint, smollm2_tokenizer):
    from tinyvllm import SamplingParams
    from tinyvllm.engine.engine_config import EngineConfig
    from tinyvllm.engine.model_runner import ModelRunner
    from tinyvllm.engine.scheduler import SchedulerOutput
    from tinyvllm.engine.sequence import Sequence

    config, weights = smollm2_checkpoint
    ref = hf_model(config, weights)
    # the rotary inv_freq must be float32 (see docs: a dtype cast of the built model can round it)
    tok = smollm2_tokenizer
    engine_config = EngineConfig(dtype=torch.float32, device="cpu", block_size=16, num_kv_blocks=8)
    engine_config.fit_model(config)
    runner = ModelRunner(engine_config, config, weights)
    prompts = [tok.encode("The capital of France is"), tok.encode("def fibonacci(n):\n    ")]
    seqs = [Sequence(str(i), p, SamplingParams()) for i, p in enumerate(prompts)]
    for s in seqs:
        s.block_table = [2 * int(s.request_id) + j for j in range(2)]  # 32 slots each
    rows = []
    for step in range(5):  # prefill, then 4 decode steps (RoPE position bugs show only in decode)
        ours = runner.compute_logits(SchedulerOutput(seqs, [s.num_uncomputed_tokens for s in seqs]))
        rows.append(ours)
        for i, s in enumerate(seqs):
            s.num_computed_tokens = s.num_tokens
            s.append_token(int(ours[i].argmax()))
    # One transformers forward per sequence gives every step's reference: a causal model's logits at
    # position t depend only on tokens <= t (the last appended token has no step to check).
    worst = 0.0
    for i, s in enumerate(seqs):
        with torch.no_grad():
            theirs_all = ref(torch.tensor([s.token_ids[:-1]])).logits[0, s.num_prompt_tokens - 1 :].float()
        assert len(theirs_all) == len(rows)
        for step, theirs in enumerate(theirs_all):
            diff = (rows[step][i] - theirs).abs().max().item()
            worst = max(worst, diff)
            assert diff < 2e-3 * max(1.0, theirs.abs().max().item()), (step, i, diff)
            assert rows[step][i].argmax() == theirs.argmax()
    print(f"max |logits diff| vs transformers: {worst:.2e}")
