"""`jaxpp serve`: the OpenAI-compatible server on the demo model, driven by the official
`openai` client and raw HTTP: answers equal LLM.generate's, streams complete, a client that
hangs up frees its request, bad requests get an OpenAI error body and nobody else notices."""

import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import openai
import pytest
import uvicorn

import jaxpp
from jaxpp.cli.app import build_parser
from jaxpp.cli.serve import prepare
from jaxpp.server.app import build_app
from jaxpp.server.loop import EngineLoop, Handle, Overloaded
from jaxpp.server.text import TextStream

MODEL = jaxpp.DEMO_MODEL.name
PROMPTS = ["def fibonacci(n):", "import os\n", "class Stack:", "# sort a list\n"]
KV = str(32 << 20)  # bytes of KV pages per device for every server here (default: 1 GiB)
# The engine flags of the fixture's server and of the `jaxpp serve` process, the same as
# test_tools.py's server: whichever compiles first, the others find its programs in the
# persistent compilation cache. A token budget of 32 (CPU default 2048) gives 3 buckets (8, 16
# and 32 slots) where 16 rows and the default budget gave 8: warm-up compiles 12 programs, not 22.
ENGINE_FLAGS = ["--max-num-seqs", "8", "--max-num-batched-tokens", "32", "--kv-cache-memory", KV]


def _free_socket() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    return sock


def _free_port() -> int:
    with _free_socket() as sock:
        return sock.getsockname()[1]


def _wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if urllib.request.urlopen(url + "/health", timeout=2).status == 200:
                return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"the server at {url} never came up (exit code {proc.poll()})")


def _hang_up_after_one_token(url: str) -> None:
    body = {"model": MODEL, "prompt": PROMPTS[0], "max_tokens": 400, "ignore_eos": True,
            "stream": True}  # fmt: skip
    request = urllib.request.Request(
        url + "/v1/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    response = urllib.request.urlopen(request, timeout=60)
    assert response.readline().startswith(b"data: ")
    response.close()


class _Served:
    """An app on a uvicorn server in a thread, on a free port."""

    def __init__(self, app):
        self.sock = _free_socket()
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]})
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started and time.monotonic() < deadline:
            time.sleep(0.02)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=30)


