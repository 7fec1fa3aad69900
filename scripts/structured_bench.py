"""Structured outputs, measured: how often a schema request's output validates, and what the
grammar sampler mode costs per tick. docs/structured_outputs.md records the figures.

    python scripts/structured_bench.py validity [--n 200] [--max-tokens 96]
        N seeded samples at temperature 1 under a JSON schema on the demo model and on a tiny
        random test model (tests/hf_fixtures.py): finished / valid (jsonschema) / cut by
        max_tokens, and that every cut output is a prefix its automaton allows.
    python scripts/structured_bench.py cost [--rows 32] [--tokens 128] [--repeats 3]
        The demo model decoding `rows` sequences for `tokens` tokens, greedy, three ways: no
        constraint (the greedy program), every row under a regex that never ends (the grammar
        mode: mask + advance every token), and half of them constrained. Seconds per ring tick,
        best of --repeats after a warm-up.
    python scripts/structured_bench.py sampler [--rows 64] [--calls 200] [--repeats 5]
        The sampler alone, what a grammar sample program adds to its mode: sampling.sample
        (and, in a grammar mode, grammar_advance) over `rows` rows of random logits on the demo
        vocabulary, one device, every row under SCHEMA's automaton in the engine's default
        pool (4096 states). Microseconds per call, best of --repeats.
"""

import argparse
import functools
import json
import sys
import tempfile
import time
from pathlib import Path

import jsonschema

import jaxpp
from jaxpp import SamplingParams
from jaxpp.config import StructuredOutputsParams

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "id": {"type": "integer", "minimum": 0, "maximum": 9999},
        "kind": {"enum": ["file", "dir", "link"]},
        "flags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 4},
    },
    "required": ["name", "id", "kind"],
    "additionalProperties": False,
}


def validity(llm, n: int, max_tokens: int, prompt) -> dict:
    so = StructuredOutputsParams(json=SCHEMA)
    params = [
        SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=i, structured_outputs=so)
        for i in range(n)
    ]
    start = time.perf_counter()
    outs = llm.generate([prompt] * n, params)
    seconds = time.perf_counter() - start
    automaton = llm.grammar_compiler.compile(so)
    finished = valid = cut = prefixes = 0
    for out in outs:
        c = out.outputs[0]
        if c.finish_reason == "stop":
            finished += 1
            try:
                jsonschema.validate(json.loads(c.text), SCHEMA)
                valid += 1
            except (ValueError, jsonschema.ValidationError) as e:
                print(f"INVALID: {c.text!r}: {e}", file=sys.stderr)
        else:
            cut += 1
            state = 0
            for t in c.token_ids:
                if not automaton.allowed(state, llm.vocab_layout)[t]:
                    break
                state = automaton.next_state(state, t)
            else:
                prefixes += 1
    return {"requests": n, "finished": finished, "valid": valid, "cut_by_max_tokens": cut,
            "cut_prefixes_allowed": prefixes, "seconds": round(seconds, 1)}  # fmt: skip


def run_validity(args) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from hf_fixtures import build_model_dir  # noqa: PLC0415

    demo = jaxpp.LLM(jaxpp.DEMO_MODEL, max_num_seqs=32, kv_cache_memory=64 << 20)
    print("demo model:", validity(demo, args.n, args.max_tokens, "import os\n"))
    tiny = jaxpp.LLM(build_model_dir(tempfile.mkdtemp(), "llama"), dtype="float32",
                     max_num_seqs=32, kv_cache_memory=16 << 20)  # fmt: skip
    print("tiny llama:", validity(tiny, args.n, args.max_tokens, [5, 6, 7]))


