"""The bad-input corpus: every kind of input nobody should send, each between two good lines.

Each line case asserts the same thing: the two neighbours get their exact answers, the bad line
gets exactly one error line with the expected stable code and a one-line message naming the
culprit, and the run exits 1 (never a traceback, never exit 3). Flag and model-dir cases assert
exit 2 with one stderr line before anything is loaded or written.

The engine is faked (cli_fakes.py) but the tokenizer, the chat templates and everything on the
request side are real, so the tokenizer's and jinja's own failures are what is exercised.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from cli_fakes import (
    FAKE_CONFIG,
    GOOD_AFTER,
    GOOD_AFTER_PLAIN,
    GOOD_BEFORE,
    TokenizerFakeLLM,
    expected_text,
    load_tokenizer,
    make_model_dir,
    records,
    run,
    write_lines,
)

from jaxpp import cli
from jaxpp.cli import generate

# Templates that refuse conversations, as real model families ship them.
MISTRAL_STYLE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}{% if message['role'] == 'user' %}[INST] {{ message['content'] }} [/INST]"
    "{% else %}{{ message['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
)
GEMMA_STYLE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}<start_of_turn>{{ message['role'] }}\n"
    "{{ message['content'] }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
LLAMA2_STYLE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% else %}{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}{% if message['role'] == 'user' %}{{ bos_token }}[INST] {{ message['content'] }}"
    " [/INST]{% else %} {{ message['content'] }} {{ eos_token }}{% endif %}{% endfor %}"
)
BROKEN_AT_RUN_TIME = "{% for m in messages %}{{ m['content'].nonexistent_method() }}{% endfor %}"
BROKEN_SYNTAX = "{% for m in messages %}{{ m['content'] }"
TEMPLATES = {
    "mistral": MISTRAL_STYLE,
    "gemma": GEMMA_STYLE,
    "llama2": LLAMA2_STYLE,
    "runtime": BROKEN_AT_RUN_TIME,
    "syntax": BROKEN_SYNTAX,
    "none": None,
}


@dataclasses.dataclass(frozen=True)
class Case:
    line: object  # dict, str (may hold lone surrogates) or bytes
    code: str
    needle: str  # in the error message
    flags: tuple[str, ...] = ()
    template: str = "mistral"


def chat(*roles: str, content: object = "hi") -> dict:
    return {"id": "bad", "messages": [{"role": r, "content": content} for r in roles]}


def plain(**fields) -> dict:
    return {"id": "bad", "prompt": "x", **fields}


def openai(url: str = "/v1/completions", **body) -> dict:
    return {"custom_id": "bad", "method": "POST", "url": url, "body": {"prompt": "x", **body}}


def openai_chat(**body) -> dict:
    return {
        "custom_id": "bad",
        "url": "/v1/chat/completions",
        "body": {"messages": [{"role": "user", "content": "hi"}], **body},
    }


J, R, L = "invalid_json", "invalid_request", "limit_exceeded"
P, T, G = "invalid_prompt", "chat_template_error", "generation_failed"

LINE_CASES = {
    # --- bytes and JSON ---------------------------------------------------------------------
    "blank": Case(b"", J, "blank line"),
    "whitespace": Case(b" \t \r", J, "blank line"),
    "truncated": Case(b'{"id": "bad", "prompt": ', J, "invalid JSON"),
    "not-utf8": Case(b"\xff\xfe not utf-8", J, "not UTF-8"),
    "latin1-byte": Case(b'{"prompt": "caf\xe9"}', J, "not UTF-8"),
    "nul-bytes": Case(b"\x00\x00\x00", J, "invalid JSON"),
    "deep-array": Case(b"[" * 100_000 + b"]" * 100_000, J, "nested too deeply"),
    "deep-object": Case(b'{"a":' * 50_000 + b"1" + b"}" * 50_000, J, "nested too deeply"),
    "deep-in-field": Case(
        b'{"id": "bad", "prompt": ' + b"[" * 50_000 + b"]" * 50_000 + b"}", J, "nested too deeply"
    ),
    "array": Case(b"[1, 2, 3]", J, "expected a JSON object"),
    "string": Case(b'"just a string"', J, "expected a JSON object"),
    "null": Case(b"null", J, "expected a JSON object"),
    "number": Case(b"42", J, "expected a JSON object"),
    "nan": Case(b"NaN", J, "expected a JSON object"),
    "two-objects": Case(b'{"prompt": "a"} {"prompt": "b"}', J, "Extra data"),
    "single-quotes": Case(b"{'prompt': 'x'}", J, "invalid JSON"),
    "huge-int-literal": Case(b'{"prompt": "x", "seed": 1' + b"0" * 5000 + b"}", J, "invalid JSON"),
    "oversized-line": Case(
        plain(prompt="y" * 10_000), L, "over the --max-line-bytes", ("--max-line-bytes", "4096")
    ),
    # --- unencodable text (lone surrogates from JSON escapes) ---------------------------------
    "surrogate-prompt": Case('{"id": "bad", "prompt": "\\ud800 x"}', P, "tokenizer cannot"),
    "reversed-pair": Case('{"id": "bad", "prompt": "\\udc00\\ud800"}', P, "tokenizer cannot"),
    "surrogate-chat": Case(chat("user", content="\ud800"), P, "cannot encode the chat prompt"),
    "surrogate-id": Case('{"id": "\\udfff", "prompt": "x"}', R, "unpaired surrogate"),
    "surrogate-openai": Case(openai(prompt="a\udbff"), P, "tokenizer cannot"),
    # --- the plain line's fields -----------------------------------------------------------
    "no-prompt": Case({"id": "bad"}, R, "exactly one of 'prompt'"),
    "both-prompt-and-messages": Case(
        {**plain(), "messages": GOOD_AFTER["messages"]}, R, "exactly one of"
    ),
    "prompt-number": Case(plain(prompt=42), R, "must be a string or a list of token ids"),
    "prompt-mixed-list": Case(plain(prompt=[1, "a"]), R, "list of token ids"),
    "prompt-float-ids": Case(plain(prompt=[1, 2.5]), R, "list of token ids"),
    "prompt-bool-ids": Case(plain(prompt=[True]), R, "list of token ids"),
    "prompt-empty-ids": Case(plain(prompt=[]), R, "empty"),
    "prompt-id-oov": Case(plain(prompt=[1, 99999]), R, "99999"),
    "prompt-id-negative": Case(plain(prompt=[-1]), R, "-1"),
    "prompt-too-long": Case(plain(prompt="word " * 200), "context_length_exceeded", "longer"),
    "id-list": Case({"id": [1], "prompt": "x"}, R, "id must be a string or an integer"),
    "id-bool": Case({"id": True, "prompt": "x"}, R, "id must be"),
    "id-float": Case({"id": 1.5, "prompt": "x"}, R, "id must be"),
    "id-too-long": Case({"id": "i" * 600, "prompt": "x"}, L, "id has 600 characters"),
    "duplicate-id": Case({"id": "before", "prompt": "x"}, "duplicate_id", "duplicate id"),
    "unknown-field": Case(plain(max_token=3), R, "unknown field 'max_token'"),
    "max-tokens-0": Case(plain(max_tokens=0), R, "SamplingParams.max_tokens=0"),
    "max-tokens-negative": Case(plain(max_tokens=-1), R, "max_tokens=-1"),
    "max-tokens-string": Case(plain(max_tokens="5"), R, "max_tokens='5'"),
    "max-tokens-float": Case(plain(max_tokens=1.5), R, "max_tokens=1.5"),
    "max-tokens-huge": Case(plain(max_tokens=2**40), R, "max_tokens"),
    "min-tokens-negative": Case(plain(min_tokens=-1), R, "min_tokens=-1"),
    "min-over-max": Case(plain(min_tokens=9, max_tokens=2), R, "expected <= max_tokens=2"),
    "temperature-negative": Case(plain(temperature=-0.5), R, "temperature=-0.5"),
    "temperature-string": Case(plain(temperature="hot"), R, "temperature='hot'"),
    "temperature-bool": Case(plain(temperature=True), R, "temperature=True"),
    "temperature-infinite": Case(b'{"prompt": "x", "temperature": 1e400}', R, "temperature=inf"),
    "top-k": Case(plain(top_k=-2), R, "top_k=-2"),
    "top-k-float": Case(plain(top_k=2.5), R, "top_k=2.5"),
    "top-p-zero": Case(plain(top_p=0), R, "top_p=0"),
    "top-p-big": Case(plain(top_p=1.5), R, "top_p=1.5"),
    "min-p": Case(plain(min_p=2), R, "min_p=2"),
    "seed-negative": Case(plain(seed=-3), R, "seed=-3"),
    "seed-string": Case(plain(seed="abc"), R, "seed='abc'"),
    "stop-number": Case(plain(stop=5), R, "stop must be a string or a list"),
    "stop-empty-string": Case(plain(stop=[""]), R, "SamplingParams.stop"),
    "stop-numbers": Case(plain(stop=[1, 2]), R, "SamplingParams.stop"),
    "stop-too-many": Case(plain(stop=[f"s{i}" for i in range(100)]), L, "stop has 100 strings"),
    "stop-too-long": Case(plain(stop=["z" * 5000]), L, "5000 characters"),
    "stop-ids-string": Case(plain(stop_token_ids="1,2"), R, "stop_token_ids must be a list"),
    "stop-ids-oov": Case(plain(stop_token_ids=[10**6]), R, "outside the vocabulary"),
    "stop-ids-negative": Case(plain(stop_token_ids=[-1]), R, "stop_token_ids"),
    "stop-ids-too-many": Case(plain(stop_token_ids=list(range(1000))), L, "1000 ids"),
    "ignore-eos-string": Case(plain(ignore_eos="yes"), R, "ignore_eos='yes'"),
    "logprobs-negative": Case(plain(logprobs=-1), R, "logprobs=-1"),
    "logprobs-huge": Case(plain(logprobs=1000), L, "logprobs=1000"),
    "logprobs-float": Case(plain(logprobs=2.5), R, "logprobs=2.5"),
    "presence-penalty": Case(plain(presence_penalty=3), R, "presence_penalty=3"),
    "frequency-penalty": Case(plain(frequency_penalty=-5), R, "frequency_penalty=-5"),
    "repetition-penalty": Case(plain(repetition_penalty=0), R, "repetition_penalty=0"),
    "skip-special-string": Case(plain(skip_special_tokens="no"), R, "skip_special_tokens"),
    # --- chat messages and templates that raise -----------------------------------------------
    "messages-empty": Case({"messages": []}, R, "non-empty list"),
    "messages-string": Case({"messages": "hi"}, R, "non-empty list"),
    "message-no-content": Case({"messages": [{"role": "user"}]}, R, "message 0"),
    "message-role-number": Case({"messages": [{"role": 5, "content": "x"}]}, R, "message 0"),
    "message-pair-list": Case({"messages": [["user", "hi"]]}, R, "message 0"),
    "message-image-part": Case(
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "u"}]}]},
        R,
        "only text content parts",
    ),
    "mistral-roles-not-alternating": Case(chat("assistant", "user"), T, "must alternate"),
    "mistral-two-users": Case(chat("user", "user"), T, "must alternate"),
    "llama2-roles-not-alternating": Case(
        chat("system", "assistant"), T, "must alternate", template="llama2"
    ),
    "gemma-system-role": Case(chat("system", "user"), T, "System role not supported", (), "gemma"),
    "template-fails-at-run-time": Case(chat("user"), T, "chat template refused", (), "runtime"),
    "template-syntax-error": Case(chat("user"), T, "chat template refused", (), "syntax"),
    "no-chat-template": Case(chat("user"), R, "no chat template", (), "none"),
    # --- OpenAI batch lines ----------------------------------------------------------------
    "openai-url": Case(openai("/v1/embeddings"), "invalid_url", "url must be one of"),
    "openai-url-missing": Case({"custom_id": "bad", "body": {}}, "invalid_url", "url must be"),
    "openai-url-number": Case({"custom_id": "bad", "url": 5, "body": {}}, "invalid_url", "got 5"),
    "openai-method": Case({**openai(), "method": "GET"}, R, "method must be 'POST'"),
    "openai-body-missing": Case({"custom_id": "bad", "url": "/v1/completions"}, R, "body must"),
    "openai-body-string": Case({**openai(), "body": "x"}, R, "body must be a JSON object"),
    "openai-unknown-key": Case({**openai(), "extra": 1}, R, "unknown field 'extra'"),
    "openai-unknown-body-field": Case(openai(functions=[]), R, "unsupported body field"),
    "openai-stream": Case(openai(stream=True), R, "stream=true"),
    "openai-echo": Case(openai(echo="yes"), R, "echo must be a boolean"),
    "openai-n-zero": Case(openai(n=0), R, "n must be an integer >= 1"),
    "openai-n-string": Case(openai(n="2"), R, "n must be an integer"),
    "openai-n-enormous": Case(openai(n=10**9), L, "1000000000 sequences"),
    "openai-many-prompts": Case(openai(prompt=["a"] * 100, n=2), L, "x 100 prompts"),
    "openai-no-prompt": Case(
        {"custom_id": "bad", "url": "/v1/completions", "body": {}}, R, "body.prompt"
    ),
    "openai-chat-no-messages": Case(
        {"custom_id": "bad", "url": "/v1/chat/completions", "body": {}}, R, "body.messages"
    ),
    "openai-chat-logprobs-string": Case(openai_chat(logprobs="yes"), R, "logprobs must be"),
    "openai-chat-top-logprobs": Case(openai_chat(logprobs=True, top_logprobs=500), L, "500"),
    "openai-logprobs-huge": Case(openai(logprobs=99), L, "logprobs=99"),
    "openai-temperature": Case(openai(temperature=-1), R, "temperature=-1"),
    "openai-custom-id-list": Case({**openai(), "custom_id": [1]}, R, "custom_id must be"),
    "openai-duplicate": Case({**openai(), "custom_id": "before"}, "duplicate_id", "duplicate"),
    "openai-chat-template-raises": Case(
        openai_chat(messages=[{"role": "assistant", "content": "x"}]), T, "must alternate"
    ),
    # --- failures past validation: the engine, building the answer ---------------------------
    "engine-refuses": Case(plain(prompt="BOOM"), G, "the engine refused the request"),
    "engine-crashes-on-one": Case(plain(prompt="CRASH"), G, "IndexError: engine tripped"),
    "answer-cannot-be-built": Case(openai(prompt="EMPTYLP", logprobs=1), "request_failed", "Key"),
}


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus_models")
    dirs = {name: make_model_dir(root / name, t) for name, t in TEMPLATES.items()}
    tokenizers = {name: load_tokenizer(d) for name, d in dirs.items()}
    return dirs, tokenizers


@pytest.mark.parametrize("name", sorted(LINE_CASES))
def test_bad_line_costs_no_neighbour_its_answer(name, model_dirs, tmp_path, monkeypatch, capsys):
    case = LINE_CASES[name]
    dirs, tokenizers = model_dirs
    model, tokenizer = dirs[case.template], tokenizers[case.template]
    llm = TokenizerFakeLLM(tokenizer, model)
    monkeypatch.setattr(generate, "load_llm", lambda args: llm)
    chat_ok = case.template in ("mistral", "llama2")
    after = GOOD_AFTER if chat_ok else GOOD_AFTER_PLAIN
    inp = write_lines(tmp_path / "in.jsonl", [GOOD_BEFORE, case.line, after])
    out = tmp_path / "out.jsonl"

    assert run(model, inp, out, *case.flags) == 1
    assert "Traceback" not in capsys.readouterr().err
    recs = records(out)
    assert len(recs) == 3, recs
    answers = {r["id"]: r for r in recs if r.get("error") is None}
    errors = [r for r in recs if r.get("error") is not None]
    expected = {
        "before": expected_text(tokenizer, GOOD_BEFORE),
        "after": expected_text(tokenizer, after),
    }
    assert {k: r["text"] for k, r in answers.items()} == expected
    assert len(errors) == 1 and errors[0]["line"] == 2, errors
    err = errors[0]["error"]
    code, message = (
        (err["code"], err["message"]) if isinstance(err, dict) else (errors[0]["code"], err)
    )
    assert code == case.code, message
    assert case.needle in message, message
    assert "\n" not in message and len(message) <= 500
    if "custom_id" in errors[0]:
        assert errors[0]["response"] is None
    # Resuming the finished file adds nothing and still reports the error line.
    before = out.read_bytes()
    assert run(model, inp, out, *case.flags, "--resume") == 1
    assert out.read_bytes() == before


def test_corpus_size():
    """The issue asks for at least 60 bad inputs of our own; flags and model dirs come on top."""
    assert len(LINE_CASES) >= 60
    assert len(LINE_CASES) + len(FLAG_CASES) + len(MODEL_DIR_CASES) >= 150


# --- flags: refused up front (exit 2, one stderr line, nothing loaded or written) ----------------

FLAG_CASES = {
    "logprobs-above-vocab": (["--logprobs", "5000"], "above the vocabulary size 4096"),
    "logprobs-above-limit": (["--logprobs", "50"], "above --max-logprobs 20"),
    "logprobs-negative": (["--logprobs", "-1"], "--logprobs"),
    "stop-token-id-outside": (["--stop-token-ids", "1,4096"], "outside the vocabulary"),
    "stop-token-id-negative": (["--stop-token-ids", "-3"], "outside the vocabulary"),
    "stop-token-ids-garbage": (["--stop-token-ids", "a,b"], "comma-separated integers"),
    "max-model-len-beyond": (["--max-model-len", "129"], "beyond the model's 128 positions"),
    "max-model-len-one": (["--max-model-len", "1"], "expected >= 2"),
    "max-model-len-zero": (["--max-model-len", "0"], "positive integer"),
    "top-p": (["--top-p", "2"], "--top-p: SamplingParams.top_p=2.0"),
    "temperature": (["--temperature", "-1"], "--temperature"),
    "temperature-nan": (["--temperature", "nan"], "--temperature"),
    "max-tokens-zero": (["--max-tokens", "0"], "--max-tokens"),
    "min-over-max": (["--min-tokens", "5", "--max-tokens", "2"], "--min-tokens"),
    "top-k": (["--top-k", "-5"], "--top-k"),
    "min-p": (["--min-p", "3"], "--min-p"),
    "presence": (["--presence-penalty", "9"], "--presence-penalty"),
    "frequency": (["--frequency-penalty", "-9"], "--frequency-penalty"),
    "repetition": (["--repetition-penalty", "0"], "--repetition-penalty"),
    "stop-empty": (["--stop", ""], "--stop"),
    "stop-too-many": ([a for i in range(40) for a in ("--stop", f"s{i}")], "40 strings"),
    "seed-negative": (["--seed", "-1"], "expected an integer >= 0"),
    "batch-size-zero": (["--batch-size", "0"], "positive integer"),
    "max-num-seqs-zero": (["--max-num-seqs", "0"], "argument --max-num-seqs: expected a positive"),
    "max-num-seqs-garbage": (["--max-num-seqs", "lots"], "--max-num-seqs: expected a positive"),
    "token-budget-negative": (
        ["--max-num-batched-tokens", "-8"],
        "--max-num-batched-tokens: expected a positive",
    ),
    "block-size-float": (["--block-size", "1.5"], "--block-size: expected a positive"),
    "pp-zero": (["--pp", "0"], "positive integer"),
    "pp-above-layers": (["--pp", "3"], "only 2 layers"),
    "layer-partition-garbage": (["--pp", "2", "--layer-partition", "1,x"], "--layer-partition"),
    "layer-partition-sum": (["--pp", "2", "--layer-partition", "1,2"], "--layer-partition"),
    "microbatches-below-pp": (["--pp", "2", "--num-microbatches", "1"], "below --pp 2"),
    "microbatches-zero": (["--num-microbatches", "0"], "positive integer"),
    "dtype": (["--dtype", "int8"], "invalid choice"),
    "retry-without-resume": (["--retry-errors"], "--retry-errors goes with --resume"),
    "progress-interval-zero": (["--progress-interval", "0"], "positive number"),
    "max-line-bytes-zero": (["--max-line-bytes", "0"], "positive integer"),
    "max-seqs-garbage": (["--max-seqs-per-request", "many"], "positive integer"),
    "unknown-flag": (["--max-token", "3"], "--max-token"),
}


@pytest.mark.parametrize("name", sorted(FLAG_CASES))
def test_impossible_flag_is_refused_before_loading(name, model_dirs, tmp_path, monkeypatch, capsys):
    flags, needle = FLAG_CASES[name]
    dirs, _ = model_dirs
    monkeypatch.setattr(generate, "load_llm", _never_load)
    inp = write_lines(tmp_path / "in.jsonl", [GOOD_BEFORE])
    out = tmp_path / "out.jsonl"
    argv = ["generate", "--model", str(dirs["mistral"]), "-i", str(inp), "-o", str(out), *flags]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and needle in err, err
    assert not out.exists() or out.read_bytes() == b""


def _never_load(args):
    raise AssertionError("the model was loaded although a flag is impossible")


def test_chat_flag_needs_a_template_and_prompt_needs_a_tokenizer(model_dirs, tmp_path, capsys):
    dirs, _ = model_dirs
    assert cli.main(["generate", "-m", str(dirs["none"]), "--prompt", "hi", "--chat"]) == 2
    assert "--chat needs a chat template" in capsys.readouterr().err
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text(json.dumps(FAKE_CONFIG))
    assert cli.main(["generate", "-m", str(bare), "--prompt", "hi"]) == 2
    assert "no tokenizer files" in capsys.readouterr().err


# --- broken model dirs: exit 2 with the file and field named -------------------------------------


def _config(**changes) -> bytes:
    return json.dumps({**FAKE_CONFIG, **changes}).encode()


MODEL_DIR_CASES = {
    "config-not-json": ({"config.json": b"{not json"}, "config.json is not valid JSON"),
    "config-latin1": ({"config.json": b'{"model_type": "ll\xe1ma"}'}, "not UTF-8"),
    "config-list": ({"config.json": b"[1, 2]"}, "config.json: expected a JSON object, got list"),
    "config-deep": ({"config.json": b"[" * 100_000 + b"]" * 100_000}, "not valid JSON"),
    "no-vocab-size": ({"config.json": _config(vocab_size=None)}, "'vocab_size' is missing"),
    "hidden-size-string": ({"config.json": _config(hidden_size="abc")}, "hidden_size='abc'"),
    "heads-zero": ({"config.json": _config(num_attention_heads=0)}, "num_attention_heads=0"),
    "kv-heads-not-dividing": (
        {"config.json": _config(num_key_value_heads=3, num_attention_heads=4, hidden_size=8)},
        "num_key_value_heads=3 does not divide",
    ),
    "unsupported-architecture": (
        {"config.json": _config(architectures=["GPT2LMHeadModel"])},
        "unsupported architecture 'GPT2LMHeadModel'",
    ),
    "rope-scaling-string": ({"config.json": _config(rope_scaling="yes")}, "rope_scaling='yes'"),
    "rope-llama3-incomplete": (
        {"config.json": _config(rope_scaling={"rope_type": "llama3", "factor": 8.0})},
        "needs 'low_freq_factor'",
    ),
    "eos-string": ({"config.json": _config(eos_token_id="</s>")}, "eos_token_id='</s>'"),
    "generation-eos-string": (
        {"generation_config.json": b'{"eos_token_id": ["x"]}'},
        "generation_config.json: eos_token_id",
    ),
    "tokenizer-config-broken": ({"tokenizer_config.json": b"{"}, "tokenizer_config.json"),
    "tokenizer-config-list": ({"tokenizer_config.json": b"[]"}, "expected a JSON object"),
}


@pytest.mark.parametrize("name", sorted(MODEL_DIR_CASES))
def test_broken_model_dir_is_refused(name, model_dirs, tmp_path, monkeypatch, capsys):
    files, needle = MODEL_DIR_CASES[name]
    model = make_model_dir(tmp_path / "model", MISTRAL_STYLE)
    for filename, data in files.items():
        (model / filename).write_bytes(data)
    monkeypatch.setattr(generate, "load_llm", _never_load)
    out = tmp_path / "out.jsonl"
    inp = write_lines(tmp_path / "in.jsonl", [GOOD_BEFORE])
    assert cli.main(["generate", "-m", str(model), "-i", str(inp), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and needle in err, err
    assert "Traceback" not in err and not out.exists()


def test_unloadable_checkpoint_or_tokenizer_is_exit_2(model_dirs, tmp_path, monkeypatch, capsys):
    """Past the up-front checks: the real loader refusing pickles, and a tokenizer that cannot
    be loaded (loaded before any line runs, so it is the model dir's error, not every line's)."""
    model = make_model_dir(tmp_path / "pickles", MISTRAL_STYLE)
    (model / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    assert cli.main(["generate", "-m", str(model), "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "never unpickles" in err, err

    class BrokenTokenizerLLM:
        @property
        def tokenizer(self):
            raise OSError("tokenizer.json: unexpected end of file")

    monkeypatch.setattr(generate, "load_llm", lambda args: BrokenTokenizerLLM())
    assert cli.main(["generate", "-m", str(model), "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == (
        f"jaxpp: error: cannot load the tokenizer of {model}: OSError: "
        "tokenizer.json: unexpected end of file"
    )


def test_generation_config_that_is_not_an_object_is_ignored(model_dirs, tmp_path, monkeypatch):
    """Recommendations only: a broken generation_config.json costs them, not the run."""
    dirs, tokenizers = model_dirs
    model = make_model_dir(tmp_path / "model", MISTRAL_STYLE)
    (model / "generation_config.json").write_text("[1, 2, 3]")
    monkeypatch.setattr(
        generate, "load_llm", lambda args: TokenizerFakeLLM(tokenizers["mistral"], model)
    )
    inp = write_lines(tmp_path / "in.jsonl", [GOOD_BEFORE])
    assert run(model, inp, tmp_path / "out.jsonl") == 0


def test_engine_failing_for_everyone_is_exit_3_with_a_log(
    model_dirs, tmp_path, monkeypatch, capsys
):
    """Not any request's fault: the engine fails even on the one-token canary. Exit 3, one
    stderr line naming the log file, the answers before the failure kept."""
    dirs, tokenizers = model_dirs
    model = dirs["mistral"]

    class DyingLLM(TokenizerFakeLLM):
        """Fails every step once a request has finished: "before" (3 tokens) is answered,
        "a" and "b" (16 tokens) are still running when the device goes."""

        def step(self):
            if self.finished:
                raise RuntimeError("device lost")
            return super().step()

    monkeypatch.setattr(generate, "load_llm", lambda args: DyingLLM(tokenizers["mistral"], model))
    inp = write_lines(tmp_path / "in.jsonl", [GOOD_BEFORE, {"prompt": "a"}, {"prompt": "b"}])
    out = tmp_path / "out.jsonl"
    assert run(model, inp, out, "--batch-size", "1") == 3
    err = capsys.readouterr().err.strip().splitlines()
    log = Path(f"{out}.log")
    assert err == [
        "jaxpp: error: the engine failed, even on a one-token canary request: RuntimeError: "
        f"device lost; answered lines are kept (rerun with --resume); traceback in {log}"
    ]
    assert "RuntimeError: device lost" in log.read_text() and "Traceback" in log.read_text()
    assert [r["id"] for r in records(out)] == ["before"]


def test_unwritable_output_is_exit_3(model_dirs, tmp_path, monkeypatch, capsys):
    dirs, tokenizers = model_dirs
    model = dirs["mistral"]
    monkeypatch.setattr(
        generate, "load_llm", lambda args: TokenizerFakeLLM(tokenizers["mistral"], model)
    )

    def full_disk(self, record):
        raise cli.errors.OutputError(f"cannot write --output {self.path}: No space left on device")

    monkeypatch.setattr(cli.sinks.FileSink, "write", full_disk)
    inp = write_lines(tmp_path / "in.jsonl", [GOOD_BEFORE])
    assert run(model, inp, tmp_path / "out.jsonl") == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "No space left on device" in err[0] and "traceback in" in err[0]
