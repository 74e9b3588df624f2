"""``rcsd serve`` under bad requests, a full queue, an internal failure and load.

Bad requests go to a real server process (its console is checked for tracebacks at the end);
the queue and the 500 path run the same handler in-process with generation held or broken on
purpose, so the cases are deterministic.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from email.message import Message

import pytest

from rcsd_cli.configs.serve import ServeConfig
from tests.backends.test_backends import start_server
from tests.conftest import ROOT, shared, unshare


def post(url: str, body, timeout: float = 60) -> tuple[int, dict, Message]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method="POST", headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read()), resp.headers
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read()), exc.headers  # header names match in any case


SERVE_FLAGS = ("--max-tokens-limit", "64", "--max-n", "4")


@pytest.fixture(scope="module")
def served(tiny_model):
    proc, url = start_server(tiny_model, *SERVE_FLAGS)
    yield shared("served", (proc, url))
    unshare("served")
    proc.kill()
    proc.wait()


BAD = [  # (endpoint, body, field named, words in the message)
    ("completions", {"prompt": [99999999]}, "prompt.0", "outside the vocabulary"),
    ("completions", {"prompt": [1, -2]}, "prompt.1", "outside the vocabulary"),
    ("completions", {"prompt": "hi", "n": 0}, "n", "greater than or equal to 1"),
    ("completions", {"prompt": "hi", "n": 5}, "n", "at most 4"),
    ("completions", {"prompt": "hi", "max_tokens": 10**6}, "max_tokens", "at most 64"),
    ("completions", {"prompt": "hi", "max_tokens": 0}, "max_tokens", "greater than or equal to 1"),
    ("completions", {"prompt": "hi", "temperature": "hot"}, "temperature", "valid number"),
    ("completions", {"prompt": "hi", "top_p": 0}, "top_p", "greater than 0"),
    ("completions", {"prompt": "hi", "seed": "x"}, "seed", "valid integer"),
    ("completions", {"prompt": "hi", "stream": "yes"}, "stream", "valid boolean"),
    ("completions", {"prompt": "hi", "echo": "yes"}, "echo", "valid boolean"),
    ("completions", {"prompt": "hi", "logprobs": 21}, "logprobs", "at most 20 (--max-logprobs)"),
    ("completions", {"prompt": "hi", "prompt_logprobs": -1}, "prompt_logprobs", "greater than or equal to 0"),
    ("completions", {"prompt": []}, "prompt", "non-empty"),
    ("completions", {"prompt": ["a", ""]}, "prompt.1", "empty prompt"),
    ("completions", {"prompt": [[1, 2], [3, 99999999]]}, "prompt.1.1", "outside the vocabulary"),
    ("completions", {"prompt": [1, 2.5]}, "prompt.1", "must be integers"),
    ("completions", {}, "prompt", "is missing"),
    ("completions", b"{not json", None, "not valid JSON"),
    ("completions", b"[1, 2]", None, "JSON object"),
    ("chat/completions", {"messages": "hi"}, "messages", "valid list"),
    ("chat/completions", {"messages": []}, "messages", "at least 1"),
    ("chat/completions", {"messages": [{"role": "robot", "content": "hi"}]}, "messages.0.role", "'user'"),
    ("chat/completions", {"messages": [{"role": "user"}]}, "messages.0.content", "is missing"),
]


@pytest.mark.parametrize("endpoint,body,field,words", BAD, ids=[f"{e}-{i}" for i, (e, *_) in enumerate(BAD)])
def test_bad_requests_get_400_naming_the_field(served, endpoint, body, field, words):
    _, url = served
    code, reply, _ = post(f"{url}/{endpoint}", body)
    assert code == 400
    message = reply["error"]["message"]
    assert "\n" not in message and words in message, message
    assert reply["error"]["param"] == field
    if field:
        assert message.startswith(f"field '{field}'")


def test_server_stays_healthy_and_quiet_after_bad_requests(tiny_model):
    proc, url = start_server(tiny_model, *SERVE_FLAGS)  # its own: the console is read after a kill
    try:
        for endpoint, body, *_ in BAD:
            assert post(f"{url}/{endpoint}", body)[0] == 400
        code, reply, _ = post(url + "/completions", {"prompt": [1, 2, 3], "max_tokens": 3, "n": 2, "seed": 1,
                                                     "return_token_ids": True})
        assert code == 200 and len(reply["choices"]) == 2 and all(len(c["token_ids"]) <= 3 for c in reply["choices"])
        assert reply["usage"]["prompt_tokens"] == 3
        req = urllib.request.Request(url + "/nowhere", data=b"{}", method="POST")
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(req, timeout=30)
        assert err.value.code == 404
        assert json.loads(urllib.request.urlopen(url.removesuffix("/v1") + "/health", timeout=30).read()) == {
            "status": "ok"}
    finally:
        proc.kill()
    console = proc.stderr.read()
    assert "Traceback" not in console, console


class InProcess:
    """The real app under uvicorn on a thread, for cases that need generation held or broken on purpose."""

    def __init__(self, tiny_model, **cfg):
        from rcsd_cli.backends.server import ServerState, bound_socket, create_app, uvicorn_server
        from rcsd_cli.models import load_model

        loaded = load_model(str(tiny_model))
        self.state = ServerState(loaded.model, loaded.tokenizer, ServeConfig(model=str(tiny_model), port=0, **cfg))
        sock = bound_socket("127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
        self.server = uvicorn_server(create_app(self.state))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        for _ in range(300):
            if self.server.started:
                break
            time.sleep(0.05)

    def shutdown(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


def in_process_server(tiny_model, **cfg):
    server = InProcess(tiny_model, **cfg)
    return server, server.url


def test_full_queue_answers_503_with_retry_after(tiny_model, monkeypatch):
    import rcsd_cli.backends.server as server

    release, started = threading.Event(), threading.Event()
    real = server.generate

    def held(*args, **kwargs):
        started.set()
        release.wait(30)
        return real(*args, **kwargs)

    monkeypatch.setattr(server, "generate", held)
    httpd, url = in_process_server(tiny_model, max_queue=1)
    first: list = []
    t = threading.Thread(target=lambda: first.append(post(url + "/completions", {"prompt": "hi", "max_tokens": 2})))
    t.start()
    assert started.wait(30)
    code, reply, headers = post(url + "/completions", {"prompt": "hi", "max_tokens": 2})
    assert code == 503 and headers["Retry-After"] == "1" and "--max-queue" in reply["error"]["message"]
    release.set()
    t.join(30)
    assert first[0][0] == 200
    assert post(url + "/completions", {"prompt": "hi", "max_tokens": 2})[0] == 200  # the slot came back
    httpd.shutdown()


def test_waiting_requests_are_decoded_together_with_their_own_answers(tiny_model, monkeypatch):
    """While the model is busy, requests that arrive wait and then run as one batch (one ``generate`` call); each
    gets the answer it gets alone (same seed, its own max_tokens), and different sampling settings run apart."""
    import rcsd_cli.backends.server as server

    httpd, url = in_process_server(tiny_model)
    bodies = [{"prompt": "hi", "max_tokens": 5, "seed": 1, "temperature": 1.0, "n": 2, "return_token_ids": True},
              {"prompt": "The sky is", "max_tokens": 3, "seed": 2, "temperature": 1.0, "return_token_ids": True},
              {"prompt": "hi", "max_tokens": 4, "temperature": 0.0, "return_token_ids": True}]
    alone = [post(url + "/completions", body)[1]["choices"] for body in bodies]
    release, started, calls = threading.Event(), threading.Event(), []
    real = server.generate

    def held(model, tok, prompts, *args, **kwargs):
        calls.append(len(prompts))
        started.set()
        release.wait(30)
        return real(model, tok, prompts, *args, **kwargs)

    monkeypatch.setattr(server, "generate", held)
    first = threading.Thread(target=lambda: post(url + "/completions", {"prompt": "hold", "max_tokens": 2}))
    first.start()
    assert started.wait(30)
    replies: dict = {}
    threads = [threading.Thread(target=lambda i=i: replies.__setitem__(i, post(url + "/completions", bodies[i])))
               for i in range(3)]
    for t in threads:
        t.start()
    time.sleep(1.0)  # all three are waiting behind the held call
    release.set()
    for t in threads + [first]:
        t.join(60)
    assert calls[0] == 1 and sorted(calls[1:]) == [1, 3]  # then the two sampled requests (2 + 1 rows) together
    for i in range(3):
        code, reply, _ = replies[i]
        assert code == 200
        assert [(c["token_ids"], c["finish_reason"]) for c in reply["choices"]] == \
            [(c["token_ids"], c["finish_reason"]) for c in alone[i]]
    httpd.shutdown()


def test_internal_failure_is_a_500_with_one_line(tiny_model, monkeypatch, capfd):
    import rcsd_cli.backends.server as server

    def broken(*args, **kwargs):
        raise RuntimeError("CUDA error: device-side assert triggered\nmore detail")

    monkeypatch.setattr(server, "generate", broken)
    monkeypatch.delenv("RCSD_DEBUG", raising=False)
    httpd, url = in_process_server(tiny_model)
    code, reply, _ = post(url + "/completions", {"prompt": "hi", "max_tokens": 2})
    assert code == 500
    assert reply["error"]["message"] == "internal error: RuntimeError: CUDA error: device-side assert triggered"
    err = capfd.readouterr().err
    assert "rcsd serve: 500 on /v1/completions: RuntimeError" in err and "Traceback" not in err
    monkeypatch.setenv("RCSD_DEBUG", "1")
    post(url + "/completions", {"prompt": "hi", "max_tokens": 2})
    assert "Traceback" in capfd.readouterr().err
    httpd.shutdown()


def test_load_every_request_answered_or_refused(tiny_model):
    """benchmarks/load_serve.py: 8 threads against rcsd serve with a small queue; none dropped."""
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "load_serve.py"), "--model", str(tiny_model),
                           "--requests", "48", "--threads", "8", "--max-queue", "4", "--max-tokens", "8", "--json"],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["dropped"] == 0 and result["other"] == 0
    assert result["ok"] + result["busy"] == 48 and result["ok"] >= 1
    assert result["p50_s"] <= result["p95_s"]



@pytest.mark.parametrize("length,status", [("999999999", 413), ("abc", 400)])
def test_oversized_or_unreadable_body_length_is_refused_before_reading(served, length, status):
    import socket
    from urllib.parse import urlparse

    _, url = served
    u = urlparse(url)
    with socket.create_connection((u.hostname, u.port), timeout=30) as sock:
        sock.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {length}\r\n\r\n".encode())
        reply = sock.recv(65536).decode()
    assert reply.startswith(f"HTTP/1.0 {status}") or reply.startswith(f"HTTP/1.1 {status}"), reply[:80]
