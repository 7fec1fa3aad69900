"""Fake engines for the CLI tests: the engine's serving API (add_request / step / abort_request,
and generate for the isolation fallback) over instant, deterministic generation.

`FakeEngine` is that API, shared by the fakes here and in test_cli.py; `TokenizerFakeLLM` adds a
REAL tokenizer and the engine's own chat templating, for the bad-input corpus and the fuzz test:
every request-side failure (tokenizer, template, limits, parsing) is the real one, and only
generation is faked.

TokenizerFakeLLM's completion of a prompt of n tokens is "<n>/<max_tokens>"; a prompt holding
EMPTYLP gets a completion whose logprobs are malformed (so building its answer fails).
"""

from __future__ import annotations

import abc
import json
from pathlib import Path
from types import SimpleNamespace

import jaxpp
from jaxpp import SamplingParams, cli
from jaxpp.grammar import Compiler, VocabLayout
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


class FakeEngine(abc.ABC):
    """The serving API of `jaxpp.LLM`, over fake generation. `step()` first admits waiting
    requests into the free slots of `max_num_seqs` (first come, first served), then moves every
    running request on by one token. A request runs for as many steps as the tokens the real
    engine budgets for it (max_tokens, capped by max_model_len), so requests finish in order of
    their max_tokens, not of arrival, and slots refill as they do.

    Poison words in a prompt, as the real engine fails: BOOM makes `add_request` refuse it
    (ValueError, nothing queued), the way the engine refuses a bad prompt; CRASH makes `step()`
    raise IndexError while it runs, an engine failure that only isolation can pin on it.

    Subclasses give the tokenizer the poison words are found with, and `complete`: what a
    finished request's completion holds.
    """

    def __init__(self, tokenizer, max_model_len: int, max_num_seqs: int = 4):
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.max_num_seqs = max_num_seqs
        self.prompts: list[list[int]] = []  # every request's prompt; its index is its id
        self.finished: list[str] = []  # request ids, in the order step() returned them
        self.generate_calls: list[list[list[int]]] = []  # the prompts of each generate call
        self.steps = 0
        self._words: dict[str, list[int]] = {}  # word -> its tokens
        self._params: dict[str, SamplingParams] = {}  # unfinished requests
        self._waiting: list[str] = []
        self._running: dict[str, int] = {}  # request id -> steps left

    @abc.abstractmethod
    def complete(self, prompt: list[int], params: SamplingParams) -> CompletionOutput:
        """The completion of a finished request."""

    def has(self, prompt: list[int], word: str) -> bool:
        """Whether `prompt` holds the tokens of `word`."""
        if word not in self._words:
            self._words[word] = self.tokenizer.encode(word, add_special_tokens=False)
        seq = self._words[word]
        return any(prompt[i : i + len(seq)] == seq for i in range(len(prompt)))

    def _check(self, prompt: list[int]) -> None:
        if self.has(prompt, "BOOM"):
            raise ValueError("engine says no")

    def add_request(self, prompt: list[int], sampling_params: SamplingParams) -> str:
        self._check(list(prompt))
        request_id = str(len(self.prompts))
        self.prompts.append(list(prompt))
        self._params[request_id] = sampling_params
        self._waiting.append(request_id)
        return request_id

    def abort_request(self, request_id: str) -> None:
        self._params.pop(request_id, None)
        self._running.pop(request_id, None)
        if request_id in self._waiting:
            self._waiting.remove(request_id)

    @property
    def num_waiting_requests(self) -> int:
        return len(self._waiting)

    def has_unfinished_requests(self) -> bool:
        return bool(self._params)

    def step(self) -> list[RequestOutput]:
        self.steps += 1
        while self._waiting and len(self._running) < self.max_num_seqs:
            request_id = self._waiting.pop(0)
            prompt = self.prompts[int(request_id)]
            budget = self.max_model_len - len(prompt) + 1
            self._running[request_id] = min(self._params[request_id].max_tokens, budget)
        if any(self.has(self.prompts[int(r)], "CRASH") for r in self._running):
            raise IndexError("engine tripped")
        outputs = []
        for request_id in list(self._running):
            self._running[request_id] -= 1
            if self._running[request_id] > 0:
                continue
            del self._running[request_id]
            prompt = self.prompts[int(request_id)]
            completion = self.complete(prompt, self._params.pop(request_id))
            outputs.append(RequestOutput(request_id, None, prompt, [completion]))
            self.finished.append(request_id)
        return outputs

    def generate(self, prompts, sampling_params, on_finish=None) -> list[RequestOutput]:
        """As LLM.generate: refuse any bad prompt before queueing, step until these requests are
        done, and on an exception withdraw the unfinished ones and re-raise."""
        assert not self._params, "the CLI runs generate only with nothing else in the engine"
        self.generate_calls.append([list(p) for p in prompts])
        for p in prompts:
            self._check(list(p))
        ids: list[str] = []
        done: dict[str, RequestOutput] = {}
        try:
            for p, sp in zip(prompts, sampling_params, strict=True):
                ids.append(self.add_request(p, sp))
            index = {request_id: i for i, request_id in enumerate(ids)}
            while len(done) < len(ids):
                for out in self.step():
                    done[out.request_id] = out
                    if on_finish is not None:
                        on_finish(index[out.request_id], out)
        except BaseException:
            for request_id in ids:
                self.abort_request(request_id)
            raise
        return [done[request_id] for request_id in ids]


class TokenizerFakeLLM(FakeEngine):
    def __init__(self, tokenizer, model_dir: Path, max_model_len: int = 64):
        super().__init__(tokenizer, max_model_len)
        self.model_dir = model_dir
        self.config = SimpleNamespace(vocab_size=4096, bos_token_id=0, eos_token_ids=(1,))
        # Structured outputs are compiled (and refused) as the engine does; `complete` ignores
        # them.
        self.grammar_compiler = Compiler(tokenizer, VocabLayout(4096, 1, 4096))

    def chat_prompt(self, messages, tools=None):
        return jaxpp.LLM.chat_prompt(self, messages, tools)

    def complete(self, prompt: list[int], params: SamplingParams) -> CompletionOutput:
        ids = [7] * min(params.max_tokens, 2)
        logprobs = None
        if params.logprobs is not None:
            entry = {} if self.has(prompt, "EMPTYLP") else {7: Logprob(-0.5, 1, "x")}
            logprobs = [dict(entry) for _ in ids]
        return CompletionOutput(
            0, f"{len(prompt)}/{params.max_tokens}", ids, "length", logprobs=logprobs
        )


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
