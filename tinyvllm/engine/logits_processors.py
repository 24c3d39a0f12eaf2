"""Logits processors: what a request's SamplingParams do to its logits before sampling.

In vLLM's order (its v1 sampler), each on the device over the whole batch, each skipped
unless some row of the batch uses it:

1. ``allowed_token_ids``: every other token's logit becomes -inf.
2. ``bad_words`` and ``min_tokens``: banned tokens' logits become -inf. A bad word is banned
   by its LAST token, and only when the tokens before it were just generated (vLLM's rule), so a
   word of one token is always banned and "New York" bans "York" right after "New". While a
   request has fewer than ``min_tokens`` outputs, its EOS and ``stop_token_ids`` are banned.
3. ``logit_bias``: ``logits[t] += bias[t]``.
4. penalties (vLLM's definitions, the same as OpenAI's and Hugging Face's):

   * repetition (``r > 0``): for every token in the prompt OR the output so far, a positive
     logit is divided by r, a negative one multiplied by r (r > 1 discourages either way);
   * frequency (``f``): ``logits[t] -= f * count of t in the output``;
   * presence (``p``): ``logits[t] -= p * [t appears in the output]``.

   The counts are a [R, vocab] tensor built on the device with one ``scatter_add`` from the R
   penalised rows' token ids, padded with the id ``vocab`` into a spare last column that is
   dropped. (vLLM keeps these token ids resident on the device between steps; here the host
   sends the penalised rows' ids each step, which costs host time in proportion to their
   lengths and nothing to rows without penalties.)

The host's part is only the per-row bookkeeping (which ids to ban, bias or count), sent in one
host-to-device copy per kind; no Python loop touches the vocabulary. A batch where no row uses
any of this (the common greedy batch) returns its logits untouched: no kernel, no copy.
"""

from __future__ import annotations

import itertools
from typing import Any, Iterable, Sequence as SequenceLike

import torch

NEG_INF = float("-inf")


def to_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A host list as a device tensor (through pinned memory on CUDA, so the copy is async)."""
    t = torch.tensor(values, dtype=dtype)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def ints_to_device(*columns: list[int], device: torch.device) -> tuple[torch.Tensor, ...]:
    """Several int lists in ONE int64 host-to-device copy; one device view per list."""
    dev = to_device(list(itertools.chain.from_iterable(columns)), torch.long, device)
    return torch.split(dev, [len(c) for c in columns])


# ---- penalties ------------------------------------------------------------------------------------
def token_counts(token_ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[R, L] token ids padded with ``vocab_size`` -> [R, vocab] counts (one scatter_add)."""
    counts = torch.zeros(token_ids.shape[0], vocab_size + 1, dtype=torch.long, device=token_ids.device)
    counts.scatter_add_(1, token_ids, torch.ones_like(token_ids))
    return counts[:, :vocab_size]


def apply_penalties(
    logits: torch.Tensor,
    prompt_ids: torch.Tensor | None,
    output_ids: torch.Tensor,
    presence: torch.Tensor,
    frequency: torch.Tensor,
    repetition: torch.Tensor,
) -> torch.Tensor:
    """vLLM's penalties on ``logits`` [R, V] (out of place). ``prompt_ids`` [R, Lp] / ``output_ids``
    [R, Lo]: token ids padded with V (``prompt_ids`` may be None when no row has a repetition
    penalty); ``presence``, ``frequency``, ``repetition``: [R] float32."""
    vocab = logits.shape[1]
    output_counts = token_counts(output_ids, vocab)
    in_output = output_counts > 0
    in_prompt_or_output = in_output if prompt_ids is None else in_output | (token_counts(prompt_ids, vocab) > 0)
    scale = torch.where(in_prompt_or_output, repetition.unsqueeze(1), torch.ones_like(logits))
    logits = torch.where(logits > 0, logits / scale, logits * scale)
    logits = logits - frequency.unsqueeze(1) * output_counts
    return logits - presence.unsqueeze(1) * in_output


def _padded(rows: list[list[int]], pad: int) -> tuple[list[int], int]:
    """Rows of different lengths as one flat row-major list padded with ``pad``; and the width."""
    width = max(1, max(len(r) for r in rows))
    return [t for r in rows for t in r + [pad] * (width - len(r))], width


# ---- bad words (host bookkeeping) ------------------------------------------------------------------
def tokenize_bad_words(bad_words: Iterable[str], tokenizer: Any) -> list[list[int]]:
    """Each bad word's token ids, as vLLM's ``SamplingParams.update_from_tokenizer``: the word as
    given (leading spaces stripped), and again with one leading space when that tokenizes to a
    different first token of the same length (the word in the middle of a text)."""
    out: list[list[int]] = []
    for word in bad_words:
        for prefix in ("", " "):
            ids = list(tokenizer.encode(prefix + word.lstrip(), add_special_tokens=False))
            if not ids:
                if not prefix:
                    raise ValueError(f"bad_words: {word!r} tokenizes to no token.")
                continue
            if not prefix or (ids[0] != out[-1][0] and len(ids) == len(out[-1])):
                out.append(ids)
    return out


