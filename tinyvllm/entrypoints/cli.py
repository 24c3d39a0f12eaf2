"""The ``tinyvllm`` command: a set of argparse subcommands sharing one error handler.

    tinyvllm generate "The capital of France is" --max-tokens 16
    tinyvllm generate "What is 2+2?" --chat --temperature 0
    echo "Once upon a time" | tinyvllm generate -          # the prompt from standard input
    tinyvllm chat                                         # an interactive chat (cli_chat.py)
    tinyvllm serve                                        # the OpenAI-compatible server
    tinyvllm bench serve --request-rate 4                 # measure a running server
    tinyvllm --version
    python -m tinyvllm generate "Hello" --model path/or/owner/name

``generate`` prints the generated text of each prompt (one prompt per positional argument).

Errors: every failure prints ONE line, ``tinyvllm: error: ...``, and exits with status 2 when
the arguments are wrong (checked before the model is loaded, so a typo costs no loading time)
or 1 when the model could not be loaded or run. ``--debug`` (or ``TINYVLLM_DEBUG=1``) shows the
traceback instead. A subcommand is a function ``f(args) -> exit status`` registered with
:func:`add_subcommand`; :func:`run_command` is the shared handler, and inside a subcommand
``with usage_errors():`` marks the code whose ValueError/TypeError means "bad arguments".
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from typing import Callable, Iterator, NoReturn

PROG = "tinyvllm"


class UsageError(Exception):
    """The user's arguments are wrong: one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad argument is one line (no usage block) naming the subcommand's --help."""

    def error(self, message: str) -> NoReturn:
        print(f"{PROG}: error: {message} (see '{self.prog} --help')", file=sys.stderr)
        sys.exit(2)


def _one_line(e: BaseException) -> str:
    """The exception as one line; the type name too when the message alone would not say what it is."""
    text = " ".join(str(e).split())
    if isinstance(e, (UsageError, ValueError, TypeError, OSError, RuntimeError)) and text:
        return text
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _debug(args: argparse.Namespace | None) -> bool:
    return bool(getattr(args, "debug", False)) or os.environ.get("TINYVLLM_DEBUG") == "1"


def run_command(func: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Run one subcommand: its own exit status, or one line on stderr and 2 (UsageError) or 1
    (anything else). With --debug / TINYVLLM_DEBUG=1 the exception propagates (a traceback)."""
    try:
        return func(args)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if _debug(args):
            raise
        print(f"{PROG}: error: {_one_line(e)}", file=sys.stderr)
        return 2 if isinstance(e, UsageError) else 1


@contextlib.contextmanager
def usage_errors() -> Iterator[None]:
    """Inside this block a ValueError, TypeError or FileNotFoundError is a bad argument (exit 2)."""
    try:
        yield
    except (ValueError, TypeError, FileNotFoundError) as e:
        raise UsageError(_one_line(e)) from e


