"""A context-free grammar without recursion, as the regular expression it is.

`structured_outputs.grammar` takes vLLM's two grammar notations: EBNF as llama.cpp's GBNF writes
it (`root ::= ...`, character classes `[a-z]`, repetition `{m,n}`, `#` comments) and Lark
(`start: ...`, `[optional]`, `"a".."z"` ranges, `/regex/` terminals, `//` comments). jaxpp
decodes under a finite automaton on the device (grammar.py), which a recursive rule (`value ::=
"[" value "]"`) cannot be: such a grammar is refused with one message naming the rule and its
cycle. Every other grammar is a regular language, and this module writes it as one regular
expression (in the syntax of the Rust `regex` crate that outlines-core compiles) by putting each
rule's body in place of its name.
"""

from __future__ import annotations

import dataclasses
import re

GBNF_ROOT, LARK_ROOT = "root", "start"
_META = set("\\.+*?()|[]{}^$#&-~")  # characters a Rust regex needs escaped


class GrammarError(ValueError):
    """The grammar cannot be used; the message names the rule or the position at fault."""


def escape(text: str) -> str:
    """`text` as a regex that matches it literally (Rust `regex` syntax)."""
    return "".join("\\" + c if c in _META else c for c in text)


def grammar_regex(text: str) -> str:
    """The regex of the language of `text`, an EBNF (GBNF) or Lark grammar."""
    lark = "::=" not in text
    rules = _Parser(text, lark).rules()
    root = LARK_ROOT if lark else GBNF_ROOT
    if root not in rules:
        names = ", ".join(sorted(rules)) or "none"
        raise GrammarError(f"grammar: no rule {root!r} to start from (rules: {names})")
    _check_no_recursion(rules, root)
    memo: dict[str, str] = {}

    def expand(name: str) -> str:
        if name not in memo:
            memo[name] = _emit(rules[name], expand, rules)
        return memo[name]

    return expand(root)


# --- the syntax tree ------------------------------------------------------------------------


@dataclasses.dataclass
class _Node:
    kind: str  # "alt", "seq", "lit", "class", "ref", "regex", "repeat"
    items: list = dataclasses.field(default_factory=list)  # alt/seq: nodes; repeat: [node]
    text: str = ""  # lit: the string; ref: the rule; regex/class: the regex
    low: int = 0  # repeat bounds (high -1: unbounded)
    high: int = -1


def _emit(node: _Node, expand, rules: dict) -> str:
    if node.kind == "lit":
        return escape(node.text)
    if node.kind in ("class", "regex"):
        return node.text
    if node.kind == "ref":
        if node.text not in rules:
            raise GrammarError(f"grammar: rule {node.text!r} is used but not defined")
        return f"({expand(node.text)})"
    if node.kind == "seq":
        return "".join(_emit(n, expand, rules) for n in node.items)
    if node.kind == "alt":
        return "(" + "|".join(_emit(n, expand, rules) for n in node.items) + ")"
    inner = f"({_emit(node.items[0], expand, rules)})"
    high = "" if node.high < 0 else str(node.high)
    return f"{inner}{{{node.low},{high}}}"


def _references(node: _Node) -> list[str]:
    if node.kind == "ref":
        return [node.text]
    return [name for item in node.items for name in _references(item)]


def _check_no_recursion(rules: dict[str, _Node], root: str) -> None:
    """A rule reachable from itself makes the language context-free, not regular: refused,
    naming the cycle."""
    done: set[str] = set()

    def visit(name: str, path: list[str]) -> None:
        if name in path:
            cycle = " -> ".join(path[path.index(name) :] + [name])
            raise GrammarError(
                f"grammar: rule {name!r} is recursive ({cycle}); jaxpp decodes under a finite "
                "automaton on the device and supports grammars without recursive rules "
                "(bound the nesting by writing each level as its own rule)"
            )
        if name in done or name not in rules:
            return
        for ref in _references(rules[name]):
            visit(ref, path + [name])
        done.add(name)

    visit(root, [])


# --- the parser -----------------------------------------------------------------------------

