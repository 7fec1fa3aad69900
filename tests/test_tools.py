"""Structured outputs and tool calling as clients send them: vLLM's request fields (parsed and
refused by name), the tool-call parsers, and `jaxpp serve` driven by the official `openai`
client: json_schema / json_object answers validate, guided_* and structured_outputs constrain
completions, tool_choice required / named / auto give OpenAI tool_calls, streamed too."""

import json
from types import SimpleNamespace

import jsonschema
import openai
import pytest
from test_serve import _Served
from transformers import AutoTokenizer

import jaxpp
from jaxpp.cli import structured, tools
from jaxpp.cli.app import build_parser
from jaxpp.cli.errors import RequestError
from jaxpp.cli.formats import RequestBuilder
from jaxpp.cli.limits import Limits
from jaxpp.cli.serve import prepare
from jaxpp.grammar import Compiler, VocabLayout

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "the forecast",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "enum": ["Paris", "Oslo"]},
                "days": {"type": "integer", "minimum": 1, "maximum": 9},
            },
            "required": ["city", "days"],
            "additionalProperties": False,
        },
    },
}
NOOP = {"type": "function", "function": {"name": "noop"}}
PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 6}, "ok": {"type": "boolean"}},
    "required": ["name", "ok"],
    "additionalProperties": False,
}


# --- request fields -> constraint -----------------------------------------------------------


@pytest.mark.parametrize(
    "body,kind",
    [
        ({"response_format": {"type": "json_object"}}, "json_object"),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "p", "schema": PERSON},
                }
            },
            "json",
        ),
        ({"structured_outputs": {"regex": "a+"}}, "regex"),
        ({"structured_outputs": {"choice": ["x"], "disable_any_whitespace": True}}, "choice"),
        ({"guided_json": PERSON, "guided_whitespace_pattern": " *"}, "json"),
        ({"guided_regex": "a+", "guided_decoding_backend": "xgrammar"}, "regex"),
        ({"guided_choice": ["a", "b"]}, "choice"),
        ({"guided_grammar": 'root ::= "a"'}, "grammar"),
    ],  # fmt: skip
)
def test_vllm_fields_give_one_constraint(body, kind):
    assert structured.from_body(body).kind == kind
    assert structured.from_body({"response_format": {"type": "text"}}) is None


@pytest.mark.parametrize(
    "body,message",
    [
        (
            {"response_format": {"type": "json_object"}, "guided_regex": "a"},
            "response_format and guided_regex both constrain the output",
        ),
        ({"guided_regex": "a", "guided_choice": ["b"]}, "give one of guided_json"),
        ({"response_format": {"type": "structural_tag"}}, "type 'structural_tag' is not supported"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
            "needs {'json_schema': {'name'",
        ),
        ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "exactly one of"),
        ({"structured_outputs": {"ebnf": "x"}}, r"structured_outputs.ebnf is not supported"),
    ],  # fmt: skip
)
def test_bad_constraint_fields_are_named(body, message):
    with pytest.raises(RequestError, match=message):
        structured.from_body(body)


def test_tool_choice_rules():
    assert tools.from_body({"tools": [WEATHER]}, "hermes").mode == "auto"  # vLLM's default
    assert tools.from_body({"tools": [], "tool_choice": "required"}, None).mode == "none"
    named = tools.from_body(
        {"tools": [WEATHER, NOOP], "tool_choice": {"type": "function",
         "function": {"name": "get_weather"}}}, None)  # fmt: skip
    assert named.constraint() == {"json": WEATHER["function"]["parameters"]}
    required = tools.from_body({"tools": [WEATHER], "parallel_tool_calls": False,
                                "tool_choice": "required"}, None)  # fmt: skip
    schema = required.constraint()["json"]
    jsonschema.validate([{"name": "get_weather", "parameters": {"city": "Oslo", "days": 2}}],
                        schema)  # fmt: skip
    for wrong in ([], [{"name": "noop", "parameters": {}}], [{"name": "get_weather",
                  "parameters": {"city": "Oslo", "days": 2}}] * 2):  # fmt: skip
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(wrong, schema)
    for body, message in [
        ({"tools": [WEATHER]}, '"auto" tool choice needs the server started with'),
        ({"tool_choice": "auto"}, "tool_choice needs tools"),
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "x"}}},
         "names 'x', which is not in tools"),
        ({"tools": [{"type": "function"}]}, r"tools\[0\] must be"),
        ({"tools": [WEATHER, WEATHER], "tool_choice": "none"}, "must be unique"),
    ]:  # fmt: skip
        with pytest.raises(RequestError, match=message):
            tools.from_body(body, None)


