"""`distill --endpoint` against a small OpenAI-compatible server run in a thread on 127.0.0.1: the
messages sent, the file written (byte for byte the built-in distill's), resume after a killed run,
and a clear error for each way a server fails, with the replies already written kept."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from medusaforge.cli import main
from medusaforge.data.distilled import prompt_keys
from medusaforge.data.endpoint import api_base, names_match, reply_text

from helpers import import_benchmark, save_tiny_model, write_jsonl

REPO = Path(__file__).resolve().parents[1]
MODEL = "org/Tiny-Chat"


def echo(body: dict):
    """The default answer: 'reply to <last user turn>', ended at end-of-turn, one token per word."""
    reply = "reply to " + body["messages"][-1]["content"]
    return 200, {"choices": [{"index": 0, "message": {"role": "assistant", "content": reply}, "finish_reason": "stop"}],
                 "usage": {"prompt_tokens": 5, "completion_tokens": len(reply.split())}}


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):  # keep the test output quiet
        pass

    def _send(self, status: int, payload) -> None:
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json" if not isinstance(payload, bytes) else "text/html")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        if self.path == "/v1/models":
            self._send(200, {"object": "list", "data": self.server.models})
        else:
            self._send(404, {"error": "not found"})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with self.server.lock:
            self.server.requests.append(body)
        time.sleep(self.server.delay)
        self._send(*self.server.answer(body))


@contextmanager
def fake_server(answer=echo, models=({"id": MODEL, "root": MODEL},), delay: float = 0.0):
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.answer, server.models, server.delay = answer, list(models), delay
    server.requests, server.lock = [], threading.Lock()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        server.url = f"http://127.0.0.1:{server.server_address[1]}/v1"
        yield server
    finally:
        server.shutdown()
        server.server_close()


def prompts_file(tmp_path: Path, count: int = 6) -> Path:
    records = [{"messages": [{"role": "user", "content": f"question number {i}"}]} for i in range(count)]
    records[1]["messages"].insert(0, {"role": "system", "content": "Answer briefly."})
    return write_jsonl(tmp_path / "prompts.jsonl", records)


def distill(url: str, prompts: Path, out: Path, *extra: str) -> int:
    return main(["distill", "--endpoint", url, "--model", MODEL, "--prompts", str(prompts), "--num-prompts", "0",
                 "--out", str(out), "--progress", "false", "--concurrency", "1", "--retries", "0", *extra])


def user_turns(out: Path) -> list[str]:
    return [json.loads(line)["conversations"][-2]["value"] for line in out.read_text().splitlines()]


def test_api_base_reply_text_and_model_names():
    assert api_base("http://h:8000") == "http://h:8000/v1" and api_base("http://h:8000/v1/") == "http://h:8000/v1"
    assert api_base("https://x.org/openai/v1") == "https://x.org/openai/v1"
    with pytest.raises(ValueError, match="expected a URL"):
        api_base("localhost:8000")
    assert reply_text({"content": " Hi. "}, "keep") == "Hi."
    assert reply_text({"content": "Hi.", "reasoning": "user greets"}, "keep") == "<think>\nuser greets\n</think>\n\nHi."
    assert reply_text({"content": "Hi.", "reasoning_content": "x"}, "strip") == "Hi."
    assert reply_text({"content": "<think>\nhm\n</think>\n\nHi."}, "strip") == "Hi."
    assert reply_text({"content": "hm\n</think>\n\nHi."}, "strip") == "Hi."  # the template opened the block
    assert names_match("meta-llama/Llama-3.1-8B-Instruct", ["/models/llama-3.1-8b-instruct", None])
    assert names_match("smollm2-135m-instruct", ["/root/.cache/medusaforge/models/smollm2-135m-instruct"])
    assert not names_match("Qwen/Qwen3-8B", ["meta-llama/Llama-3.1-8B-Instruct", "llama"])


def test_prompt_keys_count_repeats():
    a, b = [{"role": "user", "content": "a"}], [{"role": "user", "content": "b"}]
    keys = prompt_keys([a, b, a])
    assert keys[0].endswith("#0") and keys[2].endswith("#1") and keys[0][:-2] == keys[2][:-2] != keys[1][:-2]
    assert prompt_keys([a]) == keys[:1]  # stable: a hash of the messages, not of the run


def test_a_run_sends_the_prompt_messages_and_writes_them_in_prompt_order(tmp_path, capsys):
    prompts, out = prompts_file(tmp_path), tmp_path / "out.jsonl"

    def answer(body):
        status, payload = echo(body)
        if body["messages"][-1]["content"].endswith("4"):
            payload["choices"][0]["finish_reason"] = "length"
        time.sleep(0.05 * (6 - int(body["messages"][-1]["content"][-1])))  # later prompts answer first
        return status, payload

    with fake_server(answer) as server:
        assert distill(server.url, prompts, out, "--concurrency", "6") == 0
    sent = sorted(server.requests, key=lambda body: body["messages"][-1]["content"])
    assert sent[1]["messages"] == [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "question number 1"}]
    assert {(b["model"], b["temperature"], b["max_tokens"], "seed" in b) for b in sent} == {(MODEL, 0.0, 128, False)}
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert user_turns(out) == [f"question number {i}" for i in range(6)]  # prompt order, not arrival order
    assert records[1]["conversations"][0] == {"from": "system", "value": "Answer briefly."}
    assert records[0]["conversations"][-1] == {"from": "gpt", "value": "reply to question number 0"}
    assert [r["finished"] for r in records] == [True, True, True, True, False, True]
    report = capsys.readouterr()
    assert "wrote 6 conversations (30 reply tokens by the server's count" in report.out
    assert "must serve exactly those weights" in report.err


def test_the_file_equals_the_builtin_distill_byte_for_byte(tmp_path):
    model = save_tiny_model(tmp_path / "model")
    prompts, builtin, served = prompts_file(tmp_path, 5), tmp_path / "builtin.jsonl", tmp_path / "served.jsonl"
    assert main(["distill", "--model", str(model), "--prompts", str(prompts), "--num-prompts", "0", "--max-new-tokens", "6",
                 "--out", str(builtin), "--progress", "false", "--dtype", "fp32"]) == 0
    written = {json.dumps(r["conversations"][:-1]): r for r in map(json.loads, builtin.read_text().splitlines())}

    def answer(body):  # a server whose model writes what the tiny model wrote
        prompt = [{"from": "human" if m["role"] == "user" else m["role"], "value": m["content"]} for m in body["messages"]]
        record = written.get(json.dumps(prompt), {"conversations": [{"value": ""}], "finished": True})
        message = {"role": "assistant", "content": record["conversations"][-1]["value"]}
        return 200, {"choices": [{"message": message, "finish_reason": "stop" if record["finished"] else "length"}]}

    with fake_server(answer, models=[{"id": str(model), "root": str(model)}]) as server:
        assert main(["distill", "--endpoint", server.url, "--model", str(model), "--prompts", str(prompts), "--num-prompts", "0",
                     "--out", str(served), "--progress", "false", "--concurrency", "3"]) == 0
    assert written and served.read_bytes() == builtin.read_bytes()


def test_a_killed_run_resumes_with_each_prompt_exactly_once(tmp_path):
    prompts, out = prompts_file(tmp_path, 10), tmp_path / "out.jsonl"
    with fake_server(delay=0.3) as server:
        command = [sys.executable, "-m", "medusaforge.cli", "distill", "--endpoint", server.url, "--model", MODEL,
                   "--prompts", str(prompts), "--num-prompts", "0", "--out", str(out), "--progress", "false",
                   "--concurrency", "2"]
        process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
        try:
            deadline = time.monotonic() + 120
            while not (out.exists() and len(out.read_text().splitlines()) >= 3):
                assert process.poll() is None, process.stderr.read().decode()
                assert time.monotonic() < deadline, "no replies written within 120 s"
                time.sleep(0.05)
        finally:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        kept = user_turns(out)
        assert 3 <= len(kept) < 10
        with open(out, "a") as handle:
            handle.write('{"conversations": [{"from": "human", "val')  # a write the kill cut in half
        asked_before = len(server.requests)
        assert distill(server.url, prompts, out) == 0
        asked_again = [body["messages"][-1]["content"] for body in server.requests[asked_before:]]
    assert user_turns(out) == [f"question number {i}" for i in range(10)]
    assert sorted(asked_again) == sorted(set(f"question number {i}" for i in range(10)) - set(kept))


def test_nothing_listening_is_a_clear_error_and_the_file_is_kept(tmp_path, capsys):
    prompts, out = prompts_file(tmp_path), tmp_path / "out.jsonl"
    with fake_server() as server:
        assert distill(server.url, prompts, out, "--num-prompts", "2") == 0
    before = out.read_bytes()
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    assert distill(f"http://127.0.0.1:{port}", prompts, out) == 1
    assert f"cannot reach http://127.0.0.1:{port}/v1" in capsys.readouterr().err
    assert out.read_bytes() == before


def test_a_model_the_server_does_not_serve_is_refused_with_what_it_serves(tmp_path, capsys):
    prompts, out = prompts_file(tmp_path), tmp_path / "out.jsonl"
    models = [{"id": "llama", "root": "meta-llama/Llama-3.1-8B-Instruct"}, {"id": "qwen", "root": "Qwen/Qwen3-8B"}]
    with fake_server(models=models) as server:
        assert distill(server.url, prompts, out, "--served-model", "mistral") == 1
        assert "does not serve model 'mistral'; it serves 'llama', 'qwen'" in capsys.readouterr().err
        assert distill(server.url, prompts, out) == 1  # --model is neither, and two are served
        assert "name the one to ask with --served-model" in capsys.readouterr().err
        # Served, but other weights than the drafter's base: refused unless told it is the same checkpoint.
        assert distill(server.url, prompts, out, "--served-model", "qwen") == 1
        assert "--check-served-model false" in capsys.readouterr().err
        assert not server.requests and not out.exists()
        assert distill(server.url, prompts, out, "--served-model", "qwen", "--check-served-model", "false") == 0
    assert len(user_turns(out)) == 6


@pytest.mark.parametrize("failure, message", [
    ((200, b"<html>502 Bad Gateway</html>"), "with a body that is not JSON: '<html>502 Bad Gateway</html>'"),
    ((400, {"error": {"message": "max_tokens is too large"}}), "refused the request with HTTP 400: {\"error\""),
    ((500, {"error": "engine died"}), "refused the request with HTTP 500: {\"error\": \"engine died\"} (after 2 tries)"),
])
def test_a_failing_request_is_a_clear_error_and_earlier_replies_survive(tmp_path, capsys, failure, message):
    prompts, out = prompts_file(tmp_path), tmp_path / "out.jsonl"

    def answer(body):
        return failure if body["messages"][-1]["content"] == "question number 3" else echo(body)

    with fake_server(answer) as server:
        assert distill(server.url, prompts, out, "--retries", "1") == 1
    error = capsys.readouterr().err
    assert "(prompt 3)" in error and message in error
    assert f"The 3 replies in {out} are kept; rerunning the same command asks only for the rest" in error
    asked_for_3 = sum(b["messages"][-1]["content"] == "question number 3" for b in server.requests)
    assert asked_for_3 == (2 if failure[0] == 500 else 1)  # only a server error is retried
    assert user_turns(out) == [f"question number {i}" for i in range(3)]  # concurrency 1: prompts 0-2 came first


def test_an_odd_finish_reason_is_counted_shown_and_asked_again(tmp_path, capsys):
    prompts, out = prompts_file(tmp_path), tmp_path / "out.jsonl"

    def answer(body):
        status, payload = echo(body)
        if body["messages"][-1]["content"][-1] in "25":
            payload["choices"][0]["finish_reason"] = "content_filter"
        return status, payload

    with fake_server(answer) as server:
        assert distill(server.url, prompts, out) == 1
    error = capsys.readouterr().err
    assert "2 replies ended with a finish reason other than stop or length" in error
    assert "first: prompt 2 ended with finish reason 'content_filter'" in error
    assert user_turns(out) == [f"question number {i}" for i in (0, 1, 3, 4)]
    with fake_server() as server:
        assert distill(server.url, prompts, out) == 0
    assert sorted(b["messages"][-1]["content"] for b in server.requests) == ["question number 2", "question number 5"]
    assert user_turns(out) == [f"question number {i}" for i in range(6)]


def test_a_prompt_longer_than_the_servers_context_is_skipped_and_the_run_goes_on(tmp_path, capsys):
    prompts, out = prompts_file(tmp_path), tmp_path / "out.jsonl"
    too_long = (400, {"error": {"message": "This model's maximum context length is 2048 tokens. However, your prompt contains "
                                           "at least 2049 input tokens"}})

    def answer(body):
        return too_long if body["messages"][-1]["content"] == "question number 4" else echo(body)

    with fake_server(answer) as server:
        assert distill(server.url, prompts, out) == 0
    printed = capsys.readouterr()
    assert "1 prompts longer than the server's context were skipped (first: " in printed.out
    assert "(prompt 4) refused the request with HTTP 400" in printed.out
    assert sum(b["messages"][-1]["content"] == "question number 4" for b in server.requests) == 1  # never retried
    assert user_turns(out) == [f"question number {i}" for i in (0, 1, 2, 3, 5)]


def test_a_resumed_file_must_keep_the_settings_that_wrote_it(tmp_path, capsys):
    prompts, out = prompts_file(tmp_path), tmp_path / "out.jsonl"
    with fake_server() as server:
        assert distill(server.url, prompts, out, "--num-prompts", "2") == 0
        assert distill(server.url, prompts, out, "--max-new-tokens", "64") == 1
        assert "was written with max_tokens 128" in capsys.readouterr().err
        assert distill(server.url, prompts, out, "--max-new-tokens", "64", "--overwrite") == 0
    assert len(user_turns(out)) == 6


def test_first_difference():
    first_difference = import_benchmark("distill_endpoint").first_difference
    assert first_difference([5, 6, 7], [5, 6, 8], eos=2) == (2, 7, 8)
    assert first_difference([5, 6], [5, 6, 9], eos=2) == (2, 2, 9)  # the shorter one ended: end-of-turn there
    assert first_difference([], [4], eos=2) == (0, 2, 4)


def test_the_measurement_script_runs_both_modes_on_the_same_prompts(tmp_path, capsys):
    script = import_benchmark("distill_endpoint")
    model, prompts = save_tiny_model(tmp_path / "model"), prompts_file(tmp_path, 4)
    with fake_server(models=[{"id": str(model), "root": str(model)}]) as server:
        assert script.main(["--endpoint", server.url, "--model", str(model), "--prompts", str(prompts), "--num-prompts", "0",
                            "--max-new-tokens", "6", "--dtype", "fp32", "--out-dir", str(tmp_path / "bench")]) == 0
    report = json.loads((tmp_path / "bench" / "report.json").read_text())
    served, builtin = report["reports"]
    assert (served["mode"], served["replies"], builtin["mode"]) == ("vllm", 4, "builtin")
    assert served["reply_tokens"] > 0 and served["tokens_per_second"] == served["reply_tokens"] / served["seconds"]
    # The echo server is not the tiny model: every reply both wrote parts, each at a scored token.
    assert report["both_answered"] == builtin["replies"] == len(report["partings"]) and report["same_reply"] == 0
    assert all(p["position"] == 0 and p["logit_margin"] >= 0 and p["first"] != p["second"] for p in report["partings"])
    assert "| vllm | 4 |" in capsys.readouterr().out
    # The margin is the base's logit gap between the two tokens after the prompt (they part at token 0).
    from medusaforge.models import load_base_model, load_tokenizer

    tokenizer, base = load_tokenizer(model), load_base_model(model, check=False)
    parting = report["partings"][0]
    prompt = next(json.loads(line)["messages"] for line in prompts.read_text().splitlines()
                  if json.loads(line)["messages"][-1]["content"] == parting["prompt"])
    context = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    logits = base(context).logits[0, -1].detach()
    expected = abs(float(logits[parting["first_id"]] - logits[parting["second_id"]]))
    assert parting["logit_margin"] == pytest.approx(expected, rel=1e-5)


def test_a_resumed_measurement_counts_only_the_replies_written_in_its_own_time(tmp_path):
    script = import_benchmark("distill_endpoint")
    model, prompts = save_tiny_model(tmp_path / "model"), prompts_file(tmp_path, 4)
    arguments = ["--modes", "vllm", "--no-overwrite", "--model", str(model), "--prompts", str(prompts),
                 "--max-new-tokens", "6", "--dtype", "fp32", "--out-dir", str(tmp_path / "bench")]
    with fake_server(models=[{"id": str(model), "root": str(model)}]) as server:
        assert script.main(["--endpoint", server.url, "--num-prompts", "3"] + arguments) == 0
        assert script.main(["--endpoint", server.url, "--num-prompts", "0"] + arguments) == 0
    (served,) = json.loads((tmp_path / "bench" / "report.json").read_text())["reports"]
    assert served["replies"] == 1  # the fourth prompt; the first three were written by the first run
    assert len(user_turns(tmp_path / "bench" / "vllm.jsonl")) == 4
