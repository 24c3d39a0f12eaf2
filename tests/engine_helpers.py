"""Test helpers for the engine: a fake ModelRunner, a fake tokenizer, and a tiny random Llama.

FakeRunner is a deterministic toy whose logits depend on the WHOLE token history as
read back through the paged "KV cache" (a token id per slot), so a block-table bug,
a block freed while in use, or a sequence computed from the wrong offset changes
the tokens and shows up as a mismatch against the same request run alone.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from tinyvllm.engine.engine_config import EngineConfig
from tinyvllm.engine.model_runner import ModelRunner
from tinyvllm.engine.sampler import Sampler
from tinyvllm.engine.sequence import PLACEHOLDER


class FakeRunner(ModelRunner):
    """A ModelRunner whose model is the toy above: ``compute_logits`` is replaced, and
    ``execute`` (sampling, the one device->host copy, the kernels' error check) is the real one."""

    def __init__(self, config: EngineConfig, vocab_size: int = 64, *, peaked: float = 3.0):
        self.config = config
        self.vocab_size = vocab_size
        self.block_size = config.block_size
        self.cache = [-1] * config.cache_capacity  # one token id per slot
        self.peaked = peaked
        self.sampler = Sampler(config.eos_token_ids, seed=config.seed, device=config.device)
        self.batches: list[list[tuple[str, int]]] = []  # per step: (request_id, new tokens)
        self._pinned, self._last_sampled = False, None  # CPU: execute_async's copy is a plain tensor

    def _token(self, s, pos: int) -> int:
        """token_ids[pos], or (async scheduling) the previous step's sampled id its placeholder names,
        which the real runner takes on the device (``_fill_placeholders``)."""
        t = s.token_ids[pos]
        return t if t >= 0 else int(self._last_sampled[PLACEHOLDER - t])

    def compute_logits(self, out, spans=None) -> torch.Tensor:
        bs = self.block_size
        rows = []
        self.batches.append([(s.request_id, n) for s, n in zip(out.seqs, out.num_scheduled_tokens)])
        for s, n in zip(out.seqs, out.num_scheduled_tokens):
            end = s.num_computed_tokens + n
            assert n >= 1 and end <= s.num_tokens, "a span of uncomputed tokens is scheduled"
            assert len(s.block_table) * bs >= end, "block table does not cover the span"
            assert len(set(s.block_table)) == len(s.block_table)
            for pos in range(s.num_computed_tokens, end):
                self.cache[s.block_table[pos // bs] * bs + pos % bs] = self._token(s, pos)
        # Every token of the step is written before any history is read back: like the model,
        # whose every layer writes the whole batch's k/v before its attention reads the cache.
        for s, n in zip(out.seqs, out.num_scheduled_tokens):
            end = s.num_computed_tokens + n
            history = [self.cache[s.block_table[p // bs] * bs + p % bs] for p in range(end)]
            rows.append(toy_logits(history, self.vocab_size, self.peaked))
        return torch.stack(rows).float()


def toy_logits(history: list[int], vocab_size: int, peaked: float = 3.0) -> torch.Tensor:
    """FakeRunner's next-token logits after ``history`` (float32 [vocab_size]): a hash of the
    whole history seeds them, so tests can recompute what the engine saw."""
    digest = hashlib.sha256(repr(list(history)).encode()).digest()
    g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
    return torch.randn(vocab_size, generator=g) * peaked


class FakeTokenizer:
    """Token t <-> the letter chr(ord('a') + t % 26); ids >= 26 decode to 'A'+..."""

    eos_token_ids = [1]
    bos_token_id = 0

    @staticmethod
    def tok2str(t: int) -> str:
        return chr(ord("a") + t) if t < 26 else chr(ord("A") + (t - 26) % 26)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return ([0] if add_special_tokens else []) + [ord(c) - ord("a") for c in text]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return "".join(self.tok2str(t) for t in ids)


class FakeDetokenizer:
    def __init__(self, tokenizer, prompt_token_ids):
        self.tokenizer = tokenizer

    def step(self, token_id: int) -> str:
        return self.tokenizer.tok2str(token_id)


def fake_config(*, num_blocks=64, block_size=4, max_model_len=64, max_num_seqs=8, max_num_batched_tokens=None,
                seed=0, eos=(1,), longest_first=None, async_scheduling=False, **kw) -> EngineConfig:
    """A complete EngineConfig for the toy runner (CPU; no model to fit); ``kw``: more EngineConfig fields."""
    return EngineConfig(
        block_size=block_size, num_kv_blocks=num_blocks, max_model_len=max_model_len, max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens, seed=seed, device="cpu", eos_token_ids=tuple(eos),
        decode_longest_first_min_seqs=longest_first, async_scheduling=async_scheduling, **kw,
    )


def make_fake_engine(*, vocab_size=64, **config_kw):
    """An LLMEngine over FakeRunner, FakeTokenizer and FakeDetokenizer; keywords: see fake_config."""
    from tinyvllm.engine.llm_engine import LLMEngine

    config = fake_config(**config_kw)
    runner = FakeRunner(config, vocab_size)
    return LLMEngine(config, runner, FakeTokenizer(), vocab_size=vocab_size, detokenizer_cls=FakeDetokenizer)


def run_to_completion(engine, arrivals: dict[int, list[tuple]] | None = None, max_steps: int = 10_000):
    """Step the engine; before step k add the requests arrivals[k] = [(id, prompt, params), ...].
    Returns {request_id: final RequestOutput}."""
    arrivals = dict(arrivals or {})
    final = {}
    step = 0
    while engine.has_unfinished_requests() or any(k >= step for k in arrivals):
        for rid, prompt, params in arrivals.pop(step, []):
            engine.add_request(rid, prompt, params)
        for out in engine.step():
            if out.finished:
                final[out.request_id] = out
        step += 1
        assert step < max_steps
    return final


# ---- a tiny random Llama on disk, loadable by LLM(model=dir) ------------------------------------
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_tokenizer_json(path: Path) -> int:
    """A byte-level BPE with no merges: 256 byte tokens + <s>, </s>, <|user|>, <|assistant|>, <|system|>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    byte_chars = sorted(alphabet)
    vocab = {c: i for i, c in enumerate(byte_chars)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    specials = ["<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"]
    tok.add_special_tokens(specials)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)])
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "</s>", "chat_template": CHAT_TEMPLATE,
    }))
    return tok.get_vocab_size()


def make_tiny_llama(path: Path, *, seed: int = 0, max_position_embeddings: int = 256) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    vocab = build_tokenizer_json(path)
    from tokenizers import Tokenizer

    t = Tokenizer.from_file(str(path / "tokenizer.json"))
    # head_dim 64 (256 / 4 heads, GQA 2:1): a size the CUDA kernels support, so the same tests run on a GPU.
    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=max_position_embeddings, rms_norm_eps=1e-5,
        rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=t.token_to_id("<s>"),
        eos_token_id=t.token_to_id("</s>"),
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # larger weights than the default init: peakier, less tie-prone logits
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.05)
    model.save_pretrained(str(path), safe_serialization=True)
    return path
