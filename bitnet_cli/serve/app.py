"""The OpenAI-compatible HTTP layer of `bitnet serve` (Starlette on uvicorn).

Endpoints: POST /v1/completions, POST /v1/chat/completions, GET /v1/models, GET /health, and
vLLM's GET /tokenizer_info, POST /tokenize, POST /detokenize (which lm-evaluation-harness's
`local-completions` model detects and then tokenises through). Request fields and response
shapes follow OpenAI's API reference; streams are server-sent events `data: {json}` ending with
`data: [DONE]`. Every error is OpenAI's `{"error": {"message", "type", "param", "code"}}` with a
4xx status (a 500 only for a bug, and then without internals).

Sampling defaults are OpenAI's (temperature 1, top_p 1, no top_k), as are `frequency_penalty`, `presence_penalty`
and `logit_bias`; `top_k`, `ignore_eos` and `repeat_penalty` are extensions. Greedy (temperature 0) output and seeded
samples are those of `bitnet run` with the same settings, whatever else the server is doing.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import json
import operator
import re
import time
import uuid
from typing import Callable, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.routing import Route

from bitnet_cli.constrain import Schema, ToolCallText, output_schema, tag_matched, tool_call_schema
from bitnet_cli.engine import (TOOL_CALL_FORMATS, Engine, ToolCallFormat, render_chat, stop_texts,
                               tool_call_format)
from bitnet_cli.errors import BitnetError
from bitnet_cli.sampling import MAX_BIASED, MAX_PENALTY, SamplingParams, logit_bias_pairs
from bitnet_cli.serve.scheduler import DoneEvent, ErrorEvent, Job, PromptLogprobs, QueueFull, Scheduler, TokenEvent

MAX_BODY = 8 << 20  # bytes of one request body; larger ones get 413 before they are read in full
MAX_N = 16          # choices per prompt (`n`)
MAX_LOGPROBS = 20   # alternatives per token (`logprobs`, `top_logprobs`)


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type_

    def response(self) -> JSONResponse:
        headers = {"Retry-After": "1"} if self.status in (429, 503) else None
        return JSONResponse(status_code=self.status, headers=headers, content={
            "error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}})


# ---------------------------------------------------------------------- request schemas

class _Strict(BaseModel):
    # strict: "16" is not a number and 1 is not a bool; unknown fields are ignored, as OpenAI does;
    # NaN and Infinity (which Python's JSON reads) are "not a finite number", not "greater than 2"
    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)


class StreamOptions(_Strict):
    include_usage: bool = False


class JsonSchemaFormat(_Strict):
    name: Optional[str] = None
    description: Optional[str] = None
    schema_: Optional[dict] = Field(None, alias="schema")
    strict: Optional[bool] = None  # the schema is always enforced: every keyword kept is obeyed


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: Optional[JsonSchemaFormat] = None


class _Sampling(_Strict):
    model: Optional[str] = None
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)                 # extension: 0 is no limit
    repeat_penalty: float = Field(1.0, gt=0)    # extension, as `bitnet run --repeat-penalty`
    ignore_eos: bool = False                    # extension (as vLLM, llama.cpp): for benchmarks
    frequency_penalty: float = Field(0.0, ge=-MAX_PENALTY, le=MAX_PENALTY)
    presence_penalty: float = Field(0.0, ge=-MAX_PENALTY, le=MAX_PENALTY)
    logit_bias: Optional[dict[str, float]] = Field(None, max_length=MAX_BIASED)  # token id (text) -> bias
    stop: Union[str, list[str], None] = Field(None)
    seed: Optional[int] = Field(None, ge=0)       # as `bitnet run --seed`: numpy seeds are non-negative
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    response_format: Optional[ResponseFormat] = None  # json_object/json_schema: constrained decoding

    def output_schema(self) -> Schema | None:
        """The schema the reply must follow (bitnet_cli.constrain), or None for free text."""
        fmt = self.response_format
        if fmt is None or fmt.type == "text":
            return None
        if fmt.type == "json_schema" and (fmt.json_schema is None or fmt.json_schema.schema_ is None):
            raise ApiError(400, "response_format json_schema needs json_schema.schema", "response_format")
        try:
            return output_schema(fmt.type, fmt.json_schema.schema_ if fmt.type == "json_schema" else None)
        except BitnetError as e:
            raise ApiError(400, f"response_format: {e}", "response_format") from None

    def stops(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 16:
            raise ApiError(400, "at most 16 stop strings", "stop")
        try:
            return stop_texts(stops)
        except BitnetError as e:
            raise ApiError(400, str(e), "stop") from None

    def params(self, vocab_size: int) -> SamplingParams:
        try:
            bias = logit_bias_pairs(self.logit_bias or {}, vocab_size)
        except BitnetError as e:
            raise ApiError(400, str(e), "logit_bias") from None
        return SamplingParams(self.temperature, self.top_k, self.top_p, self.repeat_penalty, self.frequency_penalty,
                              self.presence_penalty, bias)


class CompletionRequest(_Sampling):
    prompt: Union[str, list[int], list[str], list[list[int]]]
    best_of: Optional[int] = Field(None, ge=1, le=1)  # neutral values only, as the penalties (both were ignored)
    suffix: Optional[str] = Field(None, max_length=0)
    max_tokens: Optional[int] = Field(16, ge=0)
    logprobs: Optional[int] = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class CalledFunction(_Strict):
    name: str
    arguments: str


class ToolCall(_Strict):
    id: str
    type: Literal["function"]
    function: CalledFunction


class ChatMessage(_Strict):
    """A turn: text, or (assistant) the tool calls it made, or (tool) a call's result, which the next turn reads."""

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: Union[str, list[TextPart], None] = None
    tool_calls: Optional[list[ToolCall]] = None  # assistant
    tool_call_id: Optional[str] = None  # tool: the call answered
    name: Optional[str] = None  # the speaker's or (tool) the function's name, for templates that write it

    def text(self) -> str:
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)

    def rendered(self, index: int) -> dict:
        """The turn as chat templates read it (transformers' and OpenAI's shape); ApiError where a part is missing."""
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ApiError(400, f"messages[{index}] ({self.role}) needs content", f"messages.{index}.content")
        if self.role == "tool" and self.tool_call_id is None:
            raise ApiError(400, f"messages[{index}] (tool) needs tool_call_id", f"messages.{index}.tool_call_id")
        turn = {"role": "system" if self.role == "developer" else self.role, "content": self.text()}
        if self.tool_calls:
            turn["tool_calls"] = [c.model_dump() for c in self.tool_calls]
        if self.tool_call_id is not None:
            turn["tool_call_id"] = self.tool_call_id
        if self.name is not None:
            turn["name"] = self.name
        return turn


