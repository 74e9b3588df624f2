"""The official ``openai`` SDK as a client of a real ``rcsd serve`` process: every feature a client uses, each
checked against what the same model computes in this process (plain transformers forward passes)."""

from __future__ import annotations

import threading

import openai
import pytest
import torch

from rcsd_cli.backends.openai import RequestFailed, prompt_topk
from rcsd_cli.data.artifacts import read_artifact
from tests.backends.test_backends import start_server
from tests.backends.test_serve import InProcess
from tests.conftest import MC_ROWS, shared, unshare, write_jsonl

KEY_ENV = "RCSD_TEST_SERVE_KEY"


@pytest.fixture(scope="module")
def sdk(tiny_model):
    proc, url = start_server(tiny_model, "--max-tokens-limit", "64", "--api-key-env", KEY_ENV,
                             env_extra={KEY_ENV: "secret-key"})
    yield shared("sdk", (openai.OpenAI(base_url=url, api_key="secret-key", max_retries=0), url, proc))
    unshare("sdk")
    proc.kill()
    proc.wait()


@pytest.fixture(scope="module")
def lm(tiny_model):
    from rcsd_cli.models import load_model

    return load_model(str(tiny_model), device=torch.device("cpu"))


def logprobs_by_hand(lm, ids: list[int]) -> torch.Tensor:
    """[len(ids) - 1, V] log-probabilities predicting ids[1:], from one plain forward pass."""
    with torch.no_grad():
        return torch.log_softmax(lm.model(torch.tensor([ids])).logits[0, :-1].float(), -1)


def test_models_completions_token_ids_n_and_seed(sdk, tiny_model):
    client, _, _ = sdk
    assert [m.id for m in client.models.list()] == [str(tiny_model)]
    one = client.completions.create(model="m", prompt="The sky is", max_tokens=6, n=2, seed=3)
    again = client.completions.create(model="m", prompt="The sky is", max_tokens=6, n=2, seed=3)
    assert len(one.choices) == 2 and [c.text for c in one.choices] == [c.text for c in again.choices]
    ids = client.completions.create(model="m", prompt=[5, 6, 7], max_tokens=4,
                                    extra_body={"return_token_ids": True}).choices[0]
    assert 1 <= len(ids.model_extra["token_ids"]) <= 4 and ids.model_extra["prompt_token_ids"] == [5, 6, 7]
    assert one.usage.completion_tokens <= 12


def test_a_batch_of_prompts_answers_each_as_alone(sdk):
    client, _, _ = sdk
    prompts = ["The sky is", "Water boils at"]
    batch = client.completions.create(model="m", prompt=prompts, max_tokens=5, n=2, seed=7)
    alone = [client.completions.create(model="m", prompt=p, max_tokens=5, n=2, seed=7) for p in prompts]
    assert [c.index for c in batch.choices] == [0, 1, 2, 3]
    assert [c.text for c in batch.choices] == [c.text for a in alone for c in a.choices]


