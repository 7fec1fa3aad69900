"""Benchmark workloads: random requests (vLLM's random dataset), LLMServingSim traces, and the
preset checkpoints with random weights that `jaxpp bench --preset` and `jaxpp plan` read."""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import importlib.util
import json
import math
import os
import textwrap
from pathlib import Path

import numpy as np

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
DEFAULT_CACHE = Path.home() / ".cache" / "jaxpp" / "presets"
TRACE_FIELDS = ("input_toks", "output_toks", "arrival_time_ns")


@dataclasses.dataclass
class Request:
    prompt: list[int]
    output_len: int
    arrival: float = 0.0  # seconds after the start of the run
    # The following turns of its conversation, (question, output_len) each: the next turn
    # arrives when this one is answered, its prompt this prompt + the answer + the question.
    then: list[tuple[list[int], int]] = dataclasses.field(default_factory=list)

    def next_turn(self, answer: list[int], arrival: float) -> Request | None:
        if not self.then:
            return None
        (question, output_len), *rest = self.then
        return Request(self.prompt + answer + question, output_len, arrival, rest)


def random_requests(
    num_prompts: int,
    input_len: int,
    output_len: int,
    range_ratio: float,
    vocab_size: int,
    seed: int = 0,
    request_rate: float = math.inf,
) -> list[Request]:
    """vLLM's random dataset: lengths uniform in [len*(1-r), len*(1+r)], ids uniform; arrivals
    all at 0, or a Poisson process of `request_rate` per second."""
    if not 0 <= range_ratio < 1:
        raise ValueError(f"--range-ratio={range_ratio} is invalid: expected 0 <= r < 1")
    if not request_rate > 0:
        raise ValueError(f"--request-rate={request_rate} is invalid: expected > 0")
    rng = np.random.default_rng(seed)

    def lengths(n: int) -> np.ndarray:
        lo, hi = max(1, math.floor(n * (1 - range_ratio))), max(1, math.ceil(n * (1 + range_ratio)))
        return rng.integers(lo, hi + 1, size=num_prompts)

    ins, outs = lengths(input_len), lengths(output_len)
    arrivals = np.zeros(num_prompts)
    if math.isfinite(request_rate):
        arrivals = np.cumsum(rng.exponential(1 / request_rate, size=num_prompts))
    return [
        Request(rng.integers(0, vocab_size, size=int(i)).tolist(), int(o), float(a))
        for i, o, a in zip(ins, outs, arrivals, strict=True)
    ]


def shared_prefix_requests(
    num_prompts: int,
    prefix_len: int,
    num_prefixes: int,
    input_len: int,
    output_len: int,
    range_ratio: float,
    vocab_size: int,
    seed: int = 0,
    request_rate: float = math.inf,
) -> list[Request]:
    """Random requests (`random_requests`: their own suffix) each after one of `num_prefixes`
    common prefixes of `prefix_len` tokens, drawn uniformly: a system prompt or few-shot
    examples in front of every question."""
    if prefix_len < 1 or num_prefixes < 1:
        raise ValueError(
            f"--shared-prefix-len={prefix_len} and --num-prefixes={num_prefixes}: expected >= 1"
        )
    suffixes = random_requests(
        num_prompts, input_len, output_len, range_ratio, vocab_size, seed, request_rate
    )
    rng = np.random.default_rng([seed, 1])
    prefixes = [rng.integers(0, vocab_size, size=prefix_len).tolist() for _ in range(num_prefixes)]
    picks = rng.integers(0, num_prefixes, size=num_prompts)
    return [
        dataclasses.replace(r, prompt=prefixes[k] + r.prompt)
        for r, k in zip(suffixes, picks, strict=True)
    ]


