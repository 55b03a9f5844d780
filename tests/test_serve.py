"""moekit serve: the continuous-batching engine (greedy equals moekit.generate whatever else runs) and the
OpenAI-compatible API through the ``openai`` client, a real uvicorn on a free port."""

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

pytest.importorskip("starlette")
uvicorn = pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")

from moekit import MoETransformer  # noqa: E402
from moekit import checkpoint as ckpt_io  # noqa: E402
from moekit.generate import generate  # noqa: E402
from moekit.presets import miniature  # noqa: E402
from moekit.serve.app import build_app  # noqa: E402
from moekit.serve.engine import Engine, SamplingParams  # noqa: E402
from moekit.serve.server import load_state  # noqa: E402
from moekit.tokenizer import ByteTokenizer  # noqa: E402

CONTEXT = 1024


def _model():
    torch.manual_seed(0)
    model = MoETransformer(miniature("tiny").replace(max_seq_len=CONTEXT)).eval()
    with torch.no_grad():  # sharper weights than the init, so greedy choices are not near-ties
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(4)
    return model


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    model = _model()
    return ckpt_io.save_checkpoint(tmp_path_factory.mktemp("serve") / "tiny-moe", 1, model, model.cfg,
                                   ByteTokenizer()).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(run_dir):
    state = load_state(run_dir, max_batch=4, prefill_chunk=16)
    port = _free_port()
    srv = uvicorn.Server(uvicorn.Config(build_app(state, on_shutdown=lambda: state.engine.close()), host="127.0.0.1",
                                        port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not srv.started:
        assert time.time() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", state
    srv.should_exit = True
    thread.join(10)


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="none", max_retries=0, timeout=60)


def _wait(cond, seconds=10.0):
    deadline = time.time() + seconds
    while not cond():
        assert time.time() < deadline, "timed out"
        time.sleep(0.02)


# -- the engine alone --------------------------------------------------------------------------------

def _collect(engine, prompt, params):
    events, done = [], threading.Event()

    def sink(ev):
        events.append(ev)
        if ev.finish_reason:
            done.set()
    engine.submit(prompt, params, sink)
    return events, done


def test_engine_greedy_equals_generate_with_others_in_the_batch():
    """Five prompts of different lengths through three slots (two wait), long prompts prefilled in chunks
    between decode steps: each continuation is the one generate gives for its prompt alone."""
    model = _model()
    engine = Engine(model, ByteTokenizer(), max_batch=3, prefill_chunk=5)
    try:
        g = torch.Generator().manual_seed(1)
        prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (3, 17, 9, 1, 12)]
        runs = [_collect(engine, p, SamplingParams(max_tokens=8 + 3 * i)) for i, p in enumerate(prompts)]
        for (events, done), p, i in zip(runs, prompts, range(5)):
            assert done.wait(60)
            ids = [t for ev in events for t in ev.token_ids]
            assert ids == generate(model, [p], 8 + 3 * i).tokens[0]
            assert events[-1].finish_reason == "length" and events[-1].completion_tokens == 8 + 3 * i
        assert engine.running == 0 and engine.queue_length == 0
        assert engine.metrics.prefill_chunks > len(prompts)  # the long prompts took several chunks
    finally:
        engine.close()


def test_engine_batched_prefill_of_several_prompts_equals_generate():
    """Prompts that arrive together are prefilled in one right-padded forward (each at its own positions),
    joining a request that is already decoding; greedy still equals generate for each alone."""
    model = _model()
    engine = Engine(model, ByteTokenizer(), max_batch=5, prefill_chunk=64)
    try:
        g = torch.Generator().manual_seed(2)
        first = _collect(engine, [7, 8, 9], SamplingParams(max_tokens=40))
        _wait(lambda: first[0])  # decoding
        prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (5, 11, 2, 8)]
        chunks = engine.metrics.prefill_chunks
        with engine._cond:  # all four wait together, so one prefill step takes them all
            runs = [_collect(engine, p, SamplingParams(max_tokens=9)) for p in prompts]
        for (events, done), p in zip(runs, prompts):
            assert done.wait(60)
            assert [t for ev in events for t in ev.token_ids] == generate(model, [p], 9).tokens[0]
        assert engine.metrics.prefill_chunks == chunks + 1
        assert first[1].wait(60)
        assert [t for ev in first[0] for t in ev.token_ids] == generate(model, [[7, 8, 9]], 40).tokens[0]
    finally:
        engine.close()


