"""
serve.py: an OpenAI-compatible HTTP server for a checkpoint, with continuous batching and a chat web page.

    pip install '.[serve]'
    python serve.py --ckpt out/sft_add2 --port 8000                 # then open http://127.0.0.1:8000/
    curl 127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
        -d '{"model": "sft_add2", "messages": [{"role": "user", "content": "What is 2 + 3?"}]}'

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")

The one idea: the HTTP side only translates. A request's messages are rendered by chat.py's chat_prompt, exactly
as the terminal chat renders them, and become an engine.Request; the engine's own thread decodes every request
in flight together (engine.py), and hands each one's text back through an asyncio queue to its handler, which
writes it as OpenAI's JSON, or as server-sent events ("data: {chunk}\\n\\n" ... "data: [DONE]\\n\\n") when
"stream" is true. A client that goes away cancels its request, which frees its cache rows at the next step.

Served: POST /v1/chat/completions, POST /v1/completions, GET /v1/models (OpenAI's API reference for the fields;
top_k, repetition_penalty and min_tokens are accepted as vLLM accepts them), GET /health, and GET / (chat.html).
Errors have OpenAI's shape, {"error": {"message", "type", "param", "code"}}, and status: 400 for malformed JSON
or fields and a prompt the context cannot hold, 401 for a wrong key (--api_key), 404 for an unknown model, 503
when --max_queue requests already wait.
"""

import argparse
import asyncio
import json
import os
import secrets
import socket
import sys
import threading
import time
from contextlib import asynccontextmanager
from typing import Literal

try:
    import uvicorn
    from fastapi import FastAPI, Header, Request as HTTPRequest
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
    from pydantic import BaseModel, Field
    from starlette.exceptions import HTTPException
except ImportError:
    raise SystemExit("serve.py needs a web framework: pip install '.[serve]' (FastAPI and uvicorn)")

from chat import CHAT_STOP_IDS, chat_prompt
from checkpoint import load_model
from configurator import resolve_device
from engine import Engine, QueueFull, Request, Sampling
from sample import encode_prompt
from tokenizer import EOS_ID

PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "chat.html")


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]  # "developer": OpenAI's newer name for system
    content: str | list[TextPart]  # a string, or OpenAI's list of content parts (text only: the model reads text)

    def turn(self) -> dict:
        return {"role": "system" if self.role == "developer" else self.role, "content": self.text()}

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class StreamOptions(BaseModel):
    include_usage: bool = False


class Generation(BaseModel):
    """The fields both endpoints share, with OpenAI's names, defaults and ranges."""
    model: str
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # the newer name of max_tokens in the chat API
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int | None = Field(None, ge=1)
    repetition_penalty: float = Field(1.0, gt=0, allow_inf_nan=False)
    min_tokens: int = Field(0, ge=0)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, lt=2**62)
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None


class ChatRequest(Generation):
    messages: list[Message] = Field(min_length=1)


class CompletionRequest(Generation):
    prompt: str


class APIError(Exception):
    def __init__(self, status, message, param=None, code=None, kind="invalid_request_error"):
        super().__init__(message)
        self.status, self.body = status, {"message": message, "type": kind, "param": param, "code": code}


def error_response(e: APIError) -> JSONResponse:
    headers = {"Retry-After": "1"} if e.status == 503 else None
    return JSONResponse({"error": e.body}, status_code=e.status, headers=headers)


def validation_error(e: RequestValidationError) -> APIError:
    """One sentence for pydantic's first complaint: which field, and what is wrong with it."""
    first = e.errors()[0]
    if first["type"] == "json_invalid":
        return APIError(400, f"the body is not valid JSON: {first.get('ctx', {}).get('error', first['msg'])}")
    where = ".".join(str(part) for part in first["loc"][1:]) or "body"
    return APIError(400, f"{where}: {first['msg']}", param=where if len(first["loc"]) > 1 else None)


def sampling_of(body: Generation, n_prompt: int, block_size: int, stop_ids) -> Sampling:
    """The engine's Sampling for a request, or APIError where the context cannot hold the prompt and the reply."""
    param = "messages" if isinstance(body, ChatRequest) else "prompt"
    if n_prompt >= block_size:
        raise APIError(400, f"the prompt is {n_prompt} tokens: this model's context is {block_size} tokens, with "
                       "room needed for at least one new token", param, "context_length_exceeded")
    max_tokens = body.max_completion_tokens or body.max_tokens or block_size - n_prompt
    if n_prompt + max_tokens > block_size:
        raise APIError(400, f"the prompt ({n_prompt} tokens) and max_tokens ({max_tokens}) exceed this model's "
                       f"context of {block_size} tokens", "max_tokens", "context_length_exceeded")
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if "" in stop:
        raise APIError(400, "stop: a stop string must not be empty", "stop")
    return Sampling(max_tokens, body.temperature, body.top_k, body.top_p if body.top_p < 1 else None,
                    body.repetition_penalty, min(body.min_tokens, max_tokens), stop, stop_ids, body.seed, body.n)


