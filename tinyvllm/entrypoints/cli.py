"""The ``tinyvllm`` command.

    tinyvllm generate "The capital of France is" --max-tokens 16
    tinyvllm generate "What is 2+2?" --chat --temperature 0
    tinyvllm chat                                         # an interactive chat (cli_chat.py)
    tinyvllm serve                                        # the OpenAI-compatible server
    tinyvllm bench serve --request-rate 4                 # measure a running server
    python -m tinyvllm generate "Hello" --model path/or/owner/name

Prints the generated text of each prompt (one prompt per positional argument).
"""

from __future__ import annotations

import argparse
import sys


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompts", nargs="+", help="prompt text (several prompts run as one batch)")
    p.add_argument("--model", default=None, help="local dir, .gguf file or Hugging Face repo id (default: SmolLM2-135M-Instruct)")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--min-tokens", type=int, default=0)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0 or -1 = off")
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None, help="per-request sampling seed")
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--system", default=None, help="system message (with --chat)")
    p.add_argument("--dtype", default="auto", help="auto, bfloat16, float16 or float32")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--num-kv-blocks", type=int, default=None)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tinyvllm", description="tinyvllm: a small, readable LLM inference engine")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser(
        "generate", help="complete prompts (or reply to them with --chat)",
        description="Complete each prompt as plain text. Instruct models (the default SmolLM2-135M-Instruct "
                    "among them) ship a chat template: --chat applies it, so each prompt is sent as a user "
                    "message and the model replies as an assistant would.",
        epilog="examples:\n  tinyvllm generate \"The capital of France is\" --max-tokens 16\n"
               "  tinyvllm generate --chat \"What is the capital of France?\" --temperature 0\n"
               "  tinyvllm generate \"def fib(n):\" --model path/to/model --temperature 0.8 --seed 1",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    _add_common(gen)
    gen.add_argument("--chat", action="store_true",
                     help="apply the model's chat template to each prompt (a user message; see --system)")
    _add_subcommands(sub)
    return parser


def _add_subcommands(sub) -> None:
    """The subcommands that live in their own modules; each sets ``func`` (main calls it)."""
    from tinyvllm.benchmarks.serve import add_bench_parser
    from tinyvllm.entrypoints.cli_chat import add_chat_parser
    from tinyvllm.entrypoints.openai.cli_args import add_serve_parser

    add_chat_parser(sub)
    add_serve_parser(sub)
    add_bench_parser(sub)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "func", None) is not None:
        return args.func(args)
    from tinyvllm import LLM, SamplingParams

    try:
        params = SamplingParams(
            max_tokens=args.max_tokens, min_tokens=args.min_tokens, temperature=args.temperature,
            top_p=args.top_p, top_k=args.top_k, min_p=args.min_p, seed=args.seed, stop=args.stop,
            ignore_eos=args.ignore_eos,
        )
    except ValueError as e:
        print(f"tinyvllm: error: {e}", file=sys.stderr)
        return 2
    llm = LLM(
        model=args.model, dtype=args.dtype, device=args.device, max_model_len=args.max_model_len,
        num_kv_blocks=args.num_kv_blocks,
    )
    use_chat = args.command == "chat" or getattr(args, "chat", False)
    if use_chat:
        system = [{"role": "system", "content": args.system}] if args.system else []
        convs = [system + [{"role": "user", "content": p}] for p in args.prompts]
        outputs = llm.chat(convs, params, use_tqdm=False)
    else:
        outputs = llm.generate(args.prompts, params, use_tqdm=False)
    rc = 0
    for i, out in enumerate(outputs):
        if len(outputs) > 1:
            print(f"--- [{i}] {out.prompt if not use_chat else args.prompts[i]!r}")
        if out.error:
            print(f"tinyvllm: error: {out.error}", file=sys.stderr)
            rc = 1
            continue
        completion = out.outputs[0]
        if completion.text == "":  # say so, rather than print nothing
            print(f"tinyvllm: empty completion (finish_reason={completion.finish_reason})", file=sys.stderr)
        print(completion.text, flush=True)
    if not use_chat and llm.get_tokenizer().chat_template is not None:
        print("tinyvllm: note: this model has a chat template; add --chat to send the prompts as chat messages",
              file=sys.stderr)  # fmt: skip
    return rc


if __name__ == "__main__":
    sys.exit(main())
