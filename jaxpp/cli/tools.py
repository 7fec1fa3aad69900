"""Tool calling on /v1/chat/completions, as vLLM does it: `tools` + `tool_choice` in, OpenAI
`tool_calls` out (each call's `arguments` a JSON string).

    tool_choice "none"       the model answers in text (the tools still reach the chat template)
    "required"               the output is constrained (grammar.py) to a JSON array of one or
                             more {"name": <a tool>, "parameters": <its schema>} objects, each
                             a tool call; vLLM builds the same schema
    {"type": "function", "function": {"name": N}}
                             the output is constrained to N's parameters schema: one call of N
    "auto"                   free text, parsed afterwards in the model family's own tool-call
                             format, chosen by `--tool-call-parser`:
                               hermes       <tool_call>{"name": ..., "arguments": {...}}</tool_call>
                                            (Hermes, Qwen2/2.5/3 templates)
                               llama3_json  [<|python_tag|>]{"name": ..., "parameters": {...}}
                                            [; {...}] (Llama 3.1+ JSON tool calls)

tool_choice defaults to "auto" when tools are given (else "none"), and "required" with no tools
is "none" (vLLM's rules). finish_reason is vLLM 0.34's: "tool_calls" when calls were made, the
engine stopped on its own ("stop") and the tool was not forced by name; otherwise the engine's.
"""

from __future__ import annotations

import dataclasses
import json
import re
import uuid
from typing import Any

from jaxpp.cli.errors import RequestError, short_repr

PARSERS = ("hermes", "llama3_json")
BODY_FIELDS = ("tools", "tool_choice", "parallel_tool_calls")
_EMPTY_PARAMETERS = {"type": "object", "properties": {}}


@dataclasses.dataclass(frozen=True)
class ToolCalling:
    """How one chat request calls tools."""

    mode: str  # "none" | "auto" | "required" | "named"
    tools: tuple[dict, ...]  # the functions: {"name", "description"?, "parameters"?}
    name: str | None = None  # the forced function ("named")
    parser: str | None = None  # "auto": the tool-call format to read
    parallel: bool = True  # "required": more than one call allowed

    def template_tools(self) -> list[dict] | None:
        """The tools as HF chat templates take them (OpenAI's shape)."""
        return [{"type": "function", "function": t} for t in self.tools] or None

    def constraint(self) -> dict | None:
        """The structured_outputs spec that guarantees the calls ("required", "named")."""
        if self.mode == "named":
            return {"json": _parameters(self._tool(self.name))}
        if self.mode != "required":
            return None
        calls = {
            "type": "array",
            "minItems": 1,
            "items": {
                "anyOf": [
                    {
                        "type": "object",
                        "properties": {
                            "name": {"type": "string", "enum": [t["name"]]},
                            "parameters": _parameters(t),
                        },
                        "required": ["name", "parameters"],
                        "additionalProperties": False,
                    }
                    for t in self.tools
                ]
            },
        }
        if not self.parallel:
            calls["maxItems"] = 1
        return {"json": calls}

    def _tool(self, name: str) -> dict:
        return next(t for t in self.tools if t["name"] == name)


def from_body(body: dict, parser: str | None) -> ToolCalling | None:
    """The request's tool calling, or None when it has no tools and no tool_choice."""
    tools, choice = body.get("tools"), body.get("tool_choice")
    if tools is None and choice is None:
        return None
    functions = tuple(_function(i, t) for i, t in enumerate(_list(tools)))
    names = [f["name"] for f in functions]
    if len(set(names)) != len(names):
        raise RequestError(f"tools: function names must be unique, got {names}")
    parallel = body.get("parallel_tool_calls", True)
    if not isinstance(parallel, bool | None):
        raise RequestError(f"parallel_tool_calls must be a boolean, got {short_repr(parallel)}")
    if choice is None:
        choice = "auto" if functions else "none"
    if choice not in ("none", "auto", "required") and not isinstance(choice, dict):
        raise RequestError(
            "tool_choice must be 'none', 'auto', 'required' or {'type': 'function', "
            f"'function': {{'name': ...}}}}, got {short_repr(choice)}"
        )
    if choice != "none" and not functions:
        if choice == "required":
            choice = "none"
        else:
            raise RequestError("tool_choice needs tools: give the functions in 'tools'")
    calling = ToolCalling("none", functions, parallel=parallel is not False)
    if choice == "auto":
        if parser is None:
            raise RequestError(
                '"auto" tool choice needs the server started with --tool-call-parser '
                f"({' or '.join(PARSERS)})"
            )
        return dataclasses.replace(calling, mode="auto", parser=parser)
    if choice == "required":
        return dataclasses.replace(calling, mode="required")
    if isinstance(choice, dict):
        fn = choice.get("function")
        name = fn.get("name") if isinstance(fn, dict) else None
        if choice.get("type") != "function" or not isinstance(name, str):
            raise RequestError(
                "tool_choice must be {'type': 'function', 'function': {'name': ...}}, got "
                f"{short_repr(choice)}"
            )
        if name not in names:
            raise RequestError(f"tool_choice names {name!r}, which is not in tools ({names})")
        return dataclasses.replace(calling, mode="named", name=name)
    return calling


def _list(tools: Any) -> list:
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise RequestError(f"tools must be a list of functions, got {short_repr(tools)}")
    return tools


