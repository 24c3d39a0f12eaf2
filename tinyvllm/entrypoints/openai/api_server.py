"""`tinyvllm serve [MODEL]`: an OpenAI-compatible HTTP server over the AsyncLLMEngine.

    tinyvllm serve                                  # SmolLM2-135M-Instruct on 127.0.0.1:8000
    curl localhost:8000/v1/completions -H 'Content-Type: application/json' \\
         -d '{"prompt": "The capital of France is", "max_tokens": 8}'

Endpoints: POST /v1/completions, POST /v1/chat/completions (both streamed over server-sent events
with ``"stream": true``), GET /v1/models, GET /health, GET /metrics (Prometheus text), POST
/tokenize, POST /detokenize, GET /version, and GET / (the chat page, static/chat.html).

The life of a request: FastAPI parses the JSON into a pydantic model (protocol.py); the serving
class checks it and builds a SamplingParams (serving_engine.py), then iterates the request's
stream from the AsyncLLMEngine, whose LLMEngine steps in a process of its own
(tinyvllm/engine/engine_core.py); each RequestOutput becomes a chunk (streaming) or, at the end,
the response. A failure anywhere is an
OpenAIError and leaves as OpenAI's error object with its status: 400 for a bad request (types
included: OpenAI and vLLM answer 400, not 422), 401 without the API key, 404 for an unknown
model or path, 500 when the engine fails, 503 while shutting down.

SIGINT/SIGTERM: the engine ends every running request with an error (503, or an error event in a
stream), then uvicorn closes the connections and exits.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import logging
import os
from contextlib import asynccontextmanager
from importlib import resources

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

import tinyvllm
from tinyvllm.engine.async_llm_engine import AsyncLLMEngine
from tinyvllm.entrypoints.openai.metrics import ServerMetrics
from tinyvllm.entrypoints.openai.protocol import (
    ChatCompletionRequest, CompletionRequest, DetokenizeRequest, ModelCard, ModelList, TokenizeRequest,
)  # fmt: skip
from tinyvllm.entrypoints.openai.serving_chat import OpenAIServingChat
from tinyvllm.entrypoints.openai.serving_completion import OpenAIServingCompletion
from tinyvllm.entrypoints.openai.serving_engine import ClientDisconnected, OpenAIError

logger = logging.getLogger("tinyvllm")

# Paths that need the API key when one is set (vLLM guards /v1; the token endpoints expose the model too).
_GUARDED = ("/v1/", "/tokenize", "/detokenize")


def error_response(e: OpenAIError) -> JSONResponse:
    return JSONResponse(e.response().model_dump(), status_code=e.status)


class APIKeyMiddleware:
    """Requests to the guarded paths without ``Authorization: Bearer <api_key>`` get 401.

    A plain ASGI middleware, not ``@app.middleware("http")``: that one (Starlette's
    BaseHTTPMiddleware) passes every response body through an extra memory stream, and a
    streamed reply is one body message per token: at 200 streams it was half the event loop's time.
    """

    def __init__(self, app, api_key: str) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"].startswith(_GUARDED):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                response = error_response(OpenAIError(401, "Missing or invalid API key (Authorization: Bearer KEY)."))
                return await response(scope, receive, send)
        await self.app(scope, receive, send)


def build_app(engine: AsyncLLMEngine, served_model_names: list[str], *, api_key: str | None = None,
              model_path: str | None = None, chat_template: str | None = None,
              trust_request_chat_template: bool = False, enable_prompt_tokens_details: bool = False) -> FastAPI:  # fmt: skip
    """The FastAPI app; ``engine`` is started with the app and shut down with it. ``chat_template``:
    the template chat requests are rendered with (None: the model's); a request's own only with
    ``trust_request_chat_template``."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        yield
        await engine.shutdown()

    app = FastAPI(title="tinyvllm", version=tinyvllm.__version__, lifespan=lifespan)
    metrics = ServerMetrics(engine)
    details = enable_prompt_tokens_details
    completions = OpenAIServingCompletion(engine, served_model_names, metrics, enable_prompt_tokens_details=details)
    chat = OpenAIServingChat(engine, served_model_names, metrics, chat_template=chat_template,
                             trust_request_chat_template=trust_request_chat_template,
                             enable_prompt_tokens_details=details)  # fmt: skip
    app.state.engine = engine

    # ---- errors: every failure leaves as OpenAI's error object ----------------------------------
    @app.exception_handler(OpenAIError)
    async def _openai_error(request: Request, e: OpenAIError):
        return error_response(e)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        if first.get("type") == "json_invalid":
            return error_response(OpenAIError(400, f"The request body is not valid JSON: {first.get('msg', '')}"))
        param = loc[0] if loc else None
        where = ".".join(loc) or "body"
        return error_response(OpenAIError(400, f"{where}: {first.get('msg', 'invalid value')}", param=param))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        return error_response(OpenAIError(e.status_code, str(e.detail)))

    @app.exception_handler(ClientDisconnected)
    async def _gone(request: Request, e: ClientDisconnected):
        return Response(status_code=499)  # nobody reads it; the request was aborted

    if api_key is not None:
        app.add_middleware(APIKeyMiddleware, api_key=api_key)

    # ---- endpoints ---------------------------------------------------------------------------------
    @app.get("/health")
    async def health():
        return Response(status_code=200 if engine.is_running else 503)

    @app.get("/version")
    async def version():
        return {"version": tinyvllm.__version__}

    @app.get("/metrics")
    async def prometheus_metrics():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models():
        cards = [ModelCard(id=name, root=model_path, max_model_len=engine.config.max_model_len) for name in served_model_names]
        return ModelList(data=cards)

    @app.post("/v1/completions")
    async def create_completion(request: CompletionRequest, raw_request: Request):
        return await completions.create_completion(request, raw_request)

    @app.post("/v1/chat/completions")
    async def create_chat_completion(request: ChatCompletionRequest, raw_request: Request):
        return await chat.create_chat_completion(request, raw_request)

    @app.post("/tokenize")
    async def tokenize(request: TokenizeRequest):
        completions.check_model(request.model)
        if (request.prompt is None) == (request.messages is None):
            raise OpenAIError(400, "give exactly one of prompt and messages.", param="prompt")
        if request.messages is not None:
            _, ids = chat.render(request.messages, request.add_generation_prompt)
        else:
            ids = await completions.encode(request.prompt, request.add_special_tokens)
        return {"count": len(ids), "max_model_len": engine.config.max_model_len, "tokens": ids}

    @app.post("/detokenize")
    async def detokenize(request: DetokenizeRequest):
        completions.check_model(request.model)
        vocab = getattr(engine.engine, "vocab_size", None)
        bad = [t for t in request.tokens if t < 0 or (vocab is not None and t >= vocab)]
        if bad:
            raise OpenAIError(400, f"Token id {bad[0]} is out of vocabulary (vocab_size={vocab}).", param="tokens")
        return {"prompt": engine.tokenizer.decode(request.tokens)}

    @app.get("/", response_class=HTMLResponse)
    async def chat_page():
        return HTMLResponse(resources.files("tinyvllm.entrypoints").joinpath("static/chat.html").read_text("utf-8"))

    return app


# ---- the command (its flags: cli_args.py) -----------------------------------------------------------
def default_model_name(model: str | None) -> str:
    if model is None:
        from tinyvllm.default_model import DEFAULT_MODEL_FILE

        return DEFAULT_MODEL_FILE.split(".")[0]  # SmolLM2-135M-Instruct
    return model


def load_chat_template(value: str | None) -> str | None:
    """``--chat-template``: a file's contents, or the value itself if it is a template (vLLM's rule:
    it holds Jinja's braces); a ValueError for a path that does not exist or a template that does
    not compile."""
    if value is None:
        return None
    path = os.path.expanduser(value)
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            value = f.read()
    elif "{" not in value:
        raise ValueError(f"--chat-template {value!r}: no such file (nor a template: it has no '{{')")
    import jinja2

    from tinyvllm.tokenizer import _compile_template

    try:
        _compile_template(value)
    except jinja2.TemplateError as e:
        raise ValueError(f"--chat-template does not compile: {e}") from e
    return value


def run_server(args: argparse.Namespace) -> int:
    """Build the engine and the app from ``tinyvllm serve``'s flags; serve until SIGINT/SIGTERM."""
    from tinyvllm.engine.arg_utils import engine_config_from_args, model_from_args

    config = engine_config_from_args(args)
    names = args.served_model_name or [default_model_name(model_from_args(args))]
    chat_template = load_chat_template(args.chat_template)  # (before the engine: a bad one fails at once)
    # The engine in its own process (engine_core.py), unless TINYVLLM_ENGINE_PROCESS=0 (vLLM's
    # VLLM_ENABLE_V1_MULTIPROCESSING): then it steps in a thread of this one.
    engine = AsyncLLMEngine.from_config(config, engine_process=os.environ.get("TINYVLLM_ENGINE_PROCESS", "1") != "0")
    app = build_app(engine, names, api_key=args.api_key, model_path=config.model, chat_template=chat_template,
                    trust_request_chat_template=args.trust_request_chat_template,
                    enable_prompt_tokens_details=args.enable_prompt_tokens_details)  # fmt: skip
    server = _Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.uvicorn_log_level,
                                    timeout_graceful_shutdown=5), engine)  # fmt: skip
    print(f"tinyvllm: serving {names[0]} on http://{args.host}:{args.port} (chat page at /, API at /v1)", flush=True)
    try:
        server.run()
    except KeyboardInterrupt:  # uvicorn re-raises the SIGINT it handled, once it has shut down
        pass
    return 0


class _Server(uvicorn.Server):
    """uvicorn's Server, whose first SIGINT/SIGTERM also ends the running requests at once (with an
    error), so that shutting down never waits for long generations to finish."""

    def __init__(self, config: uvicorn.Config, engine: AsyncLLMEngine) -> None:
        super().__init__(config)
        self.engine = engine

    def handle_exit(self, sig, frame) -> None:
        # A signal handler: it runs on the main thread, which is the event loop's.
        if not self.should_exit:
            try:
                asyncio.get_running_loop().call_soon(lambda: asyncio.ensure_future(self.engine.shutdown()))
            except RuntimeError:
                pass  # no loop running yet: uvicorn's own exit is enough
        super().handle_exit(sig, frame)