def bad_words_banned(bad_words_token_ids: list[list[int]], output_token_ids: SequenceLike[int]) -> list[int]:
    """The tokens a row may not produce next: each word's last token, when the tokens before it
    are the last ones generated (vLLM's rule, over the output tokens only)."""
    banned = []
    n = len(output_token_ids)
    for word in bad_words_token_ids:
        prefix = len(word) - 1
        if prefix > n:
            continue
        if prefix == 0 or list(output_token_ids[n - prefix :]) == word[:-1]:
            banned.append(word[-1])
    return banned


# ---- the batch ---------------------------------------------------------------------------------------
def apply_logits_processors(logits: torch.Tensor, seqs: SequenceLike, eos_token_ids: Iterable[int]) -> torch.Tensor:
    """Apply every row's processors (module docstring, in its order) to float32 ``logits`` [B, V].

    ``seqs[i]`` (tinyvllm.engine.sequence.Sequence) is row i: its SamplingParams, prompt and output
    token ids. Returns ``logits`` itself when no row needs anything, else a new tensor.
    """
    eos = list(eos_token_ids)
    B, V = logits.shape
    device = logits.device
    allowed_rows: list[int] = []
    allowed_cols: list[int] = []
    ban_rows: list[int] = []
    ban_cols: list[int] = []
    bias_rows: list[int] = []
    bias_cols: list[int] = []
    bias_vals: list[float] = []
    penalised: list[int] = []
    for i, seq in enumerate(seqs):  # (runs every step for every row: plain attribute tests first)
        p = seq.sampling_params
        if p.allowed_token_ids is not None:
            allowed_rows += [i] * len(p.allowed_token_ids)
            allowed_cols += p.allowed_token_ids
        if p._bad_words_token_ids:
            banned = bad_words_banned(p._bad_words_token_ids, seq.output_token_ids)
            ban_rows += [i] * len(banned)
            ban_cols += banned
        if p.min_tokens and seq.num_output_tokens < p.min_tokens:
            banned = list(p.stop_token_ids) + ([] if p.ignore_eos else eos)
            ban_rows += [i] * len(banned)
            ban_cols += banned
        if p.logit_bias:
            bias_rows += [i] * len(p.logit_bias)
            bias_cols += list(p.logit_bias)
            bias_vals += list(p.logit_bias.values())
        if p.presence_penalty or p.frequency_penalty or p.repetition_penalty != 1.0:
            penalised.append(i)
    if not (allowed_rows or ban_rows or bias_rows or penalised):
        return logits

    logits = logits.clone()
    if allowed_rows:
        rows_with_list = sorted(set(allowed_rows))
        d_rows, d_cols, d_list = ints_to_device(allowed_rows, allowed_cols, rows_with_list, device=device)
        disallowed = torch.zeros(B, V, dtype=torch.bool, device=device)
        disallowed[d_list] = True
        disallowed[d_rows, d_cols] = False
        logits.masked_fill_(disallowed, NEG_INF)
    if ban_rows:
        d_rows, d_cols = ints_to_device(ban_rows, ban_cols, device=device)
        logits[d_rows, d_cols] = NEG_INF
    if bias_rows:
        d_rows, d_cols = ints_to_device(bias_rows, bias_cols, device=device)
        logits.index_put_((d_rows, d_cols), to_device(bias_vals, torch.float32, device), accumulate=True)
    if penalised:
        ps = [seqs[i].sampling_params for i in penalised]
        outputs, width_o = _padded([list(seqs[i].output_token_ids) for i in penalised], V)
        any_rep = any(p.repetition_penalty != 1.0 for p in ps)
        prompts, width_p = _padded([seqs[i].prompt_token_ids if any_rep else [] for i in penalised], V)
        d_rows, d_out, d_prompt = ints_to_device(penalised, outputs, prompts if any_rep else [], device=device)
        values = to_device(
            [[p.presence_penalty, p.frequency_penalty, p.repetition_penalty] for p in ps], torch.float32, device
        )
        whole = len(penalised) == B
        rows = logits if whole else logits.index_select(0, d_rows)
        rows = apply_penalties(
            rows, d_prompt.view(len(ps), width_p) if any_rep else None, d_out.view(len(ps), width_o),
            values[:, 0], values[:, 1], values[:, 2],
        )
        logits = rows if whole else logits.index_copy_(0, d_rows, rows)
    return logits