def run_cost(args) -> None:
    llm = jaxpp.LLM(jaxpp.DEMO_MODEL, max_num_seqs=args.rows, kv_cache_memory=64 << 20)
    endless = StructuredOutputsParams(regex="[a-z ]*")  # never complete: every token masked
    plain = SamplingParams(max_tokens=args.tokens, temperature=0.0, ignore_eos=True)
    guided = SamplingParams(max_tokens=args.tokens, temperature=0.0, ignore_eos=True,
                            structured_outputs=endless)  # fmt: skip
    prompts = [f"def f{i}(x):" for i in range(args.rows)]
    cases = {
        "greedy, no constraint": [plain] * args.rows,
        "greedy, every row constrained": [guided] * args.rows,
        "greedy, half constrained": [plain, guided] * (args.rows // 2),
    }
    for params in cases.values():
        llm.generate(prompts, params)  # warm-up: compiles this case's programs
    best: dict[str, float] = {}
    for _ in range(args.repeats):  # the cases take turns: a load that comes and goes hits all
        for name, params in cases.items():
            start = time.perf_counter()
            llm.generate(prompts, params)
            per_tick = (time.perf_counter() - start) / llm.last_run_stats["ticks"]
            best[name] = min(best.get(name, per_tick), per_tick)
    for name, seconds in best.items():
        ratio = seconds / best["greedy, no constraint"]
        print(f"{name:32s} {seconds * 1e3:8.2f} ms per tick  x{ratio:.2f}")


def run_sampler(args) -> None:
    import jax  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415
    from transformers import AutoTokenizer  # noqa: PLC0415

    from jaxpp import grammar, programs  # noqa: PLC0415

    vocab = jaxpp.ModelConfig.from_dir(jaxpp.DEMO_MODEL).vocab_size
    mesh = jax.sharding.Mesh(
        np.array(jax.devices()[:1]).reshape(1, 1, 1), ("data", "stage", "tensor")
    )
    layout = grammar.VocabLayout(vocab, 1, vocab)
    pool = grammar.GrammarPool(mesh, layout, 4096, grammar.EXCEPTIONS_PER_STATE * 4096)
    compiler = grammar.Compiler(AutoTokenizer.from_pretrained(str(jaxpp.DEMO_MODEL)), layout)
    base = pool.acquire(compiler.compile(StructuredOutputsParams(json=SCHEMA)))
    rng = np.random.default_rng(0)
    logits = jax.numpy.asarray(rng.standard_normal((args.rows, vocab), np.float32))
    states = jax.numpy.full(args.rows, base, np.int32)
    generated = jax.numpy.zeros(args.rows, np.int32)
    modes = {
        "greedy": programs.GREEDY,
        "greedy, grammar": programs.GREEDY_GRAMMAR,
        "sampling": programs.SAMPLING,
        "sampling, grammar": programs.SAMPLING_GRAMMAR,
    }
    runs = {}
    for name, mode in modes.items():
        run, rows = _sampler_program(mode, mesh, vocab, args.rows)
        runs[name] = functools.partial(run, logits, rows, generated, states, pool.tables)
        runs[name]().block_until_ready()  # compiles
    best: dict[str, float] = {}
    for _ in range(args.repeats):  # the modes take turns: a load that comes and goes hits all
        for name, run in runs.items():
            start = time.perf_counter()
            for _ in range(args.calls):
                out = run()
            out.block_until_ready()
            seconds = (time.perf_counter() - start) / args.calls
            best[name] = min(best.get(name, seconds), seconds)
    for name, seconds in best.items():
        plain = best[name.split(",")[0]]
        print(f"{name:20s} {seconds * 1e6:9.1f} us per call  x{seconds / plain:.2f}")


def _sampler_program(mode, mesh, vocab: int, rows: int):
    """The jitted sampler of `mode` over one device's whole vocabulary (and, in a grammar mode,
    the advance), and its rows' settings: greedy, or seeded at temperature 1."""
    import jax  # noqa: PLC0415
    from jax.sharding import PartitionSpec as P  # noqa: PLC0415

    from jaxpp.grammar import TABLE_SPECS  # noqa: PLC0415
    from jaxpp.model import VOCAB_AXES  # noqa: PLC0415
    from jaxpp.sampling import grammar_advance, sample, sampler_rows  # noqa: PLC0415

    def body(logits, settings, generated, states, tables):
        walk = (states, tables) if mode.grammar else None
        tokens = sample(logits, settings, generated, None, None, vocab, mode, walk).tokens
        return grammar_advance(states, tokens, tables) if mode.grammar else tokens

    temperature = 1.0 if mode.full_vocab else 0.0
    params = [SamplingParams(temperature=temperature, seed=i) for i in range(rows)]
    specs = (P(None, VOCAB_AXES), P(), P(), P(), TABLE_SPECS)
    run = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=specs, out_specs=P(), check_vma=False))
    return run, sampler_rows(params, list(range(rows)), (1,), rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="what", required=True)
    v = sub.add_parser("validity")
    v.add_argument("--n", type=int, default=200)
    v.add_argument("--max-tokens", type=int, default=96)
    c = sub.add_parser("cost")
    c.add_argument("--rows", type=int, default=32)
    c.add_argument("--tokens", type=int, default=128)
    c.add_argument("--repeats", type=int, default=3)
    s = sub.add_parser("sampler")
    s.add_argument("--rows", type=int, default=64)
    s.add_argument("--calls", type=int, default=200)
    s.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    {"validity": run_validity, "cost": run_cost, "sampler": run_sampler}[args.what](args)


if __name__ == "__main__":
    main()