class FunctionDef(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")  # as OpenAI's
    description: Optional[str] = None
    parameters: Optional[dict] = None  # a JSON schema of an object; none: no arguments
    strict: Optional[bool] = None  # the schema is always enforced


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(_Strict):
    name: str


class ToolChoice(_Strict):
    type: Literal["function"]
    function: NamedFunction


NO_ARGUMENTS = {"type": "object", "properties": {}, "additionalProperties": False}


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: Optional[int] = Field(None, ge=0)
    max_completion_tokens: Optional[int] = Field(None, ge=0)
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=MAX_LOGPROBS)
    # function calling: tool_choice names a function (the reply calls it), or is "required" (it calls one of the
    # tools), or "auto" (the default with tools: the model writes text or calls, where its chat template shows it a
    # way to call: engine.tool_call_format, whose tags then hold every call); a call's arguments are held to the
    # function's parameters by constrained decoding. The legacy functions/function_call are refused rather than
    # ignored (a client would wait for a call).
    tools: Optional[list[Tool]] = Field(None, max_length=128)  # as OpenAI's limit (and constrain.MAX_FORK)
    functions: Optional[list] = None
    tool_choice: Union[Literal["none", "auto", "required"], ToolChoice, None] = None
    parallel_tool_calls: Optional[bool] = None  # false: at most one call (where calls are written between tags)
    function_call: Union[str, dict, None] = None

    @functools.cached_property
    def called_functions(self) -> list[FunctionDef]:
        """The functions the reply calls one of, or may call one of where the model chooses (:attr:`call_optional`);
        []: a reply in text. ApiError for what this server does not do. Decided once per request."""
        for name in ("functions", "function_call"):
            if getattr(self, name) not in (None, [], "none"):
                raise ApiError(400, f"{name}: the legacy function calling is not supported by this server (use tools "
                               "with tool_choice naming the function)", name)
        tools, choice = self.tools or [], self.tool_choice
        if choice == "none" or (choice is None and not tools):
            return []
        if not tools:
            raise ApiError(400, "tool_choice needs tools", "tool_choice")
        names = [t.function.name for t in tools]
        if len(set(names)) < len(names):
            raise ApiError(400, "tools: two functions have the same name", "tools")
        called = [t.function for t in tools]
        if isinstance(choice, ToolChoice):
            called = [f for f in called if f.name == choice.function.name]
            if not called:
                raise ApiError(400, f"tool_choice names {choice.function.name!r}, which is not among the tools",
                               "tool_choice")
        if self.response_format is not None and self.response_format.type != "text":
            raise ApiError(400, "response_format and tools cannot go together (a call's arguments follow the "
                           "function's parameters); send tool_choice \"none\" for a reply in that format",
                           "response_format")
        return called

    @property
    def call_optional(self) -> bool:
        """Whether the model chooses between text and a call (tool_choice "auto", or none given with tools)."""
        return bool(self.called_functions) and self.tool_choice in ("auto", None)

    def stops(self) -> list[str]:
        """No stop strings for a required call: they would cut its arguments short (where the model chooses, they
        stand, and may cut a call too)."""
        return [] if self.called_functions and not self.call_optional else super().stops()

    def output_schema(self, written: ToolCallFormat | None = None) -> Schema | None:
        """A call's arguments follow its function's parameters (one function called: the arguments alone; several,
        a choice, or calls ``written`` as the chat template writes them: the call as {"name": ..., "arguments": ...},
        constrain.tool_call_schema, with the template's key for the arguments); else response_format's schema."""
        functions = self.called_functions
        if not functions:
            return super().output_schema()
        parameters = [(f.name, f.parameters or NO_ARGUMENTS) for f in functions]
        for name, schema in parameters:  # each one's errors name its function
            try:
                arguments = output_schema("json_schema", schema)
            except BitnetError as e:
                raise ApiError(400, f"tools: {name}: parameters: {e}", "tools") from None
        if len(functions) == 1 and not self.call_optional and written is None:
            return arguments
        try:
            return tool_call_schema(parameters, written.key if written else "arguments")
        except BitnetError as e:
            raise ApiError(400, f"tools: {e}", "tools") from None


