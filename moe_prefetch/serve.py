"""python -m moe_prefetch.serve: an OpenAI-compatible HTTP server for one offloaded MoE model.

Endpoints: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (whole answers, or
server-sent events with `stream: true`), GET /health, GET /metrics (Prometheus text). One generation
runs at a time; the others wait in a bounded FIFO queue (serve_engine.py). The wire format and its
checks are in serve_api.py. Needs the `[serve]` extra (Starlette + uvicorn).
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import os
import signal
import socket
import sys

from .cli_common import ArgumentParser, run_main
from .cli_options import add_loading_flags, offload_config, validate_loading_flags
from .errors import MoePrefetchError
from .serve_api import (SSE_DONE, ApiError, chunk, generation_failed, model_card, model_list, new_id, now, parse_json,
                        parse_request, render_metrics, response, shutting_down, sse, usage)

DEFAULT_MAX_CONTEXT = 4096  # KV reserve and prompt check when the model allows more (Mixtral: 32k)
LOG_LEVELS = ("critical", "error", "warning", "info", "debug")


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m moe_prefetch.serve",
                       description="Serve an offloaded Mixture-of-Experts model over an OpenAI-compatible HTTP API.")
    add_loading_flags(p)
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 exposes the server "
                   "to the network, use --api-key then)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000; 0 picks a free one and prints it)")
    p.add_argument("--api-key", default=os.environ.get("MOE_PREFETCH_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on every request (default: $MOE_PREFETCH_API_KEY, "
                   "else no key)")
    p.add_argument("--served-model-name", help="the model id clients must send (default: the --model value)")
    p.add_argument("--max-context", type=int,
                   help=f"longest prompt + completion in tokens; sizes the KV-cache reserve (default: the model's "
                   f"max_position_embeddings, at most {DEFAULT_MAX_CONTEXT})")
    p.add_argument("--max-queue", type=int, default=8,
                   help="requests that may wait while one generates; more get HTTP 429 (default 8)")
    p.add_argument("--log-level", default="info", choices=LOG_LEVELS, help="server log level (default info)")
    return p


def _validate(args) -> None:
    validate_loading_flags(args)
    if not 0 <= args.port <= 65535:
        raise MoePrefetchError(f"--port must be between 0 and 65535, got {args.port}")
    if args.max_queue < 0:
        raise MoePrefetchError(f"--max-queue must be 0 or more, got {args.max_queue}")
    if args.max_context is not None and args.max_context < 2:
        raise MoePrefetchError(f"--max-context must be at least 2, got {args.max_context}")
    if args.api_key is not None and not args.api_key.strip():
        raise MoePrefetchError("--api-key must not be empty")


def _listen(host: str, port: int) -> socket.socket:
    """Bind before loading the model, so a taken port fails in a second, not after the load."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
    except OSError as e:
        raise MoePrefetchError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def main_body(argv=None) -> int:
    args = build_parser().parse_args(argv)
    _validate(args)
    try:
        import starlette  # noqa: F401
        import uvicorn
    except ImportError as e:
        raise MoePrefetchError(f"the server needs the [serve] extra ({e.name} is missing): "
                               "pip install 'moe_prefetch[serve]'") from None
    sock = _listen(args.host, args.port)
    if not _is_loopback(args.host) and args.api_key is None:
        print(f"warning: listening on {args.host} without --api-key: anyone who can reach this port can use "
              "the model", file=sys.stderr)

    import transformers

    transformers.logging.set_verbosity_error()
    from .hub import resolve_model
    from .runtime import _load_config, load_model

    path = resolve_model(args.model)
    model_limit = getattr(_load_config(path), "max_position_embeddings", None) or DEFAULT_MAX_CONTEXT
    if args.max_context is not None and args.max_context > model_limit:
        raise MoePrefetchError(f"--max-context {args.max_context} is longer than the model's context ({model_limit})")
    max_context = args.max_context or min(model_limit, DEFAULT_MAX_CONTEXT)
    model, tokenizer = load_model(str(path), offload_config(args, max_context=max_context))

    from .serve_engine import Engine

    engine = Engine(model, tokenizer, args.served_model_name or args.model, max_context, args.max_queue)
    url = f"http://{args.host if ':' not in args.host else f'[{args.host}]'}:{sock.getsockname()[1]}"
    app = build_app(engine, args.api_key, ready_message=f"moe_prefetch.serve: serving '{engine.model_id}' at {url}/v1")

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            engine.shutdown()  # open streams end now instead of holding the graceful shutdown
            super().handle_exit(sig, frame)

    server = Server(uvicorn.Config(app, log_level=args.log_level, timeout_graceful_shutdown=5))
    # uvicorn re-raises the signal that stopped it once it is done; for a server, Ctrl-C or SIGTERM is
    # the normal way to stop, so that re-raise is absorbed and the cleanup below runs
    previous = {s: signal.signal(s, lambda *_: None) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.run(sockets=[sock])
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        engine.close()
        model.moe_runtime.close()
    print("moe_prefetch.serve: stopped", file=sys.stderr)
    return 0


# ---- the HTTP application -----------------------------------------------------------------------------

def build_app(engine, api_key: str | None = None, ready_message: str | None = None):
    """The Starlette application around a serve_engine.Engine."""
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.middleware import Middleware
    from starlette.requests import Request
    from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse
    from starlette.routing import Route

    requests = {}  # outcome -> count, for /metrics
    created = now()

    def count(outcome: str) -> None:
        requests[outcome] = requests.get(outcome, 0) + 1

    def error_response(e: ApiError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    async def health(request: Request):
        return JSONResponse({"status": "ok", "model": engine.model_id, "busy": engine.busy, "queue_length": engine.waiting})

    async def metrics(request: Request):
        text = render_metrics(engine.stats(), engine.model_id, requests, engine.waiting, engine.busy)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    async def models(request: Request):
        return JSONResponse(model_list(engine.model_id, created))

    async def one_model(request: Request):
        engine.check_model(request.path_params["model_id"])
        return JSONResponse(model_card(engine.model_id, created))

    async def completions(request: Request):
        return await generate(request, chat=False)

    async def chat_completions(request: Request):
        return await generate(request, chat=True)

    async def generate(request: Request, chat: bool):
        try:
            req = parse_request(parse_json(await request.body()), chat)
            engine.check_model(req.model)
            ids = engine.encode_chat(req.messages) if chat else engine.encode_prompt(req.prompt)
            max_new = engine.max_new_tokens(len(ids), req.params, chat)
            job = await engine.start(ids, req.params, max_new, client_gone=request.is_disconnected)
        except ApiError as e:
            count({429: "queue_full", 503: "cancelled"}.get(e.status, "invalid"))
            return error_response(e)
        rid, stamp = new_id(chat), now()
        if job is None:  # the client left while it waited; nobody reads this
            count("cancelled")
            return PlainTextResponse("", status_code=499)
        if req.stream:
            return StreamingResponse(stream(req, job, rid, stamp, len(ids)), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        watcher = asyncio.ensure_future(_cancel_on_disconnect(request, job))
        try:
            text = "".join([delta async for delta in engine.text(job)])
        except Exception as e:  # noqa: BLE001 - the worker's failure, logged there
            count("failed")
            return error_response(generation_failed(e))
        finally:
            watcher.cancel()
        if job.finish_reason is None:
            count("cancelled")
            return error_response(shutting_down()) if engine.closing else PlainTextResponse("", status_code=499)
        count("completed")
        return JSONResponse(response(req, rid, stamp, text, job.finish_reason, usage(len(ids), job.completion_tokens)))

    async def stream(req, job, rid: str, stamp: int, n_prompt: int):
        """The server-sent events of one streamed generation. When the client disconnects, Starlette
        cancels this generator; leaving engine.text() early cancels the job."""
        outcome = "cancelled"
        try:
            if req.chat:
                yield sse(chunk(req, rid, stamp, role=True))
            async for delta in engine.text(job):
                yield sse(chunk(req, rid, stamp, text=delta))
            if job.finish_reason is None and engine.closing:
                raise shutting_down()
            if job.finish_reason is not None:
                use = usage(n_prompt, job.completion_tokens)
                yield sse(chunk(req, rid, stamp, finish_reason=job.finish_reason, use=use))
                if req.include_usage:
                    yield sse(chunk(req, rid, stamp, use=use, no_choices=True))
                outcome = "completed"
            yield SSE_DONE
        except Exception as e:  # noqa: BLE001 - headers are sent: the error goes in the stream
            outcome = "cancelled" if engine.closing else "failed"
            yield sse((e if isinstance(e, ApiError) else generation_failed(e)).body())
            yield SSE_DONE
        finally:
            job.cancel()  # no-op when it finished
            count(outcome)

    async def not_found(request: Request, exc: HTTPException):
        return error_response(ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}",
                                       code="not_found" if exc.status_code == 404 else None))

    async def api_error(request: Request, exc: ApiError):
        return error_response(exc)

    async def internal_error(request: Request, exc: Exception):
        # Starlette re-raises the exception after this response is sent, and uvicorn logs its traceback
        return error_response(ApiError(500, f"internal server error: {type(exc).__name__}: {exc}",
                                       type="server_error", code="internal_error"))

    @contextlib.asynccontextmanager
    async def lifespan(app):
        if ready_message:
            print(ready_message, file=sys.stderr, flush=True)
        yield
        engine.shutdown()  # also when stopped by other means than a signal

    routes = [
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/models/{model_id:path}", one_model, methods=["GET"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
    ]
    middleware = [Middleware(_ApiKeyCheck, key=api_key)] if api_key else []
    return Starlette(routes=routes, middleware=middleware, lifespan=lifespan,
                     exception_handlers={HTTPException: not_found, ApiError: api_error, Exception: internal_error})


async def _cancel_on_disconnect(request, job, every_s: float = 0.25) -> None:
    """A non-streamed request has no stream to break: poll the connection instead."""
    while not job.cancelled.is_set():
        await asyncio.sleep(every_s)
        if await request.is_disconnected():
            job.cancel()


class _ApiKeyCheck:
    """ASGI middleware: every HTTP request must carry `Authorization: Bearer <key>`."""

    def __init__(self, app, key: str):
        self.app, self.key = app, key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            header = dict(scope["headers"]).get(b"authorization", b"")
            scheme, _, given = header.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(given.strip(), self.key):
                from starlette.responses import JSONResponse

                e = ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                             code="invalid_api_key")
                await JSONResponse(e.body(), status_code=401)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def main(argv=None) -> int:
    return run_main(main_body, argv)


if __name__ == "__main__":
    sys.exit(main())