def multi_turn_requests(
    conversations: int,
    turns: int,
    input_len: int,
    output_len: int,
    range_ratio: float,
    vocab_size: int,
    seed: int = 0,
) -> list[Request]:
    """The first turns of `conversations` conversations of `turns` turns; each turn asks a
    new random question (`random_requests` lengths) after the whole conversation so far."""
    if turns < 1:
        raise ValueError(f"--multi-turn={turns} is invalid: expected >= 1")
    asked = random_requests(
        conversations * turns, input_len, output_len, range_ratio, vocab_size, seed
    )
    firsts = []
    for c in range(conversations):
        first, *later = asked[c * turns : (c + 1) * turns]
        firsts.append(dataclasses.replace(first, then=[(q.prompt, q.output_len) for q in later]))
    return firsts


PACKAGE_DIR = Path(__file__).resolve().parents[1]  # jaxpp/: the Python that `code` continues


def code_requests(
    num_prompts: int,
    input_len: int,
    output_len: int,
    tokenizer,
    seed: int = 0,
    retype: bool = False,
) -> list[Request]:
    """Requests that repeat their input, for speculative decoding: `code` continues a window
    of `input_len` tokens of one of the package's own Python files; `retype` (`retype=True`)
    shows a function of the package and asks for it again with its name changed (the prompt
    ends with the renamed `def` line, so the answer is the body once more)."""
    rng = np.random.default_rng(seed)
    files = sorted(PACKAGE_DIR.rglob("*.py"))
    requests = []
    while len(requests) < num_prompts:
        source = files[int(rng.integers(len(files)))].read_text()
        if retype:
            prompt = _retyped(source, rng)
            if prompt is None:
                continue
            ids = tokenizer.encode(prompt)[-input_len:]
        else:
            ids = tokenizer.encode(source)
            start = int(rng.integers(max(len(ids) - input_len, 0) + 1))
            ids = ids[start : start + input_len]
        requests.append(Request(ids, output_len))
    return requests


def _retyped(source: str, rng: np.random.Generator) -> str | None:
    """A function of `source` (ast), then the request to type it again renamed, or None."""
    functions = [n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.FunctionDef)]
    functions = [f for f in functions if 6 <= f.end_lineno - f.lineno <= 40]
    if not functions:
        return None
    f = functions[int(rng.integers(len(functions)))]
    text = "\n".join(source.splitlines()[f.lineno - 1 : f.end_lineno])
    text = textwrap.dedent(text)
    renamed = f.name + "_again"
    header = text.splitlines()[0].replace(f"def {f.name}(", f"def {renamed}(", 1)
    return f"{text}\n\n\n# The same function as {renamed}:\n{header}\n"


def read_trace(
    path: str | os.PathLike, vocab_size: int, seed: int = 0, scale: float = 1.0
) -> list[Request]:
    """Requests from an LLMServingSim trace, in arrival order. Prompts without `input_tok_ids`
    get random ids (seeded). `scale` multiplies every prompt and output length (at least one
    token each; a prompt is cut to its first tokens). Any bad line is refused with its line
    number and field."""
    if not scale > 0:
        raise ValueError(f"--scale-lengths={scale} is invalid: expected > 0")
    rng = np.random.default_rng(seed)
    requests = []
    try:
        lines = Path(path).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"--trace {path}: cannot read it ({e})") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"--trace {path} line {number}"
        try:
            obj = json.loads(line)
        except ValueError as e:
            raise ValueError(f"{where}: invalid JSON ({e})") from None
        if not isinstance(obj, dict):
            raise ValueError(f"{where}: expected a JSON object")
        for name in TRACE_FIELDS:
            value = obj.get(name)
            if value is None:
                raise ValueError(f"{where}: missing {name!r}")
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{where}: {name}={value!r} is not an integer")
            if value < (0 if name == "arrival_time_ns" else 1):
                raise ValueError(f"{where}: {name}={value} is out of range")
        ids = obj.get("input_tok_ids")
        if ids is None:
            ids = rng.integers(0, vocab_size, size=obj["input_toks"]).tolist()
        elif (
            not isinstance(ids, list)
            or len(ids) != obj["input_toks"]
            or not all(isinstance(t, int) and 0 <= t < vocab_size for t in ids)
        ):
            raise ValueError(
                f"{where}: input_tok_ids must be {obj['input_toks']} token ids in [0, {vocab_size})"
            )
        keep = max(1, round(len(ids) * scale))
        output = max(1, round(obj["output_toks"] * scale))
        requests.append(Request(ids[:keep], output, obj["arrival_time_ns"] / 1e9))
    if not requests:
        raise ValueError(f"--trace {path}: no requests")
    return sorted(requests, key=lambda r: r.arrival)