class TokenizeRequest(_Strict):
    prompt: str
    add_special_tokens: bool = True


class DetokenizeRequest(_Strict):
    tokens: list[int]


# ---------------------------------------------------------------------- the application

# what /health (JSON) and /metrics (Prometheus) report: name, Prometheus type, meaning, how to read it
SCHEDULER_FIGURES = [
    ("slots", "gauge", "Sequences that can decode together (--parallel).", lambda s: s.parallel),
    ("busy", "gauge", "Slots decoding or prefilling a sequence now.", lambda s: s.busy),
    ("queued", "gauge", "Sequences waiting for a free slot.", lambda s: s.queued),
    ("max_queue", "gauge", "Sequences that may wait before requests get 503 (--max-queue).", lambda s: s.max_queue),
    ("generated_tokens", "counter", "Tokens generated since start, every sequence together.",
     lambda s: s.generated_tokens),
    ("engine_steps", "counter", "Engine passes since start (one per batched step).", lambda s: s.engine_steps),
    ("engine_seconds", "counter", "Wall time inside engine passes since start.", lambda s: s.engine_seconds),
    ("decode_rows", "counter", "Generated tokens run through the engine since start.", lambda s: s.decode_rows),
    ("prompt_rows", "counter", "Prompt tokens run through the engine since start (after prefix reuse).",
     lambda s: s.prompt_rows),
    ("draft_rows", "counter", "Draft tokens run through the engine since start (prompt lookup, --lookup).",
     lambda s: s.draft_rows),
    ("accepted_drafts", "counter", "Draft tokens kept since start (each saved its sequence a step).",
     lambda s: s.accepted_drafts),
]

PUBLIC_PATHS = ("/health",)  # answered without the API key (load balancers probe it)


def check_api_key(key: str | None) -> str | None:
    """`--api-key`: printable ASCII without spaces, as an HTTP header carries it."""
    if key is not None and not re.fullmatch(r"[!-~]{1,512}", key):
        raise BitnetError("the API key must be 1 to 512 printable ASCII characters without spaces", param="api_key")
    return key


class _RequireKey:
    """ASGI wrapper: every path but PUBLIC_PATHS needs `Authorization: Bearer KEY` (as llama-server's
    and vLLM's --api-key); without it a 401 in OpenAI's error shape."""

    def __init__(self, app, key: str):
        self.app, self.expected = app, b"Bearer " + key.encode("ascii")

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] not in PUBLIC_PATHS:
            given = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
            if not hmac.compare_digest(given, self.expected):
                error = ApiError(401, "a valid API key is needed: send the header 'Authorization: Bearer KEY'",
                                 code="invalid_api_key", type_="authentication_error")
                await error.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


