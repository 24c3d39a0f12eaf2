"""SamplingParams: how one request chooses its tokens and when it stops.

The fields, their defaults and their validation rules follow vLLM's
``vllm.SamplingParams`` so code written for vLLM runs unchanged. Every invalid
value raises an error whose message starts with the field's name: a ``TypeError``
saying the type wanted (``temperature="hot"``, ``max_tokens=2.5``, ``stop=5``), a
``ValueError`` saying the range (``top_p=0``); see :mod:`tinyvllm.validation`.

Disabled values ("off"):

* ``temperature=0``  greedy decoding (argmax); the other sampling knobs are ignored.
* ``top_k``          ``0`` or ``-1`` (and ``None``) mean "all tokens". vLLM's current rule:
                     0 disables top-k, -1 is accepted as the older spelling of the same;
                     anything below -1 is an error. Stored normalised to ``0``.
* ``top_p=1.0``      keep the whole distribution.
* ``min_p=0.0``      keep the whole distribution.
* ``max_tokens=None`` generate until a stop condition or the model's length limit.
* ``presence_penalty=0``, ``frequency_penalty=0``, ``repetition_penalty=1``: no penalty.
* ``logit_bias``, ``allowed_token_ids``, ``bad_words``, ``logprobs``, ``prompt_logprobs``: None.

Several completions, log-probabilities and logits processors (vLLM's meanings; the math is in
tinyvllm/engine/logits_processors.py and tinyvllm/engine/logprobs.py):

* ``n``                 completions of the prompt, returned together in one RequestOutput. With a
                        ``seed``, completion i draws from ``seed + i`` (vLLM's rule): the n differ,
                        and the whole set is reproducible. Greedy decoding allows only ``n=1``.
* ``logprobs``          k >= 0: the chosen token's log-probability and the k most likely tokens',
                        per generated token. ``prompt_logprobs`` the same for the prompt tokens.
* ``presence_penalty``  in [-2, 2]: subtracted once from every token already generated.
* ``frequency_penalty`` in [-2, 2]: subtracted once per time a token was generated.
* ``repetition_penalty`` > 0: tokens in the prompt or generated so far have a positive logit
                        divided by it, a negative one multiplied by it.
* ``logit_bias``        {token id: bias}, added to the logits (clamped to [-100, 100], as OpenAI's API).
* ``allowed_token_ids`` only these tokens can be produced.
* ``bad_words``         words never produced: the last token of a word's tokens is banned whenever
                        the tokens before it were just generated (the engine tokenizes the words).

The token ids of ``logit_bias``, ``allowed_token_ids`` and ``logprobs <= vocabulary`` are checked
against the model's vocabulary when the request is added (``LLMEngine.add_request``), the first
place that knows it.

What the engine returns while a request runs (``output_kind``, vLLM's ``RequestOutputKind``):
``CUMULATIVE`` (the default: after every step, a RequestOutput with everything generated so far,
what a server streams from), ``DELTA`` (after every step, only the new tokens, text and
log-probabilities: what the server's engine process sends, see tinyvllm/engine/engine_core.py) or
``FINAL_ONLY`` (one RequestOutput, when the request finishes: ``LLM.generate`` asks for this, so a
batch of 256 does not build 256 outputs per step).

Not supported (a clear error rather than silently ignoring the request): ``best_of``.
"""

from __future__ import annotations

import copy
import enum
from dataclasses import dataclass, field

from tinyvllm.validation import check_bool, check_float, check_int, check_int_list, check_str_list