def test_engine_stop_string_cuts_the_text_and_frees_the_slot():
    model = _model()
    engine = Engine(model, ByteTokenizer(), max_batch=1)
    try:
        prompt = [5, 6, 7]
        free = ByteTokenizer().decode(generate(model, [prompt], 12).tokens[0])
        stop = free[5:7]
        events, done = _collect(engine, prompt, SamplingParams(max_tokens=12, stop=(stop,)))
        assert done.wait(60)
        assert "".join(ev.text for ev in events) == free[:free.find(stop)]
        assert events[-1].finish_reason == "stop" and engine.running == 0
    finally:
        engine.close()


def test_engine_refuses_what_can_never_fit_and_stops_taking_requests_when_closed():
    engine = Engine(_model(), ByteTokenizer(), max_batch=1)
    with pytest.raises(ValueError, match="exceeds the context of 1024"):
        engine.submit([1] * 1000, SamplingParams(max_tokens=25), lambda ev: None)
    engine.close()
    small = Engine(_model(), ByteTokenizer(), max_batch=1, context=64)  # a smaller pool, a smaller limit
    with pytest.raises(ValueError, match="exceeds the context of 64"):
        small.submit([1] * 60, SamplingParams(max_tokens=5), lambda ev: None)
    events, done = _collect(small, [1] * 60, SamplingParams(max_tokens=4))
    assert done.wait(60) and small.cache.layers[0].k_NGLD.shape[2] == 64
    small.close()
    with pytest.raises(ValueError, match="context=2000 is invalid"):
        Engine(_model(), ByteTokenizer(), context=2000)
    with pytest.raises(RuntimeError, match="shutting down"):
        engine.submit([1], SamplingParams(max_tokens=1), lambda ev: None)


# -- the HTTP API ------------------------------------------------------------------------------------

