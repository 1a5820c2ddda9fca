"""python -m moe_prefetch.serve as a client sees it: real server subprocesses on the demo model, driven
by the official `openai` package and by raw HTTP for the error cases.

Two servers, each started once for the module (loading dominates the cost):
- `plain`: the demo model as shipped (no chat template), default queue;
- `busy`: a copy of the demo model with a chat template, --max-queue 1, an API key, a slow emulated
  link (so a long generation is still running while the test queues others behind it), and a fault
  injected for one magic prompt to exercise the internal-error path.
"""
from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

openai = pytest.importorskip("openai", reason="the [serve] extra is not installed")
pytest.importorskip("starlette", reason="the [serve] extra is not installed")
pytest.importorskip("uvicorn", reason="the [serve] extra is not installed")

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "moe_prefetch" / "demo_model"
PROMPT = "And God said"
KEY = "test-key-123"
FAULT_PROMPT = [7, 7, 7]  # token ids that make the busy server's generation raise
# (and the prompt "boom" makes its request handler raise, outside any generation)
SERVER_FLAGS = ["--device", "cpu", "--expert-cache", "16", "--no-progress", "--port", "0", "--log-level", "warning"]
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")
# started with `python -c`: wraps the stopping criteria so that FAULT_PROMPT fails inside generate
FAULTY_SERVER = f"""
import sys
import moe_prefetch.serve_engine as engine
original = engine._JobCriteria.__call__
def faulty(self, input_ids, scores, **kwargs):
    if self.job.prompt_ids == {FAULT_PROMPT!r}:
        raise RuntimeError("injected fault")
    return original(self, input_ids, scores, **kwargs)
engine._JobCriteria.__call__ = faulty
encode = engine.Engine.encode_prompt
def broken_handler(self, prompt):
    if prompt == "boom":
        raise ValueError("injected handler bug")
    return encode(self, prompt)
engine.Engine.encode_prompt = broken_handler
from moe_prefetch.serve import main
sys.exit(main(sys.argv[1:]))
"""


def _env():
    return dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT), TOKENIZERS_PARALLELISM="false")


