"""The engine's command-line flags, spelled as vLLM spells them, shared by `serve` and `chat`.

    parser = argparse.ArgumentParser(); add_engine_args(parser)
    config = engine_config_from_args(parser.parse_args())      # an EngineConfig

Each flag maps to one EngineConfig field (``--max-model-len`` -> ``max_model_len``). A flag whose
field this build's EngineConfig does not have yet (``--enable-prefix-caching`` before prefix
caching lands) is accepted by the parser and refused with a one-line error if it is set, so
scripts written for vLLM fail clearly instead of silently running something else.
"""

from __future__ import annotations

import argparse
import dataclasses

from tinyvllm.engine.engine_config import EngineConfig

# (flags, EngineConfig field, argparse keywords)
_ENGINE_FLAGS: list[tuple[tuple[str, ...], str, dict]] = [
    (("--dtype",), "dtype", dict(default="auto", help="auto (bfloat16 on a GPU, float32 on CPU), bfloat16, float16, float32")),
    (("--device",), "device", dict(default=None, help="cuda or cpu (default: cuda if available)")),
    (("--max-model-len",), "max_model_len", dict(type=int, default=None, help="longest prompt + output (default: the model's)")),
    (("--max-num-seqs",), "max_num_seqs", dict(type=int, default=256, help="sequences in one step at most")),
    (("--max-num-batched-tokens",), "max_num_batched_tokens", dict(type=int, default=None, help="tokens in one step at most")),
    (("--block-size",), "block_size", dict(type=int, default=16, help="tokens per KV-cache block")),
    (("--gpu-memory-utilization",), "gpu_memory_utilization", dict(type=float, default=0.9, help="share of GPU memory to use")),
    (("--num-kv-blocks", "--num-gpu-blocks-override"), "num_kv_blocks", dict(type=int, default=None, help="KV-cache blocks (default: sized from memory)")),
    (("--enforce-eager",), "enforce_eager", dict(action="store_true", help="no CUDA graphs: every decode step launched op by op")),
    (("--enable-prefix-caching",), "enable_prefix_caching", dict(action=argparse.BooleanOptionalAction, default=True, help="reuse the KV blocks of shared prompt prefixes (on by default, as in vLLM V1 and LLM(); --no-enable-prefix-caching turns it off)")),
    (("--tensor-parallel-size", "-tp"), "tensor_parallel_size", dict(type=int, default=1, help="split the model across this many GPUs (one process each)")),
    (("--seed",), "seed", dict(type=int, default=0, help="the engine's sampling seed")),
    (("--generation-config",), "generation_config", dict(default="auto", help="sampling defaults for fields a request leaves unset: auto (the model's generation_config.json), vllm (none) or a folder")),
    (("--stream-interval",), "stream_interval", dict(type=int, default=1, help="a stream's outputs every N tokens (its first and last always): less host work per token at high load")),
]  # fmt: skip


def add_engine_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``[MODEL]`` / ``--model`` and the engine flags to ``parser``."""
    parser.add_argument("model_tag", nargs="?", default=None, metavar="MODEL",
                        help="local dir, .gguf file or Hugging Face repo id (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--model", default=None, help="the same as MODEL")
    group = parser.add_argument_group("engine")
    known = {f.name for f in dataclasses.fields(EngineConfig) if f.init}
    for flags, dest, kw in _ENGINE_FLAGS:
        if dest not in known:
            kw = dict(kw, help=kw["help"] + " (not in this build yet: refused)")
        group.add_argument(*flags, dest=dest, **kw)
    return parser


def model_from_args(args: argparse.Namespace) -> str | None:
    if args.model_tag is not None and args.model is not None and args.model_tag != args.model:
        raise ValueError(f"two models given: {args.model_tag!r} and --model {args.model!r}")
    return args.model_tag if args.model_tag is not None else args.model


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    """An EngineConfig from the parsed flags; ValueError names a flag this build does not support."""
    known = {f.name for f in dataclasses.fields(EngineConfig) if f.init}
    kwargs = {"model": model_from_args(args)}
    for flags, dest, kw in _ENGINE_FLAGS:
        value = getattr(args, dest)
        if dest not in known:
            if value != kw.get("default", False):
                raise ValueError(f"{flags[0]} is not supported by this build of tinyvllm")
            continue
        kwargs[dest] = value
    return EngineConfig(**kwargs)