def chunk_choice(kind, index, text, finish):
    """One choice's part of a streamed chunk: a delta for chat, text for completions."""
    if kind == "chat":
        return {"index": index, "delta": {"content": text} if text else {}, "logprobs": None, "finish_reason": finish}
    return {"index": index, "text": text, "logprobs": None, "finish_reason": finish}


def whole_choice(kind, index, text, finish):
    if kind == "chat":
        return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": None,
                "finish_reason": finish}
    return {"index": index, "text": text, "logprobs": None, "finish_reason": finish}


async def arrived(events) -> dict:
    """Every event waiting in the queue (at least one), merged per choice: {index: (text, finish, n_tokens)}.
    When the client or this loop falls behind the engine, several tokens go out as one chunk instead of a
    chunk each, so a busy server spends less per token on JSON and on sends, where it can least afford to."""
    batch = [await events.get()]
    while not events.empty():
        batch.append(events.get_nowait())
    merged = {}
    for index, text, finish, count in batch:
        previous = merged.get(index, ("", None, 0))
        merged[index] = (text, finish, count) if finish == "error" else \
            (previous[0] + text, finish or previous[1], count or previous[2])
    return merged


def usage(n_prompt, n_completion):
    return {"prompt_tokens": n_prompt, "completion_tokens": n_completion, "total_tokens": n_prompt + n_completion}


class Server:
    """The routes' shared state: the engine and its thread, the model's name, the key."""

    def __init__(self, engine: Engine, model_name: str, api_key: str | None):
        self.engine, self.model_name, self.api_key = engine, model_name, api_key
        self.created = int(time.time())
        self.stopped = threading.Event()

    def check(self, authorization: str | None, model: str | None = None) -> None:
        if self.api_key is not None:
            given = (authorization or "").removeprefix("Bearer ").strip()
            if not secrets.compare_digest(given.encode(), self.api_key.encode()):
                raise APIError(401, "incorrect API key provided (send it as 'Authorization: Bearer KEY')",
                               code="invalid_api_key")
        if model is not None and model != self.model_name:
            raise APIError(404, f"the model '{model}' does not exist: this server serves '{self.model_name}'",
                           "model", "model_not_found")

    async def submit(self, body: Generation, prompt: list[int], stop_ids):
        """Hand the request to the engine; returns it and the queue its events arrive on."""
        sampling = sampling_of(body, len(prompt), self.engine.model.config.block_size, stop_ids)
        if sampling.n > self.engine.max_batch:
            raise APIError(400, f"n = {sampling.n}: at most {self.engine.max_batch} (--max_batch) per request", "n")
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        request = Request(prompt, sampling, lambda *event: loop.call_soon_threadsafe(events.put_nowait, event))
        try:
            self.engine.submit(request)
        except QueueFull as e:
            raise APIError(503, f"the server is at capacity ({e}); retry later", code="overloaded",
                           kind="server_error") from None
        return request, events

    async def respond(self, http: HTTPRequest, body: Generation, prompt: list[int], stop_ids, kind: str):
        request, events = await self.submit(body, prompt, stop_ids)
        head = {"id": ("chatcmpl-" if kind == "chat" else "cmpl-") + secrets.token_hex(12),
                "object": "chat.completion" if kind == "chat" else "text_completion",
                "created": int(time.time()), "model": self.model_name}
        if body.stream:
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            return StreamingResponse(self.stream(request, events, head, kind, include_usage),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        try:
            texts, finishes, n_tokens = await self.collect(http, request, events)
        finally:
            self.engine.cancel(request)  # a client that went away stops its generation (harmless once done)
        if texts is None:
            return JSONResponse({}, status_code=499)  # nobody is listening; nginx's code for it
        choices = [whole_choice(kind, i, t, f) for i, (t, f) in enumerate(zip(texts, finishes))]
        return JSONResponse({**head, "choices": choices, "usage": usage(len(prompt), n_tokens)})

    async def collect(self, http, request, events):
        """Every choice's whole text and finish; (None, ...) if the client disconnects first."""
        n = request.sampling.n
        texts, finishes, n_tokens = [""] * n, [None] * n, 0
        while None in finishes:
            try:
                index, text, finish, count = await asyncio.wait_for(events.get(), timeout=0.5)
            except TimeoutError:
                if await http.is_disconnected():
                    return None, None, None
                continue
            if finish == "error":
                raise APIError(500, text, kind="server_error")
            texts[index] += text
            finishes[index], n_tokens = finish, n_tokens + count if finish else n_tokens
        return texts, finishes, n_tokens

    async def stream(self, request, events, head, kind, include_usage):
        """Server-sent events: a chunk per piece of new text, one per choice's end, [DONE] last."""
        head = {**head, "object": "chat.completion.chunk" if kind == "chat" else "text_completion"}

        def event(choices, **extra):
            return f"data: {json.dumps({**head, 'choices': choices, **extra})}\n\n"

        n, ended, n_tokens = request.sampling.n, 0, 0
        try:
            if kind == "chat":  # OpenAI's first chunk of each choice names the role
                for i in range(n):
                    yield event([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                  "finish_reason": None}])
            while ended < n:
                for index, (text, finish, count) in (await arrived(events)).items():
                    if finish == "error":
                        yield f"data: {json.dumps({'error': APIError(500, text, kind='server_error').body})}\n\n"
                        return
                    ended, n_tokens = ended + bool(finish), n_tokens + count
                    yield event([chunk_choice(kind, index, text, finish)])
            if include_usage:
                yield event([], usage=usage(len(request.prompt), n_tokens))
            yield "data: [DONE]\n\n"
        finally:  # also when the client disconnects: the response task is cancelled and this generator closed
            self.engine.cancel(request)


