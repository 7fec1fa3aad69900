"""How many step programs a new user's traffic compiles, and when: an engine with its default
settings, `LLM.warmup()`, then batches of random prompt and output lengths, greedy and seeded
sampling mixed, and last a batch asking for logprobs.

    python scripts/program_probe.py                       # the demo model
    python scripts/program_probe.py --preset llama-32m --max-prompt 700 --max-num-batched-tokens 512

Prints the start-up (construction, warm-up), the programs compiled at warm-up, and per batch the
programs and XLA compilations its traffic added.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="model dir (default: the demo model)")
    p.add_argument("--preset", default=None, help="a jaxpp bench preset instead of --model")
    p.add_argument("--batches", type=int, default=4)
    p.add_argument("--per-batch", type=int, default=25)
    p.add_argument("--max-prompt", type=int, default=500)
    p.add_argument("--max-output", type=int, default=128)
    p.add_argument("--max-num-batched-tokens", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import jaxpp  # noqa: PLC0415
    from jaxpp.bench import CompileCounter, preset_dir  # noqa: PLC0415

    model = preset_dir(args.preset) if args.preset else (args.model or jaxpp.DEMO_MODEL)
    start = time.perf_counter()
    settings = {"max_num_batched_tokens": args.max_num_batched_tokens}
    llm = jaxpp.LLM(model, **{k: v for k, v in settings.items() if v is not None})
    built = time.perf_counter() - start
    warmed = llm.warmup(lambda line: print(line, file=sys.stderr, flush=True))
    report = {
        "model": str(model),
        "construction_s": built,
        "warmup_s": time.perf_counter() - start - built,
        "warmup_programs": warmed,
        "buckets": list(llm.scheduler.buckets.sizes),
        "batches": [],
    }
    rng = np.random.default_rng(args.seed)
    vocab = llm.config.vocab_size
    for b in range(args.batches + 1):
        logprobs = b == args.batches  # the last batch: a rarer mode, compiled when met
        prompts, params = [], []
        for _ in range(args.per_batch):
            n = int(rng.integers(1, min(args.max_prompt, llm.max_model_len - 1) + 1))
            prompts.append(rng.integers(0, vocab, size=n).tolist())
            out = int(rng.integers(1, min(args.max_output, llm.max_model_len - n) + 1))
            seeded = bool(rng.integers(0, 2))
            params.append(jaxpp.SamplingParams(
                max_tokens=out, temperature=0.8 if seeded else 0.0, top_p=0.95,
                seed=int(rng.integers(0, 2**31)) if seeded else None, ignore_eos=True,
                logprobs=5 if logprobs else None,
            ))  # fmt: skip
        before = llm.compiled_programs
        with CompileCounter() as counter:
            t = time.perf_counter()
            llm.generate(prompts, params)
        report["batches"].append({
            "logprobs": logprobs, "seconds": time.perf_counter() - t,
            "programs_added": llm.compiled_programs - before,
            "xla_compilations": counter.count,
        })  # fmt: skip
    greedy_seeded = report["warmup_programs"] + sum(
        x["programs_added"] for x in report["batches"] if not x["logprobs"]
    )
    report["programs_greedy_and_seeded"] = greedy_seeded
    report["programs_total"] = llm.compiled_programs
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
