"""The OpenAI wire format of `python -m moe_prefetch.serve`: request bodies checked into plain
dataclasses, response and stream-chunk objects, OpenAI-style error objects, and the Prometheus text
of /metrics. Plain data only (no model, no HTTP framework), so every rule here reads in one place."""
from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import dataclass

MAX_STOP_STRINGS = 4  # OpenAI's limit; each one costs a scan of the text tail per token
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")
COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions (chat defaults to the rest of the context)


class ApiError(Exception):
    """A refused request: its HTTP status and the fields of OpenAI's error object."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def shutting_down() -> ApiError:
    return ApiError(503, "the server is shutting down", type="server_error", code="shutting_down")


def generation_failed(e: BaseException) -> ApiError:
    return ApiError(500, f"generation failed: {type(e).__name__}: {e}", type="server_error", code="internal_error")


@dataclass(frozen=True)
class SamplingParams:
    """How one request samples: temperature 0 (or top_p 0) means greedy."""

    max_tokens: int | None  # None: the endpoint's default
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_p == 0


@dataclass(frozen=True)
class CompletionRequest:
    """A checked /v1/completions or /v1/chat/completions body."""

    chat: bool
    model: str
    params: SamplingParams
    stream: bool = False
    include_usage: bool = False  # stream_options.include_usage: OpenAI's extra usage-only chunk
    prompt: str | list[int] | None = None  # completions: text or token ids
    messages: tuple[dict, ...] = ()  # chat: {"role", "content": str}


def parse_json(raw: bytes) -> dict:
    """The request body as a JSON object, or a 400 that says what is wrong with it."""
    try:
        body = json.loads(raw)
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError both derive from it
        raise ApiError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {_json_type(body)}", code="invalid_json")
    return body


def parse_request(body: dict, chat: bool) -> CompletionRequest:
    """Check a completions (chat=False) or chat completions body field by field."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _bad("model", "'model' is required and must be a non-empty string")
    _refuse_unsupported(body, chat)
    n = _integer(body, "n", 1, None)
    if n not in (None, 1):
        raise _bad("n", f"only n=1 is supported (one generation at a time), got {n}")
    if chat:
        max_tokens = _integer(body, "max_completion_tokens", 1, None)
        if max_tokens is None:
            max_tokens = _integer(body, "max_tokens", 1, None)
    else:
        max_tokens = _integer(body, "max_tokens", 1, None)
    temperature = _number(body, "temperature", 0.0, 2.0)
    top_p = _number(body, "top_p", 0.0, 1.0)
    params = SamplingParams(max_tokens=max_tokens, temperature=1.0 if temperature is None else temperature,
                            top_p=1.0 if top_p is None else top_p, seed=_integer(body, "seed", None, None),
                            stop=_stop(body))
    stream = _boolean(body, "stream") or False
    include_usage = False
    options = body.get("stream_options")
    if options is not None:
        if not isinstance(options, dict):
            raise _bad("stream_options", f"'stream_options' must be an object, got {_json_type(options)}")
        include_usage = _boolean(options, "include_usage", param="stream_options.include_usage") or False
    req = dict(chat=chat, model=model, params=params, stream=stream, include_usage=include_usage)
    if chat:
        return CompletionRequest(**req, messages=_messages(body))
    return CompletionRequest(**req, prompt=_prompt(body))


def _refuse_unsupported(body: dict, chat: bool) -> None:
    """Options that would change the answer and that this server does not implement are refused
    (rather than silently ignored); their neutral values, which clients often send, pass."""
    neutral = {"presence_penalty": (0, 0.0), "frequency_penalty": (0, 0.0), "logit_bias": ({},),
               "tools": ([],), "functions": ([],), "best_of": (1,), "echo": (False,), "suffix": ("",),
               "logprobs": (False,) if chat else (), "top_logprobs": (0,)}
    for name, ok in neutral.items():
        value = body.get(name)
        if value is not None and value not in ok:
            raise _bad(name, f"'{name}' is not supported by this server", code="unsupported_parameter")
    fmt = body.get("response_format")
    if fmt is not None and fmt != {"type": "text"}:
        raise _bad("response_format", "only response_format {\"type\": \"text\"} is supported", code="unsupported_parameter")


