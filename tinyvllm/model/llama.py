"""The Llama forward pass, top to bottom in one file.

    token ids [T]
      -> embed_tokens                                   [T, hidden]
      -> 16 x decoder layer:
           x = rms_norm(residual)                       (fused with the residual add)
           qkv = x @ W_qkv^T          -> q [T,Hq,D], k [T,Hk,D], v [T,Hk,D]   (views, no copy)
           rotary_embedding(q, k)     (in place), then
           reshape_and_cache(k, v)    (write this step's k/v into the paged cache): one kernel
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

Tensor parallelism (``tp_size`` > 1, docs/course/22-tensor-parallelism.md): the weights are this
rank's slices (tinyvllm/model/weight_sharding.py), the model runs this rank's heads and
intermediate columns, and the parallel layers (tinyvllm/model/parallel_layers.py) add the two
all-reduces per layer, after o_proj and after down_proj. With tp_size = 1 they are the plain ops.

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
from tinyvllm.distributed.utils import num_kv_heads_per_rank
from tinyvllm.model.attention_metadata import AttentionMetadata
from tinyvllm.model.parallel_layers import (
    ColumnParallelLinear,
    ParallelLMHead,
    RowParallelLinear,
    VocabParallelEmbedding,
)
from tinyvllm.model.rope import build_cos_sin_cache

# One (key_cache, value_cache) pair per layer, each [num_blocks, num_kv_heads, block_size, head_dim].
KVCache = tuple[torch.Tensor, torch.Tensor]


@dataclass
class LlamaLayerWeights:
    """One decoder layer: norms and linears, weights in linear's [out_features, in_features] layout.
    Hq, Hk, I below are this rank's (the whole model's divided by tp_size)."""

    input_layernorm: torch.Tensor  # [hidden]
    qkv_proj: ColumnParallelLinear  # [(Hq + 2*Hk) * D, hidden]: q rows, then k rows, then v rows (+ bias)
    o_proj: RowParallelLinear  # [hidden, Hq * D] (+ bias), then the all-reduce
    post_attention_layernorm: torch.Tensor  # [hidden]
    gate_up_proj: ColumnParallelLinear  # [2 * I, hidden]: gate rows, then up rows (+ bias)
    down_proj: RowParallelLinear  # [hidden, I] (+ bias), then the all-reduce


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
        tp_rank: int = 0,
        tp_size: int = 1,
    ) -> None:
        """``tp_rank``/``tp_size``: with tp_size > 1, ``weights`` hold this rank's slices."""
        self.config = config
        self.tp_rank, self.tp_size = tp_rank, tp_size
        self.dtype = dtype
        self.device = torch.device(device)
        self.num_layers = config.num_hidden_layers
        self.num_heads = config.num_attention_heads // tp_size  # this rank's
        self.num_kv_heads = num_kv_heads_per_rank(config.num_key_value_heads, tp_size)
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

        attn_bias, mlp_bias = getattr(config, "attention_bias", False), getattr(config, "mlp_bias", False)
        self.embed_tokens = VocabParallelEmbedding(get("model.embed_tokens.weight"), self.vocab_size, tp_rank, tp_size)
        self.layers: list[LlamaLayerWeights] = []
        for i in range(self.num_layers):
            p = f"model.layers.{i}."
            attn = [p + f"self_attn.{n}_proj" for n in ("q", "k", "v")]
            mlp = [p + f"mlp.{n}_proj" for n in ("gate", "up")]
            o, down = p + "self_attn.o_proj", p + "mlp.down_proj"
            self.layers.append(LlamaLayerWeights(
                input_layernorm=get(p + "input_layernorm.weight"),
                qkv_proj=ColumnParallelLinear(fused(*(n + ".weight" for n in attn)),
                                              fused(*(n + ".bias" for n in attn)) if attn_bias else None),
                o_proj=RowParallelLinear(get(o + ".weight"), get(o + ".bias") if attn_bias else None, tp_size),
                post_attention_layernorm=get(p + "post_attention_layernorm.weight"),
                gate_up_proj=ColumnParallelLinear(fused(*(n + ".weight" for n in mlp)),
                                                  fused(*(n + ".bias" for n in mlp)) if mlp_bias else None),
                down_proj=RowParallelLinear(get(down + ".weight"), get(down + ".bias") if mlp_bias else None, tp_size),
            ))  # fmt: skip
        self.norm = get("model.norm.weight")
        # Tied embeddings (Llama 3.2 1B/3B, SmolLM2): the output projection IS the embedding table.
        head = self.embed_tokens.weight if config.tie_word_embeddings else None
        if head is None:
            head = VocabParallelEmbedding(get("lm_head.weight"), self.vocab_size, tp_rank, tp_size).weight  # padded alike
        self.lm_head = ParallelLMHead(head, self.vocab_size, tp_size)

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
        x = self.embed_tokens(input_ids)  # [T, hidden]
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
        qkv = layer.qkv_proj(x)  # [T, (Hq + 2*Hk) * D]
        # Views into qkv (row stride (Hq + 2*Hk) * D): no copies. The ops accept row-strided inputs.
        q = qkv[:, : self.q_size].view(num_tokens, self.num_heads, self.head_dim)
        k = qkv[:, self.q_size : self.q_size + self.kv_size].view(num_tokens, self.num_kv_heads, self.head_dim)
        v = qkv[:, self.q_size + self.kv_size :].view(num_tokens, self.num_kv_heads, self.head_dim)

        # Rotate q and k in place by their positions (RoPE), then write k and v into the paged
        # cache, where attention reads them: one kernel on a GPU (csrc/rope_and_cache.cu).
        key_cache, value_cache = kv_cache
        ops.rotary_embedding_and_cache(positions, q, k, v, key_cache, value_cache, attn.slot_mapping, self.head_dim,
                                       self.cos_sin_cache)

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
        return layer.o_proj(out.view(num_tokens, self.q_size))  # (all-reduced when tp_size > 1)

    def mlp(self, layer: LlamaLayerWeights, x: torch.Tensor) -> torch.Tensor:
        """SwiGLU feed-forward: down(silu(gate(x)) * up(x)), gate and up in one GEMM: [T, hidden]."""
        gate_up = layer.gate_up_proj(x)  # [T, 2 * I]
        return layer.down_proj(ops.silu_and_mul(gate_up))  # (all-reduced when tp_size > 1)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """hidden [N, hidden] (already final-normed) -> logits [N, vocab] float32 (tp_size > 1:
        gathered to rank 0; None on the other ranks)."""
        return self.lm_head.compute_logits(hidden)

    def __call__(self, *args, **kwargs) -> torch.Tensor:
        return self.forward(*args, **kwargs)