class Server:
    """The routes over one Engine and its Scheduler; `app` is the ASGI application (behind the API
    key, when there is one)."""

    def __init__(self, engine: Engine, scheduler: Scheduler, model_id: str, api_key: str | None = None):
        self.engine, self.scheduler, self.model_id = engine, scheduler, model_id
        self.created = int(time.time())
        self.tool_calls = tool_call_format(engine)  # the chat template's, read once: the same for every request

        @contextlib.asynccontextmanager
        async def lifespan(app):
            yield
            await run_in_threadpool(scheduler.close)

        self.app = Starlette(
            routes=[
                Route("/v1/completions", self.completions, methods=["POST"]),
                Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
                Route("/v1/models", self.models, methods=["GET"]),
                Route("/v1/models/{model:path}", self.model, methods=["GET"]),
                Route("/health", self.health, methods=["GET"]),
                Route("/metrics", self.metrics, methods=["GET"]),
                Route("/tokenizer_info", self.tokenizer_info, methods=["GET"]),
                Route("/tokenize", self.tokenize, methods=["POST"]),
                Route("/detokenize", self.detokenize, methods=["POST"]),
            ],
            exception_handlers={HTTPException: self._http_error, Exception: self._internal_error},
            lifespan=lifespan,
        )
        if check_api_key(api_key) is not None:
            self.app = _RequireKey(self.app, api_key)

    # -------------------------------------------------------------- errors and parsing

    async def _http_error(self, request: Request, exc: HTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", type_=kind).response()

    async def _internal_error(self, request: Request, exc: Exception) -> JSONResponse:
        return ApiError(500, f"internal error: {type(exc).__name__}", type_="server_error").response()

    async def _body(self, request: Request, schema: type[BaseModel]):
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > MAX_BODY:
            raise ApiError(413, f"the request body is larger than {MAX_BODY} bytes")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > MAX_BODY:
                raise ApiError(413, f"the request body is larger than {MAX_BODY} bytes")
            chunks.append(chunk)
        try:
            data = json.loads(b"".join(chunks))
        except (ValueError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON: {e}") from None
        except RecursionError:  # `[[[...` a few thousand deep: was a 500 and a traceback in the log
            raise ApiError(400, "the request body is not valid JSON: nested too deeply") from None
        if not isinstance(data, dict):
            raise ApiError(400, "the request body must be a JSON object")
        try:
            return schema.model_validate(data)
        except ValidationError as e:
            errors = e.errors()
            param = str(errors[0]["loc"][0]) if errors[0]["loc"] else None
            # a field of several accepted types fails once per type: say them all
            why = "; or ".join(dict.fromkeys(
                f"{'.'.join(str(p) for p in err['loc'][1:]) + ': ' if len(err['loc']) > 1 else ''}{err['msg']}"
                for err in errors if (str(err["loc"][0]) if err["loc"] else None) == param))
            raise ApiError(400, f"{param}: {why}" if param else why, param) from None

    def _check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_id:
            raise ApiError(404, f"the model {model!r} does not exist; this server serves {self.model_id!r}",
                           "model", "model_not_found", "not_found_error")

    def _encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """The prompt's token ids; a text the tokenizer refuses (a lone surrogate such as JSON's "\\udcff")
        is a 400, not a 500 with a traceback in the server's log."""
        try:
            return self.engine.encode(text, add_special_tokens)
        except BitnetError as e:
            raise ApiError(400, str(e), "prompt") from None

    def _check_ids(self, ids: list[int]) -> None:
        if not ids:
            raise ApiError(400, "the prompt is empty", "prompt")
        if min(ids) < 0 or max(ids) >= self.engine.vocab_size:
            raise ApiError(400, f"a prompt token id is outside [0, {self.engine.vocab_size})", "prompt")
        if len(ids) >= self.engine.ctx_size:
            raise ApiError(400, f"the prompt is {len(ids)} tokens but the context holds {self.engine.ctx_size} "
                           "(the server's context size), the prompt and at least one new token together; "
                           "shorten it", "prompt", "context_length_exceeded")

    async def _prepare(self, req, written: ToolCallFormat | None = None) -> Callable[[], object] | None:
        """What makes each sequence's constraint (None: free text) from the request's output schema: a JSON value of
        it, or with ``written`` tool calls written as the chat template writes them (ToolCallConstraint). Builds what
        they need off the event loop: the model's JSON vocabulary (a second or so for a 128k vocabulary, once per
        server)."""
        root = req.output_schema() if written is None else req.output_schema(written)
        if root is None:
            return None
        try:
            await run_in_threadpool(self.engine.json_vocabulary)
        except BitnetError as e:
            called = isinstance(req, ChatRequest) and req.called_functions
            raise ApiError(400, str(e), "tools" if called else "response_format") from None
        if written is not None:
            return functools.partial(self.engine.tool_call_constraint, root, written, required=not req.call_optional,
                                     several=req.parallel_tool_calls is not False)
        return functools.partial(self.engine.json_constraint, root)

    def _submit(self, prompts: list[list[int]], req, max_tokens: int, logprobs: int | None, prompt_logprobs: bool,
                constraint: Callable[[], object] | None = None):
        """Jobs (prompt-major, n per prompt) feeding one asyncio queue of (index, event)."""
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()
        most = self.scheduler.parallel + self.scheduler.max_queue
        if len(prompts) * req.n > most:  # never admitted, however long the client waits: not a 503
            raise ApiError(400, f"the request asks for {len(prompts) * req.n} sequences (prompts x n) but the server "
                           f"takes at most {most} at once ({self.scheduler.parallel} decoding, {self.scheduler.max_queue} "
                           "waiting); send fewer per request", "n" if len(prompts) == 1 else "prompt")
        try:
            params = req.params(self.engine.vocab_size).check()
        except BitnetError as e:
            raise ApiError(400, str(e)) from None
        stops = req.stops()
        jobs = []
        for p, ids in enumerate(prompts):
            for c in range(req.n):
                index = p * req.n + c

                def sink(event, index=index):
                    with contextlib.suppress(RuntimeError):  # the loop is gone: no one is listening
                        loop.call_soon_threadsafe(queue.put_nowait, (index, event))

                seed = None if req.seed is None else req.seed + c
                jobs.append(Job(ids, max_tokens, params, seed, sink, stops, logprobs, prompt_logprobs,
                                req.ignore_eos, constraint() if constraint else None))
        try:
            self.scheduler.submit(jobs)
        except QueueFull as e:
            raise ApiError(503, str(e), code="server_overloaded", type_="server_error") from None
        return jobs, queue

    async def _events(self, request: Request, jobs: list[Job], queue: asyncio.Queue):
        """(index, event) until every job is done; stops (and frees the slots) when the client goes."""
        left = len(jobs)
        while left:
            try:
                index, event = await asyncio.wait_for(queue.get(), 0.5)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    return
                continue
            if isinstance(event, (DoneEvent, ErrorEvent)):
                left -= 1
            yield index, event

    # -------------------------------------------------------------- endpoints

    async def health(self, request: Request) -> JSONResponse:
        figures = {name: round(get(self.scheduler), 6) for name, _, _, get in SCHEDULER_FIGURES}
        return JSONResponse({"status": "ok", "model": self.model_id, **figures, "kv_cache": self.engine.kv_cache,
                             "kv_bytes_per_slot": self.engine.kv_bytes_per_sequence})

    async def metrics(self, request: Request) -> PlainTextResponse:
        """The /health figures in Prometheus' text format (counters end in _total)."""
        label = json.dumps(self.model_id, ensure_ascii=False)  # a quoted, escaped label value
        lines = []
        for name, kind, about, get in SCHEDULER_FIGURES:
            metric = f"bitnet_{name}" + ("_total" if kind == "counter" else "")
            lines += [f"# HELP {metric} {about}", f"# TYPE {metric} {kind}", f"{metric}{{model={label}}} {get(self.scheduler)}"]
        return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4; charset=utf-8")

    def _model_card(self) -> dict:
        return {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "bitnet-cli",
                "context_length": self.engine.ctx_size}

    async def models(self, request: Request) -> JSONResponse:
        return JSONResponse({"object": "list", "data": [self._model_card()]})

    async def model(self, request: Request) -> JSONResponse:
        try:
            self._check_model(request.path_params["model"])
        except ApiError as e:
            return e.response()
        return JSONResponse(self._model_card())

    async def tokenizer_info(self, request: Request) -> JSONResponse:
        tok, eng = self.engine.tokenizer, self.engine
        name = lambda i: tok.id_to_token(i) if i is not None else None  # noqa: E731
        return JSONResponse({"bos_token": name(eng.bos_token_id), "eos_token": name(eng.eos_token_id),
                             "pad_token": None, "chat_template": eng.tokenizer_config.get("chat_template"),
                             "model_max_length": eng.ctx_size})

    async def tokenize(self, request: Request) -> JSONResponse:
        try:
            req = await self._body(request, TokenizeRequest)
            ids = await run_in_threadpool(self._encode, req.prompt, req.add_special_tokens)
        except ApiError as e:
            return e.response()
        return JSONResponse({"tokens": ids, "count": len(ids), "max_model_len": self.engine.ctx_size})

    async def detokenize(self, request: Request) -> JSONResponse:
        try:
            req = await self._body(request, DetokenizeRequest)
            if req.tokens and (min(req.tokens) < 0 or max(req.tokens) >= self.engine.vocab_size):
                raise ApiError(400, f"a token id is outside [0, {self.engine.vocab_size})", "tokens")
        except ApiError as e:
            return e.response()
        return JSONResponse({"prompt": self.engine.decode(req.tokens)})

    async def completions(self, request: Request):
        try:
            req = await self._body(request, CompletionRequest)
            self._check_model(req.model)
            prompts = req.prompt if isinstance(req.prompt, list) and req.prompt and not isinstance(
                req.prompt[0], int) else [req.prompt]
            if not prompts:
                raise ApiError(400, "the prompt is empty", "prompt")
            ids = await run_in_threadpool(
                lambda: [self._encode(p) if isinstance(p, str) else list(p) for p in prompts])
            for i in ids:
                self._check_ids(i)
            echo_logprobs = req.echo and req.logprobs is not None
            constraint = await self._prepare(req)
            jobs, queue = self._submit(ids, req, req.max_tokens if req.max_tokens is not None else
                                       self.engine.ctx_size, req.logprobs, echo_logprobs, constraint)
        except ApiError as e:
            return e.response()
        texts = [p if isinstance(p, str) else self.engine.decode(p) for p in prompts]
        reply = _Completion(self, req, ids, texts, jobs)
        if req.stream:
            return StreamingResponse(reply.stream(request, queue), media_type="text/event-stream")
        return await reply.whole(request, queue)

    async def chat_completions(self, request: Request):
        try:
            req = await self._body(request, ChatRequest)
            self._check_model(req.model)
            functions = req.called_functions
            written = self.tool_calls if functions else None
            if req.call_optional and written is None:
                raise ApiError(400, f"tool_choice {req.tool_choice or 'auto'!r}: this model's chat template shows no "
                               f"way to call a tool (such as {' or '.join(map(str, TOOL_CALL_FORMATS))}), so it "
                               "cannot choose to call; name the function ({\"type\": \"function\", \"function\": "
                               "{\"name\": ...}}), or ask for a call of one of the tools with \"required\", or send "
                               "\"none\"",
                               "tool_choice")
            if not any(m.role == "user" for m in req.messages):
                raise ApiError(400, "messages need at least one user message", "messages")
            messages = [m.rendered(i) for i, m in enumerate(req.messages)]
            while messages and messages[0]["role"] != "user" and not self.engine.tokenizer_config.get(
                    "chat_template"):
                messages.pop(0)  # the plain User:/Assistant: fallback has no system turn
            try:
                tools = [t.model_dump(exclude_none=True) for t in req.tools or []] if functions else None
                ids = await run_in_threadpool(render_chat, self.engine, messages, tools)
            except BitnetError as e:
                raise ApiError(400, str(e), "messages") from None
            limit = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
            self._check_ids(ids)
            if req.top_logprobs and not req.logprobs:  # as OpenAI: was silently no log-probabilities at all
                raise ApiError(400, "top_logprobs needs logprobs: true", "top_logprobs")
            top = (req.top_logprobs or 0) if req.logprobs else None
            constraint = await self._prepare(req, written)
            jobs, queue = self._submit([ids], req, limit if limit is not None else self.engine.ctx_size, top, False,
                                       constraint)
        except ApiError as e:
            return e.response()
        reply = _Chat(self, req, [ids], jobs, functions, written)
        if req.stream:
            return StreamingResponse(reply.stream(request, queue), media_type="text/event-stream")
        return await reply.whole(request, queue)


# ---------------------------------------------------------------------- replies

# U+0085, U+2028 and U+2029 end a line for str.splitlines, and so for httpx's iter_lines, with which many clients read
# a stream: escaped in events (as JSON allows), so that a model's text holding one does not cut its event in two
# (found by the fuzzer, seed 29001)
_LINE_BREAKS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False).translate(_LINE_BREAKS)}\n\n"