def _stop(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise _bad("stop", "'stop' must be a string or a list of strings")
    if len(stop) > MAX_STOP_STRINGS:
        raise _bad("stop", f"at most {MAX_STOP_STRINGS} stop strings are allowed, got {len(stop)}")
    if any(s == "" for s in stop):
        raise _bad("stop", "stop strings must not be empty")
    return tuple(stop)


def _prompt(body: dict) -> str | list[int]:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return prompt
    if isinstance(prompt, list) and len(prompt) > 1 and all(isinstance(p, (str, list)) for p in prompt):
        raise _bad("prompt", "only one prompt per request is supported (batch 1)")
    raise _bad("prompt", "'prompt' is required: a string or a non-empty list of token ids")


def _messages(body: dict) -> tuple[dict, ...]:
    messages = body.get("messages")
    if not isinstance(messages, list):
        raise _bad("messages", "'messages' is required and must be a list of messages")
    if not messages:
        raise _bad("messages", "'messages' must contain at least one message")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise _bad(where, f"{where} must be an object, got {_json_type(m)}")
        role = m.get("role")
        if role not in CHAT_ROLES:
            raise _bad(f"{where}.role", f"{where}.role must be one of {', '.join(CHAT_ROLES)}, got {role!r}")
        out.append({"role": "system" if role == "developer" else role,  # templates know "system"
                    "content": _content(m.get("content"), role, f"{where}.content")})
    return tuple(out)


def _content(content, role: str, where: str) -> str:
    if isinstance(content, str):
        return content
    if content is None and role == "assistant":
        return ""
    if isinstance(content, list):
        parts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise _bad(where, f"{where}: only text parts ({{\"type\": \"text\", \"text\": ...}}) are supported")
            parts.append(part["text"])
        return "".join(parts)
    raise _bad(where, f"{where} must be a string or a list of text parts, got {_json_type(content)}")


def _integer(body: dict, name: str, lo: int | None, hi: int | None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # some clients serialise every number as a float
    if not isinstance(value, int) or isinstance(value, bool):
        raise _bad(name, f"'{name}' must be an integer, got {_json_type(value)}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise _bad(name, f"'{name}' must be at least {lo}, got {value}" if hi is None
                   else f"'{name}' must be between {lo} and {hi}, got {value}")
    return value


def _number(body: dict, name: str, lo: float, hi: float) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise _bad(name, f"'{name}' must be a number, got {_json_type(value)}")
    if not (lo <= value <= hi):  # also refuses NaN, which Python's json accepts
        raise _bad(name, f"'{name}' must be between {lo:g} and {hi:g}, got {value}")
    return float(value)


def _boolean(body: dict, name: str, param: str | None = None) -> bool | None:
    value = body.get(name)
    if value is not None and not isinstance(value, bool):
        raise _bad(param or name, f"'{param or name}' must be true or false, got {_json_type(value)}")
    return value


def _bad(param: str, message: str, code: str | None = "invalid_value") -> ApiError:
    return ApiError(400, message, param=param, code=code)


def _json_type(value) -> str:
    if value is None:
        return "null"
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
            dict: "an object"}.get(type(value), type(value).__name__)


# ---- responses -------------------------------------------------------------------------------------

def new_id(chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def response(req: CompletionRequest, rid: str, created: int, text: str, finish_reason: str, use: dict) -> dict:
    """The whole (non-streamed) answer."""
    if req.chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                  "finish_reason": finish_reason}
        return {"id": rid, "object": "chat.completion", "created": created, "model": req.model,
                "choices": [choice], "usage": use}
    choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
    return {"id": rid, "object": "text_completion", "created": created, "model": req.model,
            "choices": [choice], "usage": use}


def chunk(req: CompletionRequest, rid: str, created: int, text: str | None = None, role: bool = False,
          finish_reason: str | None = None, use: dict | None = None, no_choices: bool = False) -> dict:
    """One streamed piece: text, the opening role (chat), or the final one with finish_reason and usage."""
    if req.chat:
        delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
        choices = [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]
        obj = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": req.model}
    else:
        choices = [{"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}]
        obj = {"id": rid, "object": "text_completion", "created": created, "model": req.model}
    obj["choices"] = [] if no_choices else choices
    if use is not None:
        obj["usage"] = use
    return obj


def sse(obj: dict) -> bytes:
    """One server-sent event carrying a JSON object."""
    return b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"


def model_list(model_id: str, created: int) -> dict:
    return {"object": "list", "data": [model_card(model_id, created)]}


def model_card(model_id: str, created: int) -> dict:
    return {"id": model_id, "object": "model", "created": created, "owned_by": "moe_prefetch"}


def now() -> int:
    return int(time.time())


# ---- /metrics ----------------------------------------------------------------------------------------

# (metric name, type, help, key in moe_prefetch.stats(model))
_RUNTIME_METRICS = [
    ("moe_prefetch_prompt_tokens_total", "counter", "Prompt tokens processed (prefill).", "prompt_tokens"),
    ("moe_prefetch_tokens_generated_total", "counter", "Tokens generated.", "generated_tokens"),
    ("moe_prefetch_prefill_seconds_total", "counter", "Seconds spent in prefill forwards.", "prefill_seconds"),
    ("moe_prefetch_decode_seconds_total", "counter", "Seconds spent in decode forwards.", "decode_seconds"),
    ("moe_prefetch_decode_steps_total", "counter", "Decode forwards (one token each).", "decode_steps"),
    ("moe_prefetch_decode_tokens_per_second", "gauge", "Decode speed since the server started "
     "(decode steps / decode seconds).", "decode_tokens_per_s"),
    ("moe_prefetch_expert_requests_total", "counter", "Experts the routers asked for.", "expert_requests"),
    ("moe_prefetch_expert_hits_total", "counter", "Expert requests served from the device cache.", "hits"),
    ("moe_prefetch_expert_misses_total", "counter", "Expert requests that had to wait for a copy.", "misses"),
    ("moe_prefetch_expert_hit_rate", "gauge", "Expert cache hit rate since the server started.", "hit_rate"),
    ("moe_prefetch_bytes_moved_total", "counter", "Expert bytes copied to the device.", "bytes_to_device"),
    ("moe_prefetch_stall_seconds_total", "counter", "Seconds compute waited for expert copies.", "stall_seconds"),
    ("moe_prefetch_prefetch_issued_total", "counter", "Prefetch copies issued.", "prefetch_issued"),
    ("moe_prefetch_prefetch_used_total", "counter", "Prefetched experts that were then used.", "prefetch_used"),
    ("moe_prefetch_prefetch_wasted_total", "counter", "Prefetched experts evicted unused.", "prefetch_wasted"),
    ("moe_prefetch_expert_cache_slots", "gauge", "Expert slots in the device cache.", "expert_cache_slots"),
]
REQUEST_OUTCOMES = ("completed", "cancelled", "failed", "queue_full", "invalid")


def render_metrics(stats: dict, model_id: str, requests: dict, queue_length: int, busy: bool) -> str:
    """Prometheus text exposition (format 0.0.4) of the runtime counters and the server's queue."""
    lines = []

    def metric(name, kind, help_, samples):
        lines.extend([f"# HELP {name} {help_}", f"# TYPE {name} {kind}"])
        lines.extend(f"{name}{labels} {_number_text(v)}" for labels, v in samples)

    info = {k: str(stats.get(k, "")) for k in ("device", "backend", "predictor")}
    metric("moe_prefetch_info", "gauge", "The served model and how it runs (value always 1).",
           [(_labels(model=model_id, **info), 1)])
    for name, kind, help_, key in _RUNTIME_METRICS:
        if key in stats:
            metric(name, kind, help_, [("", stats[key])])
    metric("moe_prefetch_requests_total", "counter", "Generation requests by outcome.",
           [(_labels(outcome=o), requests.get(o, 0)) for o in REQUEST_OUTCOMES])
    metric("moe_prefetch_queue_length", "gauge", "Requests waiting for the model.", [("", queue_length)])
    metric("moe_prefetch_busy", "gauge", "1 while a generation runs on the model.", [("", int(busy))])
    return "\n".join(lines) + "\n"


def _labels(**kv) -> str:
    esc = {k: str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") for k, v in kv.items()}
    return "{" + ",".join(f'{k}="{v}"' for k, v in esc.items()) + "}"


def _number_text(v) -> str:
    v = float(v)
    if math.isnan(v):
        return "NaN"
    return str(int(v)) if v.is_integer() and abs(v) < 2**53 else repr(v)
