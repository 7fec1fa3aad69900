"""The `jaxpp` command line: JSONL in, JSONL out, one answer per input line, never lost.

Most cases run `main([...])` in-process. Cases about line handling, resume, streaming and engine
failures use a fake LLM (instant); one run drives the real engine over a tiny model with every
kind of line at once (one compile). Subprocesses only where the process itself matters: --help,
a missing model (exactly one stderr line) and a SIGKILL mid-run followed by --resume.
"""

import dataclasses
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from cli_fakes import FakeEngine

import jaxpp
from jaxpp import cli
from jaxpp.cli import formats, generate, progress, resume
from jaxpp.cli.flags import engine_config
from jaxpp.config import EngineConfig
from jaxpp.outputs import CompletionOutput, Logprob

# Refuses a conversation that opens with the assistant, as Mistral-style templates do.
CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'assistant' %}"
    "{{ raise_exception('Conversation must start with the user') }}{% endif %}"
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
REAL_FLAGS = ["--max-tokens", "4", "--temperature", "0", "--max-model-len", "32", "--quiet"]


def _records(path: Path) -> list[dict]:
    data = path.read_bytes()
    assert data == b"" or data.endswith(b"\n"), "torn last line"
    return [json.loads(line) for line in data.decode().splitlines()]


def _write_lines(path: Path, lines: list) -> Path:
    """Each item: a dict (dumped as JSON) or a str/bytes written verbatim."""
    chunks = []
    for item in lines:
        if isinstance(item, dict):
            item = json.dumps(item)
        chunks.append(item.encode() if isinstance(item, str) else item)
    path.write_bytes(b"\n".join(chunks) + b"\n")
    return path


def _answered_lines(records: list[dict], ids_to_line: dict) -> list[int]:
    """The input line each output record answers (errors carry it; answers by their id)."""
    lines = []
    for r in records:
        if r.get("error") is not None:
            lines.append(r["line"])
        else:
            lines.append(ids_to_line[json.dumps(r.get("custom_id", r.get("id")))])
    return lines


# --- a fake engine: instant, deterministic, records how it was driven ---------------------------


class FakeTokenizer:
    chat_template = "fake"

    def encode(self, text, add_special_tokens=True):
        return ([1] if add_special_tokens else []) + [3 + ord(c) % 90 for c in text]


class FakeLLM(FakeEngine):
    """Answers "<prompt length>/<max_tokens>/<seed>". As every FakeEngine: BOOM is refused when
    added, CRASH fails the step it runs in. After `steps_before_crash` steps, every step fails
    (RuntimeError: the engine is broken). With `output`, notes the records on disk and the
    requests finished so far as each step begins."""

    def __init__(
        self,
        output: Path | None = None,
        steps_before_crash: int | None = None,
        max_num_seqs: int = 4,
    ):
        super().__init__(FakeTokenizer(), max_model_len=64, max_num_seqs=max_num_seqs)
        self.config = SimpleNamespace(vocab_size=100, bos_token_id=1, eos_token_ids=())
        self.output = output
        self.steps_before_crash = steps_before_crash
        self.written_before_step: list[list[dict]] = []
        self.finished_before_step: list[int] = []

    def chat_prompt(self, messages, tools=None):
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("content"), str):
                raise ValueError(f"message {i} must be {{'role': str, 'content': str}}")
        return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"

    def step(self):
        if self.output is not None:
            self.written_before_step.append(_records(self.output))
            self.finished_before_step.append(len(self.finished))
        if self.steps_before_crash is not None and self.steps >= self.steps_before_crash:
            raise RuntimeError("device lost")
        return super().step()

    def complete(self, prompt, params):
        ids = [(t + 1) % 100 for t in prompt[: params.max_tokens]]
        logprobs = None
        if params.logprobs is not None:
            logprobs = [{t: Logprob(-0.5, 1, f"t{t}"), 99: Logprob(-2.0, 2, "t99")} for t in ids]
        return CompletionOutput(
            0,
            f"{len(prompt)}/{params.max_tokens}/{params.seed}",
            ids,
            "length",
            logprobs=logprobs,
            cumulative_logprob=-0.5 * len(ids),
        )


# What the up-front flag checks read of the fake model dir: the FakeLLM's vocabulary and length.
FAKE_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 100,
    "hidden_size": 8,
    "intermediate_size": 16,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "max_position_embeddings": 64,
}


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """(model dir, install(fake_llm)) — the model dir only has to look like one."""
    model = tmp_path / "fake_model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(FAKE_CONFIG))
    (model / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}))

    def install(llm):
        monkeypatch.setattr(generate, "load_llm", lambda args: llm)
        return llm

    return model, install