class _Reply:
    """What one request returns, built from its jobs' events (shared by completions and chat)."""

    object_whole = object_chunk = ""

    def __init__(self, server: Server, req, prompts: list[list[int]], jobs: list[Job]):
        self.server, self.req, self.jobs = server, req, jobs
        self.id = f"{self.prefix}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())
        self.prompt_tokens = sum(len(p) for p in prompts)
        self.completion_tokens = 0
        self.cached_tokens = 0  # prompt tokens whose keys/values came from the prefix cache
        self.n = len(jobs)
        self.text = [""] * self.n
        self.finish: list[str | None] = [None] * self.n
        self.tokens: list[list[TokenEvent]] = [[] for _ in jobs]
        self.prompt_lp: list[PromptLogprobs | None] = [None] * self.n

    def head(self) -> dict:
        return {"id": self.id, "object": self.object_chunk, "created": self.created, "model": self.server.model_id}

    def usage(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens,
                "prompt_tokens_details": {"cached_tokens": self.cached_tokens}}

    def take(self, index: int, event) -> None:
        if isinstance(event, TokenEvent):
            self.text[index] += event.text
            if event.token is not None:
                self.tokens[index].append(event)
        elif isinstance(event, PromptLogprobs):
            self.prompt_lp[index] = event
        elif isinstance(event, DoneEvent):
            self.finish[index] = event.finish_reason
            self.completion_tokens += event.completion_tokens
            self.cached_tokens += event.reused_tokens

    async def whole(self, request: Request, queue: asyncio.Queue):
        try:
            async for index, event in self.server._events(request, self.jobs, queue):
                if isinstance(event, ErrorEvent):
                    return ApiError(503, event.message, type_="server_error").response()
                self.take(index, event)
        finally:
            self.server.scheduler.cancel(self.jobs)  # a no-op for jobs that ended
        if any(f is None for f in self.finish):  # the client went away
            return JSONResponse({}, status_code=499)
        return JSONResponse({"id": self.id, "object": self.object_whole, "created": self.created,
                             "model": self.server.model_id, "choices": [self.choice(i) for i in range(self.n)],
                             "usage": self.usage()})

    async def stream(self, request: Request, queue: asyncio.Queue):
        try:
            for i in range(self.n):
                first = self.first_chunk(i)
                if first is not None:
                    yield _sse(first)
            async for index, event in self.server._events(request, self.jobs, queue):
                if isinstance(event, ErrorEvent):
                    yield _sse({"error": {"message": event.message, "type": "server_error", "param": None,
                                          "code": None}})
                    return
                self.take(index, event)
                chunk = self.chunk(index, event)
                if chunk is not None:
                    yield _sse(chunk)
            if self.req.stream_options is not None and self.req.stream_options.include_usage:
                yield _sse({**self.head(), "choices": [], "usage": self.usage()})
            yield "data: [DONE]\n\n"
        finally:
            self.server.scheduler.cancel(self.jobs)


