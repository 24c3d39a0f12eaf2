"""Which slice of each checkpoint tensor a tensor-parallel rank loads (Hugging Face Llama names).

    q_proj, k_proj, v_proj, gate_proj, up_proj   column-parallel: split the OUTPUT rows (dim 0)
                                                 q by query heads, k/v by KV heads (replicated
                                                 when N exceeds them), gate/up by intermediate rows
    o_proj, down_proj                            row-parallel: split the INPUT columns (dim 1)
    embed_tokens, lm_head                        vocab-parallel: split the vocabulary rows (dim 0)
    norms, o_proj/down_proj biases               replicated (a row layer adds its bias once, after the sum)

Biases of column layers split like their weights' rows. ``shard_spec`` returns the (dim, start,
stop) a rank reads, so the safetensors loader can read just that slice from disk
(``safe_open(...).get_slice``) and no rank ever holds the whole model.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tinyvllm.distributed.utils import kv_head_range
from tinyvllm.model.parallel_layers import vocab_range

if TYPE_CHECKING:
    from tinyvllm.config import ModelConfig


def shard_spec(name: str, config: "ModelConfig", rank: int, tp_size: int) -> tuple[int, int, int] | None:
    """(dim, start, stop) of tensor ``name`` that ``rank`` of ``tp_size`` loads; None: the whole tensor."""
    if tp_size == 1:
        return None
    d = config.head_dim
    is_bias = name.endswith(".bias")
    if name in ("model.embed_tokens.weight", "lm_head.weight"):
        start, stop, _ = vocab_range(config.vocab_size, rank, tp_size)
        return 0, start, stop
    if ".self_attn.q_proj." in name:
        per = config.num_attention_heads // tp_size * d
        return 0, rank * per, (rank + 1) * per
    if ".self_attn.k_proj." in name or ".self_attn.v_proj." in name:
        first, last = kv_head_range(config.num_key_value_heads, tp_size, rank)
        return 0, first * d, last * d
    if ".mlp.gate_proj." in name or ".mlp.up_proj." in name:
        per = config.intermediate_size // tp_size
        return 0, rank * per, (rank + 1) * per
    if is_bias:  # o_proj, down_proj biases: whole on every rank
        return None
    if ".self_attn.o_proj." in name:
        per = config.num_attention_heads // tp_size * d
        return 1, rank * per, (rank + 1) * per
    if ".mlp.down_proj." in name:
        per = config.intermediate_size // tp_size
        return 1, rank * per, (rank + 1) * per
    return None  # norms


def slice_tensor(tensor, spec: tuple[int, int, int] | None):
    """``tensor[spec]``; works on a torch tensor and on a safetensors slice (which reads only that part)."""
    if spec is None:
        return tensor[:]
    dim, start, stop = spec
    return tensor[start:stop] if dim == 0 else tensor[:, start:stop]
