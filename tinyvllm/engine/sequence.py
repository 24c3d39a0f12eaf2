"""A Sequence: one request's tokens, where its KV cache lives, and its timeline (RequestMetrics)."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

from tinyvllm.outputs import RequestMetrics
from tinyvllm.sampling_params import SamplingParams


# Async scheduling records a step's sampled tokens before the host knows them: sequence i of
# the step gets the token id PLACEHOLDER - i (negative, never a real id) until the engine reads
# the step's ids; the model runner takes the real ones from the device meanwhile.
PLACEHOLDER = -1


class SequenceStatus(enum.Enum):
    WAITING = "waiting"  # queued, no KV blocks yet
    RUNNING = "running"  # holds KV blocks, being prefilled or decoded
    FINISHED = "finished"  # done; its blocks are freed


@dataclass
class Sequence:
    """One request as the engine sees it.

    ``token_ids`` holds the prompt followed by every generated token.
    ``num_computed_tokens`` counts the tokens whose k/v are already in the cache:
    the model's next step computes ``token_ids[num_computed_tokens:]``.
    ``block_table[i]`` is the physical KV block that holds tokens
    ``i*block_size .. (i+1)*block_size - 1``. ``block_hashes[i]`` is the prefix-cache hash
    of full block ``i`` (the BlockManager extends it as the sequence grows);
    ``num_published_blocks`` of the table's leading blocks have been offered to the cache.
    """

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    arrival_index: int = 0
    token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    prompt: str | None = None
    generator: Any = field(default=None, repr=False)  # torch.Generator for a seeded request, else None (the Sampler's)
    # The engine's (text), never read by the Scheduler or the ModelRunner:
    detokenizer: Any = field(default=None, repr=False)  # IncrementalDetokenizer, fed one token at a time
    output_text: str = ""  # detokenized text of the generated tokens (stop string already cut)
    error: str | None = None  # why the request failed (finish_reason == "error")
    num_preemptions: int = 0
    block_hashes: list[bytes] = field(default_factory=list, repr=False)
    num_published_blocks: int = 0
    metrics: RequestMetrics = field(default_factory=lambda: RequestMetrics(arrival_time=time.time()), repr=False)

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = list(self.prompt_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return self.num_tokens - self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    @property
    def num_uncomputed_tokens(self) -> int:
        """Tokens not yet in the KV cache (a prompt or what is left of it, or one when decoding)."""
        return self.num_tokens - self.num_computed_tokens

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)

    def reset_for_recompute(self) -> None:
        """Preemption by recomputation: drop the KV cache (the BlockManager has freed the blocks);
        the next prefill recomputes every token its prefix-cache hits do not cover."""
        self.num_computed_tokens = 0
        self.block_table = []
        self.num_published_blocks = 0
        self.status = SequenceStatus.WAITING
        self.num_preemptions += 1