def create_app(server: Server) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app):
        thread = threading.Thread(target=server.engine.run, args=(server.stopped,), daemon=True)
        thread.start()
        yield
        server.stopped.set()
        thread.join()

    app = FastAPI(lifespan=lifespan, title="myllm")
    app.add_exception_handler(APIError, lambda request, e: error_response(e))
    app.add_exception_handler(RequestValidationError,
                              lambda request, e: error_response(validation_error(e)))
    app.add_exception_handler(HTTPException,  # unknown paths and methods: the same shape
                              lambda request, e: error_response(APIError(e.status_code, str(e.detail))))
    tokenizer = server.engine.tokenizer

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, http: HTTPRequest, authorization: str | None = Header(None)):
        server.check(authorization, body.model)
        messages = [m.turn() for m in body.messages]
        return await server.respond(http, body, chat_prompt(tokenizer, messages), CHAT_STOP_IDS, "chat")

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, http: HTTPRequest, authorization: str | None = Header(None)):
        server.check(authorization, body.model)
        return await server.respond(http, body, encode_prompt(tokenizer, body.prompt), (EOS_ID,), "text")

    @app.get("/v1/models")
    async def models(authorization: str | None = Header(None)):
        server.check(authorization)
        return {"object": "list", "data": [{"id": server.model_name, "object": "model", "created": server.created,
                                            "owned_by": "myllm"}]}

    @app.get("/health")
    async def health():
        engine = server.engine
        return {"status": "ok", "active": len(engine.active()), "waiting": len(engine.waiting),
                "cancelled": engine.cancelled}

    with open(PAGE, encoding="utf-8") as f:
        page = f.read()

    @app.get("/", response_class=HTMLResponse)
    async def index():
        return page

    return app


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", default="out", help="out_dir of a training run (ckpt.pt + tokenizer.model)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api_key", default=os.environ.get("MYLLM_API_KEY"),
                        help="require 'Authorization: Bearer KEY' (default: $MYLLM_API_KEY; unset: no key)")
    parser.add_argument("--model_name", default=None, help="the model's id in the API (default: the ckpt folder's name)")
    parser.add_argument("--max_batch", type=int, default=16, help="sequences decoded together (cache rows)")
    parser.add_argument("--max_queue", type=int, default=64, help="requests that may wait for a row; more get 503")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    if not 0 <= args.port < 65536:
        parser.error("--port must be between 0 and 65535")
    if args.max_batch < 1 or args.max_queue < 0:
        parser.error("--max_batch must be >= 1 and --max_queue >= 0")
    if args.api_key == "":
        parser.error("--api_key must not be empty")
    return args


def main(argv=None):
    args = parse_args(argv)
    try:  # before the model loads: a port in use is one sentence, not a log line after "serving"
        with socket.create_server((args.host, args.port)):
            pass
    except OSError as e:
        raise SystemExit(f"serve.py: cannot listen on {args.host}:{args.port}: {e.strerror}")
    model, tokenizer = load_model(args.ckpt, resolve_device(args.device))
    name = args.model_name or os.path.basename(os.path.abspath(args.ckpt))
    server = Server(Engine(model, tokenizer, args.max_batch, args.max_queue), name, args.api_key)
    print(f"serving {name} at http://{args.host}:{args.port}/ ({args.max_batch} sequences at a time"
          f"{', API key required' if args.api_key else ''})", file=sys.stderr, flush=True)
    uvicorn.run(create_app(server), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
