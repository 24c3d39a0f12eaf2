"""`tinyvllm chat [MODEL]`: an interactive conversation in the terminal.

    $ tinyvllm chat
    > What is the capital of France?
    The capital of France is Paris.
    > /clear          (forget the conversation)     /exit (or Ctrl-D) quits

Each line you type is a user message; the whole conversation so far goes through the model's chat
template (as ``LLM.chat``), and the reply is printed token by token as the engine steps (the
engine's incremental detokenizer never splits a character). The reply joins the history. Ctrl-C
during a reply stops it (the request is aborted) and keeps what was printed.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from typing import Any, TextIO

HELP = "commands: /clear forgets the conversation, /exit (or Ctrl-D) quits"


def add_chat_parser(subparsers) -> argparse.ArgumentParser:
    from tinyvllm.engine.arg_utils import add_engine_args

    p = subparsers.add_parser(
        "chat", help="talk to a model in the terminal (its chat template applied)",
        description="An interactive chat in the terminal: type a message, the reply streams back; the "
                    "conversation is kept and rendered with the model's chat template. " + HELP + ".",
        epilog="examples:\n  tinyvllm chat\n  tinyvllm chat path/to/model --system 'Answer briefly.'\n"
               "  echo 'Hi!' | tinyvllm chat --temperature 0 --max-tokens 32",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    add_engine_args(p)
    g = p.add_argument_group("sampling")
    g.add_argument("--system", default=None, help="a system message that opens the conversation")
    # Unset: the model's recommended value (its generation_config.json, as the server does), else ours.
    g.add_argument("--max-tokens", type=int, default=None, help="longest reply (default: the model's, else 512)")
    g.add_argument("--temperature", type=float, default=None, help="0 = greedy (default: the model's, else 0.7)")
    g.add_argument("--top-p", type=float, default=None, help="(default: the model's, else 1)")
    g.add_argument("--top-k", type=int, default=None, help="0 or -1 = off (default: the model's, else off)")
    g.add_argument("--min-p", type=float, default=None, help="(default: the model's, else 0)")
    p.set_defaults(func=chat_main)
    return p


CHAT_DEFAULTS = {"max_tokens": 512, "temperature": 0.7}  # where neither the flags nor the model say


def chat_sampling(args: argparse.Namespace, model_defaults: dict[str, Any]) -> Any:
    """The reply's SamplingParams: the flags given, else the model's generation config, else ours."""
    from tinyvllm.sampling_params import SamplingParams

    given = {name: getattr(args, name) for name in ("max_tokens", "temperature", "top_p", "top_k", "min_p")}
    return SamplingParams(**(CHAT_DEFAULTS | model_defaults | {k: v for k, v in given.items() if v is not None}))


class ChatSession:
    """The conversation and the engine; :meth:`reply` streams one answer to ``out``."""

    def __init__(self, engine: Any, params: Any, system: str | None = None) -> None:
        self.engine = engine
        self.params = params
        self.system = system
        self._ids = itertools.count()
        self.clear()

    def clear(self) -> None:
        self.messages: list[dict[str, str]] = [{"role": "system", "content": self.system}] if self.system else []

    def reply(self, user_text: str, out: TextIO) -> Any:
        """Add the user's message, stream the reply to ``out``, keep it in the history; the final
        RequestOutput is returned."""
        tok = self.engine.tokenizer
        self.messages.append({"role": "user", "content": user_text})
        prompt = tok.apply_chat_template(self.messages, add_generation_prompt=True)
        request_id = f"chat-{next(self._ids)}"
        self.engine.add_request(request_id, {"prompt": prompt, "prompt_token_ids": tok.encode(prompt, add_special_tokens=False)},
                                self.params)  # fmt: skip
        shown, final = 0, None
        try:
            while final is None:
                for o in self.engine.step():
                    if o.request_id != request_id:
                        continue
                    text = o.outputs[0].text
                    out.write(text[shown:])
                    out.flush()
                    shown = len(text)
                    if o.finished:
                        final = o
        except KeyboardInterrupt:
            self.engine.abort_request(request_id)
            final = next(o for o in self.engine.step() if o.request_id == request_id)
            out.write(" [stopped]")
        completion = final.outputs[0]
        if final.error:
            self.messages.pop()
            out.write(f"[error: {final.error}]\n")
            return final
        if completion.text == "":
            out.write(f"[empty reply, finish_reason={completion.finish_reason}]")
        out.write("\n")
        out.flush()
        self.messages.append({"role": "assistant", "content": completion.text})
        return final


def chat_main(args: argparse.Namespace) -> int:
    from tinyvllm.engine.arg_utils import engine_config_from_args
    from tinyvllm.engine.llm_engine import LLMEngine

    try:
        chat_sampling(args, {})  # (a bad flag fails before the model loads)
        engine = LLMEngine.from_config(engine_config_from_args(args))
        params = chat_sampling(args, engine.default_sampling)
    except (ValueError, FileNotFoundError) as e:
        print(f"tinyvllm: error: {e}", file=sys.stderr)
        return 2
    if engine.tokenizer.chat_template is None:
        print("tinyvllm: error: this model has no chat template; use `tinyvllm generate` for plain completion",
              file=sys.stderr)  # fmt: skip
        return 2
    session = ChatSession(engine, params, args.system)
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"tinyvllm chat: {HELP}", file=sys.stderr)
    while True:
        try:
            line = input("> " if interactive else "")
        except EOFError:
            break
        except KeyboardInterrupt:
            print(file=sys.stderr)
            break
        line = line.strip()
        if not line:
            continue
        if line == "/exit":
            break
        if line == "/clear":
            session.clear()
            print("[conversation cleared]", file=sys.stderr)
            continue
        if line.startswith("/"):
            print(f"[unknown command {line.split()[0]}; {HELP}]", file=sys.stderr)
            continue
        session.reply(line, sys.stdout)
    return 0