@dataclass
class Server:
    proc: subprocess.Popen
    log: Path
    model: str
    key: str | None = None
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, **kw):
        return openai.OpenAI(base_url=self.url + "/v1", api_key=self.key or "none", max_retries=0, timeout=120, **kw)

    def headers(self) -> dict:
        h = {"Content-Type": "application/json"}
        if self.key:
            h["Authorization"] = f"Bearer {self.key}"
        return h

    def request(self, method: str, path: str, body=None, headers=None, timeout=120):
        """(status, parsed JSON or text) of one plain HTTP request; body may be raw bytes."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        conn.request(method, path, body=data, headers=self.headers() if headers is None else headers)
        resp = conn.getresponse()
        raw = resp.read().decode()
        conn.close()
        try:
            return resp.status, json.loads(raw)
        except ValueError:
            return resp.status, raw

    def metrics(self) -> dict[str, float]:
        status, text = self.request("GET", "/metrics")
        assert status == 200, text
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                out[name] = float(value)
        return out


def _start(tmp: Path, name: str, args: list[str], model: str, key: str | None = None, code: str | None = None) -> Server:
    log = tmp / f"{name}.log"
    cmd = [sys.executable, "-c", code] if code else [sys.executable, "-m", "moe_prefetch.serve"]
    with open(log, "w") as f:
        proc = subprocess.Popen([*cmd, *args, *SERVER_FLAGS], stdout=f, stderr=subprocess.STDOUT, env=_env(), cwd=ROOT)
    return Server(proc, log, model, key)


def _wait_ready(server: Server, timeout: float = 180) -> Server:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = server.log.read_text()
        m = re.search(r"serving '.*' at http://127\.0\.0\.1:(\d+)/v1", text)
        if m:
            server.port = int(m.group(1))
            status, body = server.request("GET", "/health")
            assert status == 200 and body["status"] == "ok", body
            return server
        if server.proc.poll() is not None:
            pytest.fail(f"server exited with {server.proc.returncode}:\n{text}")
        time.sleep(0.2)
    pytest.fail(f"server not ready after {timeout} s:\n{server.log.read_text()}")


def _stop(server: Server) -> None:
    server.proc.terminate()
    try:
        server.proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        server.proc.kill()
        server.proc.wait()
        pytest.fail(f"the server did not stop on SIGTERM:\n{server.log.read_text()}")
    assert server.proc.returncode == 0 and "stopped" in server.log.read_text(), server.log.read_text()


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve")
    chat_model = tmp / "demo-chat"
    shutil.copytree(DEMO, chat_model)
    cfg = json.loads((chat_model / "tokenizer_config.json").read_text())
    (chat_model / "tokenizer_config.json").write_text(json.dumps(cfg | {"chat_template": CHAT_TEMPLATE}))
    # both load at once: the two cores share the import and load time
    plain = _start(tmp, "plain", ["--model", "demo"], "demo")
    busy = _start(tmp, "busy", ["--model", str(chat_model), "--served-model-name", "demo-chat", "--max-queue", "1",
                                "--api-key", KEY, "--link-gbps", "0.03"], "demo-chat", key=KEY, code=FAULTY_SERVER)
    try:
        yield _wait_ready(plain), _wait_ready(busy)
    finally:
        _stop(plain)
        _stop(busy)


@pytest.fixture(scope="module")
def plain(servers):
    return servers[0]


@pytest.fixture(scope="module")
def busy(servers):
    return servers[1]


def _stream_text(stream, chat: bool):
    """(deltas, final chunk) of an openai stream."""
    deltas, last = [], None
    for ev in stream:
        if ev.choices:
            piece = ev.choices[0].delta.content if chat else ev.choices[0].text
            if piece:
                deltas.append(piece)
            if ev.choices[0].finish_reason is not None:
                last = ev
    return deltas, last


# ---- behaviour --------------------------------------------------------------------------------------

def test_models_health_and_metrics_format(plain):
    client = plain.client()
    assert [m.id for m in client.models.list().data] == ["demo"]
    assert client.models.retrieve("demo").id == "demo"
    status, body = plain.request("GET", "/health")
    assert status == 200 and body["model"] == "demo"
    status, text = plain.request("GET", "/metrics")
    assert status == 200
    for name in ("moe_prefetch_tokens_generated_total", "moe_prefetch_decode_tokens_per_second",
                 "moe_prefetch_expert_hit_rate", "moe_prefetch_bytes_moved_total", "moe_prefetch_stall_seconds_total",
                 "moe_prefetch_queue_length"):
        assert f"# TYPE {name} " in text and f"# HELP {name} " in text, name
        assert re.search(rf"^{name} [0-9.e+-]+$", text, re.M), name


def test_greedy_output_equals_run_token_for_token(plain):
    n = 24
    r = subprocess.run([sys.executable, "-m", "moe_prefetch.run", "--model", "demo", "--device", "cpu", "--expert-cache",
                        "16", "--no-progress", "--predictor", "none", "--prompt", PROMPT, "--max-new-tokens", str(n),
                        "--json"], capture_output=True, text=True, env=_env(), timeout=300)
    assert r.returncode == 0, r.stderr
    ref = json.loads(r.stdout)
    before = plain.metrics()

    client = plain.client()
    out = client.completions.create(model="demo", prompt=PROMPT, max_tokens=n, temperature=0)
    assert out.choices[0].text == ref["text"]
    assert out.usage.completion_tokens == len(ref["token_ids"])
    assert out.usage.prompt_tokens == ref["stats"]["prompt_tokens"]
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens
    assert out.choices[0].finish_reason == "length"

    # streamed: one delta per generated token, each the text that token adds in run's output
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(DEMO)
    ids = ref["token_ids"]
    expected = [tok.decode(ids[:i + 1]) for i in range(len(ids))]
    expected = [b[len(a):] for a, b in zip([""] + expected[:-1], expected, strict=True) if b != a]
    deltas, last = _stream_text(client.completions.create(model="demo", prompt=PROMPT, max_tokens=n, temperature=0,
                                                          stream=True), chat=False)
    assert deltas == expected
    assert last.choices[0].finish_reason == "length"
    assert last.usage.completion_tokens == len(ids) and last.usage.prompt_tokens == ref["stats"]["prompt_tokens"]

    after = plain.metrics()  # the counters moved by what the two requests did
    assert after["moe_prefetch_tokens_generated_total"] - before["moe_prefetch_tokens_generated_total"] == 2 * len(ids)
    assert after["moe_prefetch_expert_requests_total"] > before["moe_prefetch_expert_requests_total"]
    assert after['moe_prefetch_requests_total{outcome="completed"}'] - before['moe_prefetch_requests_total{outcome="completed"}'] == 2
    assert after["moe_prefetch_decode_tokens_per_second"] > 0 and 0 < after["moe_prefetch_expert_hit_rate"] <= 1


def test_sampling_is_seeded_and_streamed_text_equals_whole_text(plain):
    client = plain.client()
    kw = dict(model="demo", prompt=PROMPT, max_tokens=20, temperature=0.9, top_p=0.95, seed=11)
    first = client.completions.create(**kw).choices[0].text
    assert client.completions.create(**kw).choices[0].text == first  # same seed, same text
    deltas, last = _stream_text(client.completions.create(**kw, stream=True), chat=False)
    assert "".join(deltas) == first
    assert last.usage.completion_tokens == 20
    others = {client.completions.create(**(kw | {"seed": s})).choices[0].text for s in (1, 2, 3)}
    assert len(others | {first}) > 1  # the seed matters


def test_stop_strings_cut_the_text_and_are_never_streamed(plain):
    client = plain.client()
    full = client.completions.create(model="demo", prompt=PROMPT, max_tokens=30, temperature=0).choices[0].text
    words = full.split()
    stop = " ".join(words[5:7])  # two words: spans several tokens, so its start is held back while streaming
    cut = full[:full.index(stop)]
    for stream in (False, True):
        kw = dict(model="demo", prompt=PROMPT, max_tokens=30, temperature=0, stop=[stop, "no such text"])
        if stream:
            deltas, last = _stream_text(client.completions.create(**kw, stream=True), chat=False)
            text, reason, used = "".join(deltas), last.choices[0].finish_reason, last.usage.completion_tokens
        else:
            out = client.completions.create(**kw)
            text, reason, used = out.choices[0].text, out.choices[0].finish_reason, out.usage.completion_tokens
        assert text == cut, stream
        assert reason == "stop"
        assert used < 30  # generation ended at the stop string
    # a stop string whose beginning appears but which never completes holds nothing back in the end
    nearly = words[5] + " XYZ"
    deltas, last = _stream_text(client.completions.create(model="demo", prompt=PROMPT, max_tokens=30, temperature=0,
                                                          stop=nearly, stream=True), chat=False)
    assert "".join(deltas) == full and last.choices[0].finish_reason == "length"


def test_chat_without_a_template_is_refused_clearly(plain):
    with pytest.raises(openai.BadRequestError) as e:
        plain.client().chat.completions.create(model="demo", messages=[{"role": "user", "content": "hi"}])
    assert e.value.body["code"] == "no_chat_template"
    assert "chat template" in e.value.body["message"]


def test_chat_with_a_template_sync_and_streamed(busy):
    client = busy.client()
    messages = [{"role": "system", "content": "Speak as the King James Bible."},
                {"role": "user", "content": PROMPT}]
    out = client.chat.completions.create(model="demo-chat", messages=messages, max_tokens=6, temperature=0)
    assert out.object == "chat.completion" and out.choices[0].message.role == "assistant"
    text = out.choices[0].message.content
    assert text and out.usage.completion_tokens == 6 and out.choices[0].finish_reason == "length"
    assert out.usage.prompt_tokens > 6  # the template's role words are part of the prompt
    deltas, last = _stream_text(client.chat.completions.create(
        model="demo-chat", messages=messages, max_tokens=6, temperature=0, stream=True,
        stream_options={"include_usage": True}), chat=True)
    assert "".join(deltas) == text
    assert last.usage.completion_tokens == 6 and last.usage.prompt_tokens == out.usage.prompt_tokens


def test_api_key_is_checked_on_every_request(busy):
    for path in ("/health", "/metrics", "/v1/models"):
        status, body = busy.request("GET", path, headers={})
        assert status == 401 and body["error"]["code"] == "invalid_api_key", path
    status, body = busy.request("GET", "/v1/models", headers={"Authorization": "Bearer wrong"})
    assert status == 401
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=busy.url + "/v1", api_key="wrong", max_retries=0).models.list()
    assert [m.id for m in busy.client().models.list().data] == ["demo-chat"]


def test_text_gate_holds_back_what_could_become_a_stop_string():
    from moe_prefetch.serve_engine import TextGate

    gate, text, shown = TextGate(("END", "xyz")), "", []
    for piece in ["Hello E", "N", "ough. x", "y", " and E", "ND tail"]:
        text += piece
        shown.append(gate.update(text))
    assert shown == ["Hello ", "", "ENough. ", "", "xy and ", ""]
    assert gate.stopped and "".join(shown) == text[:text.index("END")]
    gate = TextGate(("abc",))
    assert gate.update("xxab") == "xx" and gate.flush("xxab") == "ab"  # the end releases the held tail
    gate = TextGate(())
    assert gate.update("caf\ufffd") == "caf" and gate.update("café") == "é"  # a character still incomplete


def _open_stream(server: Server, body: dict):
    """Start a streamed completion with raw HTTP; returns (connection, response) after the first event."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
    conn.request("POST", "/v1/completions", body=json.dumps(body | {"stream": True}), headers=server.headers())
    resp = conn.getresponse()
    assert resp.status == 200
    line = resp.readline()
    assert line.startswith(b"data: {"), line
    return conn, resp