class RequestOutputKind(enum.IntEnum):
    """When the engine returns a request's output, and what it holds (vLLM's names and numbers)."""

    CUMULATIVE = 0  # after every step that gives the request a token: everything so far
    DELTA = 1  # after every such step: only what is new since the last output
    FINAL_ONLY = 2  # once, when the request finishes


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = 0
    min_p: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    include_stop_str_in_output: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    best_of: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = None
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    # Filled in by __post_init__: the stop-token ids as a set for O(1) checks.
    _stop_token_set: frozenset = field(default=frozenset(), init=False, repr=False, compare=False)
    # Filled in by the engine (it has the tokenizer): each bad word's token ids, vLLM's name.
    _bad_words_token_ids: list[list[int]] | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Normalise the "list or single value" fields first, so validation sees one shape.
        self.stop = check_str_list("stop", self.stop)
        self.stop_token_ids = check_int_list("stop_token_ids", self.stop_token_ids, ge=0)
        if self.top_k is None or self.top_k == -1:
            self.top_k = 0
        if isinstance(self.bad_words, str):
            self.bad_words = [self.bad_words]
        elif isinstance(self.bad_words, (tuple, list)):
            self.bad_words = list(self.bad_words)
        if isinstance(self.allowed_token_ids, (tuple, list, set, frozenset, range)):
            self.allowed_token_ids = list(self.allowed_token_ids)
        self._verify()
        self.output_kind = RequestOutputKind(self.output_kind)
        self._stop_token_set = frozenset(self.stop_token_ids)
        if self.logit_bias is not None:
            # JSON keys arrive as strings; OpenAI's API clamps each bias to [-100, 100] (vLLM does too).
            self.logit_bias = {int(t): min(100.0, max(-100.0, float(b))) for t, b in self.logit_bias.items()}

    def _verify(self) -> None:
        """Types first (a TypeError naming the field and the type wanted), then ranges (ValueError)."""
        check_int("n", self.n, ge=1)
        if self.best_of not in (None, 1):
            raise ValueError(f"best_of is not supported by tinyvllm, got {self.best_of!r}.")
        check_float("temperature", self.temperature, ge=0)
        check_float("top_p", self.top_p, gt=0, le=1)
        if check_int("top_k", self.top_k) < 0:
            raise ValueError(f"top_k must be 0 or -1 (disable), or at least 1, got {self.top_k!r}.")
        check_float("min_p", self.min_p, ge=0, le=1)
        check_int("seed", self.seed, optional=True)
        check_int("max_tokens", self.max_tokens, ge=1, optional=True)
        check_int("min_tokens", self.min_tokens, ge=0)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(
                f"min_tokens must be less than or equal to max_tokens={self.max_tokens}, got {self.min_tokens}."
            )
        if "" in self.stop:
            raise ValueError(f"stop must not hold an empty string, got {self.stop!r}.")
        check_bool("ignore_eos", self.ignore_eos)
        check_bool("include_stop_str_in_output", self.include_stop_str_in_output)
        # n, log-probabilities and the logits processors (vLLM's ranges; token ids against the
        # vocabulary: LLMEngine.add_request).
        if self.n > 1 and self.temperature == 0:
            raise ValueError(f"n must be 1 when using greedy sampling, got {self.n}.")
        check_int("logprobs", self.logprobs, ge=0, optional=True)
        check_int("prompt_logprobs", self.prompt_logprobs, ge=0, optional=True)
        check_float("presence_penalty", self.presence_penalty, ge=-2, le=2)
        check_float("frequency_penalty", self.frequency_penalty, ge=-2, le=2)
        if not check_float("repetition_penalty", self.repetition_penalty, gt=0) < float("inf"):
            raise ValueError(f"repetition_penalty must be finite, got {self.repetition_penalty!r}.")
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict):
                raise ValueError(f"logit_bias must be a dict of token id -> bias, got {self.logit_bias!r}.")
            for t, b in self.logit_bias.items():
                if isinstance(t, bool) or not isinstance(t, (int, str)) or not str(t).strip().lstrip("-").isdigit():
                    raise ValueError(f"logit_bias keys must be token ids (ints), got {t!r}.")
                if int(t) < 0:
                    raise ValueError(f"logit_bias keys must be non-negative token ids, got {t!r}.")
                if isinstance(b, bool) or not isinstance(b, (int, float)) or b != b:
                    raise ValueError(f"logit_bias values must be numbers, got {b!r} for token {t!r}.")
        if self.allowed_token_ids is not None:
            if not isinstance(self.allowed_token_ids, list) or not self.allowed_token_ids:
                raise ValueError(
                    f"allowed_token_ids must be a non-empty list of token ids, got {self.allowed_token_ids!r}."
                )
            check_int_list("allowed_token_ids", self.allowed_token_ids, ge=0)
        if self.bad_words is not None and (
            not isinstance(self.bad_words, list) or any(not isinstance(w, str) or not w.strip() for w in self.bad_words)
        ):
            raise ValueError(f"bad_words must be a string or a list of non-empty strings, got {self.bad_words!r}.")
        if isinstance(self.output_kind, bool) or self.output_kind not in set(RequestOutputKind):
            raise ValueError(
                f"output_kind must be RequestOutputKind.CUMULATIVE, DELTA or FINAL_ONLY, got {self.output_kind!r}."
            )

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def stop_token_set(self) -> frozenset:
        return self._stop_token_set

    @property
    def reads_output_tokens(self) -> bool:
        """Whether sampling reads the tokens generated so far on the host (penalties, bad words):
        then the engine knows the last step's tokens before it schedules the next (no overlap)."""
        return (self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0
                or bool(self.bad_words))

    @property
    def bad_words_token_ids(self) -> list[list[int]] | None:
        """Each bad word's token ids, once the engine has tokenized ``bad_words`` (else None)."""
        return self._bad_words_token_ids

    def clone(self) -> "SamplingParams":
        """A deep copy (lists and dicts too), with what the engine filled in."""
        return copy.deepcopy(self)