@pytest.mark.parametrize(
    "parser,text,calls,content",
    [
        (
            "hermes",
            'Sure.<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>'
            '<tool_call>{"name": "g", "arguments": {}}',
            [("f", '{"a": 1}'), ("g", "{}")],
            "Sure.",
        ),
        (
            "hermes",
            '<tool_call>{"name": "f", "arguments": {"a": "é"}}</tool_call>',
            [("f", '{"a": "é"}')],
            None,
        ),
        ("hermes", "<tool_call>{broken</tool_call>", [], "<tool_call>{broken</tool_call>"),
        ("hermes", "no calls", [], "no calls"),
        (
            "llama3_json",
            '<|python_tag|>{"name": "f", "parameters": {"a": 1}}; {"name": "g", '
            '"arguments": {"b": 2}}',
            [("f", '{"a": 1}'), ("g", '{"b": 2}')],
            None,
        ),
        ("llama3_json", "It is sunny.", [], "It is sunny."),
        ("llama3_json", '{"name": "f"}', [], '{"name": "f"}'),
    ],  # fmt: skip
)
def test_auto_parsers(parser, text, calls, content):
    calling = tools.ToolCalling("auto", ({"name": "f"}, {"name": "g"}), parser=parser)
    message, finish = tools.reply(calling, text, "stop")
    got = [(c["function"]["name"], c["function"]["arguments"]) for c in message["tool_calls"]]
    assert got == calls and message["content"] == content
    assert finish == ("tool_calls" if calls else "stop")
    assert tools.reply(calling, text, "length")[1] == "length"  # vLLM 0.34's rule


# --- the server, through the openai client --------------------------------------------------


@pytest.fixture(scope="module")
def client():
    args = build_parser().parse_args(
        # A small token budget: warm-up compiles 2 forward buckets, not 8.
        ["serve", "--max-num-seqs", "8", "--kv-cache-memory", str(32 << 20),
         "--max-num-batched-tokens", "32", "--tool-call-parser", "hermes"]
    )  # fmt: skip
    prepared = prepare(args)
    prepared.loop.start()
    server = _Served(prepared.app)
    yield openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
    server.stop()
    prepared.loop.drain(grace=0.0)


def _chat(client, **kw):
    messages = [{"role": "user", "content": "the weather?"}]
    return client.chat.completions.create(model="demo_model", messages=messages, **kw)


def test_response_format_answers_validate(client):
    """Seeded samples at temperature 1: each one that finished parses and validates."""
    finished = 0
    for seed in range(6):
        schema = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
        r = _chat(client, max_tokens=40, temperature=1.0, seed=seed, response_format=schema)
        choice = r.choices[0]
        if choice.finish_reason == "stop":
            jsonschema.validate(json.loads(choice.message.content), PERSON)
            finished += 1
    assert finished >= 3
    r = _chat(client, max_tokens=60, temperature=0.0, response_format={"type": "json_object"})
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].message.content), dict)


