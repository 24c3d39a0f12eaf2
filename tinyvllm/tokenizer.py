"""Text <-> token ids, chat templates, and incremental detokenization.

    tok = Tokenizer.from_pretrained(path)        # a Hugging Face directory or a .gguf file
    ids = tok.encode("Hello")                    # BOS added if the model wants it
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hi"}])
    detok = IncrementalDetokenizer(tok, ids)
    for t in generated: print(detok.step(t), end="")

The heavy lifting is the `tokenizers` library (Rust BPE). A Hugging Face directory ships a ready
`tokenizer.json`; a GGUF file ships only the vocabulary and merges as metadata, so we assemble the
same pipeline from them (normalizer -> pre-tokenizer -> BPE -> post-processor -> decoder), choosing
the pre-tokenizer from `tokenizer.ggml.pre` the way llama.cpp does.

Chat templates are Jinja2 programs stored with the model. They are rendered in the same sandboxed
environment transformers uses (trim_blocks, lstrip_blocks, loopcontrols, `raise_exception`,
`strftime_now`, a `tojson` that does not HTML-escape), so the prompt text is byte-identical.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as _Backend

try:  # the tokenizers library's own incremental decoder (0.21+; IncrementalDetokenizer's fast path)
    from tokenizers.decoders import DecodeStream
except ImportError:  # pragma: no cover - older tokenizers
    DecodeStream = None

# llama.cpp token types (tokenizer.ggml.token_type)
_CONTROL, _USER_DEFINED = 3, 4

_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# tokenizer.ggml.pre -> (split regex, split digits one by one first, ignore_merges). From llama.cpp's
# llama-vocab.cpp; "smollm"/"starcoder"/"refact" split digits individually, then the GPT-2 regex.
_BPE_PRE_TOKENIZERS: dict[str, tuple[str, bool, bool]] = {
    "default": (_GPT2_SPLIT, False, False),
    "gpt-2": (_GPT2_SPLIT, False, False),
    "smollm": (_GPT2_SPLIT, True, False),
    "starcoder": (_GPT2_SPLIT, True, False),
    "refact": (_GPT2_SPLIT, True, False),
    "llama-bpe": (_LLAMA3_SPLIT, False, True),
    "llama3": (_LLAMA3_SPLIT, False, True),
    "smaug-bpe": (_LLAMA3_SPLIT, False, True),
    "qwen2": (_QWEN2_SPLIT, False, False),
}


class Tokenizer:
    """A `tokenizers` backend plus the model's special tokens and chat template."""

    def __init__(
        self,
        backend: _Backend,
        *,
        chat_template: str | None = None,
        special_tokens: dict[str, str] | None = None,
        extra_eos_token_ids: list[int] | None = None,
    ) -> None:
        """`special_tokens`: {"bos_token": "<s>", "eos_token": ...} as the template sees them."""
        self.backend = backend
        self.chat_template = chat_template
        self.special_tokens = {k: v for k, v in (special_tokens or {}).items() if v is not None}
        eos = [self._id(self.special_tokens.get("eos_token"))] + list(extra_eos_token_ids or [])
        self._eos_ids = list(dict.fromkeys(i for i in eos if i is not None))

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | Path) -> "Tokenizer":
        """Load from a Hugging Face directory (tokenizer.json, ...) or a .gguf file."""
        path = Path(path)
        if path.is_file() and path.suffix == ".gguf":
            return cls.from_gguf(path)
        if not (path / "tokenizer.json").is_file():
            raise FileNotFoundError(f"{path}: no tokenizer.json (and not a .gguf file)")
        backend = _Backend.from_file(str(path / "tokenizer.json"))
        cfg = _read_json(path / "tokenizer_config.json") or {}
        special_map = _read_json(path / "special_tokens_map.json") or {}
        special = {}
        for name in ("bos_token", "eos_token", "unk_token", "pad_token"):
            value = cfg.get(name, special_map.get(name))
            special[name] = value.get("content") if isinstance(value, dict) else value
        template = _hf_chat_template(path, cfg)
        gen = _read_json(path / "generation_config.json") or {}
        extra = gen.get("eos_token_id")
        extra = [] if extra is None else (extra if isinstance(extra, list) else [extra])
        return cls(backend, chat_template=template, special_tokens=special, extra_eos_token_ids=extra)

    @classmethod
    def from_gguf(cls, path: str | Path, reader: Any = None) -> "Tokenizer":
        """Assemble the tokenizer a GGUF file describes in its `tokenizer.*` metadata (`reader`:
        the file's gguf.GGUFReader if it is already open: parsing it is the slow part)."""
        from tinyvllm.gguf_loader import gguf_metadata, open_gguf

        meta = gguf_metadata(reader if reader is not None else open_gguf(path))
        kind = meta.get("tokenizer.ggml.model")
        if kind == "gpt2":
            backend = _byte_level_bpe(meta)
        elif kind == "llama":
            backend = _sentencepiece_bpe(meta)
        else:
            raise ValueError(f"{path}: unsupported GGUF tokenizer model {kind!r}; supported: 'gpt2', 'llama'")
        tokens = meta["tokenizer.ggml.tokens"]
        _add_special_tokens(backend, tokens, meta.get("tokenizer.ggml.token_type") or [])
        special = {
            name: tokens[meta[key]] if key in meta else None
            for name, key in (("bos_token", "tokenizer.ggml.bos_token_id"), ("eos_token", "tokenizer.ggml.eos_token_id"),
                              ("unk_token", "tokenizer.ggml.unknown_token_id"), ("pad_token", "tokenizer.ggml.padding_token_id"))
        }  # fmt: skip
        # llama.cpp adds BOS to sentencepiece vocabularies unless told otherwise; byte-level ones only if told.
        add_bos = meta.get("tokenizer.ggml.add_bos_token", kind == "llama")
        add_eos = meta.get("tokenizer.ggml.add_eos_token", False)
        _set_bos_eos_post_processor(backend, special["bos_token"] if add_bos else None, special["eos_token"] if add_eos else None)
        extra = [meta[k] for k in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id") if k in meta]
        return cls(backend, chat_template=meta.get("tokenizer.chat_template"), special_tokens=special, extra_eos_token_ids=extra)

    def save_pretrained(self, directory: str | Path) -> None:
        """Write the Hugging Face files that :meth:`from_pretrained` reads back into the same
        tokenizer: tokenizer.json, tokenizer_config.json (special tokens, chat template) and
        generation_config.json (every end-of-sequence id)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "tokenizer.json").write_text(self.backend.to_str())
        cfg = {**self.special_tokens, "chat_template": self.chat_template}
        (directory / "tokenizer_config.json").write_text(json.dumps(cfg, ensure_ascii=False, indent=1))
        (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": self.eos_token_ids}))

    # ---- ids ------------------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; with add_special_tokens, BOS (and EOS) as the model's post-processor says."""
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids` (no clean-up of spaces: what the model wrote is what you get)."""
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    @property
    def eos_token_ids(self) -> list[int]:
        """Every id that ends generation (the EOS token, plus e.g. Llama 3's <|eot_id|>)."""
        return list(self._eos_ids)

    @property
    def bos_token_id(self) -> int | None:
        """Id of the BOS token, or None if the model has none."""
        return self._id(self.special_tokens.get("bos_token"))

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def _id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    # ---- chat -----------------------------------------------------------------------------------
    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tokenize: bool = False,
        continue_final_message: bool = False,
        **kwargs: Any,
    ) -> str | list[int]:
        """Render `messages` with the model's chat template (the prompt string, or its ids if tokenize).

        ``continue_final_message`` (transformers' and vLLM's): the text stops right after the last
        message's content, without the end-of-turn the template writes after it, so the model goes
        on with that message ("Sure, here is the JSON: {") instead of starting a new one.
        """
        template = kwargs.pop("chat_template", None) or self.chat_template
        if template is None:
            raise ValueError("this tokenizer has no chat template; pass chat_template=... or a plain prompt")
        if continue_final_message and add_generation_prompt:
            raise ValueError("continue_final_message continues the last message: add_generation_prompt must be False")
        # As transformers does: drop None-valued keys, let kwargs override the special tokens.
        messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
        context = {**self.special_tokens, "tools": None, "documents": None, **kwargs}
        text = _compile_template(template).render(messages=messages, add_generation_prompt=add_generation_prompt, **context)
        if continue_final_message:
            text = _cut_after_final_message(text, messages[-1].get("content", "") if messages else "")
        return self.encode(text, add_special_tokens=False) if tokenize else text


def _cut_after_final_message(text: str, final: str) -> str:
    """``text`` up to the end of its last occurrence of the final message's content. Templates often
    strip a message (``message['content'] | trim``), so the content is looked for stripped, and
    its own trailing spaces kept only where the template kept them."""
    core = final.strip()
    if not core or core not in text:
        raise ValueError("continue_final_message: the final message's content does not appear in the rendered chat")
    start = text.rindex(core)
    kept = final.lstrip()  # (the content as written, without the spaces a template drops in front)
    end = start + (len(kept) if text[start : start + len(kept)] == kept else len(core))
    return text[:end]


class IncrementalDetokenizer:
    """Turn a stream of generated ids into a stream of text, one step per token.

    Decoding token by token goes wrong two ways: a character can span tokens (an emoji is 4 bytes,
    often 2+ tokens; alone each decodes to U+FFFD), and some decoders treat a sequence's first token
    differently (sentencepiece drops its leading space). So, like vLLM, we decode a short window
    twice: the text up to the last emitted token (`prefix`) and the text including the new token;
    the difference is new text, released only once it doesn't end in an incomplete character.

    The same algorithm runs inside the tokenizers library as ``DecodeStream`` (Rust, one call per
    token instead of two decodes and the slicing here: about 3x faster, which matters at 256
    sequences a step). We use it when the backend has it, primed with the same few prompt tokens
    of context; the Python window stays as the fallback, and for a prompt that ends inside a
    character (the stream would then emit the prompt's own text).
    """

    CONTEXT = 5  # prompt tokens decoded with the first generated ones, for the decoder's context

    def __init__(self, tokenizer: Tokenizer, prompt_token_ids: list[int], skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids = list(prompt_token_ids)
        self.prefix_offset = max(len(self.ids) - self.CONTEXT, 0)
        self.read_offset = len(self.ids)
        self.text = ""
        self._stream = self._backend = None
        backend = getattr(tokenizer, "backend", None)
        if DecodeStream is not None and backend is not None:
            context = self.ids[self.prefix_offset :]
            if not (context and tokenizer.decode(context, skip_special_tokens).endswith("\ufffd")):
                try:
                    self._stream = DecodeStream(ids=context, skip_special_tokens=skip_special_tokens)
                    self._backend = backend
                except TypeError:  # a tokenizers without ``ids=`` (before 0.22): the window below
                    self._stream = None

    def step(self, token_id: int) -> str:
        """Add one generated id; return the text it completes ("" while a character is incomplete)."""
        if self._stream is not None:
            new = self._stream.step(self._backend, token_id) or ""
            self.text += new
            return new
        self.ids.append(token_id)
        decode = self.tokenizer.decode
        prefix = decode(self.ids[self.prefix_offset : self.read_offset], self.skip_special_tokens)
        full = decode(self.ids[self.prefix_offset :], self.skip_special_tokens)
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return ""
        new = full[len(prefix) :]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        self.text += new
        return new


# ---- GGUF tokenizer assembly ------------------------------------------------------------------
def _byte_level_bpe(meta: dict[str, Any]) -> _Backend:
    """GPT-2 style byte-level BPE: tokens are spelled in the 256-symbol byte alphabet (Ġ = space)."""
    tokens = meta["tokenizer.ggml.tokens"]
    merges = [tuple(m.split(" ")) for m in meta.get("tokenizer.ggml.merges", [])]
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in _BPE_PRE_TOKENIZERS:
        raise ValueError(f"unsupported GGUF pre-tokenizer {pre!r}; supported: {sorted(_BPE_PRE_TOKENIZERS)}")
    split, split_digits, ignore_merges = _BPE_PRE_TOKENIZERS[pre]
    bpe = models.BPE({t: i for i, t in enumerate(tokens)}, merges, ignore_merges=ignore_merges)
    backend = _Backend(bpe)
    steps = [pre_tokenizers.Digits(individual_digits=True)] if split_digits else []
    steps += [
        pre_tokenizers.Split(Regex(split), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ]
    backend.pre_tokenizer = pre_tokenizers.Sequence(steps)
    backend.decoder = decoders.ByteLevel()
    return backend


def _sentencepiece_bpe(meta: dict[str, Any]) -> _Backend:
    """Sentencepiece BPE (Llama 1/2, Mistral): '▁' marks spaces, unknown bytes fall back to <0xNN>."""
    tokens = meta["tokenizer.ggml.tokens"]
    scores = meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
    vocab = {t: i for i, t in enumerate(tokens)}
    if "tokenizer.ggml.merges" in meta:
        merges = [tuple(m.split(" ")) for m in meta["tokenizer.ggml.merges"]]
    else:  # sentencepiece files store scores, not merges: a token's score ranks the merge that forms it
        merges = _merges_from_scores(vocab, dict(zip(tokens, scores)))
    unk_id = meta.get("tokenizer.ggml.unknown_token_id", 0)
    bpe = models.BPE(vocab, merges, unk_token=tokens[unk_id], fuse_unk=True, byte_fallback=True)
    backend = _Backend(bpe)
    add_prefix = meta.get("tokenizer.ggml.add_space_prefix", True)
    backend.normalizer = normalizers.Replace(" ", "\u2581")
    backend.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="\u2581", prepend_scheme="first" if add_prefix else "never", split=False
    )
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    backend.decoder = decoders.Sequence(steps)
    return backend


def _merges_from_scores(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    """Every (left, right) split of a token into two tokens, best-scored result first."""
    merges = []
    for token, score in scores.items():
        local = [(token[:k], token[k:], score) for k in range(1, len(token)) if token[:k] in vocab and token[k:] in vocab]
        merges += sorted(local, key=lambda m: (vocab[m[0]], vocab[m[1]]))
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(a, b) for a, b, _ in merges]


def _add_special_tokens(backend: _Backend, tokens: list[str], token_types: list[int]) -> None:
    """Control tokens (<|im_start|>) become special added tokens, user-defined ones plain added tokens,
    so that they are matched whole in text instead of being cut into pieces."""
    control = [AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, token_types) if k == _CONTROL]
    user = [AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, token_types) if k == _USER_DEFINED]
    backend.add_special_tokens(control)
    backend.add_tokens(user)


def _set_bos_eos_post_processor(backend: _Backend, bos: str | None, eos: str | None) -> None:
    single, pair, specials = "$A", "$A $B:1", []
    if bos is not None:
        single, pair = f"{bos} {single}", f"{bos} $A {bos}:1 $B:1"
        specials.append((bos, backend.token_to_id(bos)))
    if eos is not None:
        single, pair = f"{single} {eos}", f"{pair} {eos}:1"
        specials.append((eos, backend.token_to_id(eos)))
    if specials:
        backend.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)


# ---- Hugging Face directory helpers ------------------------------------------------------------
def _read_json(file: Path) -> dict | None:
    return json.loads(file.read_text()) if file.is_file() else None


def _hf_chat_template(path: Path, cfg: dict) -> str | None:
    """transformers 5 saves the template to chat_template.jinja; older files keep it in tokenizer_config."""
    if (path / "chat_template.jinja").is_file():
        return (path / "chat_template.jinja").read_text()
    template = cfg.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {t["name"]: t["template"] for t in template}
        template = named.get("default", next(iter(named.values()), None))
    return template


# ---- Jinja environment (as in transformers.utils.chat_template_utils) ---------------------------
@lru_cache(maxsize=8)
def _compile_template(template: str):
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(Extension):
        """`{% generation %}...{% endgeneration %}` marks assistant text for training masks; renders its body."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

        def _render(self, caller):
            return caller()

    def raise_exception(message: str):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt: str) -> str:
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env.from_string(template)
