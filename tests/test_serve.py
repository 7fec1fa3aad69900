"""`jaxpp serve`: the OpenAI-compatible server on the demo model, driven by the official
`openai` client and raw HTTP: answers equal LLM.generate's, streams complete, a client that
hangs up frees its request, bad requests get an OpenAI error body and nobody else notices."""

import json
import os
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
KV = str(64 << 20)  # bytes of KV pages per device for every server here (default: 1 GiB)


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


@pytest.fixture(scope="module")
def served():
    """The server as `jaxpp serve` builds it, and what its own engine answers by LLM.generate
    (same defaults: the model's generation_config.json), taken before the loop owns it."""
    args = build_parser().parse_args(
        [
            "serve",
            "--max-num-seqs",
            "16",
            "--max-waiting",
            "200",
            "--max-line-bytes",
            "65536",
            "--kv-cache-memory",
            KV,
        ]  # fmt: skip
    )
    prepared = prepare(args)
    cases = sorted(set(GREEDY))
    params = [
        jaxpp.SamplingParams(**{**prepared.builder.defaults, "max_tokens": n, "temperature": 0.0})
        for _, n in cases
    ]
    outs = prepared.loop.llm.generate([p for p, _ in cases], params)
    reference = {case: out.outputs[0].text for case, out in zip(cases, outs, strict=True)}
    prepared.loop.start()
    server = _Served(prepared.app)
    yield server, prepared, reference
    server.stop()
    prepared.loop.drain(grace=0.0)


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served[0].url + "/v1", api_key="none", max_retries=0)


@pytest.fixture(scope="module")
def reference(served):
    return lambda prompt, max_tokens: served[2][prompt, max_tokens]


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
    """64 clients streaming at once through 16 rows: every stream ends, each greedy text
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


def test_api_key_guards_v1(served):
    """A second app over the same engine loop, with a key."""
    p = served[1]
    keyed = _Served(build_app(p.loop, p.builder, p.metrics, p.name, api_key="s3cret"))
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


def test_jaxpp_serve_starts_answers_and_stops_on_sigterm(tmp_path):
    """The command as the README gives it: up, /health, the README's curl and openai snippets,
    then SIGTERM while a stream runs: the stream still ends with [DONE], the exit code is 0."""
    port = _free_port()
    proc = subprocess.Popen(
        # The fixture's engine flags: its compiled programs come from the persistent cache.
        [sys.executable, "-m", "jaxpp.cli", "serve", "--port", str(port), "--max-num-seqs", "16",
         "--kv-cache-memory", KV],
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