# --- the parser ----------------------------------------------------------------------------


def test_sampling_fields_match_sampling_params():
    """Every SamplingParams field but `n` and `stream`: a plain line has one answer (an OpenAI
    batch line takes `n`), written when it is done (a server streams)."""
    assert set(formats.SAMPLING_FIELDS) | {"n", "stream"} == {
        f.name for f in dataclasses.fields(jaxpp.SamplingParams)
    }


def test_help_subprocess_is_complete():
    """`jaxpp --help` works as a process and lists the subcommand; generate's epilog documents
    the formats and the exit codes."""
    out = subprocess.run(
        [sys.executable, "-m", "jaxpp.cli", "--help"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert "generate" in out.stdout and "usage: jaxpp" in out.stdout


def test_generate_help(capsys):
    assert cli.main(["generate", "--help"]) == 0
    text = capsys.readouterr().out
    for needle in (
        "--input",
        "--output",
        "--resume",
        "--prompt",
        "--pp",
        "--layer-partition",
        "--max-tokens",
        "--top-p",
        "custom_id",
        "/v1/chat/completions",
        "exit status",
        "batch_req_",
        "finish_reason",
    ):
        assert needle in text, needle


def test_engine_flags_reach_the_llm():
    """The batching and KV flags go to LLM(...); left out, the engine's defaults apply."""
    argv = ["generate", "--prompt", "x", "--max-num-seqs", "8", "--max-num-batched-tokens", "16"]
    argv += ["--block-size", "4", "--kv-cache-memory", "1000000"]
    config = engine_config(cli.build_parser(argv).parse_args(argv))
    assert config.max_num_seqs == 8 and config.max_num_batched_tokens == 16
    assert config.block_size == 4 and config.kv_cache_memory == 1000000
    argv = argv[:3]
    config = engine_config(cli.build_parser(argv).parse_args(argv))
    assert config == EngineConfig()


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["generate", "--input", "x.jsonl", "--bogus"], "unrecognized arguments: --bogus"),
        (["generate", "--input", "x.jsonl", "--pp", "0"], "--pp"),
        (["generate"], "one of the arguments --input/-i --prompt/-p is required"),
        (["frobnicate"], "invalid choice"),
        (["generate", "--prompt", "hi", "--model", "/nonexistent/model"], "does not exist"),
        (["generate", "--prompt", "hi", "--resume"], "--resume needs --output"),
        (["generate", "--input", "x.jsonl", "--chat"], "--chat goes with --prompt"),
    ],
)
def test_usage_errors_are_one_line(argv, needle, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert needle in err and "Traceback" not in err


def test_missing_model_subprocess_one_line(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "jaxpp.cli",
            "generate",
            "--model",
            str(tmp_path / "none"),
            "--prompt",
            "hi",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        f"jaxpp: error: model dir {tmp_path / 'none'} does not exist"
    ]


def test_bad_sampling_flag_and_existing_output(fake, tmp_path, capsys):
    model, install = fake
    install(FakeLLM())
    inp = _write_lines(tmp_path / "in.jsonl", [{"prompt": "a"}])
    base = ["generate", "--model", str(model), "--input", str(inp)]
    assert cli.main(base + ["--top-p", "2"]) == 2
    assert "SamplingParams.top_p=2.0 is invalid" in capsys.readouterr().err
    out = tmp_path / "out.jsonl"
    out.write_text("precious\n")
    assert cli.main(base + ["--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert "exists" in err and "--resume" in err and len(err.splitlines()) == 1
    assert out.read_text() == "precious\n"  # not clobbered
    assert cli.main(base + ["--output", str(out), "--resume"]) == 2  # not a jaxpp answer file
    assert "not a jaxpp answer" in capsys.readouterr().err


# --- line handling, resume, streaming (fake engine) ----------------------------------------------

FAKE_LINES = [
    {"id": "a", "prompt": "hello"},  # 1
    {"prompt": "no id"},  # 2 -> id 2
    {"id": "a", "prompt": "again"},  # 3 duplicate
    "",  # 4 blank
    '{"id": "torn", "prompt": ',  # 5 malformed
    {"id": "b", "prompt": "x", "top_p": 2},  # 6 invalid sampling value
    {"id": "c", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},  # 7
    {"id": 2, "prompt": "collides with line 2's default id"},  # 8 duplicate
    {
        "custom_id": "r1",
        "method": "POST",
        "url": "/v1/completions",
        "body": {"prompt": "hey", "n": 2, "seed": 5},
    },  # 9
    {"custom_id": "r1", "url": "/v1/completions", "body": {"prompt": "dup"}},  # 10 duplicate
    {"id": "d", "prompt": "y" * 80},  # 11 longer than max_model_len=64
    {"id": "e", "prompt": "BOOM here"},  # 12 the engine refuses it (ValueError) when added
    {"id": "f", "prompt": "fine", "seed": 11},  # 13
]
FAKE_ERRORS = {3, 4, 5, 6, 8, 10, 11, 12}
FAKE_IDS = {'"a"': 1, "2": 2, '"c"': 7, '"r1"': 9, '"f"': 13}


def _fake_run(model, inp, out, *extra):
    return cli.main(
        [
            "generate",
            "--model",
            str(model),
            "--input",
            str(inp),
            "--output",
            str(out),
            "--quiet",
            *extra,
        ]
    )


def test_every_line_answered_once_and_streamed(fake, tmp_path):
    model, install = fake
    inp = _write_lines(tmp_path / "in.jsonl", FAKE_LINES)
    out = tmp_path / "out.jsonl"
    llm = install(FakeLLM(output=out))
    assert _fake_run(model, inp, out, "--batch-size", "2") == 1
    records = _records(out)
    assert sorted(_answered_lines(records, FAKE_IDS)) == list(range(1, len(FAKE_LINES) + 1))
    errors = {r["line"]: r for r in records if r.get("error") is not None}
    assert set(errors) == FAKE_ERRORS
    assert "duplicate id 'a' (first used on line 1)" in errors[3]["error"]
    assert "blank line" in errors[4]["error"] and "invalid JSON" in errors[5]["error"]
    assert errors[6]["error"].startswith("SamplingParams.top_p=2 is invalid")
    assert "duplicate id 2" in errors[8]["error"]
    assert errors[10]["error"]["code"] == "duplicate_id" and errors[10]["custom_id"] == "r1"
    assert "longer than max_model_len=64" in errors[11]["error"]
    assert errors[12] == {
        "id": "e",
        "line": 12,
        "error": "the engine refused the request: engine says no",
        "code": "generation_failed",
    }
    assert llm.generate_calls == []  # a refusal is pinned when added: nothing ran again
    # Streaming: each step began with the answer of every request finished before it on disk.
    tok = FakeTokenizer()
    job_of = {
        tuple(tok.encode("hello")): "a",
        tuple(tok.encode("no id")): 2,
        tuple(tok.encode("user: hi\nassistant:", False)): "c",
        tuple(tok.encode("hey")): "r1",
        tuple(tok.encode("fine")): "f",
    }
    requests_of: dict = {}
    for request_id, prompt in enumerate(llm.prompts):
        requests_of.setdefault(job_of[tuple(prompt)], set()).add(str(request_id))
    answer_sets = set()
    for written, n in zip(llm.written_before_step, llm.finished_before_step, strict=True):
        finished = set(llm.finished[:n])
        on_disk = {r.get("custom_id", r.get("id")) for r in written if r.get("error") is None}
        assert on_disk == {job for job, ids in requests_of.items() if ids <= finished}
        answer_sets.add(frozenset(on_disk))
    assert len(answer_sets) >= 4  # answers came out over the run, not at its end
    order = [r.get("custom_id", r.get("id")) for r in records if r.get("error") is None]
    assert order.index("c") < order.index("a")  # finish order: c asked for 2 tokens, a for 16
    by_id = {r.get("custom_id", r.get("id")): r for r in records if not r.get("error")}
    assert by_id[2]["prompt"] == "no id"
    assert by_id["c"]["prompt"] == "user: hi\nassistant:"
    assert by_id["c"]["text"].split("/")[1] == "2"  # the line's max_tokens
    # Seeds: the line's own seed wins; OpenAI n choices get seed, seed+1; else derived from id.
    assert by_id["f"]["text"].endswith("/11")
    assert [c["text"].split("/")[2] for c in by_id["r1"]["response"]["body"]["choices"]] == [
        "5",
        "6",
    ]
    assert by_id["a"]["text"].endswith(f"/{formats.derive_seed(0, json.dumps('a'))}")


def test_resume_truncates_torn_line_and_answers_the_rest(fake, tmp_path, capsys):
    model, install = fake
    inp = _write_lines(tmp_path / "in.jsonl", FAKE_LINES)
    full = tmp_path / "full.jsonl"
    install(FakeLLM())
    assert _fake_run(model, inp, full) == 1
    records = _records(full)
    # A killed run: some answers and some error lines made it, then a torn write.
    kept = [r for r in records if r.get("id") in ("a", "c") or r.get("line") in (3, 5)]
    out = tmp_path / "out.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in kept) + '{"id": "f", "text": "ha')
    llm = install(FakeLLM())
    assert _fake_run(model, inp, out, "--resume") == 1
    records = _records(out)
    answered = _answered_lines(records, FAKE_IDS)
    assert sorted(answered) == list(range(1, len(FAKE_LINES) + 1)), answered
    assert records[: len(kept)] == kept
    tok = FakeTokenizer()
    assert tok.encode("hello") not in llm.prompts  # a: answered before the kill
    assert tok.encode("user: hi\nassistant:", False) not in llm.prompts  # c: likewise
    assert tok.encode("fine") in llm.prompts  # f: its answer was the torn line
    # Everything answered: a further resume generates nothing, still exits 1 (error lines).
    llm = install(FakeLLM())
    assert _fake_run(model, inp, out, "--resume") == 1 and llm.prompts == []
    assert _records(out) == records
    # A file whose last complete line is not JSON: that line goes too.
    scratch = tmp_path / "scratch.jsonl"
    scratch.write_text('{"id": "a", "text": "x"}\n{"id": "b", "te\n')
    assert resume.scan_output(scratch).ids == {'"a"'}
    assert scratch.read_text() == '{"id": "a", "text": "x"}\n'
    scratch.write_text('{"id": "a", "tex')
    assert resume.scan_output(scratch).records == 0 and scratch.read_text() == ""


def test_retry_errors_reruns_only_error_lines(fake, tmp_path, capsys):
    """--resume --retry-errors: after the user fixed the bad lines, they are answered and every
    answer of the first run stays byte for byte; lines still bad get their error line again."""
    model, install = fake
    lines = [
        {"id": "a", "prompt": "hello"},
        '{"id": "b", "prompt": ',
        {"id": "c", "prompt": "x", "top_p": 2},
        {"id": "d", "prompt": "fine"},
    ]
    inp = _write_lines(tmp_path / "in.jsonl", lines)
    out = tmp_path / "out.jsonl"
    install(FakeLLM())
    assert _fake_run(model, inp, out) == 1
    first = _records(out)
    good = [r for r in first if r.get("error") is None]
    assert {r["id"] for r in good} == {"a", "d"}
    assert cli.main(["generate", "--model", str(model), "-i", str(inp), "--retry-errors"]) == 2
    assert "--retry-errors goes with --resume" in capsys.readouterr().err

    lines[1] = {"id": "b", "prompt": "fixed"}  # c stays bad
    _write_lines(inp, lines)
    llm = install(FakeLLM())
    assert _fake_run(model, inp, out, "--resume", "--retry-errors") == 1
    records = _records(out)
    assert records[: len(good)] == good  # kept first, unchanged
    assert sorted(_answered_lines(records, {'"a"': 1, '"b"': 2, '"d"': 4})) == [1, 2, 3, 4]
    assert [r["line"] for r in records if r.get("error")] == [3]
    assert llm.prompts == [FakeTokenizer().encode("fixed")]  # a and d were not generated again
    assert not list(tmp_path.glob(".out.jsonl.retry-*"))

    lines[2] = {"id": "c", "prompt": "now fine"}
    _write_lines(inp, lines)
    install(FakeLLM())
    assert _fake_run(model, inp, out, "--resume", "--retry-errors") == 0
    assert sorted(r["id"] for r in _records(out)) == ["a", "b", "c", "d"]


def test_engine_crash_keeps_answers_and_exits_3(fake, tmp_path, capsys):
    """The engine breaks mid-run (every step fails from the third on, the canary too): the
    answers written before stay, exit 3, and --resume answers the rest."""
    model, install = fake
    inp = _write_lines(tmp_path / "in.jsonl", [{"id": i, "prompt": "p"} for i in range(1, 7)])
    out = tmp_path / "out.jsonl"
    flags = ["--batch-size", "2", "--max-tokens", "2"]
    # Two slots: lines 1 and 2 take two steps and finish; line 3 waits for the third step.
    install(FakeLLM(steps_before_crash=2, max_num_seqs=2))
    assert _fake_run(model, inp, out, *flags) == 3
    assert "device lost" in capsys.readouterr().err
    assert [r["id"] for r in _records(out)] == [1, 2]
    install(FakeLLM())
    assert _fake_run(model, inp, out, *flags, "--resume") == 0
    assert sorted(r["id"] for r in _records(out)) == [1, 2, 3, 4, 5, 6]


class WatchedInput:
    """The binary stdin of `--input -`: serves `lines` one readline at a time, noting how many
    records `output` holds as each line is read."""

    def __init__(self, lines: list[dict], output: Path):
        self.lines = [json.dumps(line).encode() + b"\n" for line in lines]
        self.output = output
        self.written_when_read: list[int] = []

    def readline(self, limit: int = -1) -> bytes:
        if not self.lines:
            return b""
        self.written_when_read.append(len(_records(self.output)))
        return self.lines.pop(0)


def test_answers_are_written_before_later_lines_are_read(fake, tmp_path, monkeypatch):
    """A long input streams through the engine: a line is read only when the engine has room for
    it (its slots + --batch-size queued), so answers reach the file, in the order requests
    finish, while most lines are still unread."""
    model, install = fake
    n, slots, lookahead = 40, 2, 3
    lines = [{"id": i, "prompt": f"p{i}", "max_tokens": 1 + 3 * (i % 2)} for i in range(1, n + 1)]
    out = tmp_path / "out.jsonl"
    stdin = WatchedInput(lines, out)
    monkeypatch.setattr(sys, "stdin", SimpleNamespace(buffer=stdin))
    install(FakeLLM(max_num_seqs=slots))
    assert _fake_run(model, "-", out, "--batch-size", str(lookahead)) == 0
    ids = [r["id"] for r in _records(out)]
    assert sorted(ids) == list(range(1, n + 1)) and ids != sorted(ids)
    # When line k is read, lines 1 .. k-1 are in: at most slots + lookahead of them unanswered.
    assert len(stdin.written_when_read) == n
    for k, written in enumerate(stdin.written_when_read, 1):
        assert written >= k - 1 - slots - lookahead, (k, written)


def test_a_failing_step_is_pinned_on_its_request(fake, tmp_path):
    """step() raises while a CRASH request runs: every request still in the engine is withdrawn
    and run again by halves until the failure is pinned on the CRASH line alone; the engine
    answers a canary, so that line gets its error line and every other line its answer, once."""
    model, install = fake
    lines = [{"id": i, "prompt": f"p{i}", "max_tokens": 3} for i in range(1, 11)]
    lines[5] = {"id": 6, "prompt": "CRASH now", "max_tokens": 3}
    inp = _write_lines(tmp_path / "in.jsonl", lines)
    out = tmp_path / "out.jsonl"
    llm = install(FakeLLM(max_num_seqs=2))
    assert _fake_run(model, inp, out, "--batch-size", "2") == 1
    records = _records(out)
    ids = {str(i): i for i in range(1, 11)}
    assert sorted(_answered_lines(records, ids)) == list(range(1, 11))
    [error] = [r for r in records if r.get("error") is not None]
    assert error["line"] == 6 and error["code"] == "generation_failed"
    assert error["error"].startswith(
        "the engine failed on this request: IndexError: engine tripped (traceback in "
    )
    assert "IndexError: engine tripped" in Path(f"{out}.log").read_text()
    tok = FakeTokenizer()
    assert [tok.encode("CRASH now")] in llm.generate_calls  # run alone, and failed alone
    assert [[llm.config.bos_token_id]] in llm.generate_calls  # the canary: the engine is fine
    assert llm.prompts.count(tok.encode("p1")) == 1  # finished before the failure: kept


class AddRequestFailsLLM(FakeLLM):
    """add_request raises KeyError, not a refusal's ValueError, for a prompt holding ODD."""

    def add_request(self, prompt, sampling_params):
        if self.has(list(prompt), "ODD"):
            raise KeyError("slot table")
        return super().add_request(prompt, sampling_params)


def test_an_unexpected_add_request_failure_is_pinned_like_a_failed_step(fake, tmp_path):
    model, install = fake
    lines = [{"id": "a", "prompt": "one"}, {"id": "b", "prompt": "ODD"}, {"id": "c", "prompt": "2"}]
    inp = _write_lines(tmp_path / "in.jsonl", lines)
    out = tmp_path / "out.jsonl"
    install(AddRequestFailsLLM())
    assert _fake_run(model, inp, out) == 1
    records = {r["id"]: r for r in _records(out)}
    assert records["b"]["error"].startswith(
        "the engine failed on this request: KeyError: 'slot table'"
    )
    assert records["a"].get("error") is None and records["c"].get("error") is None


def test_prompt_mode_stdin_and_logprobs(fake, tmp_path, capsys, monkeypatch):
    model, install = fake
    install(FakeLLM())
    base = ["generate", "--model", str(model), "--quiet"]
    assert cli.main(base + ["--prompt", "hi", "--max-tokens", "3"]) == 0
    assert capsys.readouterr().out == f"3/3/{formats.derive_seed(0, '1')}\n"
    assert cli.main(base + ["--prompt", "hi", "--chat", "--output", "-"]) == 0
    rec = json.loads(capsys.readouterr().out)
    assert rec["prompt"] == "user: hi\nassistant:" and rec["id"] == 1
    assert cli.main(base + ["--prompt", "z" * 100]) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and "longer than max_model_len" in captured.err
    # stdin in, stdout out; logprobs in the plain and both OpenAI shapes
    lines = [
        {"id": "p", "prompt": "a", "logprobs": 1},
        {"custom_id": "oc", "url": "/v1/completions", "body": {"prompt": "a", "logprobs": 1}},
        {
            "custom_id": "ch",
            "url": "/v1/chat/completions",
            "body": {
                "messages": [{"role": "user", "content": "a"}],
                "logprobs": True,
                "top_logprobs": 1,
            },
        },
    ]
    stdin = "".join(json.dumps(x) + "\n" for x in lines).encode()
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin)))
    assert cli.main(base + ["--input", "-", "--max-tokens", "1"]) == 0
    recs = {
        r.get("custom_id", r.get("id")): r
        for r in map(json.loads, capsys.readouterr().out.splitlines())
    }
    tok = recs["p"]["token_ids"][0]
    assert recs["p"]["logprobs"] == [{str(tok): -0.5, "99": -2.0}]
    oc = recs["oc"]["response"]["body"]["choices"][0]["logprobs"]
    assert oc == {
        "tokens": [f"t{tok}"],
        "token_logprobs": [-0.5],
        "top_logprobs": [{f"t{tok}": -0.5}],
        "text_offset": [0],
    }
    ch = recs["ch"]["response"]["body"]["choices"][0]["logprobs"]["content"][0]
    assert ch["logprob"] == -0.5 and [t["token"] for t in ch["top_logprobs"]] == [ch["token"]]


