"""Property-based fuzzing of `jaxpp generate`: random JSON values, request-shaped objects with
random field values, and random bytes, written as lines between two good ones.

Whatever the lines hold, the run must exit 0 or 1, answer every line exactly once (and a
--resume must find nothing left to do), give the two good neighbours their exact answers, and
answer every bad line with a one-line error of a known code. `request_failed` (an exception
nobody anticipated) fails the test: it would be a jaxpp bug, even though it costs no neighbour.

The engine is faked (cli_fakes.py); the tokenizer and chat template are the real ones.
"""

from __future__ import annotations

import itertools
import json

import pytest

hypothesis = pytest.importorskip("hypothesis", reason="the fuzz test needs hypothesis (.[test])")
from cli_fakes import (  # noqa: E402
    GOOD_AFTER,
    GOOD_BEFORE,
    TokenizerFakeLLM,
    expected_text,
    load_tokenizer,
    make_model_dir,
    records,
    run,
    write_lines,
)
from hypothesis import HealthCheck, event, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from test_cli_bad_inputs import MISTRAL_STYLE  # noqa: E402

from jaxpp.cli import generate  # noqa: E402
from jaxpp.cli.formats import _OPENAI_BODY, SAMPLING_FIELDS  # noqa: E402

EXPECTED_CODES = {
    "invalid_json",
    "invalid_request",
    "invalid_url",
    "duplicate_id",
    "context_length_exceeded",
    "limit_exceeded",
    "invalid_prompt",
    "chat_template_error",
}

# Text with everything JSON can carry, lone surrogates (from escapes such as "\ud800") and
# control characters included (st.text leaves surrogates out, hence the join).
text = st.lists(
    st.characters() | st.sampled_from(["\ud800", "\udfff", "\x00", "\u2028", "\x85"]),
    max_size=12,
).map("".join)
leaf = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.integers(-3, 5000)
    | st.floats()
    | text
)
json_value = st.recursive(
    leaf,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(text, inner, max_size=4),
    max_leaves=12,
)
token_ids = st.lists(st.integers(-3, 5000), max_size=8)
message = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "assistant", "system"]), "content": text}
)
messages = st.lists(message, min_size=1, max_size=3)
ids = text | st.integers(-5, 5)
# Plausible values (mostly valid, often at the edges), so that lines get past the first check
# and reach the tokenizer, the chat template, the limits and the engine.
PLAUSIBLE = {
    "max_tokens": st.integers(-1, 70),
    "min_tokens": st.integers(-1, 5),
    "temperature": st.floats(-0.5, 3.0),
    "top_k": st.integers(-2, 50),
    "top_p": st.floats(0.0, 1.5),
    "min_p": st.floats(-0.5, 1.5),
    "seed": st.integers(-1, 2**64),
    "stop": text | st.lists(text, max_size=40),
    "stop_token_ids": st.lists(st.integers(-1, 5000), max_size=300),
    "ignore_eos": st.booleans(),
    "logprobs": st.integers(-1, 30),
    "prompt_logprobs": st.integers(-1, 30),
    "presence_penalty": st.floats(-3, 3),
    "frequency_penalty": st.floats(-3, 3),
    "repetition_penalty": st.floats(0, 3),
    "skip_special_tokens": st.booleans(),
    "n": st.integers(-1, 200),
    "top_logprobs": st.integers(-1, 30),
    "max_completion_tokens": st.integers(-1, 70),
    "model": text,
    "structured_outputs": st.sampled_from(
        [
            {"choice": ["a", "b"]},
            {"regex": "[a-z]{1,3}"},
            {"json_object": True},
            {"grammar": "root ::= root"},
            {"json": {"type": "integer", "multipleOf": 2}},
        ]
    )
    | st.dictionaries(st.sampled_from(["json", "regex", "choice", "x"]), text, max_size=2),
    "response_format": st.sampled_from([{"type": "json_object"}, {"type": "text"}, {"type": 3}]),
    "guided_choice": st.lists(text, max_size=3),
    "tools": st.lists(
        st.fixed_dictionaries(
            {"type": st.just("function"), "function": st.fixed_dictionaries({"name": text})}
        ),
        max_size=2,
    ),
    "tool_choice": st.sampled_from(["none", "auto", "required", {"type": "function"}]),
}