def _function(index: int, tool: Any) -> dict:
    fn = tool.get("function") if isinstance(tool, dict) else None
    if (
        not isinstance(tool, dict)
        or tool.get("type", "function") != "function"
        or not (isinstance(fn, dict) and isinstance(fn.get("name"), str) and fn["name"])
    ):
        raise RequestError(
            f"tools[{index}] must be {{'type': 'function', 'function': {{'name': str, "
            f"'parameters': {{...}}}}}}, got {short_repr(tool)}"
        )
    if not isinstance(fn.get("parameters", {}), dict | None):
        raise RequestError(f"tools[{index}].function.parameters must be a JSON schema object")
    if not isinstance(fn.get("description", ""), str | None):
        raise RequestError(f"tools[{index}].function.description must be a string")
    return {k: fn[k] for k in ("name", "description", "parameters") if fn.get(k) is not None}


def _parameters(tool: dict) -> dict:
    return tool.get("parameters") or _EMPTY_PARAMETERS


def template_message(index: int, message: dict) -> dict:
    """A chat message as chat templates take it: an assistant's earlier tool calls with their
    arguments as objects (clients send the JSON strings OpenAI returned) and its content ""
    when it had none."""
    calls = message.get("tool_calls")
    if calls is None:
        return message
    if not isinstance(calls, list) or not all(
        isinstance(c, dict) and isinstance(c.get("function"), dict) for c in calls
    ):
        raise RequestError(
            f"message {index}: tool_calls must be a list of {{'function': {{'name', "
            f"'arguments'}}}}, got {short_repr(calls)}"
        )
    parsed = []
    for call in calls:
        fn = dict(call["function"])
        if isinstance(fn.get("arguments"), str):
            try:
                fn["arguments"] = json.loads(fn["arguments"])
            except ValueError:
                pass  # the template gets the text as it came
        parsed.append({**call, "function": fn})
    content = message.get("content")
    return {**message, "tool_calls": parsed, "content": "" if content is None else content}


# --- answers ---------------------------------------------------------------------------------


def reply(calling: ToolCalling, text: str, finish_reason: str) -> tuple[dict, str]:
    """The chat `message` of a completion and its finish_reason (module docstring)."""
    calls: list[tuple[str, Any]] = []
    content: str | None = text
    if calling.mode == "named":
        calls, content = _arguments_of(calling.name, text), ""
    elif calling.mode == "required":
        calls = _required_calls(text)
        content = "" if calls else text
    elif calling.mode == "auto":
        parse = _hermes if calling.parser == "hermes" else _llama3_json
        calls, content = parse(text)
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if calls:
        message["tool_calls"] = [
            {
                "id": f"chatcmpl-tool-{uuid.uuid4().hex}",
                "type": "function",
                "function": {"name": name, "arguments": arguments},
            }
            for name, arguments in calls
        ]
    elif calling.mode != "none":
        message["tool_calls"] = []
    made = bool(calls) and finish_reason == "stop" and calling.mode != "named"
    return message, "tool_calls" if made else finish_reason


def stream_delta(calling: ToolCalling, text: str, finish_reason: str) -> tuple[dict, str]:
    """The one streamed `delta` of a tool-calling answer (its calls with their index, as
    OpenAI's DeltaToolCall) and its finish_reason."""
    message, finish = reply(calling, text, finish_reason)
    delta: dict[str, Any] = {"content": message["content"]}
    if message.get("tool_calls"):
        delta["tool_calls"] = [{"index": i, **call} for i, call in enumerate(message["tool_calls"])]
    return delta, finish


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def _arguments_of(name: str, text: str) -> list[tuple[str, str]]:
    """Named: the whole output is the arguments (cut by max_tokens it is passed on as it is,
    as vLLM does: finish_reason "length" says so)."""
    try:
        return [(name, _dumps(json.loads(text)))]
    except ValueError:
        return [(name, text)]


def _required_calls(text: str) -> list[tuple[str, str]]:
    try:
        calls = json.loads(text)
    except ValueError:
        return []  # cut by max_tokens: no complete call (the text stays the content)
    return [(c["name"], _dumps(c["parameters"])) for c in calls]


_HERMES = re.compile(r"<tool_call>(.*?)</tool_call>|<tool_call>(.*)", re.DOTALL)


def _hermes(text: str) -> tuple[list[tuple[str, str]], str | None]:
    """Hermes / Qwen: JSON objects between <tool_call> tags; content is the text before the
    first tag (None when empty). Any call that is not valid JSON leaves the whole text as
    content, with no calls."""
    if "<tool_call>" not in text:
        return [], text
    try:
        bodies = [json.loads(a or b) for a, b in _HERMES.findall(text)]
        calls = [(c["name"], _dumps(c.get("arguments", {}))) for c in bodies]
    except (ValueError, KeyError, TypeError):
        return [], text
    before = text[: text.find("<tool_call>")]
    return calls, before if before.strip() else None


def _llama3_json(text: str) -> tuple[list[tuple[str, str]], str | None]:
    """Llama 3.x: an optional <|python_tag|>, then JSON objects separated by ';', each
    {"name", "parameters" (or "arguments")}; content None when calls were read."""
    body = text.strip().removeprefix("<|python_tag|>").strip()
    if not body.startswith("{"):
        return [], text
    decoder = json.JSONDecoder()
    calls, at = [], 0
    try:
        while at < len(body):
            obj, at = decoder.raw_decode(body, at)
            arguments = obj["arguments"] if "arguments" in obj else obj["parameters"]
            calls.append((obj["name"], _dumps(arguments)))
            at = len(body) - len(body[at:].lstrip().removeprefix(";").lstrip())
    except (ValueError, KeyError, TypeError):
        return [], text
    return calls, None
