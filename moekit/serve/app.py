"""The OpenAI-compatible HTTP API over an :class:`~moekit.serve.engine.Engine` (Starlette).

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions`` (``stream: true`` as server-sent events
ending with ``data: [DONE]``), ``GET /v1/models`` (and ``/v1/models/{id}``), ``GET /health``, ``GET /metrics``
(Prometheus text).
Errors carry OpenAI's body, ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
import uuid
from dataclasses import dataclass

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from moekit.serve.engine import ContextTooLong, Engine, EngineClosed, Event, SamplingParams

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat defaults to the rest of the context


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, self.param, self.code, self.type)


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   type: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type, "param": param, "code": code}}, status)


@dataclass
class ServerState:
    engine: Engine
    model_name: str
    chat_template: str | None = None  # a Jinja template (Hugging Face's tokenizer_config.json), or None
    bos_token: str = ""
    eos_token: str = ""
    created: int = 0
    requests: dict | None = None  # (endpoint, status) -> count


# -- request parsing ---------------------------------------------------------------------------------

def _number(body: dict, name: str, default, low: float, high: float, *, above: bool = False):
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value < low or value > high or (above and value == low):
        raise APIError(400, f"{name}={value!r} is invalid: a number in {'(' if above else '['}{low:g}, {high:g}]",
                       name, "invalid_value")
    return float(value)


def _integer(body: dict, name: str, default, low: int):
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise APIError(400, f"{name}={value!r} is invalid: an integer >= {low}", name, "invalid_value")
    return value


def _stops(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise APIError(400, f"stop={stop!r} is invalid: a non-empty string or a list of them", "stop",
                       "invalid_value")
    return tuple(stop)


def _render_chat(state: ServerState, messages) -> str:
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "messages must be a non-empty list of {role, content} objects", "messages",
                       "invalid_value")
    plain = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise APIError(400, f"messages[{i}] must be an object with a string 'role'", "messages", "invalid_value")
        content = m.get("content", "")
        if isinstance(content, list):  # content parts: only text is understood
            if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
                raise APIError(400, f"messages[{i}].content: only text parts are supported", "messages",
                               "invalid_value")
            content = "".join(str(p.get("text", "")) for p in content)
        if content is None:
            content = ""
        if not isinstance(content, str):
            raise APIError(400, f"messages[{i}].content must be a string or a list of text parts", "messages",
                           "invalid_value")
        plain.append({"role": m["role"], "content": content})
    if state.chat_template:
        import jinja2

        env = jinja2.Environment(undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)

        def raise_exception(message):
            raise APIError(400, f"the chat template refused the messages: {message}", "messages")

        env.globals["raise_exception"] = raise_exception
        try:
            return env.from_string(state.chat_template).render(
                messages=plain, add_generation_prompt=True, bos_token=state.bos_token, eos_token=state.eos_token)
        except jinja2.TemplateError as err:
            raise APIError(400, f"the chat template could not render the messages: {err}", "messages") from None
    # no template: one "role: content" line per message, then the assistant's turn
    return "".join(f"{m['role']}: {m['content']}\n" for m in plain) + "assistant:"


def _prompt_ids(state: ServerState, prompt) -> list[int]:
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        return state.engine.tokenizer.encode(prompt)
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return prompt
    raise APIError(400, "prompt must be a string, a list of token ids, or a list of one of either (batches of "
                        "several prompts are not supported: send one request each)", "prompt", "invalid_value")


async def _body(request: HTTPRequest) -> dict:
    raw = await request.body()
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise APIError(400, f"the request body is not valid JSON: {err}", None, "invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(body).__name__}", None,
                       "invalid_json")
    return body


def _params(state: ServerState, body: dict, prompt_len: int, chat: bool) -> SamplingParams:
    model = body.get("model")
    if model is not None and model != state.model_name:
        raise APIError(404, f"the model {model!r} does not exist; this server serves {state.model_name!r}",
                       "model", "model_not_found")
    n = body.get("n", 1)
    if n != 1 or isinstance(n, bool):
        raise APIError(400, f"n={n!r} is not supported: this server returns one choice (n=1)", "n", "invalid_value")
    for flag in ("stream", "echo"):
        if not isinstance(body.get(flag, False), bool):
            raise APIError(400, f"{flag}={body[flag]!r} is invalid: true or false", flag, "invalid_value")
    if body.get("echo"):
        raise APIError(400, "echo=true is not supported", "echo", "invalid_value")
    context = state.engine.max_len
    name = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
    default = max(1, context - prompt_len) if chat else COMPLETIONS_DEFAULT_MAX_TOKENS
    max_tokens = _integer(body, name, default, 1)
    if prompt_len + max_tokens > context:
        raise APIError(400, f"the prompt ({prompt_len} tokens) + {name} ({max_tokens}) = {prompt_len + max_tokens} "
                            f"exceeds the context of {context} tokens", name, "context_length_exceeded")
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0, above=True)
    return SamplingParams(max_tokens=max_tokens, temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
                          top_p=None if top_p == 1.0 else top_p, seed=_integer(body, "seed", None, 0),
                          stop=_stops(body))


# -- generation --------------------------------------------------------------------------------------

class _Stream:
    """An engine request seen from the event loop: its events on an asyncio queue."""

    def __init__(self, state: ServerState, prompt_ids: list[int], params: SamplingParams):
        loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[Event] = asyncio.Queue()

        def sink(ev: Event) -> None:
            try:
                loop.call_soon_threadsafe(self.queue.put_nowait, ev)
            except RuntimeError:  # the loop has closed (the server stopped)
                pass

        try:
            self.req = state.engine.submit(prompt_ids, params, sink)
        except ContextTooLong as err:
            raise APIError(400, str(err), "max_tokens", "context_length_exceeded") from None
        except EngineClosed as err:
            raise APIError(503, str(err), None, "shutting_down", "server_error") from None
        except ValueError as err:
            raise APIError(400, str(err), "prompt", "invalid_value") from None

    async def events(self, request: HTTPRequest | None = None):
        """The events up to the last; with ``request``, polls for a client that went away meanwhile."""
        checked = time.monotonic()
        try:
            while True:
                try:
                    ev = await asyncio.wait_for(self.queue.get(), 0.5)
                except asyncio.TimeoutError:
                    ev = None
                if request is not None and time.monotonic() - checked >= 0.5:  # (events may never pause)
                    checked = time.monotonic()
                    if await request.is_disconnected():
                        return
                if ev is None:
                    continue
                yield ev
                if ev.finish_reason is not None:
                    return
        finally:
            self.req.cancel()  # no-op once finished; frees the slot of a request whose client left


def _usage(ev: Event) -> dict:
    return {"prompt_tokens": ev.prompt_tokens, "completion_tokens": ev.completion_tokens,
            "total_tokens": ev.prompt_tokens + ev.completion_tokens}


def _finish_reason(ev: Event) -> str:
    if ev.finish_reason == "error":
        raise APIError(500, f"generation failed: {ev.error}", None, "generation_failed", "server_error")
    return ev.finish_reason


async def _generate(request: HTTPRequest, chat: bool) -> Response:
    state: ServerState = request.app.state.serve
    body = await _body(request)
    if chat:
        if "messages" not in body:
            raise APIError(400, "messages is required", "messages", "missing_required_parameter")
        prompt_ids = state.engine.tokenizer.encode(_render_chat(state, body["messages"]))
    else:
        if "prompt" not in body:
            raise APIError(400, "prompt is required", "prompt", "missing_required_parameter")
        prompt_ids = _prompt_ids(state, body["prompt"])
    if not prompt_ids:
        raise APIError(400, "the prompt is empty: it needs at least one token", "prompt", "invalid_value")
    params = _params(state, body, len(prompt_ids), chat)
    stream = _Stream(state, prompt_ids, params)
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
    created = int(time.time())
    head = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": created,
            "model": state.model_name}
    if body.get("stream"):
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        return StreamingResponse(_sse(stream, head, chat, include_usage), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
    text, last = [], None
    async for ev in stream.events(request):
        text.append(ev.text)
        last = ev
    if last is None or last.finish_reason is None:  # the client went away
        return Response(status_code=499)
    reason = _finish_reason(last)
    if chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": "".join(text)}, "logprobs": None,
                  "finish_reason": reason}
        return JSONResponse({**head, "object": "chat.completion", "choices": [choice], "usage": _usage(last)})
    choice = {"index": 0, "text": "".join(text), "logprobs": None, "finish_reason": reason}
    return JSONResponse({**head, "choices": [choice], "usage": _usage(last)})


async def _sse(stream: _Stream, head: dict, chat: bool, include_usage: bool):
    def chunk(text: str | None, reason: str | None, role: bool = False) -> str:
        if chat:
            delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": reason}
        payload = {**head, "choices": [choice]}
        if include_usage:
            payload["usage"] = None
        return f"data: {json.dumps(payload)}\n\n"

    if chat:
        yield chunk(None, None, role=True)
    async for ev in stream.events():
        if ev.finish_reason is None:
            if ev.text:
                yield chunk(ev.text, None)
            continue
        if ev.finish_reason == "error":
            err = {"error": {"message": f"generation failed: {ev.error}", "type": "server_error", "param": None,
                             "code": "generation_failed"}}
            yield f"data: {json.dumps(err)}\n\n"
            return
        if ev.text:
            yield chunk(ev.text, None)
        yield chunk(None, ev.finish_reason)
        if include_usage:
            yield f"data: {json.dumps({**head, 'choices': [], 'usage': _usage(ev)})}\n\n"
        yield "data: [DONE]\n\n"


def _counted(endpoint: str, handler):
    async def route(request: HTTPRequest) -> Response:
        state: ServerState = request.app.state.serve
        try:
            response = await handler(request)
        except APIError as err:
            response = err.response()
        state.requests[(endpoint, response.status_code)] = state.requests.get((endpoint, response.status_code), 0) + 1
        return response
    return route


async def completions(request: HTTPRequest) -> Response:
    return await _generate(request, chat=False)


async def chat_completions(request: HTTPRequest) -> Response:
    return await _generate(request, chat=True)


async def models(request: HTTPRequest) -> Response:
    state: ServerState = request.app.state.serve
    return JSONResponse({"object": "list", "data": [{"id": state.model_name, "object": "model",
                                                      "created": state.created, "owned_by": "moekit"}]})


async def model_info(request: HTTPRequest) -> Response:
    state: ServerState = request.app.state.serve
    name = request.path_params["model"]
    if name != state.model_name:
        return error_response(404, f"the model {name!r} does not exist; this server serves {state.model_name!r}",
                              "model", "model_not_found")
    return JSONResponse({"id": name, "object": "model", "created": state.created, "owned_by": "moekit"})


async def health(request: HTTPRequest) -> Response:
    state: ServerState = request.app.state.serve
    return JSONResponse({"status": "ok", "model": state.model_name, "running": state.engine.running,
                         "waiting": state.engine.queue_length})


def metrics_text(state: ServerState) -> str:
    """The Prometheus text exposition of the server's counters and gauges."""
    e, m = state.engine, state.engine.metrics
    lines = []

    def metric(name, kind, help, samples):
        lines.append(f"# HELP moekit_{name} {help}")
        lines.append(f"# TYPE moekit_{name} {kind}")
        for labels, value in samples:
            lab = "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}" if labels else ""
            lines.append(f"moekit_{name}{lab} {value}")

    metric("http_requests_total", "counter", "HTTP requests to the generation endpoints by status",
           [({"endpoint": ep, "status": st}, n) for (ep, st), n in sorted((state.requests or {}).items())])
    metric("requests_finished_total", "counter", "Generation requests finished, by finish reason",
           [({"reason": r}, n) for r, n in sorted(m.requests_finished.items())])
    metric("prompt_tokens_total", "counter", "Prompt tokens prefilled", [({}, m.prompt_tokens)])
    metric("generated_tokens_total", "counter", "Tokens generated", [({}, m.generated_tokens)])
    metric("decode_steps_total", "counter", "Batched decode steps run", [({}, m.decode_steps)])
    metric("queue_length", "gauge", "Requests waiting for a KV-cache slot", [({}, e.queue_length)])
    metric("running_requests", "gauge", "Requests holding a KV-cache slot (prefilling or decoding)",
           [({}, e.running)])
    metric("kv_cache_slots", "gauge", "KV-cache slots (the most requests running at once)", [({}, e.max_batch)])
    metric("kv_cache_bytes", "gauge", "Bytes of the KV-cache pool (allocated at the first request)",
           [({}, e.cache.nbytes())])
    recent = sorted(m.ttft_s)
    quantiles = [({"quantile": q}, recent[min(len(recent) - 1, int(q * len(recent)))]) for q in (0.5, 0.9, 0.99)] \
        if recent else []
    metric("time_to_first_token_seconds", "summary",
           "Seconds from submission to the first generated token (quantiles over the last 1000 requests)",
           quantiles)
    lines.append(f"moekit_time_to_first_token_seconds_sum {m.ttft_sum}")
    lines.append(f"moekit_time_to_first_token_seconds_count {m.ttft_count}")
    load = dict(m.expert_load)
    metric("expert_assignments_total", "counter", "Token-to-expert assignments, per MoE layer and expert",
           [({"layer": layer, "expert": i}, int(n)) for layer, counts in sorted(load.items())
            for i, n in enumerate(counts.tolist())])
    return "\n".join(lines) + "\n"


async def metrics(request: HTTPRequest) -> Response:
    return PlainTextResponse(metrics_text(request.app.state.serve), media_type="text/plain; version=0.0.4")


async def _http_error(request: HTTPRequest, exc: HTTPException) -> Response:
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    return error_response(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", None, code)


def build_app(state: ServerState, on_shutdown=None) -> Starlette:
    """The Starlette application; ``on_shutdown`` runs at the server's shutdown (uvicorn's lifespan)."""
    import contextlib

    state.requests = {} if state.requests is None else state.requests
    state.created = state.created or int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        if on_shutdown is not None:
            await asyncio.get_running_loop().run_in_executor(None, on_shutdown)

    app = Starlette(routes=[
        Route("/v1/completions", _counted("completions", completions), methods=["POST"]),
        Route("/v1/chat/completions", _counted("chat_completions", chat_completions), methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/models/{model:path}", model_info, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
    ], exception_handlers={HTTPException: _http_error}, lifespan=lifespan)
    app.state.serve = state
    return app