# Every greedy (prompt, max_tokens) the tests compare against LLM.generate.
CONCURRENT = [PROMPTS[i % len(PROMPTS)] + " " * (i // len(PROMPTS)) for i in range(64)]
GREEDY = (
    [(p, 12) for p in PROMPTS[:2]]
    + [(PROMPTS[2], 16), (PROMPTS[1], 4)]
    + [(p, 8) for p in CONCURRENT]
)


# lm-eval's loglikelihood requests: (context, continuation), scored through the server.
SCORED = [("def fibonacci(n):", "\n    return n"), ("import os\n", "import sys\n"),
          ("class Stack:", "\n    pass")]  # fmt: skip


@pytest.fixture(scope="module")
def served():
    """The server as `jaxpp serve` builds it, and what its own engine answers by LLM.generate
    (same defaults: the model's generation_config.json) and LLM.logits (lm-eval's
    token ids of SCORED, context + continuation), taken before the loop owns it."""
    args = build_parser().parse_args(
        ["serve", *ENGINE_FLAGS, "--max-waiting", "200", "--max-line-bytes", "65536"]
    )
    prepared = prepare(args)
    cases = sorted(set(GREEDY))
    params = [
        jaxpp.SamplingParams(**{**prepared.builder.defaults, "max_tokens": n, "temperature": 0.0})
        for _, n in cases
    ]
    llm = prepared.loop.llm
    outs = llm.generate([p for p, _ in cases], params)
    reference = {case: out.outputs[0].text for case, out in zip(cases, outs, strict=True)}
    encode = lambda text: llm.tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    pairs = [(encode(context), encode(more)) for context, more in SCORED]
    # loglikelihood_rolling's first window: the end-of-text token, then the text
    pairs.append(([llm.config.eos_token_ids[0]], encode("def add(a, b):\n    return a + b\n")))
    logits = llm.logits([context + more for context, more in pairs])
    prepared.loop.start()
    server = _Served(prepared.app)
    yield server, prepared, reference, list(zip(pairs, logits, strict=True))
    server.stop()
    prepared.loop.drain(grace=0.0)


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served[0].url + "/v1", api_key="none", max_retries=0)


@pytest.fixture(scope="module")
def reference(served):
    return lambda prompt, max_tokens: served[2][prompt, max_tokens]


@pytest.fixture(scope="module")
def scored(served):
    """[((context ids, continuation ids), LLM.logits of context + continuation)] of SCORED."""
    return served[3]


def _post(url: str, body, headers=None) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(
        url, data=data, headers={"Content-Type": "application/json", **(headers or {})}
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _metric(url: str, name: str) -> float:
    text = urllib.request.urlopen(url + "/metrics", timeout=10).read().decode()
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


def _idle(url: str, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        running = _metric(url, "vllm:num_requests_running")
        waiting = _metric(url, "vllm:num_requests_waiting")
        if running == waiting == 0 and _metric(url, "vllm:kv_cache_usage_perc") == 0:
            return True
        time.sleep(0.1)
    return False


def test_text_stream_holds_back_what_may_change():
    pieces = {1: "Hel", 2: "lo", 3: " wo", 4: "rld", 5: "\ufffd", 6: "!"}

    def text(ids):
        s = "".join(pieces[i] for i in ids)
        return s.replace("\ufffd!", "é")  # a character whose bytes come in two tokens

    stream = TextStream(text, stops=["world"])
    assert stream.update([1]) == "Hel"
    assert stream.update([1, 2]) == "lo"
    assert stream.update([1, 2, 3]) == " "  # " wo" may begin "world": held back
    assert stream.update([1, 2, 3, 4]) == ""  # "world" appeared: never sent
    assert stream.finish("Hello ") == ""
    plain = TextStream(text)
    assert plain.update([1, 2, 5]) == "Hello"  # half a character: held back
    assert plain.update([1, 2, 5, 6]) == "é"


def test_a_full_queue_refuses_all_of_a_request():
    loop = EngineLoop(llm=None, max_outstanding=3)
    params = jaxpp.SamplingParams()
    loop.submit([Handle([1], params, print) for _ in range(2)])
    with pytest.raises(Overloaded, match="2 sequences are queued or running"):
        loop.submit([Handle([1], params, print) for _ in range(2)])
    assert loop.outstanding == 2


def test_completions_match_generate(client, reference):
    for prompt in PROMPTS[:2]:
        out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0)
        assert out.choices[0].text == reference(prompt, 12)
        assert out.usage.completion_tokens == 12 or out.choices[0].finish_reason == "stop"
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]


def test_streams_carry_the_same_text_usage_and_n(client, reference):
    chunks = list(
        client.completions.create(
            model=MODEL, prompt=PROMPTS[2], max_tokens=16, temperature=0, stream=True,
            stream_options={"include_usage": True},
        )
    )  # fmt: skip
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == reference(PROMPTS[2], 16)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    chat = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "sort a list"}], max_tokens=10,
        temperature=0.8, seed=5, n=2, stream=True,
    )  # fmt: skip
    parts = {0: "", 1: ""}
    roles = set()
    for c in chat:
        for choice in c.choices:
            parts[choice.index] += choice.delta.content or ""
            roles.add(choice.delta.role)
    whole = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "sort a list"}], max_tokens=10,
        temperature=0.8, seed=5, n=2,
    )  # fmt: skip
    assert [c.message.content for c in whole.choices] == [parts[0], parts[1]]
    assert "assistant" in roles


def test_many_concurrent_streams_all_complete(served, client, reference):
    """64 clients streaming at once through 8 rows: every stream ends, each greedy text
    equals LLM.generate's, nothing is left running."""
    url = served[0].url
    prompts = CONCURRENT
    got: dict[int, str] = {}

    def one(i: int) -> None:
        stream = client.completions.create(
            model=MODEL, prompt=prompts[i], max_tokens=8, temperature=0, stream=True
        )
        got[i] = "".join(c.choices[0].text for c in stream if c.choices)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(64)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert sorted(got) == list(range(64))
    assert all(got[i] == reference(prompts[i], 8) for i in range(64))
    assert _idle(url)