def test_completions_take_vllm_extra_fields(client):
    def text(**extra):
        r = client.completions.create(model="demo_model", prompt="import", max_tokens=16,
                                      temperature=1.0, seed=1, extra_body=extra)  # fmt: skip
        assert r.choices[0].finish_reason == "stop"
        return r.choices[0].text

    assert text(guided_choice=["alpha", "beta"]) in ("alpha", "beta")
    assert text(structured_outputs={"choice": ["up", "down"]}) in ("up", "down")
    assert text(guided_regex="[a-z]{2}-[0-9]")[2] == "-"
    assert text(guided_grammar='root ::= "x" [0-9] ("," "y")?') in [
        f"x{d}{y}" for d in range(10) for y in ("", ",y")
    ]
    with pytest.raises(openai.BadRequestError, match="rule 'root' is recursive"):
        text(guided_grammar='root ::= "(" root ")" | "x"')


def test_tool_choice_required_and_named_give_valid_calls(client):
    parameters = WEATHER["function"]["parameters"]
    r = _chat(client, max_tokens=60, tools=[WEATHER, NOOP], tool_choice="required",
              parallel_tool_calls=False, temperature=1.0, seed=2)  # fmt: skip
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
    for call in choice.message.tool_calls:
        assert call.id.startswith("chatcmpl-tool-") and call.type == "function"
        if call.function.name == "get_weather":
            jsonschema.validate(json.loads(call.function.arguments), parameters)
    named = {"type": "function", "function": {"name": "get_weather"}}
    r = _chat(client, max_tokens=60, tools=[WEATHER, NOOP], tool_choice=named)
    choice = r.choices[0]
    assert choice.finish_reason == "stop"  # forced by name: the engine's reason
    [call] = choice.message.tool_calls
    assert call.function.name == "get_weather" and choice.message.content == ""
    jsonschema.validate(json.loads(call.function.arguments), parameters)


def test_auto_and_none_answer_in_text(client):
    r = _chat(client, max_tokens=8, tools=[WEATHER])  # auto: the demo model calls nothing
    assert r.choices[0].message.tool_calls == [] and r.choices[0].message.content
    r = _chat(client, max_tokens=8, tools=[WEATHER], tool_choice="none")
    assert r.choices[0].message.tool_calls is None and r.choices[0].message.content


def test_streamed_tool_calls(client):
    named = {"type": "function", "function": {"name": "get_weather"}}
    stream = _chat(client, max_tokens=60, tools=[WEATHER], tool_choice=named, stream=True)
    deltas = [c.choices[0].delta for c in stream if c.choices]
    [call] = [call for d in deltas for call in d.tool_calls or []]
    assert call.index == 0 and call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])


def test_jsonl_lines_carry_the_constraint():
    """A plain line's structured_outputs and an OpenAI batch line's tools reach SamplingParams
    (compiled, so that a refused constraint is the line's error)."""
    tokenizer = AutoTokenizer.from_pretrained(str(jaxpp.DEMO_MODEL))
    llm = SimpleNamespace(
        tokenizer=tokenizer, config=SimpleNamespace(vocab_size=4096), max_model_len=1024,
        grammar_compiler=Compiler(tokenizer, VocabLayout(4096, 1, 4096)),
        chat_prompt=lambda messages, tools=None: jaxpp.LLM.chat_prompt(llm, messages, tools),
    )  # fmt: skip
    builder = RequestBuilder(llm, {}, 0, "demo", Limits())
    job = builder.plain({"prompt": "x", "structured_outputs": {"choice": ["a", "b"]}}, 1, "p")
    assert job.seqs[0].params.structured_outputs.choice == ("a", "b")
    with pytest.raises(RequestError, match="rule 'root' is recursive"):
        builder.plain({"prompt": "x", "structured_outputs": {"grammar": "root ::= root"}}, 2, "q")
    line = {"custom_id": "t", "url": "/v1/chat/completions", "body": {
        "messages": [{"role": "user", "content": "hi"}], "tools": [WEATHER, NOOP],
        "tool_choice": {"type": "function", "function": {"name": "noop"}}}}  # fmt: skip
    job = builder.openai(line, 3, "t")
    assert job.tools.mode == "named"
    assert json.loads(job.seqs[0].params.structured_outputs.json) == {
        "type": "object", "properties": {}}  # fmt: skip
