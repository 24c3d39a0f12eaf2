"""The Llama forward pass, top to bottom in one file.

    token ids [T]
      -> embed_tokens                                   [T, hidden]
      -> 16 x decoder layer:
           x = rms_norm(residual)                       (fused with the residual add)
           qkv = x @ W_qkv^T          -> q [T,Hq,D], k [T,Hk,D], v [T,Hk,D]   (views, no copy)
           rotary_embedding(q, k)     (in place)
           reshape_and_cache(k, v)    (write this step's k/v into the paged cache)
           a = attention(q, cache)    (prefill_attention or paged_attention_decode)
           residual += a @ W_o^T
           x = rms_norm(residual)
           h = silu(x @ W_gate^T) * (x @ W_up^T)          (one GEMM for gate and up)
           residual += h @ W_down^T
      -> final rms_norm                                 [T, hidden]
      -> lm_head (tied to embed_tokens), for the rows that need logits only

The model calls ``tinyvllm.ops`` only, so the same file runs our CUDA kernels on a
GPU and the pure-torch reference ops on a CPU. It has no Python control flow that
depends on tensor values and never reads a device tensor on the host, so a decode
step can later be captured in a CUDA graph.

The residual stream follows vLLM: ``fused_add_rms_norm(x, residual, w)`` does
``residual += x; x = rms_norm(residual) * w`` in one pass. The first layer has no
sublayer output to add yet, so it starts with a plain ``rms_norm`` and the
embeddings become the residual.

Course chapter: docs/course/04-the-llama-forward-pass.md.
Oracle: tests/test_model_vs_transformers.py (Hugging Face's LlamaForCausalLM, same weights).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tinyvllm import ops
from tinyvllm.model.attention_metadata import AttentionMetadata
from tinyvllm.model.rope import build_cos_sin_cache

# One (key_cache, value_cache) pair per layer, each [num_blocks, num_kv_heads, block_size, head_dim].
KVCache = tuple[torch.Tensor, torch.Tensor]


@dataclass
class LlamaLayerWeights:
    """One decoder layer's weights, in linear's [out_features, in_features] layout."""

    input_layernorm: torch.Tensor  # [hidden]
    qkv_proj: torch.Tensor  # [(Hq + 2*Hk) * D, hidden]: q rows, then k rows, then v rows
    o_proj: torch.Tensor  # [hidden, Hq * D]
    post_attention_layernorm: torch.Tensor  # [hidden]
    gate_up_proj: torch.Tensor  # [2 * I, hidden]: gate rows, then up rows
    down_proj: torch.Tensor  # [hidden, I]
    qkv_bias: torch.Tensor | None = None  # [(Hq + 2*Hk) * D] when config.attention_bias
    o_bias: torch.Tensor | None = None  # [hidden] when config.attention_bias
    gate_up_bias: torch.Tensor | None = None  # [2 * I] when config.mlp_bias
    down_bias: torch.Tensor | None = None  # [hidden] when config.mlp_bias


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    y = ops.linear(x, weight)
    if bias is not None:
        y += bias
    return y


class LlamaForCausalLM:
    """A Llama-architecture decoder (Llama 2/3.x, SmolLM2, TinyLlama, Mistral-style GQA).

    ``weights`` holds Hugging Face-named tensors (tinyvllm.loader.load_checkpoint); they
    are cast to ``dtype``, moved to ``device`` and fused at load time. The model keeps
    no reference to the dict itself, so dropping it frees the unfused copies.
    """

    def __init__(
        self,
        config,
        weights: dict[str, torch.Tensor],
        dtype: torch.dtype,
        device: torch.device | str,
        max_position: int | None = None,
    ) -> None:
        self.config = config
        self.dtype = dtype
        self.device = torch.device(device)
        self.num_layers = config.num_hidden_layers
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim  # ModelConfig resolves an implied head_dim
        self.hidden_size = config.hidden_size
        self.vocab_size = config.vocab_size
        self.eps = config.rms_norm_eps
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.scale = self.head_dim**-0.5

        def get(name: str) -> torch.Tensor:
            if name not in weights:
                raise KeyError(f"checkpoint has no tensor {name!r}")
            return weights[name].detach().to(device=self.device, dtype=dtype)

        def fused(*names: str) -> torch.Tensor:
            return torch.cat([get(n) for n in names], dim=0).contiguous()

        self.embed_tokens = get("model.embed_tokens.weight")  # [vocab, hidden]
        self.layers: list[LlamaLayerWeights] = []
        for i in range(self.num_layers):
            p = f"model.layers.{i}."
            attn = [p + f"self_attn.{n}_proj" for n in ("q", "k", "v")]
            mlp = [p + f"mlp.{n}_proj" for n in ("gate", "up")]
            layer = LlamaLayerWeights(
                input_layernorm=get(p + "input_layernorm.weight"),
                qkv_proj=fused(*(n + ".weight" for n in attn)),
                o_proj=get(p + "self_attn.o_proj.weight"),
                post_attention_layernorm=get(p + "post_attention_layernorm.weight"),
                gate_up_proj=fused(*(n + ".weight" for n in mlp)),
                down_proj=get(p + "mlp.down_proj.weight"),
            )
            if getattr(config, "attention_bias", False):
                layer.qkv_bias = fused(*(n + ".bias" for n in attn))
                layer.o_bias = get(p + "self_attn.o_proj.bias")
            if getattr(config, "mlp_bias", False):
                layer.gate_up_bias = fused(*(n + ".bias" for n in mlp))
                layer.down_bias = get(p + "mlp.down_proj.bias")
            self.layers.append(layer)
        self.norm = get("model.norm.weight")
        # Tied embeddings (Llama 3.2 1B/3B, SmolLM2): the output projection IS the embedding table.
        self.lm_head = self.embed_tokens if config.tie_word_embeddings else get("lm_head.weight")

        # cos/sin of every rotary angle, float32, computed once (llama3 scaling included).
        self.cos_sin_cache = build_cos_sin_cache(
            self.head_dim,
            config.rope_theta,
            max_position or config.max_position_embeddings,
            config.rope_scaling,
            self.device,
        )

    # ---- the forward pass ------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[KVCache],
        attn: AttentionMetadata,
    ) -> torch.Tensor:
        """input_ids, positions: [T] int64 -> final-normed hidden states [T, hidden]."""
        x = ops.embedding(input_ids, self.embed_tokens)  # [T, hidden]
        residual = x
        for i, layer in enumerate(self.layers):
            # Pre-attention norm. Layer 0: residual = embeddings, x = norm(embeddings).
            if i == 0:
                x = ops.rms_norm(residual, layer.input_layernorm, self.eps)
            else:
                ops.fused_add_rms_norm(x, residual, layer.input_layernorm, self.eps)
            x = self.attention(layer, x, positions, kv_caches[i], attn)
            ops.fused_add_rms_norm(x, residual, layer.post_attention_layernorm, self.eps)
            x = self.mlp(layer, x)
        ops.fused_add_rms_norm(x, residual, self.norm, self.eps)  # last residual add + final norm
        return x

    def attention(
        self, layer: LlamaLayerWeights, x: torch.Tensor, positions: torch.Tensor, kv_cache: KVCache, attn: AttentionMetadata
    ) -> torch.Tensor:
        """Self-attention of the new tokens over everything cached for their sequences: [T, hidden]."""
        num_tokens = x.shape[0]
        qkv = _linear(x, layer.qkv_proj, layer.qkv_bias)  # [T, (Hq + 2*Hk) * D]
        # Views into qkv (row stride (Hq + 2*Hk) * D): no copies. The ops accept row-strided inputs.
        q = qkv[:, : self.q_size].view(num_tokens, self.num_heads, self.head_dim)
        k = qkv[:, self.q_size : self.q_size + self.kv_size].view(num_tokens, self.num_kv_heads, self.head_dim)
        v = qkv[:, self.q_size + self.kv_size :].view(num_tokens, self.num_kv_heads, self.head_dim)

        ops.rotary_embedding(positions, q, k, self.head_dim, self.cos_sin_cache)  # rotates q and k in place
        key_cache, value_cache = kv_cache
        ops.reshape_and_cache(k, v, key_cache, value_cache, attn.slot_mapping)  # now attention can read them

        if attn.is_prefill:
            out = ops.prefill_attention(
                q,
                key_cache,
                value_cache,
                attn.block_tables,
                attn.cu_seqlens_q,
                attn.seq_lens,
                attn.max_seqlen_q,
                self.scale,
            )
        else:  # one query token per sequence
            out = ops.paged_attention_decode(q, key_cache, value_cache, attn.block_tables, attn.seq_lens, self.scale,
                                             sum_seq_lens=attn.sum_seq_lens)
        return _linear(out.view(num_tokens, self.q_size), layer.o_proj, layer.o_bias)

    def mlp(self, layer: LlamaLayerWeights, x: torch.Tensor) -> torch.Tensor:
        """SwiGLU feed-forward: down(silu(gate(x)) * up(x)), gate and up in one GEMM: [T, hidden]."""
        gate_up = _linear(x, layer.gate_up_proj, layer.gate_up_bias)  # [T, 2 * I]
        return _linear(ops.silu_and_mul(gate_up), layer.down_proj, layer.down_bias)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, hidden] (already final-normed) -> logits [N, vocab] float32."""
        return ops.linear(hidden, self.lm_head).float()

    def __call__(self, *args, **kwargs) -> torch.Tensor:
        return self.forward(*args, **kwargs)