def preset_path(name: str | os.PathLike) -> Path:
    """configs/NAME.json, or NAME itself when it is a path to a .json file."""
    path = Path(name)
    if not path.suffix == ".json":
        path = CONFIG_DIR / f"{name}.json"
    if not path.is_file():
        known = sorted(p.stem for p in CONFIG_DIR.glob("*.json"))
        raise ValueError(f"preset {str(name)!r} not found ({path}); known presets: {known}")
    return path


def preset_dir(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """A checkpoint dir with random weights for configs/NAME.json, written on first use."""
    path = preset_path(name)
    text = path.read_text()
    digest = hashlib.sha256(text.encode()).hexdigest()[:10]
    root = Path(cache_dir or os.environ.get("JAXPP_CACHE_DIR") or DEFAULT_CACHE)
    out = root / f"{path.stem}-{digest}"
    if (out / "config.json").is_file() and any(out.glob("*.safetensors")):
        return out
    need_torch(f"--preset {name} writes its random checkpoint (once, into {root})")
    _write_random_checkpoint(json.loads(text), out)
    return out


def need_torch(what: str) -> None:
    """A ValueError naming the one command to run when `what` needs PyTorch and it is not
    installed (jaxpp itself does not need it)."""
    if importlib.util.find_spec("torch") is None:
        raise ValueError(
            f"{what} with PyTorch, which jaxpp does not install: pip install torch (the CPU "
            "build is enough)"
        )


def _write_random_checkpoint(raw: dict, out: Path, shard_bytes: float = 4e9) -> None:
    """Random weights for `raw` as sharded safetensors that transformers and jaxpp both load:
    normal(0, initializer_range) matrices, unit norms, zero biases. The tensors are drawn on the
    GPU when torch has one (an 8B model in about 25 s instead of minutes through transformers'
    own init and save_pretrained); the model itself is built on the meta device, for its names."""
    import torch  # noqa: PLC0415
    import transformers  # noqa: PLC0415
    from safetensors.torch import save_file  # noqa: PLC0415

    config = transformers.AutoConfig.for_model(raw["model_type"]).__class__.from_dict(raw)
    dtype = getattr(torch, raw.get("dtype") or raw.get("torch_dtype") or "float32")
    with torch.device("meta"):
        model = getattr(transformers, raw["architectures"][0])(config)
    # named_parameters lists a tied weight once, under the name transformers saves it as.
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    del model
    device = "cuda" if torch.cuda.is_available() else "cpu"
    generator = torch.Generator(device=device).manual_seed(0)
    std = raw.get("initializer_range", 0.02)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    weight_map, shard, size, total = {}, {}, 0, 0

    def flush() -> None:
        nonlocal shard, size
        name = f"model-{len(set(weight_map.values())) + 1:05d}.safetensors"
        save_file(shard, str(tmp / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
        shard, size = {}, 0

    for name, shape in shapes.items():
        if name.endswith("norm.weight"):
            t = torch.ones(shape, dtype=dtype)
        elif name.endswith(".bias"):
            t = torch.zeros(shape, dtype=dtype)
        else:
            t = torch.randn(shape, device=device, generator=generator) * std
            t = t.to(dtype).cpu()
        shard[name] = t
        size += t.numel() * t.element_size()
        total += t.numel() * t.element_size()
        if size >= shard_bytes:
            flush()
    if shard:
        flush()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index))
    (tmp / "config.json").write_text(json.dumps(raw, indent=2))
    if out.exists():  # another process finished first
        import shutil  # noqa: PLC0415

        shutil.rmtree(tmp, ignore_errors=True)
        return
    tmp.rename(out)
