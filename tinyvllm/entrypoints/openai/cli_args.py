"""`tinyvllm serve`'s flags. Kept apart from api_server.py so that building the `tinyvllm` parser
never imports FastAPI (an optional extra): `tinyvllm serve` without it says how to install it."""

from __future__ import annotations

import argparse
import os
import sys


def add_serve_parser(subparsers) -> argparse.ArgumentParser:
    from tinyvllm.engine.arg_utils import add_engine_args

    p = subparsers.add_parser(
        "serve", help="run an OpenAI-compatible server (and a chat page at /)",
        description="Serve a model over the OpenAI API: /v1/completions, /v1/chat/completions, /v1/models, "
                    "/health, /metrics, /tokenize, /detokenize, and a chat page at /.",
        epilog="examples:\n  tinyvllm serve\n  tinyvllm serve path/to/model --port 8080 --max-model-len 4096\n"
               "  tinyvllm serve model.gguf --api-key secret --served-model-name my-model\n"
               "then open http://127.0.0.1:8000/ or use any OpenAI client with base_url http://127.0.0.1:8000/v1",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    add_engine_args(p)
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for all)")
    g.add_argument("--port", type=int, default=8000)
    g.add_argument("--api-key", default=os.environ.get("TINYVLLM_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1/*, /tokenize, /detokenize "
                        "(default: $TINYVLLM_API_KEY, else none)")  # fmt: skip
    g.add_argument("--served-model-name", nargs="+", default=None,
                   help="the name(s) clients use in 'model' (default: the model argument)")
    g.add_argument("--chat-template", default=None,
                   help="the chat template for /v1/chat/completions: a Jinja file's path, or the template itself "
                        "(default: the model's)")  # fmt: skip
    g.add_argument("--trust-request-chat-template", action="store_true",
                   help="let a request bring its own chat_template (vLLM's flag: off, a template is code the server runs)")
    g.add_argument("--enable-prompt-tokens-details", action="store_true",
                   help="report usage.prompt_tokens_details.cached_tokens: prompt tokens the prefix cache served")
    g.add_argument("--uvicorn-log-level", default="warning", choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=serve_main)
    return p


def serve_main(args: argparse.Namespace) -> int:
    try:
        from tinyvllm.entrypoints.openai.api_server import run_server
    except ImportError as e:
        print(f"tinyvllm: error: `tinyvllm serve` needs the serve extra ({e.name} is missing): "
              "pip install -e '.[serve]'", file=sys.stderr)  # fmt: skip
        return 1
    try:
        return run_server(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"tinyvllm: error: {e}", file=sys.stderr)
        return 2