def test_progress_bar_reports_prompts_and_tokens():
    buf = io.StringIO()
    bar = progress.Progress(progress.BAR, total=4, initial=1, file=buf)
    bar.advance(tokens=10)
    bar.close()
    text = buf.getvalue()
    assert "2/4" in text and "tok/s" in text and "prompt" in text
    assert progress.Progress(None, total=4).bar is None


class SlowFakeLLM(FakeLLM):
    def step(self):
        time.sleep(0.02)  # 16 steps (the default max_tokens) keep the engine busy for 0.3 s
        return super().step()


def test_progress_lines_when_stderr_is_not_a_terminal(fake, tmp_path, capsys):
    """Off a terminal (capsys is not a TTY): no bar, but a plain line every interval, also while
    the engine is busy, with done/total, errors and tokens/s; --quiet silences it."""
    model, install = fake
    inp = _write_lines(tmp_path / "in.jsonl", [{"prompt": "abc"}, "oops", {"prompt": "de"}])
    install(SlowFakeLLM())
    argv = ["generate", "--model", str(model), "-i", str(inp), "-o", str(tmp_path / "o.jsonl")]
    assert cli.main(argv + ["--batch-size", "1", "--progress-interval", "0.05"]) == 1
    err = capsys.readouterr().err.splitlines()
    progress_lines = [line for line in err if " lines done, " in line]
    assert len(progress_lines) >= 3, err
    assert all(
        re.fullmatch(r"jaxpp: [0-3]/3 lines done, [01] errors, [\d.]+ tok/s, \d+ s elapsed", line)
        for line in progress_lines
    ), progress_lines
    assert "\r" not in "".join(err) and err[-1].startswith("jaxpp: 3 answered, 1 with errors")
    assert cli.main(argv[:-2] + ["-o", str(tmp_path / "q.jsonl"), "--quiet"]) == 1
    assert capsys.readouterr().err == ""


