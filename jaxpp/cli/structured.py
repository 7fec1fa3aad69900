"""A request's structured-output fields, as vLLM names them, -> one StructuredOutputsParams.

    response_format     {"type": "json_object"} | {"type": "json_schema", "json_schema":
                        {"name", "schema", "strict"?}} | {"type": "text"}  (OpenAI's field)
    structured_outputs  {"json" | "regex" | "choice" | "grammar" | "json_object", options}
                        (vLLM's extra field; a plain JSONL line's too)
    guided_json, guided_regex, guided_choice, guided_grammar, guided_whitespace_pattern,
    guided_decoding_backend   (vLLM's older extra fields, still sent by many clients)

A request gives at most one constraint; two (say response_format and guided_json) are refused
rather than one silently winning. The grammar engine itself (and what each kind supports) is
jaxpp/grammar.py.
"""

from __future__ import annotations

from typing import Any

from jaxpp.cli.errors import RequestError, short_repr

LEGACY = {
    "guided_json": "json",
    "guided_regex": "regex",
    "guided_choice": "choice",
    "guided_grammar": "grammar",
}
# Fields that only qualify a constraint: guided_decoding_backend names vLLM's engine (jaxpp has
# one), guided_whitespace_pattern is structured_outputs.whitespace_pattern.
LEGACY_OPTIONS = ("guided_whitespace_pattern", "guided_decoding_backend")
BODY_FIELDS = ("response_format", "structured_outputs", *LEGACY, *LEGACY_OPTIONS)
_OPTIONS = ("disable_any_whitespace", "whitespace_pattern")
_KINDS = ("json", "regex", "choice", "grammar", "json_object")


def from_body(body: dict) -> Any:
    """The StructuredOutputsParams a request body asks for, or None."""
    from jaxpp.config import StructuredOutputsParams  # noqa: PLC0415

    found: list[tuple[str, dict]] = []
    if body.get("response_format") is not None:
        spec = _response_format(body["response_format"])
        if spec is not None:
            found.append(("response_format", spec))
    if body.get("structured_outputs") is not None:
        found.append(("structured_outputs", _structured(body["structured_outputs"])))
    legacy = {kind: body[name] for name, kind in LEGACY.items() if body.get(name) is not None}
    if len(legacy) > 1:
        raise RequestError(f"give one of {', '.join(LEGACY)}, not several")
    if legacy:
        name = next(n for n, kind in LEGACY.items() if kind in legacy)
        spec = dict(legacy)
        if body.get("guided_whitespace_pattern") is not None:
            spec["whitespace_pattern"] = body["guided_whitespace_pattern"]
        found.append((name, spec))
    if len(found) > 1:
        raise RequestError(
            f"{found[0][0]} and {found[1][0]} both constrain the output: give one of them"
        )
    if not found:
        return None
    name, spec = found[0]
    try:
        return StructuredOutputsParams(**spec)
    except (ValueError, TypeError) as e:
        raise RequestError(f"{name}: {e}") from None


def _response_format(value: Any) -> dict | None:
    if not isinstance(value, dict) or not isinstance(value.get("type"), str):
        raise RequestError(
            f"response_format must be an object with a 'type', got {short_repr(value)}"
        )
    kind = value["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return {"json_object": True}
    if kind == "json_schema":
        spec = value.get("json_schema")
        schema = spec.get("schema", spec.get("json_schema")) if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise RequestError(
                "response_format json_schema needs {'json_schema': {'name': ..., 'schema': "
                f"{{...}}}}, got {short_repr(spec)}"
            )
        return {"json": schema}
    raise RequestError(
        f"response_format type {short_repr(kind)} is not supported (json_object, json_schema, text)"
    )


def _structured(value: Any) -> dict:
    if not isinstance(value, dict):
        raise RequestError(f"structured_outputs must be an object, got {short_repr(value)}")
    unknown = sorted(set(value) - set(_KINDS) - set(_OPTIONS))
    if unknown:
        raise RequestError(
            f"structured_outputs.{unknown[0]} is not supported (one of {', '.join(_KINDS)}, "
            f"with {', '.join(_OPTIONS)})"
        )
    return {k: v for k, v in value.items() if v is not None}
