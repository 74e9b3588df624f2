"""The OpenAI-compatible client under faults, against a scripted fake server on loopback.

Each case runs the real CLI in a subprocess and asserts what the user sees: the exit code, one
line on stderr (never a traceback), the rows kept, and how many requests the server received.
Requests go out one at a time (``--concurrency 1``) so the script's order is the items' order.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from rcsd_cli.data.artifacts import read_artifact
from tests.conftest import write_jsonl

OK = {"choices": [{"text": "Answer: B", "token_ids": [330, 1234, 28], "finish_reason": "stop"}]}


class FakeServer:
    """Answers POSTs by a script of actions, one per request (the last one repeats).

    Actions: "ok", "500", "503", "400", "429" (Retry-After: 1), "drop" (close without a reply),
    "truncated" (Content-Length longer than the body), "html" (200 that is not JSON),
    "nochoices", "slow" (sleep past the client's timeout, then ok), ("reply", text) for a
    completion with that text, "die" (stop listening: later connections are refused).
    """

    def __init__(self, script: list):
        self.script, self.times = list(script), []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                fake.times.append(time.monotonic())
                i = len(fake.times) - 1
                action = fake.script[min(i, len(fake.script) - 1)]
                fake.act(self, action)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def requests(self) -> int:
        return len(self.times)

    def act(self, h: BaseHTTPRequestHandler, action):
        def send(code: int, body: bytes, headers: dict | None = None, length: int | None = None):
            h.send_response(code)
            for k, v in {"Content-Type": "application/json", **(headers or {})}.items():
                h.send_header(k, v)
            h.send_header("Content-Length", str(len(body) if length is None else length))
            h.end_headers()
            h.wfile.write(body)

        def error(code: int, message: str, headers: dict | None = None):
            send(code, json.dumps({"error": {"message": message}}).encode(), headers)

        if isinstance(action, tuple):
            return send(200, json.dumps({"choices": [{"text": action[1], "finish_reason": "stop"}]}).encode())
        if action == "ok":
            return send(200, json.dumps(OK).encode())
        if action in ("500", "503", "400"):
            return error(int(action), {"500": "boom", "503": "overloaded", "400": "prompt is too long"}[action])
        if action == "429":
            return error(429, "rate limited", {"Retry-After": "1"})
        if action == "drop":
            h.close_connection = True
            return
        if action == "truncated":
            return send(200, json.dumps(OK).encode()[:20], length=500)
        if action == "html":
            return send(200, b"<html>502 Bad Gateway</html>")
        if action == "nochoices":
            return send(200, b'{"choices": []}')
        if action == "slow":
            time.sleep(SLOW_S)
            return send(200, json.dumps(OK).encode())
        if action == "die":
            h.close_connection = True
            threading.Thread(target=self.close, daemon=True).start()
            return
        raise AssertionError(action)

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def fake():
    servers = []

    def start(script):
        servers.append(FakeServer(script))
        return servers[-1]

    yield start
    for s in servers:
        try:
            s.close()
        except OSError:
            pass


@pytest.fixture
def rubrics(run_cli, tmp_path):
    rows = [{"id": f"p{i}", "question": f"Which is largest: {i}, {i + 1} or {i + 2}?",
             "choices": [str(i), str(i + 1), str(i + 2)], "answer": "C"} for i in range(4)]
    write_jsonl(tmp_path / "p.jsonl", rows)
    run_cli("gen-rubrics", tmp_path / "p.jsonl", "-o", tmp_path / "r.parquet", "--generator", "reference",
            check=True)
    return tmp_path / "r.parquet"


SLOW_S = 6.0  # the "slow" reply; a client waiting for it uses a timeout of half that


def sample_args(rubrics, out, model, url, *extra, limit=4, timeout=30.0):
    """``rcsd sample`` through the openai backend, fast backoff (a config file sets it: no flag for it);
    timeouts generous enough that a loaded machine never turns an instant reply into a failure."""
    cfg = out.parent / "fast-backoff.yaml"
    cfg.write_text("backend:\n  backoff_s: 0.05\n")
    return ["sample", rubrics, "-o", out, "--model", model, "--backend", "openai", "--base-url", url,
            "--concurrency", "1", "--limit", str(limit), "--config", cfg, "--request-timeout", str(timeout), *extra]


def assert_one_line_error(proc, *fragments):
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    line = [x for x in proc.stderr.splitlines() if x.startswith("rcsd: error:")]
    assert len(line) == 1, proc.stderr
    for f in fragments:
        assert f in line[0], line[0]


def test_transient_faults_are_retried_and_retry_after_honoured(run_cli, fake, rubrics, tiny_model, tmp_path):
    # item 0: five kinds of transient fault, then an answer (6 attempts = --max-retries 5)
    # item 1: 429 with Retry-After: 1, then an answer; item 2: too slow once (timeout), then an answer
    script = ["500", "drop", "truncated", "html", "nochoices", "ok", "429", "ok", "slow", "ok"]
    server = fake(script)
    out = tmp_path / "s.parquet"
    p = run_cli(*sample_args(rubrics, out, tiny_model, server.url, "--max-retries", "5", limit=3, timeout=SLOW_S / 2))
    assert p.returncode == 0, p.stderr
    assert "Traceback" not in p.stderr
    samples, _ = read_artifact(out, "samples")
    assert [s.completion_token_ids for s in samples] == [OK["choices"][0]["token_ids"]] * 3
    assert all(s.error is None and s.finish_reason == "stop" for s in samples)
    assert server.requests == len(script)
    assert server.times[7] - server.times[6] >= 0.95  # waited as Retry-After said, not the 0.05 s backoff


def test_client_errors_are_not_retried(run_cli, fake, rubrics, tiny_model, tmp_path):
    server = fake(["ok", "400"])
    out = tmp_path / "s.parquet"
    p = run_cli(*sample_args(rubrics, out, tiny_model, server.url, "--max-retries", "5"))
    assert_one_line_error(p, "HTTP 400: prompt is too long (not retried)", "rerun the same command to resume")
    assert server.requests == 2  # the 400 was asked once; nothing after the stop
    assert not out.exists()
    kept = (tmp_path / "s.parquet.partial.jsonl").read_text().splitlines()[1:]
    assert [json.loads(r)["id"] for r in kept] == ["p0:0"]


def test_failures_within_max_failures_are_recorded_and_skipped_downstream(run_cli, fake, rubrics, tiny_model,
                                                                          tmp_path):
    server = fake(["ok", "503", "503", "ok", "ok"])  # item 1 fails twice = for good with --max-retries 1
    out = tmp_path / "s.parquet"
    p = run_cli(*sample_args(rubrics, out, tiny_model, server.url, "--max-retries", "1", "--max-failures", "1"))
    assert p.returncode == 0, p.stderr
    assert "1 of 4 requests" in p.stderr and "1 failed (error column)" in p.stderr
    samples, _ = read_artifact(out, "samples")
    assert [s.finish_reason for s in samples] == ["stop", "error", "stop", "stop"]
    failed = samples[1]
    assert failed.error == "HTTP 503: overloaded (after 2 attempts)" and failed.completion_token_ids == []
    p = run_cli("score", out, "--rubrics", rubrics, "-o", tmp_path / "sc.parquet", check=True)
    assert "skipping 1 failed sample(s) (first 'p1:0'" in p.stderr
    scores, _ = read_artifact(tmp_path / "sc.parquet", "scores")
    assert [s.sample_id for s in scores] == ["p0:0", "p2:0", "p3:0"]


def test_dead_server_stops_the_stage_and_a_rerun_resumes(run_cli, fake, rubrics, tiny_model, tmp_path):
    dying = fake(["ok", "ok", "die"])
    out = tmp_path / "s.parquet"
    p = run_cli(*sample_args(rubrics, out, tiny_model, dying.url, "--max-retries", "2"))
    assert_one_line_error(p, "1 request(s) failed after retries, more than --max-failures 0",
                          "rerun the same command to resume")
    assert not out.exists()
    healthy = fake(["ok"])
    p = run_cli(*sample_args(rubrics, out, tiny_model, healthy.url), check=True)
    assert "resuming: 2 samples" in p.stderr
    assert healthy.requests == 2
    samples, _ = read_artifact(out, "samples")
    assert [s.id for s in samples] == [f"p{i}:0" for i in range(4)] and all(s.error is None for s in samples)


def test_judge_retries_malformed_replies_and_counts_what_it_could_not_judge(run_cli, fake, tiny_model, tmp_path):
    rubric = [{"title": "Names the largest number", "description": "Says which number is largest", "weight": 3},
              {"title": "Explains", "description": "Explains why", "weight": 2},
              {"title": "Is polite", "description": "Is polite", "weight": 1}]
    write_jsonl(tmp_path / "p.jsonl", [{"id": "p0", "question": "Which is largest: 1, 2 or 3?", "rubric": rubric}])
    run_cli("gen-rubrics", tmp_path / "p.jsonl", "-o", tmp_path / "r.parquet", check=True)
    run_cli("sample", tmp_path / "r.parquet", "-o", tmp_path / "s.parquet", "--model", tiny_model,
            "--max-new-tokens", "4", check=True)
    malformed, yes = ("reply", "I think it does."), ("reply", '{"explanation": "it does", "criteria_met": true}')
    # round 1 (criteria 1, 2, 3): malformed, malformed, 400 -> round 2 (1, 2): yes, malformed -> round 3 (2): malformed
    server = fake([malformed, malformed, "400", yes, malformed, malformed])
    cfg = tmp_path / "fast-backoff.yaml"
    cfg.write_text("backend:\n  backoff_s: 0.05\n")
    p = run_cli("score", tmp_path / "s.parquet", "--rubrics", tmp_path / "r.parquet", "-o", tmp_path / "sc.parquet",
                "--judge-model", tiny_model, "--judge-retries", "2", "--backend", "openai", "--base-url", server.url,
                "--concurrency", "1", "--max-failures", "1", "--config", cfg)
    assert p.returncode == 0, p.stderr
    assert server.requests == 6
    (score,), _ = read_artifact(tmp_path / "sc.parquet", "scores")
    met = [v.met for v in score.verdicts]
    assert met == [True, None, None] and score.n_unjudged == 2
    assert score.verdicts[1].explanation == "judge output malformed (3 attempts)"
    assert score.verdicts[2].explanation.startswith("judge request failed: HTTP 400: prompt is too long")
    assert score.score == 1.0 and score.points_possible == 3  # judged criteria only: never a silent 0


def test_eval_and_gen_rubrics_record_failed_requests(run_cli, fake, rubrics, tiny_model, tmp_path):
    server = fake([("reply", "Answer: C"), "400", ("reply", "Answer: A")])
    cfg = tmp_path / "fast-backoff.yaml"
    cfg.write_text("backend:\n  backoff_s: 0.05\n")
    common = ["--model", tiny_model, "--backend", "openai", "--base-url", server.url, "--concurrency", "1",
              "--config", cfg, "--max-failures", "1"]
    p = run_cli("eval", "--bench", "rubric", "--data", rubrics, "--limit", "3", "-o", tmp_path / "e.parquet",
                *common)
    assert p.returncode == 0, p.stderr
    items, _ = read_artifact(tmp_path / "e.parquet", "eval")
    failed = [it for it in items if it.errors]
    assert len(failed) == 1 and failed[0].errors[0].startswith("HTTP 400: prompt is too long")
    assert failed[0].predictions == [None] and failed[0].correct == [False]  # graded as an empty answer
    assert sorted(it.correct[0] for it in items) == [False, False, True]

    server = fake(["400"])
    write_jsonl(tmp_path / "q.jsonl", [{"id": "q0", "question": "Why is the sky blue?"}])
    p = run_cli("gen-rubrics", tmp_path / "q.jsonl", "-o", tmp_path / "g.parquet", "--generator", "llm",
                *common[:5], server.url, *common[6:])
    assert_one_line_error(p, "no valid rubric for any of 1 problems")
    rejected, _ = read_artifact(tmp_path / "g.rejected.parquet", "rejected-rubrics")
    assert [r.reason for r in rejected] == ["request failed: HTTP 400: prompt is too long (not retried)"]
    assert server.requests == 1  # a failed request is not asked again by gen-rubrics' own retries


def test_teacher_logprobs_from_a_server_without_prompt_logprobs(run_cli, fake, rubrics, tiny_model, tmp_path):
    """A server that answers but ignores vLLM's prompt_logprobs: one line, asked once (asking again would give the
    same reply), nothing written."""
    run_cli("sample", rubrics, "-o", tmp_path / "s.parquet", "--model", tiny_model, "--max-new-tokens", "3",
            "--limit", "1", check=True)
    server = fake(["ok"])
    p = run_cli("score", tmp_path / "s.parquet", "--rubrics", rubrics, "-o", tmp_path / "sc.parquet",
                "--teacher-logprobs", "--teacher-model", tiny_model, "--backend", "openai", "--base-url", server.url)
    assert_one_line_error(p, "prompt log-probs", "the reply has no prompt_logprobs positions",
                          "the server must take vLLM's prompt_logprobs parameter", "(not retried)")
    assert server.requests == 1 and not (tmp_path / "sc.parquet").exists()


@pytest.mark.slow
def test_grpo_reward_judge_scores_rollouts_and_never_hides_unjudged_criteria(run_cli, fake, tiny_model, tmp_path):
    """--reward judge: criteria without a check go to the judge (here a scripted OpenAI-compatible server); the
    reward is the weighted share; criteria the judge cannot decide are counted, their rollouts get the group's
    mean, and the console says so."""
    rows = [{"id": f"q{i}", "question": f"Explain why {i} is small.", "rubric": [
        {"title": "Gives a reason", "description": "States a reason.", "weight": 5},
        {"title": "Rambles on", "description": "Goes off topic.", "weight": -1}]} for i in range(2)]
    run_cli("gen-rubrics", write_jsonl(tmp_path / "q.jsonl", rows), "-o", tmp_path / "r.parquet", check=True)
    common = ["train", "--rubrics", tmp_path / "r.parquet", "--model", tiny_model, "--method", "grpo",
              "--reward", "judge", "--judge-model", tiny_model, "--judge-backend", "openai", "--group-size", "2",
              "--batch-size", "2", "--steps", "1", "--max-new-tokens", "4", "--judge-retries", "1"]

    server = fake([("reply", '{"explanation": "yes", "criteria_met": true}')])
    run_cli(*common, "--judge-base-url", server.url, "-o", tmp_path / "ok", check=True)
    (row,), _ = read_artifact(tmp_path / "ok" / "metrics.parquet", "metrics")
    assert server.requests == 2 * 2 * 2  # items x rollouts x unchecked criteria
    assert row.reward == pytest.approx((5 - 1) / 5) and (row.judge_unjudged, row.reward_unscored) == (0, 0)
    assert row.reward_seconds is not None and row.reward_seconds > 0

    server = fake([("reply", "I think it does.")])  # never a verdict
    p = run_cli(*common, "--judge-base-url", server.url, "-o", tmp_path / "bad", check=True)
    (row,), _ = read_artifact(tmp_path / "bad" / "metrics.parquet", "metrics")
    assert server.requests == 8 * 2  # asked again once
    assert (row.judge_unjudged, row.reward_unscored) == (8, 4)
    assert "unjudged 8 (unscored rollouts 4)" in " ".join(p.stderr.split())

    p = run_cli("train", "--rubrics", tmp_path / "r.parquet", "--method", "grpo", "--reward", "judge", "-o",
                tmp_path / "x")
    assert p.returncode == 2 and "--reward judge needs --judge-model" in p.stderr


def test_verl_reward_judges_unchecked_criteria_when_a_judge_is_set(fake, tiny_model, monkeypatch):
    from rcsd_cli import verl_reward

    gt = json.dumps({"id": "q", "question": "Why is the sky blue?", "rubric": [
        {"id": "a", "title": "Names scattering", "description": "Mentions Rayleigh scattering.", "weight": 4},
        {"id": "b", "title": "Blames the sea", "description": "Says the sea is reflected.", "weight": -1}]})
    assert verl_reward.compute_score("x", "Rayleigh scattering.", gt) == 0.0  # no judge: nothing gradable
    server = fake([("reply", '{"explanation": "", "criteria_met": true}')])
    monkeypatch.setenv("RCSD_JUDGE_BASE_URL", server.url)
    monkeypatch.setenv("RCSD_JUDGE_MODEL", str(tiny_model))
    monkeypatch.setattr(verl_reward, "_JUDGE", {})
    assert verl_reward.compute_score("x", "Rayleigh scattering.", gt) == (4 - 1) / 4  # both met: pitfall subtracts
    assert server.requests == 2  # one request per unchecked criterion
