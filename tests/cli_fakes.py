"""A fake engine with a REAL tokenizer and the engine's own chat templating, for the bad-input
corpus and the fuzz test: every request-side failure (tokenizer, template, limits, parsing) is
the real one, and only generation is faked (instant, deterministic).

Generation: the completion of a prompt of n tokens is "<n>/<max_tokens>". A prompt holding the
text BOOM makes the whole call raise ValueError (the engine refusing one request), CRASH an
IndexError (the engine failing on one request), and EMPTYLP a completion whose logprobs are
malformed (so building its answer fails).
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import jaxpp
from jaxpp import cli
from jaxpp.outputs import CompletionOutput, Logprob, RequestOutput

GOOD_BEFORE = {"id": "before", "prompt": "def add(a, b):", "max_tokens": 3}
GOOD_AFTER = {"id": "after", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
# The neighbour after the bad line where the model's template cannot take GOOD_AFTER's chat.
GOOD_AFTER_PLAIN = {"id": "after", "prompt": "x = 1", "max_tokens": 2}

# A config.json the up-front checks read: vocabulary and positions of the fake engine.
FAKE_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 4096,
    "hidden_size": 8,
    "intermediate_size": 16,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "max_position_embeddings": 128,
    "bos_token_id": 0,
}


class TokenizerFakeLLM:
    def __init__(self, tokenizer, model_dir: Path, max_model_len: int = 64):
        self.tokenizer = tokenizer
        self.model_dir = model_dir
        self.max_model_len = max_model_len
        self.config = SimpleNamespace(vocab_size=4096, bos_token_id=0, eos_token_ids=(1,))
        self.calls: list[int] = []
        self.poison = {
            word: tokenizer.encode(word, add_special_tokens=False)
            for word in ("BOOM", "CRASH", "EMPTYLP")
        }

    def chat_prompt(self, messages):
        return jaxpp.LLM.chat_prompt(self, messages)

    def _has(self, prompt, word: str) -> bool:
        seq = self.poison[word]
        return any(prompt[i : i + len(seq)] == seq for i in range(len(prompt)))

    def generate(self, prompts, sampling_params, on_finish=None):
        self.calls.append(len(prompts))
        if any(self._has(p, "BOOM") for p in prompts):
            raise ValueError("engine says no")
        if any(self._has(p, "CRASH") for p in prompts):
            raise IndexError("engine tripped")
        outs = []
        for i, (p, sp) in enumerate(zip(prompts, sampling_params, strict=True)):
            ids = [7] * min(sp.max_tokens, 2)
            logprobs = None
            if sp.logprobs is not None:
                entry = {} if self._has(p, "EMPTYLP") else {7: Logprob(-0.5, 1, "x")}
                logprobs = [dict(entry) for _ in ids]
            c = CompletionOutput(0, f"{len(p)}/{sp.max_tokens}", ids, "length", logprobs=logprobs)
            out = RequestOutput(str(i), None, list(p), [c])
            outs.append(out)
            if on_finish is not None:
                on_finish(i, out)
        return outs


def make_model_dir(path: Path, chat_template: str | None) -> Path:
    """A model dir the up-front checks accept: config.json and the demo tokenizer's files."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(FAKE_CONFIG))
    (path / "tokenizer.json").write_bytes((jaxpp.DEMO_MODEL / "tokenizer.json").read_bytes())
    tok_config = json.loads((jaxpp.DEMO_MODEL / "tokenizer_config.json").read_text())
    tok_config.pop("chat_template", None)
    if chat_template is not None:
        tok_config["chat_template"] = chat_template
    (path / "tokenizer_config.json").write_text(json.dumps(tok_config))
    return path


def load_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))


def write_lines(path: Path, lines: list) -> Path:
    """Each item: a dict (dumped as JSON) or str/bytes written verbatim, one per line."""
    chunks = []
    for item in lines:
        if isinstance(item, dict):
            item = json.dumps(item)
        chunks.append(item.encode("utf-8", "surrogatepass") if isinstance(item, str) else item)
    path.write_bytes(b"\n".join(chunks) + b"\n")
    return path


def records(path: Path) -> list[dict]:
    data = path.read_bytes()
    assert data == b"" or data.endswith(b"\n"), "torn last line"
    return [json.loads(line) for line in data.decode("utf-8").splitlines()]


def run(model_dir: Path, inp: Path, out: Path, *extra: str) -> int:
    argv = ["generate", "--model", str(model_dir), "-i", str(inp), "-o", str(out), "--quiet"]
    return cli.main([*argv, "--batch-size", "16", *extra])


def expected_text(tokenizer, line: dict) -> str:
    """What the fake engine answers a good plain or chat line."""
    if "messages" in line:
        text = tokenizer.apply_chat_template(
            line["messages"], tokenize=False, add_generation_prompt=True
        )
        n = len(tokenizer.encode(text, add_special_tokens=False))
    else:
        n = len(tokenizer.encode(line["prompt"]))
    return f"{n}/{line['max_tokens']}"