@st.composite
def request_fields(draw, names: list[str]) -> dict:
    """A few plausible fields and, one time in three, one field holding any JSON value."""
    fields = {
        name: draw(PLAUSIBLE[name])
        for name in draw(st.lists(st.sampled_from(names), max_size=3, unique=True))
    }
    if draw(st.integers(0, 2)) == 0:
        fields[draw(st.sampled_from([*names, "extra"]))] = draw(json_value)
    return fields


@st.composite
def plain_request(draw) -> dict:
    obj = {"id": draw(ids)} if draw(st.booleans()) else {}
    if draw(st.booleans()):
        obj["prompt"] = draw(text | token_ids)
    else:
        obj["messages"] = draw(messages)
    return {**obj, **draw(request_fields(list(SAMPLING_FIELDS)))}


@st.composite
def openai_request(draw) -> dict:
    chat = draw(st.booleans())
    url = "/v1/chat/completions" if chat else "/v1/completions"
    if chat:
        body = {"messages": draw(messages)}
        if draw(st.booleans()):
            body |= {"logprobs": True, "top_logprobs": draw(PLAUSIBLE["top_logprobs"])}
    else:
        body = {"prompt": draw(text | token_ids | st.lists(text | token_ids, max_size=3))}
        if draw(st.booleans()):
            body["logprobs"] = draw(PLAUSIBLE["logprobs"])
    body |= draw(
        request_fields(
            [f for f in PLAUSIBLE if f in _OPENAI_BODY["chat" if chat else "completion"]]
        )
    )
    obj = {"custom_id": draw(ids), "url": url, "body": body}
    if draw(st.integers(0, 3)) == 0:  # one top-level key holding anything
        obj[draw(st.sampled_from(["custom_id", "url", "method", "body", "extra"]))] = draw(
            json_value
        )
    return obj


def _not_after(obj) -> bool:
    """A fuzz line must not take the id of the good line after it (that line would then be
    the duplicate, rightly)."""
    return not (isinstance(obj, dict) and "after" in (obj.get("id"), obj.get("custom_id")))


json_line = (json_value | plain_request() | openai_request()).filter(_not_after).map(json.dumps)
byte_line = st.binary(max_size=300).map(lambda b: b.replace(b"\n", b" "))


@pytest.fixture(scope="module")
def fuzz_env(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    model = make_model_dir(root / "model", MISTRAL_STYLE)
    return root, model, load_tokenizer(model), itertools.count()


def _check(fuzz_env, monkeypatch, bad_lines: list) -> None:
    root, model, tokenizer, counter = fuzz_env
    monkeypatch.setattr(generate, "load_llm", lambda args: TokenizerFakeLLM(tokenizer, model))
    n = next(counter)
    lines = [GOOD_BEFORE, *bad_lines, GOOD_AFTER]
    inp = write_lines(root / f"in{n}.jsonl", lines)
    out = root / f"out{n}.jsonl"
    assert run(model, inp, out) in (0, 1)
    recs = records(out)
    assert len(recs) == len(lines), recs
    answers = [r for r in recs if r.get("error") is None]
    errors = [r for r in recs if r.get("error") is not None]
    by_id = {r.get("custom_id", r.get("id")): r for r in answers}
    assert by_id["before"]["text"] == expected_text(tokenizer, GOOD_BEFORE)
    assert by_id["after"]["text"] == expected_text(tokenizer, GOOD_AFTER)
    assert len({r["line"] for r in errors}) == len(errors)
    assert all(2 <= r["line"] <= len(bad_lines) + 1 for r in errors)
    for r in errors:
        err = r["error"]
        code, message = (err["code"], err["message"]) if isinstance(err, dict) else (r["code"], err)
        assert code in EXPECTED_CODES, message
        assert "\n" not in message and len(message) <= 500
        event(f"error line: {code}")  # --hypothesis-show-statistics: how deep the lines reach
    for _ in range(len(answers) - 2):
        event("a fuzz line was answered")
    before = out.read_bytes()
    assert run(model, inp, out, "--resume") in (0, 1)
    assert out.read_bytes() == before, "a resume found lines left to answer"


def fuzz_settings(examples: int) -> settings:
    return settings(
        max_examples=examples,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )


@fuzz_settings(600)
@given(st.lists(json_line, min_size=1, max_size=3))
def test_fuzz_json_lines(fuzz_env, monkeypatch, bad_lines):
    _check(fuzz_env, monkeypatch, bad_lines)


@fuzz_settings(300)
@given(st.lists(byte_line, min_size=1, max_size=3))
def test_fuzz_raw_bytes(fuzz_env, monkeypatch, bad_lines):
    _check(fuzz_env, monkeypatch, bad_lines)