_TOKEN = re.compile(
    r"""
    (?P<space>\s+)
  | (?P<comment>\#[^\n]*|//[^\n]*)
  | (?P<define>::=|:)
  | (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')
  | (?P<regex>/(?:[^/\\\n]|\\.)+/[imsux]*)
  | (?P<cls>\[\^?(?:[^\]\\]|\\.)*\])
  | (?P<brace>\{\s*\d+\s*(?:,\s*\d*\s*)?\})
  | (?P<range>\.\.)
  | (?P<name>[A-Za-z_][A-Za-z0-9_.-]*)
  | (?P<count>\d+(?:\.\.\d+)?)
  | (?P<punct>[()|*+?!.\[\]~])
  | (?P<directive>%[a-z]+[^\n]*)
    """,
    re.VERBOSE,
)


class _Parser:
    def __init__(self, text: str, lark: bool):
        self.lark = lark
        self.tokens: list[tuple[str, str, int]] = []
        at = 0
        while at < len(text):
            m = _TOKEN.match(text, at)
            if m is None:
                raise GrammarError(f"grammar: cannot read {text[at : at + 20]!r} at {at}")
            kind = m.lastgroup
            value = m.group()
            if kind == "cls" and lark:  # Lark: [x] is an optional item, not a class
                self.tokens.append(("punct", "[", at))
                at += 1
                continue
            if kind == "directive":
                raise GrammarError(f"grammar: directive {value.split()[0]!r} is not supported")
            if kind not in ("space", "comment"):
                self.tokens.append((kind, value, at))
            at = m.end()
        self.at = 0

    def rules(self) -> dict[str, _Node]:
        rules: dict[str, _Node] = {}
        while self.at < len(self.tokens):
            if self._peek()[1] in ("?", "!") and self._peek(1)[0] == "name":
                self._next()  # Lark's inline (?) and keep-tokens (!) marks change no language
            kind, name, where = self._next()
            if kind != "name" or self._peek()[0] != "define":
                raise GrammarError(f"grammar: expected a rule definition at {where}, got {name!r}")
            self._next()
            if name in rules:
                raise GrammarError(f"grammar: rule {name!r} is defined twice")
            rules[name] = self._alternatives()
        return rules

    def _peek(self, ahead: int = 0) -> tuple[str, str, int]:
        i = self.at + ahead
        return self.tokens[i] if i < len(self.tokens) else ("end", "", -1)

    def _next(self) -> tuple[str, str, int]:
        token = self._peek()
        self.at += 1
        return token

    def _rule_starts(self) -> bool:
        ahead = 1 if self._peek()[1] in ("?", "!") else 0
        return self._peek(ahead)[0] == "name" and self._peek(ahead + 1)[0] == "define"

    def _alternatives(self) -> _Node:
        options = [self._sequence()]
        while self._peek()[1] == "|" and self._peek()[0] == "punct":
            self._next()
            options.append(self._sequence())
        return options[0] if len(options) == 1 else _Node("alt", options)

    def _sequence(self) -> _Node:
        items = []
        while True:
            kind, value, _ = self._peek()
            if kind == "end" or self._rule_starts() or value in ("|", ")", "]"):
                break
            items.append(self._repeated(self._atom()))
        return items[0] if len(items) == 1 else _Node("seq", items)

    def _repeated(self, node: _Node) -> _Node:
        while True:
            kind, value, where = self._peek()
            if kind == "punct" and value in "*+?":
                self._next()
                low, high = {"*": (0, -1), "+": (1, -1), "?": (0, 1)}[value]
            elif kind == "brace":
                self._next()
                low, high = _bounds(value[1:-1], where)
            elif kind == "punct" and value == "~" and self.lark:
                self._next()
                count_kind, count, at = self._next()
                if count_kind != "count":
                    raise GrammarError(f"grammar: '~' at {where} needs a count (3 or 2..5)")
                low, high = _bounds(count.replace("..", ","), at)
            else:
                return node
            node = _Node("repeat", [node], low=low, high=high)

    def _atom(self) -> _Node:
        kind, value, where = self._next()
        if kind == "string":
            text = _unquote(value, where)
            if self._peek()[0] == "range":  # Lark "a".."z"
                self._next()
                end = _unquote(self._next()[1], where)
                if len(text) != 1 or len(end) != 1:
                    raise GrammarError(f"grammar: a range at {where} needs single characters")
                return _Node("class", text=f"[{_code(text)}-{_code(end)}]")
            return _Node("lit", text=text)
        if kind == "cls":
            return _Node("class", text=_char_class(value, where))
        if kind == "regex":
            body, flags = value[1:].rsplit("/", 1)
            return _Node("regex", text=f"(?{flags}:{body})" if flags else f"({body})")
        if kind == "name":
            return _Node("ref", text=value)
        if kind == "punct" and value == ".":
            return _Node("class", text="(?s:.)")
        if kind == "punct" and value in "([":
            inner = self._alternatives()
            close = ")" if value == "(" else "]"
            if self._next()[1] != close:
                raise GrammarError(f"grammar: {value!r} at {where} is not closed")
            return inner if value == "(" else _Node("repeat", [inner], low=0, high=1)
        raise GrammarError(f"grammar: unexpected {value or 'end of grammar'!r} at {where}")


