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

Not supported (a clear error rather than silently ignoring the request):
``n != 1``, ``best_of``, ``logprobs``/``prompt_logprobs``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tinyvllm.validation import check_bool, check_float, check_int, check_int_list, check_str_list


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
    # Filled in by __post_init__: the stop-token ids as a set for O(1) checks.
    _stop_token_set: frozenset = field(default=frozenset(), init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Normalise the "list or single value" fields first, so validation sees one shape.
        self.stop = check_str_list("stop", self.stop)
        self.stop_token_ids = check_int_list("stop_token_ids", self.stop_token_ids, ge=0)
        if self.top_k is None or self.top_k == -1:
            self.top_k = 0
        self._verify()
        self._stop_token_set = frozenset(self.stop_token_ids)

    def _verify(self) -> None:
        """Types first (a TypeError naming the field and the type wanted), then ranges (ValueError)."""
        if check_int("n", self.n) != 1:
            raise ValueError(f"n must be 1 (tinyvllm generates one completion per request), got {self.n!r}.")
        if self.best_of not in (None, 1):
            raise ValueError(f"best_of is not supported by tinyvllm, got {self.best_of!r}.")
        if self.logprobs is not None:
            raise ValueError(f"logprobs is not supported by tinyvllm yet, got {self.logprobs!r}.")
        if self.prompt_logprobs is not None:
            raise ValueError(f"prompt_logprobs is not supported by tinyvllm yet, got {self.prompt_logprobs!r}.")
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

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def stop_token_set(self) -> frozenset:
        return self._stop_token_set

    def clone(self) -> "SamplingParams":
        return SamplingParams(
            n=self.n, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, min_p=self.min_p,
            seed=self.seed, stop=list(self.stop), stop_token_ids=list(self.stop_token_ids),
            ignore_eos=self.ignore_eos, max_tokens=self.max_tokens, min_tokens=self.min_tokens,
            include_stop_str_in_output=self.include_stop_str_in_output,
        )
