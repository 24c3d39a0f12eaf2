"""The requests `tinyvllm bench serve` sends: random token prompts, or a ShareGPT-format file.

Both follow vLLM's benchmark datasets. Token counts come from the server under test (its
/tokenize endpoint), so the client needs no model files and counts exactly as the server does.

* ``random``: each prompt is ``input_len`` token ids, cut at a random offset from one long
  tokenized text of random words (no two prompts share a prefix), or drawn uniformly from
  ``[0, --random-vocab-size)``, each asking for ``output_len`` tokens; ``range_ratio`` r draws each length uniformly from [len * (1 - r), len * (1 + r)].
* ``sharegpt``: a JSON list of ``{"conversations": [{"from": "human", "value": ...},
  {"from": "gpt", "value": ...}, ...]}``; the first turn is the prompt and the second's token count
  is the output length (or ``--sharegpt-output-len``). As vLLM, conversations are shuffled with the
  seed, and pairs with a prompt or output under 4 tokens, a prompt over 1024 tokens or a total over
  2048 (or over the server's max_model_len) are skipped.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from typing import Callable


@dataclass
class SampleRequest:
    prompt: str | list[int]  # text, or token ids sent as they are
    prompt_len: int
    expected_output_len: int


def _lengths(rng: random.Random, length: int, ratio: float, n: int) -> list[int]:
    low, high = max(1, int(length * (1 - ratio))), max(1, int(length * (1 + ratio)))
    return [rng.randint(low, high) for _ in range(n)]


def random_requests(tokenize: Callable[[str], list[int]], num_prompts: int, input_len: int, output_len: int,
                    range_ratio: float = 0.0, seed: int = 0, vocab_size: int | None = None) -> list[SampleRequest]:  # fmt: skip
    """``vocab_size``: draw each prompt id uniformly from [0, vocab_size) instead (perf.md's workloads
    draw from [0, 10000)); for a model whose tokenizer turns random words into one unknown token."""
    if not 0.0 <= range_ratio < 1.0:
        raise ValueError(f"random_range_ratio must be in [0, 1), got {range_ratio}")
    rng = random.Random(seed)
    input_lens = _lengths(rng, input_len, range_ratio, num_prompts)
    output_lens = _lengths(rng, output_len, range_ratio, num_prompts)
    if vocab_size is not None:
        return [SampleRequest([rng.randrange(vocab_size) for _ in range(n_in)], n_in, n_out)
                for n_in, n_out in zip(input_lens, output_lens)]  # fmt: skip
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = " ".join("".join(rng.choice(letters) for _ in range(rng.randint(2, 8))) for _ in range(max(input_lens) + 256))
    pool = tokenize(words)
    while len(pool) < 2 * max(input_lens):
        pool = pool + pool
    requests = []
    for n_in, n_out in zip(input_lens, output_lens):
        start = rng.randrange(0, len(pool) - n_in)
        requests.append(SampleRequest(pool[start : start + n_in], n_in, n_out))
    return requests


def sharegpt_requests(path: str, tokenize: Callable[[str], list[int]], num_prompts: int, seed: int = 0,
                      fixed_output_len: int | None = None, max_model_len: int | None = None) -> list[SampleRequest]:  # fmt: skip
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, list):
        raise ValueError(f"{path}: a ShareGPT file is a JSON list of {{'conversations': [...]}} entries")
    pairs = [(d["conversations"][0]["value"], d["conversations"][1]["value"]) for d in data
             if isinstance(d, dict) and len(d.get("conversations", [])) >= 2]  # fmt: skip
    random.Random(seed).shuffle(pairs)
    requests = []
    for prompt, completion in pairs:
        if len(requests) == num_prompts:
            break
        prompt_len = len(tokenize(prompt))
        output_len = fixed_output_len if fixed_output_len is not None else len(tokenize(completion))
        if prompt_len < 4 or (fixed_output_len is None and output_len < 4):
            continue
        if prompt_len > 1024 or prompt_len + output_len > 2048:
            continue
        if max_model_len is not None and prompt_len + output_len > max_model_len:
            continue
        requests.append(SampleRequest(prompt, prompt_len, output_len))
    if not requests:
        raise ValueError(f"{path}: no conversation fits the length limits")
    return requests