def test_streaming_gives_the_same_text(sdk):
    client, _, _ = sdk
    plain = client.completions.create(model="m", prompt="Once", max_tokens=8, seed=1)
    stream = client.completions.create(model="m", prompt="Once", max_tokens=8, seed=1, stream=True,
                                       stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == plain.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == plain.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    messages = [{"role": "user", "content": "hi"}]
    chat = client.chat.completions.create(model="m", messages=messages, max_tokens=8, seed=2)
    pieces = client.chat.completions.create(model="m", messages=messages, max_tokens=8, seed=2, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in pieces) == chat.choices[0].message.content


def test_stop_sequences_cut_the_text(sdk):
    client, _, _ = sdk
    full = client.completions.create(model="m", prompt="The", max_tokens=12, temperature=0).choices[0]
    stop = full.text[3:6]
    assert len(stop) == 3
    cut = client.completions.create(model="m", prompt="The", max_tokens=12, temperature=0, stop=[stop],
                                    extra_body={"return_token_ids": True}).choices[0]
    assert cut.text == full.text[: full.text.index(stop)] and cut.finish_reason == "stop"
    assert len(cut.model_extra["token_ids"]) < 12


def test_logprobs_of_generated_tokens_match_a_forward_pass(sdk, lm):
    client, _, _ = sdk
    prompt = [3, 14, 15, 92]
    choice = client.completions.create(model="m", prompt=prompt, max_tokens=5, temperature=0, logprobs=3,
                                       extra_body={"return_token_ids": True}).choices[0]
    completion = choice.model_extra["token_ids"]
    ref = logprobs_by_hand(lm, prompt + completion)[len(prompt) - 1:]
    got = choice.logprobs
    assert len(got.token_logprobs) == len(completion) == len(got.top_logprobs)
    for t, (tok, lp, top) in enumerate(zip(completion, got.token_logprobs, got.top_logprobs, strict=True)):
        assert lp == pytest.approx(ref[t, tok].item(), abs=1e-4)
        assert sorted(top.values(), reverse=True) == pytest.approx(ref[t].topk(3).values.tolist(), abs=1e-4)
        assert lp == pytest.approx(max(top.values()), abs=1e-6)  # greedy: the chosen token is the top one
    chat = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=3,
                                          temperature=0, logprobs=True, top_logprobs=2).choices[0]
    assert len(chat.logprobs.content) >= 1 and all(len(e.top_logprobs) == 2 for e in chat.logprobs.content)


def test_echo_with_logprobs_scores_a_continuation_as_loglik_eval_does(sdk, lm):
    """lm-eval's local-completions request for a log-likelihood: prompt = context + continuation as token ids,
    echo, logprobs=1, max_tokens=1; the continuation's summed log-prob is what rcsd eval --scoring loglik sums."""
    from rcsd_cli.modeling.logprobs import continuation_sums

    client, _, _ = sdk
    context, continuation = [3, 14, 15, 92, 65], [35, 89, 79]
    reply = client.completions.create(model="m", prompt=[context + continuation], max_tokens=1, temperature=0,
                                      logprobs=1, echo=True, seed=1234)
    lps = reply.choices[0].logprobs.token_logprobs
    assert lps[0] is None and len(lps) == len(context) + len(continuation) + 1
    summed = sum(lps[len(context): -1])
    (expected,) = continuation_sums(lm.model, [(context, continuation)], lm.tokenizer.pad_token_id)
    assert summed == pytest.approx(expected, abs=1e-4)


def test_prompt_logprobs_as_vllm_returns_them(sdk, lm):
    client, _, _ = sdk
    prompt = [7, 8, 9, 10, 11]
    choice = client.completions.create(model="m", prompt=prompt, max_tokens=1, extra_body={"prompt_logprobs": 2})
    entries = choice.choices[0].model_extra["prompt_logprobs"]
    ref = logprobs_by_hand(lm, prompt)
    assert entries[0] is None and len(entries) == len(prompt)
    for t, (tok, entry) in enumerate(zip(prompt[1:], entries[1:], strict=True)):
        assert entry[str(tok)]["logprob"] == pytest.approx(ref[t, tok].item(), abs=1e-4)
        assert entry[str(tok)]["rank"] == int((ref[t] > ref[t, tok]).sum()) + 1
        top = sorted((v for k, v in entry.items() if v["rank"] <= 2), key=lambda v: v["rank"])
        assert [v["logprob"] for v in top][:2] == pytest.approx(ref[t].topk(2).values.tolist(), abs=1e-4)