# --- the real engine -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chat_model(hf_model, tmp_path_factory):
    """The tiny fixture Llama plus a short chat template."""
    from hf_fixtures import copy_model_dir

    d = copy_model_dir(hf_model("llama"), tmp_path_factory.mktemp("cli") / "tiny-llama")
    cfg_path = d / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["chat_template"] = CHAT_TEMPLATE
    cfg_path.write_text(json.dumps(cfg))
    return d


_LLMS: dict = {}


@pytest.fixture
def cached_llm(monkeypatch):
    """Reuse one LLM per model/parallelism setting across in-process runs (compiles once)."""
    real = generate.load_llm

    def load(args):
        key = (args.model, engine_config(args))
        if key not in _LLMS:
            _LLMS[key] = real(args)
        return _LLMS[key]

    monkeypatch.setattr(generate, "load_llm", load)


def test_real_engine_every_kind_of_line(chat_model, cached_llm, tmp_path, capsys):
    from transformers import AutoTokenizer

    hello_ids = AutoTokenizer.from_pretrained(str(chat_model)).encode("hello world")
    chat = [{"role": "user", "content": "hi"}]
    lines = [
        {"id": "greet", "prompt": "hello world"},  # 1
        {"id": "ids", "prompt": hello_ids},  # 2
        {"prompt": "the quick brown fox", "max_tokens": 2, "ignore_eos": True},  # 3 -> id 3
        {"id": "greet", "prompt": "dup"},  # 4
        {"id": "bad-top-p", "prompt": "x", "top_p": 2},  # 5
        "",  # 6
        "{not json",  # 7
        {"id": "no-prompt"},  # 8
        {"id": "bad-type", "prompt": 42},  # 9
        {"id": "bad-temp", "prompt": "x", "temperature": "hot"},  # 10
        {"id": "long", "prompt": "hello world " * 30},  # 11
        {"id": "typo", "prompt": "x", "max_token": 3},  # 12
        {"id": "chat", "messages": chat},  # 13
        {"id": "bad-chat", "messages": [{"role": "user"}]},  # 14
        {"id": 3, "prompt": "x"},  # 15: line 3's default id
        {
            "custom_id": "oa-cmpl",
            "method": "POST",
            "url": "/v1/completions",
            "body": {"model": "tiny", "prompt": "hello world", "max_tokens": 4, "n": 2},
        },  # 16
        {
            "custom_id": "oa-chat",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {"model": "tiny", "messages": chat},
        },  # 17
        {"custom_id": "oa-url", "method": "POST", "url": "/v1/embeddings", "body": {}},  # 18
        {
            "custom_id": "oa-temp",
            "method": "POST",
            "url": "/v1/completions",
            "body": {"prompt": "x", "temperature": -1},
        },  # 19
        {
            "custom_id": "oa-long",
            "method": "POST",
            "url": "/v1/completions",
            "body": {"prompt": "hello world " * 30},
        },  # 20
        {
            "custom_id": "oa-cmpl",
            "method": "POST",
            "url": "/v1/completions",
            "body": {"prompt": "again"},
        },  # 21
        b"\xff\xfe not utf-8",  # 22
        {"id": "oov", "prompt": [1, 2, 99999]},  # 23
        '{"id": "surrogate", "prompt": "\\ud800 hello"}',  # 24
        "[" * 50_000 + "]" * 50_000,  # 25
        {"id": "raises", "messages": [{"role": "assistant", "content": "hi"}]},  # 26
        {"custom_id": "huge-n", "url": "/v1/completions", "body": {"prompt": "x", "n": 10**6}},
    ]
    inp = _write_lines(tmp_path / "in.jsonl", lines)
    out = tmp_path / "out.jsonl"
    argv = [
        "generate",
        "--model",
        str(chat_model),
        "--input",
        str(inp),
        "--output",
        str(out),
        "--batch-size",
        "64",
        *REAL_FLAGS,
    ]
    assert cli.main(argv) == 1
    records = _records(out)
    ids = {'"greet"': 1, '"ids"': 2, "3": 3, '"chat"': 13, '"oa-cmpl"': 16, '"oa-chat"': 17}
    assert sorted(_answered_lines(records, ids)) == list(range(1, len(lines) + 1))
    err = {r["line"]: r["error"] for r in records if r.get("error") is not None}
    records_code = {r["line"]: r.get("code") for r in records if r.get("error") is not None}
    msg = {n: e["message"] if isinstance(e, dict) else e for n, e in err.items()}
    assert set(err) == {
        4,
        5,
        6,
        7,
        8,
        9,
        10,
        11,
        12,
        14,
        15,
        18,
        19,
        20,
        21,
        22,
        23,
        24,
        25,
        26,
        27,
    }
    codes = {n: e["code"] if isinstance(e, dict) else records_code[n] for n, e in err.items()}
    assert [codes[n] for n in (24, 25, 26, 27)] == [
        "invalid_prompt",
        "invalid_json",
        "chat_template_error",
        "limit_exceeded",
    ]
    assert "duplicate id 'greet'" in msg[4] and "duplicate id 3" in msg[15]
    assert msg[5] == "SamplingParams.top_p=2 is invalid: expected in (0, 1]"
    assert "SamplingParams.temperature='hot'" in msg[10]
    assert "prompt" in msg[8] and "prompt" in msg[9] and "'max_token'" in msg[12]
    assert "longer than max_model_len=32" in msg[11] and "message 0" in msg[14]
    assert "UTF-8" in msg[22] and "99999" in msg[23]
    assert err[18]["code"] == "invalid_url" and err[20]["code"] == "context_length_exceeded"
    assert "temperature" in msg[19] and err[21]["code"] == "duplicate_id"

    ok = {r.get("custom_id", r.get("id")): r for r in records if r.get("error") is None}
    greet = ok["greet"]
    assert set(greet) == {"id", "prompt", "text", "token_ids", "finish_reason", "usage"}
    assert greet["prompt"] == "hello world" and 1 <= len(greet["token_ids"]) <= 4
    assert greet["usage"] == {
        "prompt_tokens": len(hello_ids),
        "completion_tokens": len(greet["token_ids"]),
    }
    assert ok["ids"]["token_ids"] == greet["token_ids"] and ok["ids"]["prompt"] == hello_ids
    assert ok[3]["finish_reason"] == "length" and len(ok[3]["token_ids"]) == 2
    assert ok["chat"]["prompt"] == "user: hi\nassistant:"

    batch = ok["oa-cmpl"]
    assert batch["id"].startswith("batch_req_") and batch["error"] is None
    assert batch["response"]["status_code"] == 200 and batch["response"]["request_id"]
    body = batch["response"]["body"]
    assert body["object"] == "text_completion" and body["model"] == "tiny"
    assert [c["index"] for c in body["choices"]] == [0, 1]
    assert [c["text"] for c in body["choices"]] == [greet["text"]] * 2  # greedy
    assert all(c["finish_reason"] == greet["finish_reason"] for c in body["choices"])
    assert body["usage"] == {
        "prompt_tokens": len(hello_ids),
        "completion_tokens": 2 * len(greet["token_ids"]),
        "total_tokens": len(hello_ids) + 2 * len(greet["token_ids"]),
    }
    cbody = ok["oa-chat"]["response"]["body"]
    assert cbody["object"] == "chat.completion"
    assert cbody["choices"][0]["message"] == {"role": "assistant", "content": ok["chat"]["text"]}
    assert cbody["usage"]["prompt_tokens"] == ok["chat"]["usage"]["prompt_tokens"]

    # Resuming a finished file answers nothing more and changes nothing.
    before = out.read_bytes()
    assert cli.main(argv + ["--resume"]) == 1
    assert out.read_bytes() == before
    # An engine error at construction (bad layer partition): one line, exit 2.
    capsys.readouterr()
    bad = [
        "generate",
        "--model",
        str(chat_model),
        "--prompt",
        "x",
        "--pp",
        "2",
        "--layer-partition",
        "1,1",
    ]
    assert cli.main(bad) == 2
    stderr = capsys.readouterr().err
    assert len(stderr.strip().splitlines()) == 1 and "sums to 2" in stderr