def test_openai_client_completions_and_chat(server, client):
    model_id = client.models.list().data[0].id
    assert model_id == "tiny-moe" and client.models.retrieve("tiny-moe").id == "tiny-moe"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")
    c = client.completions.create(model=model_id, prompt="def fib(n):", max_tokens=5, temperature=0)
    assert c.object == "text_completion" and c.choices[0].finish_reason == "length"
    assert c.usage.prompt_tokens == len("def fib(n):") and c.usage.completion_tokens == 5
    pieces = list(client.completions.create(model=model_id, prompt="def fib(n):", max_tokens=5, temperature=0,
                                            stream=True))
    assert "".join(p.choices[0].text for p in pieces) == c.choices[0].text
    assert pieces[-1].choices[0].finish_reason == "length"
    full = c.choices[0].text
    stop = full[2:4]
    for stream in (False, True):
        got = client.completions.create(model=model_id, prompt="def fib(n):", max_tokens=5, temperature=0, stop=[stop],
                                        stream=stream)
        got = list(got) if stream else [got]
        assert "".join(p.choices[0].text for p in got) == full[:full.find(stop)]
        assert got[-1].choices[0].finish_reason == "stop"

    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    r = client.chat.completions.create(model=model_id, messages=messages, max_tokens=6, temperature=0)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.usage.prompt_tokens == len("system: be brief\nuser: hi\nassistant:")  # the plain rendering
    chunks = list(client.chat.completions.create(model=model_id, messages=messages, max_tokens=6, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == r.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == 6

    # a seed makes sampling repeatable
    kw = dict(model=model_id, prompt="x", max_tokens=8, temperature=1.0, top_p=0.9, seed=3)
    assert client.completions.create(**kw).choices[0].text == client.completions.create(**kw).choices[0].text


def test_greedy_equals_generate_under_four_concurrent_requests(server, client, run_dir):
    model, _, _ = ckpt_io.load_model(run_dir)
    tok = ByteTokenizer()
    prompts = ["a", "def fib(n):\n    return", "class Point:\n    x: int = 0\n    y", "import os"]
    lengths = [30, 12, 24, 18]

    def ask(i):
        return client.completions.create(model="tiny-moe", prompt=prompts[i], max_tokens=lengths[i], temperature=0)

    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(ask, range(4)))
    for p, n, c in zip(prompts, lengths, got):
        assert c.choices[0].text == tok.decode(generate(model, [tok.encode(p)], n).tokens[0])


class _Reply:
    def __init__(self, status, text):
        self.status_code, self.text = status, text

    def json(self):
        return json.loads(self.text)


def _connect(url) -> http.client.HTTPConnection:
    host, port = url.split("//")[1].split(":")
    return http.client.HTTPConnection(host, int(port), timeout=60)


def _request(method, url, body=None, raw=False) -> _Reply:
    base, path = url.split("/", 3)[:3], "/" + url.split("/", 3)[3]
    conn = _connect("/".join(base))
    try:
        data = None if body is None else (body if raw else json.dumps(body))
        conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        return _Reply(resp.status, resp.read().decode())
    finally:
        conn.close()


def _post(url, body, raw=False) -> _Reply:
    return _request("POST", url, body, raw)


def _get(url) -> _Reply:
    return _request("GET", url)


def _open_stream(url, body):
    """A streaming POST to ``url`` (the server's root + path): (connection, response), lines via readline."""
    base, path = "/".join(url.split("/", 3)[:3]), "/" + url.split("/", 3)[3]
    conn = _connect(base)
    conn.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"})
    return conn, conn.getresponse()


def _data_lines(resp):
    for raw in iter(resp.readline, b""):
        line = raw.decode().strip()
        if line.startswith("data:"):
            yield line


@pytest.mark.parametrize("body, status, param", [
    ("{not json", 400, None),
    ("[1, 2]", 400, None),
    ({"model": "gpt-4", "prompt": "x"}, 404, "model"),
    ({"prompt": "x", "n": 2}, 400, "n"),
    ({"prompt": "x", "temperature": -1}, 400, "temperature"),
    ({"prompt": "x", "top_p": 0}, 400, "top_p"),
    ({"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ({"prompt": "x", "stop": 3}, 400, "stop"),
    ({"prompt": "x" * 1000, "max_tokens": 100}, 400, "max_tokens"),
    ({"prompt": [1, 999]}, 400, "prompt"),
    ({}, 400, "prompt"),
])
def test_bad_requests_get_openai_error_bodies(server, body, status, param):
    r = _post(server[0] + "/v1/completions", body, raw=isinstance(body, str))
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"] and err["param"] == param
    if body == {"prompt": "x" * 1000, "max_tokens": 100}:
        assert err["code"] == "context_length_exceeded"


def test_bad_chat_requests_and_unknown_routes(server, client):
    r = _post(server[0] + "/v1/chat/completions", {"messages": "hi"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    r = _get(server[0] + "/v1/nothing-here")
    assert r.status_code == 404 and "error" in r.json()
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny-moe", messages=[{"role": "user", "content": "hi"}], n=2)
    # the server carries on
    assert client.completions.create(model="tiny-moe", prompt="ok", max_tokens=2).usage.completion_tokens == 2


def test_client_disconnect_mid_stream_frees_its_slot(server):
    url, state = server
    engine = state.engine
    before = engine.metrics.requests_finished["cancelled"]
    conn, resp = _open_stream(url + "/v1/completions", {"prompt": "x", "max_tokens": CONTEXT - 1, "stream": True})
    assert resp.status == 200 and next(_data_lines(resp))
    assert engine.running == 1
    conn.close()  # the client goes away mid-stream
    _wait(lambda: engine.running == 0)
    assert engine.metrics.requests_finished["cancelled"] == before + 1


def test_client_disconnect_while_waiting_for_a_whole_completion_frees_its_slot(server):
    url, state = server
    engine = state.engine
    before = engine.metrics.requests_finished["cancelled"]
    conn, _ = _connect(url), None
    conn.request("POST", "/v1/completions", body=json.dumps({"prompt": "y", "max_tokens": CONTEXT - 1}),
                 headers={"Content-Type": "application/json"})
    _wait(lambda: engine.running == 1)
    conn.close()  # gone before the answer
    _wait(lambda: engine.running == 0)
    assert engine.metrics.requests_finished["cancelled"] == before + 1


def test_chat_template_of_a_hugging_face_directory_renders_the_messages(run_dir, tmp_path):
    from moekit.serve.app import ServerState, _render_chat
    from moekit.serve.server import chat_template_of, stop_token_ids

    template = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}{% endfor %}"
                "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": template, "bos_token": "<s>",
                                                                "eos_token": {"content": "</s>"}}))
    state = ServerState(None, "m", *chat_template_of(tmp_path))
    messages = [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    assert _render_chat(state, messages) == "<s><|user|>hi</s><|assistant|>"
    assert chat_template_of(run_dir) == (None, "", "")  # moekit's byte tokenizer has no template
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    assert stop_token_ids(tmp_path, ByteTokenizer()) == (2, 7)


def test_a_hugging_face_directory_serves_with_its_chat_template_and_eos(tmp_path):
    from moekit.interop import to_hf
    from moekit.serve.app import _render_chat

    model = _model()
    to_hf(model, tmp_path / "hf", tokenizer=ByteTokenizer())
    template = "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}>"
    (tmp_path / "hf" / "tokenizer_config.json").write_text(json.dumps({"chat_template": template, "eos_token": "\n"}))
    state = load_state(tmp_path / "hf", max_batch=2)
    try:
        assert state.model_name == "hf" and state.engine.stop_token_ids == {ord("\n")}
        prompt = _render_chat(state, [{"role": "user", "content": "hi"}])
        assert prompt == "[user]hi>"
        events, done = _collect(state.engine, ByteTokenizer().encode(prompt), SamplingParams(max_tokens=6))
        assert done.wait(60)
        expected = generate(model, [ByteTokenizer().encode(prompt)], 6, stop_tokens=[ord("\n")]).tokens[0]
        assert [t for ev in events for t in ev.token_ids] == expected
    finally:
        state.engine.close()


def test_metrics_and_health(server, client):
    client.completions.create(model="tiny-moe", prompt="count me", max_tokens=3)
    assert _get(server[0] + "/health").json()["status"] == "ok"
    text = _get(server[0] + "/metrics").text
    for name in ("moekit_http_requests_total", "moekit_generated_tokens_total", "moekit_queue_length",
                 "moekit_running_requests", "moekit_time_to_first_token_seconds_count", "moekit_kv_cache_bytes",
                 'moekit_expert_assignments_total{layer="0",expert="0"}'):
        assert name in text
    assert 'moekit_http_requests_total{endpoint="completions",status="200"}' in text


def test_sigterm_drains_the_running_request_then_exits(run_dir):
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # one thread: steady steps on a busy machine
    proc = subprocess.Popen([sys.executable, "-m", "moekit", "serve", "--model", str(run_dir), "--port", str(port),
                             "--log-level", "info"], env=env, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        _wait(lambda: _up(url), 60)
        conn, resp = _open_stream(url + "/v1/completions", {"prompt": "x", "max_tokens": 400, "stream": True,
                                                             "temperature": 0})
        lines = _data_lines(resp)
        assert next(lines)
        proc.send_signal(signal.SIGTERM)
        data = list(lines)
        conn.close()
        assert data[-1] == "data: [DONE]"
        assert json.loads(data[-2][5:])["choices"][0]["finish_reason"] == "length"
        assert proc.wait(30) in (0, -signal.SIGTERM)  # (uvicorn re-raises the signal once it has shut down)
        assert "Waiting for connections to close" in proc.stderr.read()  # the stream was open at the signal
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _up(url) -> bool:
    try:
        return _get(url + "/health").status_code == 200
    except OSError:
        return False


@pytest.mark.slow
def test_mixed_load_with_random_disconnects_completes_every_request_and_frees_every_slot(server):
    """16 clients x 8 requests: streamed or not, greedy or sampled, a third of the streams dropped after
    their first chunk; every other response is whole, and nothing stays in the engine."""
    import random

    url, state = server
    errors = []

    def worker(i):
        rnd = random.Random(i)
        for _ in range(8):
            body = {"prompt": "x" * rnd.randint(1, 100), "max_tokens": rnd.randint(1, 60),
                    "temperature": rnd.choice([0, 0.8]), "stream": rnd.random() < 0.5}
            try:
                if not body["stream"]:
                    r = _post(url + "/v1/completions", body)
                    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == body["max_tokens"]
                    continue
                conn, resp = _open_stream(url + "/v1/completions", body)
                lines = _data_lines(resp)
                if rnd.random() < 0.3:
                    next(lines, None)
                else:
                    assert list(lines)[-1] == "data: [DONE]"
                conn.close()
            except Exception as err:  # noqa: BLE001 - collected, reported below
                errors.append(repr(err))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    _wait(lambda: state.engine.running == 0 and state.engine.queue_length == 0)