def test_a_client_that_hangs_up_frees_its_request(served):
    url = served[0].url
    _hang_up_after_one_token(url)  # gone after its first token
    assert _idle(url)


BAD = [
    (b"{not json", 400, "invalid JSON"),
    (b'["a list"]', 400, "expected a JSON object"),
    ({"model": MODEL}, 400, "body.prompt is required"),
    ({"model": MODEL, "prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
    ({"model": MODEL, "prompt": "x", "temperature": "hot"}, 400, "temperature"),
    ({"model": MODEL, "prompt": "x", "n": 0}, 400, "n must be an integer"),
    ({"model": MODEL, "prompt": "x", "n": 1000}, 400, "over the limit"),
    ({"model": MODEL, "prompt": "x", "bogus": 1}, 400, "unsupported body field 'bogus'"),
    ({"model": MODEL, "prompt": "x", "stream": "yes"}, 400, "stream must be a boolean"),
    (
        {"model": MODEL, "prompt": "x", "stream_options": {"include_usage": True}},
        400,
        "stream_options goes with stream",
    ),  # fmt: skip
    ({"model": MODEL, "prompt": [99999]}, 400, "outside the vocabulary"),
    ({"model": MODEL, "prompt": "x" * 5000}, 400, "longer than max_model_len"),
    ({"model": MODEL, "prompt": "\ud800"}, 400, "prompt"),
    ({"model": "gpt-4", "prompt": "x"}, 404, "not served here"),
    ({"model": MODEL, "prompt": []}, 400, "empty"),
    ({"model": MODEL, "prompt": "x", "best_of": 2}, 400, "best_of=2 is not supported"),
    ({"model": MODEL, "prompt": "x", "max_tokens": "ten"}, 400, "expected an integer, got str"),
    (
        {"model": MODEL, "prompt": "x", "max_tokens": 1023},
        400,
        "'max_tokens' or 'max_completion_tokens' is too large: 1023. This model's maximum context "
        "length is 1024 tokens and your request has 2 input tokens (1023 > 1024 - 2).",
    ),
    ({"model": MODEL, "prompt": "x", "echo": 1}, 400, "echo must be a boolean"),
]


def test_bad_requests_get_an_error_body_and_cost_nobody(served, client, reference):
    url = served[0].url
    for body, status, message in BAD:
        code, answer = _post(url + "/v1/completions", body)
        assert code == status, (body, answer)
        assert message in answer["error"]["message"], (body, answer)
        out = client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=4,
                                        temperature=0)  # fmt: skip
        assert out.choices[0].text == reference(PROMPTS[1], 4)
    code, answer = _post(url + "/v1/chat/completions", {"model": MODEL, "messages": []})
    assert code == 400 and "messages must be a non-empty list" in answer["error"]["message"]
    robot = {"model": MODEL, "messages": [{"role": "robot", "content": "hi"}]}
    code, answer = _post(url + "/v1/chat/completions", robot)
    assert code == 400 and "has role 'robot': expected one of" in answer["error"]["message"]
    # Over --max-line-bytes (small enough that the socket takes it all before the 413 comes).
    code, answer = _post(url + "/v1/completions", b"x" * 100_000)
    assert code == 413 and "over the limit" in answer["error"]["message"]
    code, answer = _post(url + "/v1/nowhere", {})
    assert code == 404 and answer["error"]["code"] == "not_found"


FUZZ_VALUES = [None, True, False, -1, 0, 1, 3, 2**40, 0.5, -0.5, 1e308, "", "x", "\ud800",
               [], [1], [[1, 2]], ["a", 1], {}, {"include_usage": True}]  # fmt: skip
FUZZ_FIELDS = ["prompt", "messages", "max_tokens", "n", "temperature", "top_p", "top_k", "seed",
               "stop", "logprobs", "stream", "stream_options", "ignore_eos", "min_tokens",
               "stop_token_ids", "repetition_penalty", "model", "echo", "user", "zzz"]  # fmt: skip


def test_fuzzed_requests_never_break_the_server(served, client, reference):
    """200 good bodies with one to three fields set to values of any type, or cut short: each
    gets 200 (a complete answer or stream) or an OpenAI error body with 400/404/413, never a
    500 or a dropped connection; good requests between them get their usual answer."""
    import random  # noqa: PLC0415

    url = served[0].url
    rng = random.Random(0)
    statuses: dict[int, int] = {}
    for i in range(200):
        route = rng.choice(["/v1/completions", "/v1/chat/completions"])
        body = {"model": MODEL, "max_tokens": 3}
        if route.endswith("chat/completions"):
            body["messages"] = [{"role": "user", "content": "hi"}]
        else:
            body["prompt"] = PROMPTS[i % len(PROMPTS)]
        for _ in range(rng.randint(1, 3)):
            field = rng.choice(FUZZ_FIELDS)
            if field == "max_tokens" and rng.random() < 0.5:
                body.pop(field, None)  # the model's default (64 tokens)
            else:
                body[field] = rng.choice(FUZZ_VALUES)
        raw = json.dumps(body).encode()
        if rng.random() < 0.1:
            raw = raw[: rng.randrange(len(raw))]
        status, answer = _post_any(url + route, raw)
        statuses[status] = statuses.get(status, 0) + 1
        assert status in (200, 400, 404, 413), (body, status, answer)
        if status != 200:
            assert answer["error"]["message"], (body, answer)
        if i % 50 == 0:
            out = client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=4,
                                            temperature=0)  # fmt: skip
            assert out.choices[0].text == reference(PROMPTS[1], 4)
    assert statuses.get(200, 0) > 15 and statuses.get(400, 0) > 60, statuses
    assert _idle(url)