def _hang_up(conn) -> None:
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()


def test_disconnect_mid_stream_stops_the_generation(plain):
    before = plain.metrics()
    long = 500  # the whole context; at demo speed seconds of work, stopped after a token or two
    conn, _ = _open_stream(plain, {"model": "demo", "prompt": PROMPT, "max_tokens": long, "temperature": 0})
    _hang_up(conn)
    out = plain.client().completions.create(model="demo", prompt=PROMPT, max_tokens=3, temperature=0)
    assert out.usage.completion_tokens == 3  # the next request was served, so the model was freed
    after = plain.metrics()
    assert after['moe_prefetch_requests_total{outcome="cancelled"}'] == before['moe_prefetch_requests_total{outcome="cancelled"}'] + 1
    dropped = after["moe_prefetch_tokens_generated_total"] - before["moe_prefetch_tokens_generated_total"] - 3
    assert 1 <= dropped < long
    assert after["moe_prefetch_busy"] == 0 and after["moe_prefetch_queue_length"] == 0


def test_a_full_queue_answers_429_and_the_waiting_request_is_served(busy):
    # one generation running (slow link, long), one waiting: the queue of 1 is full
    conn, _ = _open_stream(busy, {"model": "demo-chat", "prompt": PROMPT, "max_tokens": 450, "temperature": 0})
    waiting = {}
    t = threading.Thread(target=lambda: waiting.update(r=busy.request(
        "POST", "/v1/completions", {"model": "demo-chat", "prompt": PROMPT, "max_tokens": 2, "temperature": 0})))
    t.start()
    try:
        deadline = time.monotonic() + 60
        while busy.request("GET", "/health")[1]["queue_length"] != 1:
            assert time.monotonic() < deadline, "the second request never queued"
            time.sleep(0.05)
        assert busy.metrics()["moe_prefetch_queue_length"] == 1
        status, body = busy.request("POST", "/v1/completions", {"model": "demo-chat", "prompt": PROMPT, "max_tokens": 2})
        assert status == 429, body
        assert body["error"]["code"] == "queue_full" and body["error"]["message"]
        with pytest.raises(openai.RateLimitError):
            busy.client().completions.create(model="demo-chat", prompt=PROMPT, max_tokens=2)
    finally:
        _hang_up(conn)  # frees the model for the waiting request
        t.join(timeout=120)
    status, body = waiting["r"]
    assert status == 200 and body["usage"]["completion_tokens"] == 2
    m = busy.metrics()
    assert m['moe_prefetch_requests_total{outcome="queue_full"}'] >= 2
    assert m['moe_prefetch_requests_total{outcome="cancelled"}'] >= 1