def _bounds(text: str, where: int) -> tuple[int, int]:
    parts = [p.strip() for p in text.split(",")]
    low = int(parts[0])
    high = low if len(parts) == 1 else (int(parts[1]) if parts[1] else -1)
    if high != -1 and high < low:
        raise GrammarError(f"grammar: repetition {{{text}}} at {where} has max < min")
    return low, high


_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\", '"': '"', "'": "'", "/": "/", "]": "]",
            "[": "[", "-": "-", "^": "^", "0": "\0"}  # fmt: skip


def _unescape(body: str, where: int) -> list[str]:
    """The characters of a literal's body, its escapes resolved."""
    out, i = [], 0
    while i < len(body):
        c = body[i]
        if c != "\\":
            out.append(c)
            i += 1
            continue
        nxt = body[i + 1 : i + 2]
        if nxt in ("x", "u", "U"):
            width = {"x": 2, "u": 4, "U": 8}[nxt]
            digits = body[i + 2 : i + 2 + width]
            if len(digits) != width or not all(d in "0123456789abcdefABCDEF" for d in digits):
                raise GrammarError(f"grammar: bad escape \\{nxt}{digits} at {where}")
            out.append(chr(int(digits, 16)))
            i += 2 + width
        elif nxt in _ESCAPES:
            out.append(_ESCAPES[nxt])
            i += 2
        else:
            raise GrammarError(f"grammar: unknown escape \\{nxt} at {where}")
    return out


def _unquote(token: str, where: int) -> str:
    return "".join(_unescape(token[1:-1], where))


def _code(c: str) -> str:
    return f"\\x{{{ord(c):X}}}"


def _char_class(token: str, where: int) -> str:
    """A GBNF class `[^a-z\\n]` as a Rust regex class, every character written by its code."""
    body = token[1:-1]
    negated = body.startswith("^")
    body = body[1:] if negated else body
    parts, i = [], 0
    # Split on unescaped '-' between two characters: resolve escapes one character at a time.
    chars: list[tuple[str, bool]] = []  # (character, is a literal '-' range marker)
    while i < len(body):
        if body[i] == "\\":
            step = {"x": 4, "u": 6, "U": 10}.get(body[i + 1 : i + 2], 2)
            chars.append((_unescape(body[i : i + step], where)[0], False))
            i += step
        else:
            chars.append((body[i], body[i] == "-"))
            i += 1
    j = 0
    while j < len(chars):
        c = chars[j][0]
        if j + 2 < len(chars) and chars[j + 1][1]:
            parts.append(f"{_code(c)}-{_code(chars[j + 2][0])}")
            j += 3
        else:
            parts.append(_code(c))
            j += 1
    if not parts:
        raise GrammarError(f"grammar: empty character class at {where}")
    return "[" + ("^" if negated else "") + "".join(parts) + "]"