def _post_any(url: str, raw: bytes) -> tuple[int, dict]:
    """POST a body; a stream is read to its end and must end with [DONE] or an error event."""
    request = urllib.request.Request(url, data=raw, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as r:
            text = r.read().decode()
            if not r.headers.get("content-type", "").startswith("text/event-stream"):
                return r.status, json.loads(text)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())
    events = [line[6:] for line in text.splitlines() if line.startswith("data: ")]
    assert events and events[-1] == "[DONE]", text[-500:]
    return 200, json.loads(events[-2])


def test_api_key_guards_v1(served, caplog):
    """A second app over the same engine loop, with a key (and without the access log)."""
    p = served[1]
    keyed = _Served(build_app(p.loop, p.builder, p.metrics, p.name, "s3cret", access_log=False))
    caplog.set_level(logging.INFO, logger="jaxpp.serve.access")
    try:
        code, answer = _post(keyed.url + "/v1/completions", {"model": MODEL, "prompt": "x"})
        assert code == 401 and answer["error"]["type"] == "authentication_error"
        code, _ = _post(
            keyed.url + "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 2},
            {"Authorization": "Bearer s3cret"},
        )  # fmt: skip
        assert code == 200
        assert urllib.request.urlopen(keyed.url + "/health", timeout=10).status == 200
    finally:
        keyed.stop()
    assert not [r for r in caplog.records if r.name == "jaxpp.serve.access"]