def test_internal_error_is_a_500_and_the_server_keeps_serving(busy):
    status, body = busy.request("POST", "/v1/completions", {"model": "demo-chat", "prompt": FAULT_PROMPT, "max_tokens": 4})
    assert status == 500, body
    assert body["error"]["type"] == "server_error" and "injected fault" in body["error"]["message"]
    with pytest.raises(openai.APIError) as e:  # streamed: the error arrives as an event after the headers
        list(busy.client().completions.create(model="demo-chat", prompt=FAULT_PROMPT, max_tokens=4, stream=True))
    assert "injected fault" in str(e.value)
    status, body = busy.request("POST", "/v1/completions", {"model": "demo-chat", "prompt": "boom"})
    assert status == 500 and body["error"]["code"] == "internal_error", body
    assert "injected handler bug" in body["error"]["message"]
    out = busy.client().completions.create(model="demo-chat", prompt=PROMPT, max_tokens=2, temperature=0)
    assert out.usage.completion_tokens == 2
    assert busy.metrics()['moe_prefetch_requests_total{outcome="failed"}'] == 2


BAD_REQUESTS = [
    # (path, body (bytes: sent as is), status, error param)
    ("/v1/completions", b"{not json", 400, None),
    ("/v1/completions", b"[1, 2]", 400, None),
    ("/v1/completions", b"\xff\xfe", 400, None),
    ("/v1/completions", {"prompt": PROMPT}, 400, "model"),
    ("/v1/completions", {"model": "gpt-4", "prompt": PROMPT}, 404, "model"),
    ("/v1/completions", {"model": "demo"}, 400, "prompt"),
    ("/v1/completions", {"model": "demo", "prompt": 5}, 400, "prompt"),
    ("/v1/completions", {"model": "demo", "prompt": ["a", "b"]}, 400, "prompt"),
    ("/v1/completions", {"model": "demo", "prompt": [1, 99999]}, 400, "prompt"),
    ("/v1/completions", {"model": "demo", "prompt": PROMPT, "max_tokens": "ten"}, 400, "max_tokens"),
    ("/v1/completions", {"model": "demo", "prompt": PROMPT, "max_tokens": True}, 400, "max_tokens"),
    ("/v1/completions", {"model": "demo", "prompt": PROMPT, "max_tokens": -5}, 400, "max_tokens"),
    ("/v1/completions", {"model": "demo", "prompt": PROMPT, "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"model": "demo", "prompt": PROMPT, "max_tokens": 10**12}, 400, "max_tokens"),
    ("/v1/completions", {"model": "demo", "prompt": "And " * 600}, 400, "prompt"),
    ("/v1/completions", {"model": "demo", "prompt": PROMPT, "temperature": "hot"}, 400, "temperature"),
    ("/v1/completions", {"model": "demo", "prompt": PROMPT, "temperature": -1}, 400, "temperature"),
    ("/v1/completions", {"model": "demo", "prompt": PROMPT, "top_p": 1.5}, 400, "top_p"),
    ("/v1/completions", {"model": "demo", "prompt": PROMPT, "seed": "x"}, 400, "seed"),
    ("/v1/completions", {"model": "demo", "prompt": PROMPT, "stop": 5}, 400, "stop"),
    ("/v1/completions", {"model": "demo", "prompt": PROMPT, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ("/v1/completions", {"model": "demo", "prompt": PROMPT, "n": 2}, 400, "n"),
    ("/v1/completions", {"model": "demo", "prompt": PROMPT, "stream": "yes"}, 400, "stream"),
    ("/v1/completions", {"model": "demo", "prompt": PROMPT, "logprobs": 3}, 400, "logprobs"),
    ("/v1/chat/completions", {"model": "demo", "messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"model": "demo", "messages": "hi"}, 400, "messages"),
    ("/v1/chat/completions", {"model": "demo", "messages": [{"role": "wizard", "content": "x"}]}, 400, "messages[0].role"),
    ("/v1/chat/completions", {"model": "demo", "messages": [{"role": "user", "content": 3}]}, 400, "messages[0].content"),
    ("/v1/nothing-here", {}, 404, None),
]


def test_bad_input_gets_an_openai_error_object_and_never_crashes(plain):
    for path, body, status, param in BAD_REQUESTS:
        got, err = plain.request("POST", path, body)
        assert got == status, (path, body, got, err)
        assert isinstance(err, dict) and set(err) == {"error"}, err
        assert set(err["error"]) == {"message", "type", "param", "code"}, err
        assert err["error"]["message"] and err["error"]["param"] == param, (body, err)
    got, err = plain.request("GET", "/v1/completions")
    assert got == 405 and "error" in err
    assert plain.proc.poll() is None
    assert plain.request("GET", "/health")[0] == 200
    assert plain.metrics()['moe_prefetch_requests_total{outcome="invalid"}'] >= len(BAD_REQUESTS) - 1  # all but the unknown route


@pytest.mark.parametrize("args,pattern", [
    (["--port", "70000"], "--port"),
    (["--model", "/nonexistent/model"], "does not exist"),
    (["--max-context", "100000"], "longer than the model's context"),
])
def test_bad_flags_give_one_line(args, pattern):
    r = subprocess.run([sys.executable, "-m", "moe_prefetch.serve", "--device", "cpu", "--no-progress", *args],
                       capture_output=True, text=True, env=_env(), timeout=300)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode != 0 and r.stdout == ""
    assert len(lines) == 1 and lines[0].startswith("error: ") and pattern in lines[0], r.stderr


def test_port_in_use_gives_one_line(plain):
    r = subprocess.run([sys.executable, "-m", "moe_prefetch.serve", "--port", str(plain.port)],
                       capture_output=True, text=True, env=_env(), timeout=300)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode != 0 and len(lines) == 1 and "cannot listen" in lines[0], r.stderr