class _Completion(_Reply):
    prefix, object_whole, object_chunk = "cmpl", "text_completion", "text_completion"

    def __init__(self, server, req: CompletionRequest, prompts, texts: list[str], jobs):
        super().__init__(server, req, prompts, jobs)
        self.prompts = [p for p in prompts for _ in range(req.n)]
        self.prompt_texts = [t for t in texts for _ in range(req.n)]

    def logprobs(self, index: int, events: list[TokenEvent], with_prompt: bool, offset: int = 0) -> dict | None:
        if self.req.logprobs is None:
            return None
        piece = self.server.scheduler.piece
        tokens, lps, tops = [], [], []
        if with_prompt:
            pl = self.prompt_lp[index]
            tokens += [piece(t) for t in self.prompts[index]]
            lps += pl.logprobs if pl else [None] * len(self.prompts[index])
            tops += pl.top if pl else [None] * len(self.prompts[index])
        ids = (list(self.prompts[index]) if with_prompt else []) + [e.token for e in events]
        tokens += [piece(e.token) for e in events]
        lps += [e.logprob for e in events]
        tops += [e.top for e in events]
        offsets = []  # where each token's text starts in the choice's text (special tokens have none)
        for t in ids:
            offsets.append(offset)
            offset += len(self.server.engine.decode([t]))
        return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}

    def choice(self, i: int) -> dict:
        echo = self.prompt_texts[i] if self.req.echo else ""
        return {"index": i, "text": echo + self.text[i], "finish_reason": self.finish[i],
                "logprobs": self.logprobs(i, self.tokens[i], self.req.echo)}

    def first_chunk(self, i: int) -> dict | None:
        if not self.req.echo or self.req.logprobs is not None:
            return None  # with logprobs the echoed prompt goes out once its log-probabilities are known
        return {**self.head(), "choices": [{"index": i, "text": self.prompt_texts[i], "logprobs": None,
                                            "finish_reason": None}]}

    def chunk(self, i: int, event) -> dict | None:
        if isinstance(event, PromptLogprobs):
            lp = self.logprobs(i, [], True)
            return {**self.head(), "choices": [{"index": i, "text": self.prompt_texts[i], "logprobs": lp,
                                                "finish_reason": None}]}
        if isinstance(event, TokenEvent):  # one chunk per token, its text possibly "" (held back)
            start = (len(self.prompt_texts[i]) if self.req.echo else 0) + len(self.text[i]) - len(event.text)
            lp = self.logprobs(i, [event] if event.token is not None else [], False, start)
            return {**self.head(), "choices": [{"index": i, "text": event.text, "logprobs": lp,
                                                "finish_reason": None}]}
        if isinstance(event, DoneEvent):
            return {**self.head(), "choices": [{"index": i, "text": "", "logprobs": None,
                                                "finish_reason": event.finish_reason}]}
        return None