def test_jaxpp_serve_starts_answers_and_stops_on_sigterm(tmp_path):
    """The command as the README gives it: up, /health, the README's curl and openai snippets,
    then SIGTERM while a stream runs: the stream still ends with [DONE], the exit code is 0."""
    port = _free_port()
    proc = subprocess.Popen(
        # The fixture's engine flags: its compiled programs come from the persistent cache.
        [sys.executable, "-m", "jaxpp.cli", "serve", "--port", str(port), *ENGINE_FLAGS],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ},
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, proc)
        curl, snippet = (block.replace(":8000", f":{port}") for block in _readme_server_blocks())
        if shutil.which("curl"):
            answer = json.loads(subprocess.run(["bash", "-c", curl], capture_output=True,
                                               check=True, timeout=60).stdout)  # fmt: skip
        else:
            code, answer = _post(url + "/v1/completions", json.loads(curl.split("-d '")[1][:-1]))
        assert answer["choices"][0]["text"] and answer["model"] == MODEL
        printed = subprocess.run([sys.executable, "-c", snippet], capture_output=True,
                                 check=True, timeout=60).stdout  # fmt: skip
        assert printed.strip()
        body = {"model": MODEL, "prompt": PROMPTS[0], "max_tokens": 120, "ignore_eos": True,
                "stream": True}  # fmt: skip
        request = urllib.request.Request(
            url + "/v1/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=60) as stream:
            assert stream.readline().startswith(b"data: ")
            proc.send_signal(signal.SIGTERM)  # in flight: it has --grace (30 s) to finish
            rest = stream.read().decode()
        assert rest.rstrip().endswith("data: [DONE]"), rest[-500:]
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out.decode()[-2000:]


def _readme_server_blocks() -> tuple[str, str]:
    """The README's server section: its curl command (one line) and its openai snippet."""
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    section = readme[readme.index("## Server") :]
    shell, python = section.split("```bash\n")[1], section.split("```python\n")[1]
    lines = shell.split("```")[0].splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("curl "))
    curl = (lines[at].rstrip("\\") + lines[at + 1]).strip()
    return curl, python.split("```")[0]


# Slow (49 s: two processes compile pp2 x tp2): run with `pytest -m slow tests/test_serve.py`;
# test_multihost.py keeps two processes running one engine in CI.
@pytest.mark.slow
def test_two_processes_serve_one_engine(served, reference):
    """`jaxpp launch --nproc 2 --devices-per-process 2 -- serve --pp 2 --tp 2`: process 0 serves
    HTTP, both step the same engine (the commands broadcast before each step). 16 concurrent
    greedy streams equal LLM.generate's (one process, pp=1), a client that hangs up is freed
    on both, SIGTERM to the launcher: both exit 0."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "jaxpp.cli", "launch", "--nproc", "2", "--devices-per-process",
         "2", "--", "serve", "--pp", "2", "--tp", "2", "--kv-cache-memory", KV, "--port", str(port),
         "--max-num-seqs",
         "8"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ},
    )  # fmt: skip
    try:
        _wait_healthy(url, proc)
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        got: dict[int, str] = {}

        def one(i: int) -> None:
            stream = client.completions.create(
                model=MODEL, prompt=CONCURRENT[i], max_tokens=8, temperature=0, stream=True
            )
            got[i] = "".join(c.choices[0].text for c in stream if c.choices)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        assert {i: got.get(i) for i in range(16)} == {
            i: reference(CONCURRENT[i], 8) for i in range(16)
        }
        _hang_up_after_one_token(url)
        assert _idle(url)
        out = client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=4,
                                        temperature=0)  # fmt: skip
        assert out.choices[0].text == reference(PROMPTS[1], 4)
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out.decode()[-3000:]


def test_bench_base_url_measures_the_server(served, capsys):
    """`jaxpp bench --base-url`: every request answered with its exact output length (greedy,
    ignore_eos), latencies and the server's occupancy reported, nothing left running."""
    from jaxpp.cli.app import main  # noqa: PLC0415

    url = served[0].url
    argv = ["bench", "--model", str(jaxpp.DEMO_MODEL), "--base-url", url, "--num-prompts", "12",
            "--input-len", "16", "--output-len", "6",
            "--max-concurrency", "8", "--json"]  # fmt: skip
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["failed"] == 0 and report["num_prompts"] == 12
    assert report["output_tokens"] == 12 * 6
    assert 0 < report["ttft_s"]["p50"] <= report["e2e_s"]["p50"]
    assert report["server"]["samples"] >= 0 and report["server"]["running_max"] <= 8
    assert _idle(url)


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    logits = logits.astype(np.float64)
    return logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)


def _lm_eval_parse_logprobs(answer: dict, ctxlens: list[int]) -> list[tuple[float, bool]]:
    """lm-eval 0.4.13's LocalCompletionsAPI.parse_logprobs, as it reads an answer."""
    res = []
    choices = sorted(answer["choices"], key=lambda c: c["index"])
    for choice, ctxlen in zip(choices, ctxlens, strict=True):
        token_logprobs = choice["logprobs"]["token_logprobs"][ctxlen:-1]
        tops = choice["logprobs"]["top_logprobs"][ctxlen:-1]
        greedy = all(
            tok == max(top.values()) for tok, top in zip(token_logprobs, tops, strict=True)
        )
        res.append((sum(token_logprobs), greedy))
    return res