class _WarningLines(logging.Handler):
    """Each of tinyvllm's warnings (a failed prompt, a slow dtype) as one line on the current stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        msg = " ".join(record.getMessage().split())
        print(msg if msg.startswith(PROG) else f"{PROG}: {msg}", file=sys.stderr)


def _show_warnings() -> None:
    logger = logging.getLogger(PROG)
    if not any(isinstance(h, _WarningLines) for h in logger.handlers):
        logger.addHandler(_WarningLines(logging.WARNING))


def _version() -> str:
    """Version, torch and whether the CUDA kernels are there, without importing torch (fast)."""
    import importlib.metadata
    import importlib.util

    from tinyvllm import __version__

    try:
        torch_version = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        torch_version = "not installed"
    kernels = "built" if importlib.util.find_spec("tinyvllm._C") is not None else "not built (ops run the torch reference)"
    return f"{PROG} {__version__} (torch {torch_version}; CUDA kernels {kernels})"


# ---- generate / chat ---------------------------------------------------------------------------
def _add_generation_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompts", nargs="+", help="prompt text (several prompts run as one batch; '-' reads standard input)")
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


def read_prompts(prompts: list[str]) -> list[str]:
    """The prompts, with '-' replaced by standard input (once; a trailing newline dropped)."""
    if prompts.count("-") > 1:
        raise UsageError("'-' (read the prompt from standard input) can be given only once")
    if "-" not in prompts:
        return prompts
    if sys.stdin.isatty():
        print(f"{PROG}: reading the prompt from standard input (end it with Ctrl-D)", file=sys.stderr)
    text = sys.stdin.read().rstrip("\r\n")
    return [text if p == "-" else p for p in prompts]


def run_generate(args: argparse.Namespace) -> int:
    """Check everything the arguments say, then load the model, then generate."""
    from tinyvllm import SamplingParams
    from tinyvllm.engine.engine_config import EngineConfig
    from tinyvllm.loader import check_model_argument

    use_chat = args.chat
    engine_args = dict(model=args.model, dtype=args.dtype, device=args.device, max_model_len=args.max_model_len,
                       num_kv_blocks=args.num_kv_blocks)  # fmt: skip
    with usage_errors():
        prompts = read_prompts(args.prompts)
        empty = [i for i, p in enumerate(prompts) if p == ""]
        if empty and not use_chat:
            raise UsageError(f"prompt {empty[0]} is empty" + (" (standard input was empty)" if "-" in args.prompts else ""))
        params = SamplingParams(
            max_tokens=args.max_tokens, min_tokens=args.min_tokens, temperature=args.temperature,
            top_p=args.top_p, top_k=args.top_k, min_p=args.min_p, seed=args.seed, stop=args.stop,
            ignore_eos=args.ignore_eos,
        )  # fmt: skip
        EngineConfig(**engine_args)  # the same checks LLM(...) makes, before anything is read
        if args.model is not None:
            check_model_argument(args.model)

    from tinyvllm import LLM

    llm = LLM(**engine_args)
    if use_chat:
        system = [{"role": "system", "content": args.system}] if args.system else []
        outputs = llm.chat([system + [{"role": "user", "content": p}] for p in prompts], params, use_tqdm=False)
    else:
        outputs = llm.generate(prompts, params, use_tqdm=False)
    rc = 0
    for i, out in enumerate(outputs):
        if len(outputs) > 1:
            print(f"--- [{i}] {prompts[i]!r}")
        if out.error:  # already reported, once, by LLM.generate's warning
            rc = 1
            continue
        completion = out.outputs[0]
        if completion.text == "":  # say so, rather than print nothing
            print(f"{PROG}: empty completion (finish_reason={completion.finish_reason})", file=sys.stderr)
        print(completion.text, flush=True)
    if rc == 0 and not use_chat and llm.get_tokenizer().chat_template is not None:
        print(f"{PROG}: note: this model has a chat template; add --chat to send the prompts as chat messages",
              file=sys.stderr)  # fmt: skip
    return rc


# ---- the parser ---------------------------------------------------------------------------------
def _add_debug_flag(p: argparse.ArgumentParser, default: object) -> None:
    p.add_argument("--debug", action="store_true", default=default,
                   help="show the traceback of an error (also: TINYVLLM_DEBUG=1)")  # fmt: skip


def add_subcommand(sub, name: str, func: Callable[[argparse.Namespace], int], help: str) -> argparse.ArgumentParser:
    """A subcommand whose errors :func:`run_command` handles; add its own arguments to the result."""
    p = sub.add_parser(name, help=help, description=help)
    _add_debug_flag(p, argparse.SUPPRESS)  # `tinyvllm --debug generate` and `tinyvllm generate --debug`
    p.set_defaults(func=func)
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="tinyvllm: a small, readable LLM inference engine")
    parser.add_argument("--version", action="version", version=_version())
    _add_debug_flag(parser, False)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    gen = add_subcommand(sub, "generate", run_generate, "complete prompts (or reply to them with --chat)")
    gen.description = ("Complete each prompt as plain text. Instruct models (the default SmolLM2-135M-Instruct "
                       "among them) ship a chat template: --chat applies it, so each prompt is sent as a user "
                       "message and the model replies as an assistant would.")
    gen.epilog = ("examples:\n  tinyvllm generate \"The capital of France is\" --max-tokens 16\n"
                  "  tinyvllm generate --chat \"What is the capital of France?\" --temperature 0\n"
                  "  echo \"Once upon a time\" | tinyvllm generate -\n"
                  "  tinyvllm generate \"def fib(n):\" --model path/to/model --temperature 0.8 --seed 1")
    gen.formatter_class = argparse.RawDescriptionHelpFormatter
    _add_generation_args(gen)
    gen.add_argument("--chat", action="store_true",
                     help="apply the model's chat template to each prompt (a user message; see --system)")
    _add_subcommands(sub)
    return parser


def _add_subcommands(sub) -> None:
    """The subcommands that live in their own modules (chat, serve, bench); each sets ``func``,
    which :func:`run_command` runs like generate's."""
    from tinyvllm.benchmarks.serve import add_bench_parser
    from tinyvllm.entrypoints.cli_chat import add_chat_parser
    from tinyvllm.entrypoints.openai.cli_args import add_serve_parser

    add_chat_parser(sub)
    add_serve_parser(sub)
    add_bench_parser(sub)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _show_warnings()
    return run_command(args.func, args)


if __name__ == "__main__":
    sys.exit(main())