# the text of a call of one of several functions (constrain.tool_call_schema) up to its arguments, under
# "arguments" or (Llama's templates: ToolCallFormat.key) "parameters"
CALL_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*("(?:[^"\\]|\\.)*")\s*,\s*"(?:arguments|parameters)"\s*:\s*')
WRAPPER_END = re.compile(r"\s*\}$")  # after a whole call's arguments
HELD_BACK = re.compile(r"[\s}]*$")  # what may still turn out to be the whole call's end, while it streams


class _Chat(_Reply):
    """A chat reply: text, or calls of the functions. Where the chat template writes calls between tags (``written``),
    each call is written so, {"name": ..., "arguments": ...} (constrain.tool_call_schema) between the tags (or all the
    calls as one JSON list between them, where the template lists them), after the message's content where the model
    chooses whether to call (constrain.ToolCallText takes that text apart).
    Otherwise a required call of one function is its arguments' text, and one of several is written as above without
    tags. The reply takes each call apart, streamed as soon as its name is known; finish_reason is "tool_calls" once
    the reply ends after a call."""

    prefix, object_whole, object_chunk = "chatcmpl", "chat.completion", "chat.completion.chunk"

    def __init__(self, server, req: ChatRequest, prompts, jobs, functions: list[FunctionDef],
                 written: ToolCallFormat | None = None):
        super().__init__(server, req, prompts, jobs)
        self.functions, self.tag = functions, written.tag if written else None
        self.required = bool(functions) and not req.call_optional  # a call must come: no content
        self.split = [ToolCallText(written.tag, written.close, written.listed) for _ in jobs] if written else None
        self.call_ids: list[list[str]] = [[] for _ in jobs]  # per choice, its calls' ids, made as they are named
        self.streamed: list[list[str]] = [[] for _ in jobs]  # per choice, each named call's arguments sent so far
        self.said = [0] * self.n  # per choice, the characters of content sent so far

    def take(self, index: int, event) -> None:
        super().take(index, event)
        if self.split and isinstance(event, TokenEvent):
            self.split[index].feed(event.text)

    def called(self, i: int) -> bool:
        """Whether choice i is (or has begun) a call rather than a reply in text."""
        return self.required or bool(self.functions) and self.split[i].content_end is not None

    def content(self, i: int) -> str:
        """Choice i's text before its calls (all of it for a reply in text)."""
        if not self.functions:
            return self.text[i]
        if self.split is None:
            return ""
        content = self.split[i].content
        return content.rstrip() if self.called(i) else content

    def calls(self, i: int) -> list[tuple[str, str, bool]]:
        """Choice i's calls so far, those whose name is known: (the function's name, its arguments' text, whether
        the call is complete). A complete call's arguments leave out the closing brace of the call around them."""
        if not self.called(i):
            return []
        if len(self.functions) == 1 and self.split is None:
            return [(self.functions[0].name, self.text[i], self.finish[i] == "stop")]
        texts = [self.text[i]] if self.split is None else self.split[i].calls
        calls = []
        for k, text in enumerate(texts):
            head = CALL_HEAD.match(text)
            if head is None:
                break
            done = self.finish[i] == "stop" if self.split is None else k < self.split[i].complete
            arguments = text[head.end():]
            calls.append((json.loads(head[1]), WRAPPER_END.sub("", arguments) if done else arguments, done))
        return calls

    def call_id(self, i: int, k: int) -> str:
        while len(self.call_ids[i]) <= k:
            self.call_ids[i].append(f"call_{uuid.uuid4().hex[:24]}")
        return self.call_ids[i][k]

    def finish_reason(self, i: int, reason: str | None) -> str | None:
        return "tool_calls" if self.called(i) and reason == "stop" else reason

    def logprobs(self, events: list[TokenEvent]) -> dict | None:
        if not self.req.logprobs:
            return None
        piece = self.server.scheduler.piece
        return {"content": [{"token": piece(e.token), "logprob": e.logprob,
                             "top_logprobs": [{"token": t, "logprob": v} for t, v in (e.top or {}).items()]}
                            for e in events]}

    def choice(self, i: int) -> dict:
        content = self.content(i)
        message = {"role": "assistant", "content": content or (None if self.called(i) else content)}
        if self.called(i):
            message["tool_calls"] = [{"id": self.call_id(i, k), "type": "function",
                                      "function": {"name": name, "arguments": arguments}}
                                     for k, (name, arguments, _) in enumerate(self.calls(i))]
        return {"index": i, "message": message, "finish_reason": self.finish_reason(i, self.finish[i]),
                "logprobs": self.logprobs(self.tokens[i])}

    def content_delta(self, i: int) -> dict | None:
        """The content's news since the last delta, or None. Where the model chooses whether to call, the text's end
        is held back while it may still turn out to begin the tag (a call's content has no space before the tag)."""
        content = self.content(i)
        if self.split is not None and not self.called(i) and self.finish[i] is None:
            content = content[:len(content) - tag_matched(self.tag, 0, content)[0]].rstrip()
        if len(content) <= self.said[i]:
            return None
        sent, self.said[i] = self.said[i], len(content)
        return {"content": content[sent:]}

    def call_delta(self, i: int) -> dict | None:
        """The calls' news since the last delta: each call's arguments' new text, the first time with the call's id
        and name; None where there is none. While a call written inside another object streams, a tail that may be
        that object's closing brace is held back."""
        deltas = []
        for k, (name, arguments, complete) in enumerate(self.calls(i)):
            if not complete and self.finish[i] is None and (len(self.functions) > 1 or self.split is not None):
                arguments = arguments[:HELD_BACK.search(arguments).start()]
            if k == len(self.streamed[i]):
                self.streamed[i].append(arguments)
                deltas.append({"index": k, "id": self.call_id(i, k), "type": "function",
                               "function": {"name": name, "arguments": arguments}})
            elif len(arguments) > len(self.streamed[i][k]):
                sent, self.streamed[i][k] = self.streamed[i][k], arguments
                deltas.append({"index": k, "function": {"arguments": arguments[len(sent):]}})
        return {"tool_calls": deltas} if deltas else None

    def delta(self, i: int) -> dict | None:
        """What choice i has new to send: content, then calls."""
        news = [d for d in (self.content_delta(i), self.call_delta(i)) if d]
        return functools.reduce(operator.or_, news) if news else None

    def first_chunk(self, i: int) -> dict:
        delta = {"role": "assistant", "content": None if self.required else ""}
        if self.required and self.split is None and len(self.functions) == 1:  # the call is named from the start
            delta |= self.call_delta(i)
        return {**self.head(), "choices": [{"index": i, "delta": delta, "logprobs": None, "finish_reason": None}]}

    def chunk(self, i: int, event) -> dict | None:
        if isinstance(event, TokenEvent):
            lp = self.logprobs([event] if event.token is not None else [])
            delta = self.delta(i) if self.functions else {"content": event.text}
            if delta is None and lp is None:
                return None
            return {**self.head(), "choices": [{"index": i, "delta": delta or {}, "logprobs": lp,
                                                "finish_reason": None}]}
        if isinstance(event, DoneEvent):
            delta = (self.delta(i) or {}) if self.functions else {}  # what was held back
            return {**self.head(), "choices": [{"index": i, "delta": delta, "logprobs": None,
                                                "finish_reason": self.finish_reason(i, event.finish_reason)}]}
        return None


__all__ = ["ApiError", "Server"]