def test_lm_eval_local_completions_scores_as_llm_logits(served, scored):
    """lm-eval's local-completions requests (round4 facts §5: loglikelihood and its rolling
    windows as one echo body per batch of token-id prompts, generate_until), read as lm-eval
    reads them: each continuation's log-likelihood and greediness equal what LLM.logits gives
    the same tokens; the first prompt token's logprob is null; max_tokens 0 and vLLM's
    prompt_logprobs field give the same numbers."""
    url = served[0].url + "/v1/completions"
    prompts = [context + more for (context, more), _ in scored]
    body = {"model": MODEL, "prompt": prompts, "temperature": 0, "max_tokens": 1, "logprobs": 1,
            "seed": 1234, "echo": True}  # fmt: skip
    code, answer = _post(url, body)
    assert code == 200, answer
    results = _lm_eval_parse_logprobs(answer, [len(context) for (context, _), _ in scored])
    for ((context, more), logits), (total, greedy) in zip(scored, results, strict=True):
        ids, lp = context + more, _log_softmax(logits)
        want = [lp[i - 1, ids[i]] for i in range(len(context), len(ids))]
        assert abs(total - sum(want)) <= 1e-5 * np.abs(logits).max() * len(want)
        assert greedy == all(lp[i - 1].argmax() == ids[i] for i in range(len(context), len(ids)))
    first = answer["choices"][0]["logprobs"]
    assert first["token_logprobs"][0] is None and first["top_logprobs"][0] is None
    assert len(first["token_logprobs"]) == len(prompts[0]) + 1  # the prompt, then one token
    (context, more), logits = scored[0]
    code, only = _post(url, {**body, "prompt": prompts[0], "max_tokens": 0})
    alone = only["choices"][0]["logprobs"]["token_logprobs"]
    # Scored alone its ticks pack other buckets than in the batch: equal to the logit scale.
    assert alone[0] is None and len(alone) == len(first["token_logprobs"]) - 1
    assert np.allclose(alone[1:], first["token_logprobs"][1:-1], rtol=0,
                       atol=5e-6 * np.abs(logits).max())  # fmt: skip
    assert only["usage"]["completion_tokens"] == 0
    code, vllm = _post(url, {"model": MODEL, "prompt": prompts[0], "max_tokens": 1,
                             "prompt_logprobs": 2})  # fmt: skip
    entries = vllm["choices"][0]["prompt_logprobs"]
    assert entries[0] is None and len(entries) == len(prompts[0])
    lp = _log_softmax(logits)
    for i, entry in enumerate(entries[1:], 1):
        best = np.argsort(-lp[i - 1])[:2]
        assert set(map(str, best)) | {str(prompts[0][i])} == set(entry)
        chosen = entry[str(prompts[0][i])]
        assert abs(chosen["logprob"] - lp[i - 1, prompts[0][i]]) <= 1e-5 * np.abs(logits).max()
        assert chosen["rank"] == 1 + int(np.sum(lp[i - 1] > lp[i - 1, prompts[0][i]]))
    # generate_until (tokenized_requests=False: the prompt as text)
    code, answer = _post(url, {"prompt": PROMPTS[0], "model": MODEL, "max_tokens": 12,
                               "temperature": 0, "stop": ["\n\n"], "seed": 1234})  # fmt: skip
    assert answer["choices"][0]["text"] == served[2][PROMPTS[0], 12].split("\n\n")[0]