def test_sigkill_then_resume_answers_every_line_exactly_once(chat_model, tmp_path):
    n = 80  # two of each bad line; the kill comes at the first answer, long before the end
    lines, ids = [], {}
    for i in range(1, n + 1):
        if i % 40 == 7:
            lines.append('{"id": "broken", "prompt": ')
        elif i % 40 == 19:
            lines.append({"id": f"q{i}", "prompt": "x", "top_k": -5})
        elif i % 40 == 29:
            lines.append({"id": "q1", "prompt": "duplicate"})
        else:
            lines.append({"id": f"q{i}", "prompt": f"number {i}"})
            ids[json.dumps(f"q{i}")] = i
    inp = _write_lines(tmp_path / "in.jsonl", lines)
    out = tmp_path / "out.jsonl"
    cmd = [
        sys.executable,
        "-m",
        "jaxpp.cli",
        "generate",
        "--model",
        str(chat_model),
        "--input",
        str(inp),
        "--output",
        str(out),
        "--batch-size",
        "8",
        "--max-num-seqs",  # few rows: few programs to compile, and a run to kill
        "8",
        "--max-num-batched-tokens",
        "8",
        *REAL_FLAGS,
    ]
    env = {**os.environ, "JAX_NUM_CPU_DEVICES": "1"}

    log = open(tmp_path / "stderr.txt", "w+")  # noqa: SIM115 - a pipe could fill up and block
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=log)
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if out.exists() and b'"text"' in out.read_bytes():
                break
            time.sleep(0.02)
        assert proc.poll() is None, (tmp_path / "stderr.txt").read_text()[-2000:]
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
        log.close()
    first = out.read_bytes()
    assert b'"text"' in first
    assert len(first.splitlines()) < n, "the run finished before it could be killed"
    with open(out, "ab") as f:  # and a torn write on top, as a kill mid-write leaves it
        f.write(b'{"id": "q2", "prompt": "number 2", "te')

    done = subprocess.run(cmd + ["--resume"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr[-2000:]  # the broken lines
    records = _records(out)
    answered = _answered_lines(records, ids)
    assert sorted(answered) == list(range(1, n + 1))
    assert out.read_bytes().startswith(first[: first.rfind(b"\n") + 1])
    errors = [r for r in records if r.get("error") is not None]
    assert len(errors) == 3 * (n // 40)