def test_score_stores_a_served_teachers_topk_as_the_in_process_one(sdk, run_cli, tiny_model, tmp_path,
                                                                    monkeypatch):
    """``OpenAIBackend.topk_logprobs`` (vLLM's prompt_logprobs) behind ``score --teacher-logprobs --backend openai``."""
    _, url, _ = sdk
    monkeypatch.setenv(KEY_ENV, "secret-key")
    data = write_jsonl(tmp_path / "d.jsonl", MC_ROWS)
    run_cli("gen-rubrics", data, "-o", tmp_path / "r.parquet", "--generator", "reference", check=True)
    run_cli("sample", tmp_path / "r.parquet", "-o", tmp_path / "s.parquet", "--model", tiny_model,
            "--max-new-tokens", "6", check=True)
    common = ("score", tmp_path / "s.parquet", "--rubrics", tmp_path / "r.parquet", "--teacher-logprobs",
              "--teacher-top-k", "5")
    run_cli(*common, "-o", tmp_path / "hf.parquet", check=True)
    run_cli(*common, "-o", tmp_path / "served.parquet", "--backend", "openai", "--base-url", url, "--api-key-env",
            KEY_ENV, check=True)
    here = read_artifact(tmp_path / "hf.parquet", "scores")[0]
    served = read_artifact(tmp_path / "served.parquet", "scores")[0]
    for a, b in zip(here, served, strict=True):
        assert b.teacher_topk_ids == a.teacher_topk_ids and len(a.teacher_topk_ids[0]) == 5
        assert torch.allclose(torch.tensor(b.teacher_topk_logprobs), torch.tensor(a.teacher_topk_logprobs), atol=1e-4)


def test_prompt_topk_reads_vllms_format():
    # the prompt's own token (id 9) ranks 7th: present, but not among the top 2; a tie at rank 2 is ordered by rank
    entry = {"4": {"logprob": -0.5, "rank": 1}, "9": {"logprob": -3.0, "rank": 7}, "2": {"logprob": -1.0, "rank": 2},
             "8": {"logprob": -1.0, "rank": 3}}
    assert prompt_topk({"prompt_logprobs": [None, entry, entry]}, 1, 2, 2) == ([[4, 2], [4, 2]], [[-0.5, -1.0]] * 2)
    with pytest.raises(RequestFailed, match="2 prompt_logprobs positions, expected 3: the server must take"):
        prompt_topk({"prompt_logprobs": [None, entry]}, 1, 2, 2)
    with pytest.raises(RequestFailed, match="has 4 entries, fewer than the 5 asked"):
        prompt_topk({"prompt_logprobs": [None, entry]}, 1, 1, 5)
    with pytest.raises(ValueError, match="entries"):
        prompt_topk({"prompt_logprobs": [None, {"x": {"logprob": -1}}]}, 1, 1, 1)


def test_the_api_key_is_required_for_completions(sdk):
    _, url, _ = sdk
    wrong = openai.OpenAI(base_url=url, api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError, match="missing or wrong API key"):
        wrong.completions.create(model="m", prompt="x", max_tokens=1)


def test_concurrent_requests_are_decoded_together(tiny_model, monkeypatch):
    """Eight requests sent at once are decoded in fewer batches than eight (what makes them faster than eight in
    a row: benchmarks/serve_concurrency.py measures it), each with the answer it gets alone."""
    import rcsd_cli.backends.server as server

    calls, real = [], server.generate

    def counted(model, tok, prompts, *args, **kwargs):
        calls.append(len(prompts))
        return real(model, tok, prompts, *args, **kwargs)

    served = InProcess(tiny_model)
    client = openai.OpenAI(base_url=served.url, api_key="none", max_retries=0)
    alone = [client.completions.create(model="m", prompt=f"Item {i}", max_tokens=8, seed=i).choices[0].text
             for i in range(8)]
    monkeypatch.setattr(server, "generate", counted)
    together: dict = {}
    threads = [threading.Thread(target=lambda i=i: together.__setitem__(i, client.completions.create(
        model="m", prompt=f"Item {i}", max_tokens=8, seed=i).choices[0].text)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    served.shutdown()
    assert [together[i] for i in range(8)] == alone
    assert sum(calls) == 8 and len(calls) < 8, calls