def test_streams_bring_each_token_with_its_logprobs(client):
    """A stream gets one chunk per sampled token (one ring round), each with its logprobs;
    together they are the non-streamed answer's."""
    kwargs = dict(model=MODEL, prompt=PROMPTS[0], max_tokens=8, temperature=0, logprobs=2,
                  extra_body={"ignore_eos": True})  # fmt: skip
    whole = client.completions.create(**kwargs).choices[0].logprobs
    chunks = [c.choices[0] for c in client.completions.create(stream=True, **kwargs) if c.choices]
    assert [len(c.logprobs.tokens) for c in chunks] == [1] * 8
    for field in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
        assert [x for c in chunks for x in getattr(c.logprobs, field)] == getattr(whole, field)
    chat = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "sort a list"}], max_tokens=6,
        temperature=0, logprobs=True, top_logprobs=1, stream=True, extra_body={"ignore_eos": True},
    )  # fmt: skip
    contents = [c.choices[0].logprobs.content for c in chat if c.choices and c.choices[0].logprobs]
    assert [len(c) for c in contents] == [1] * 6


def _sse_events(url: str, body: dict) -> list[dict]:
    request = urllib.request.Request(url, json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})  # fmt: skip
    with urllib.request.urlopen(request, timeout=120) as r:
        lines = [line[6:].strip() for line in r.read().decode().splitlines()
                 if line.startswith("data: ")]  # fmt: skip
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def test_sglang_bench_serving_requests_are_answered(served):
    """SGLang bench_serving's bodies (round4 facts §7: --backend vllm / sglang-oai on
    completions, with best_of 1 and ignore_eos; the chat backends with max_completion_tokens
    and, on later turns, include_usage), read as it reads them."""
    url = served[0].url
    body = {"model": MODEL, "prompt": PROMPTS[1], "best_of": 1, "max_tokens": 6, "stream": True,
            "temperature": 0.0, "ignore_eos": True}  # fmt: skip
    events = _sse_events(url + "/v1/completions", body)
    texts = [e["choices"][0]["text"] for e in events if e["choices"][0]["text"]]
    assert texts and "".join(texts)
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "sort a list"}],
            "max_completion_tokens": 5, "stream": True, "temperature": 0.0, "ignore_eos": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    events = _sse_events(url + "/v1/chat/completions", chat)
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 5
    code, answer = _post(url + "/v1/completions", {**body, "stream": False})
    assert code == 200 and answer["usage"]["completion_tokens"] == 6


# What vLLM's example Grafana dashboard reads (round4 facts §6).
DASHBOARD = ["vllm:e2e_request_latency_seconds_bucket", "vllm:prompt_tokens_total",
             "vllm:generation_tokens_total", "vllm:inter_token_latency_seconds_bucket",
             "vllm:num_requests_running", "vllm:num_requests_waiting",
             "vllm:time_to_first_token_seconds_bucket", "vllm:kv_cache_usage_perc",
             "vllm:request_prompt_tokens_bucket", "vllm:request_generation_tokens_bucket",
             "vllm:request_success_total", "vllm:request_queue_time_seconds_sum",
             "vllm:request_prefill_time_seconds_sum", "vllm:request_decode_time_seconds_sum",
             "vllm:request_max_num_generation_tokens_sum", "vllm:cache_config_info",
             "vllm:time_per_output_token_seconds_sum", "vllm:iteration_tokens_total_sum",
             "vllm:request_params_n_sum", "vllm:request_inference_time_seconds_sum"]  # fmt: skip


def test_metrics_carry_what_vllms_dashboard_reads(served, client, caplog):
    """After a request: every series vLLM's dashboard reads, labelled with the model name,
    no *_created series; and the request's access log line."""
    url = served[0].url
    caplog.set_level(logging.INFO, logger="jaxpp.serve.access")
    client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=3,
                              extra_body={"ignore_eos": True})  # fmt: skip
    text = urllib.request.urlopen(url + "/metrics", timeout=10).read().decode()
    lines = [line for line in text.splitlines() if not line.startswith("#")]
    for name in DASHBOARD:
        assert any(line.startswith(name + "{") and f'model_name="{MODEL}"' in line
                   for line in lines), name  # fmt: skip
    assert "_created" not in text
    logged = [r.getMessage() for r in caplog.records if r.name == "jaxpp.serve.access"]
    assert any(re.search(r'"POST /v1/completions" 200 tokens=\d+\+3 \d+\.\d{3}s$', line)
               for line in logged), logged  # fmt: skip
