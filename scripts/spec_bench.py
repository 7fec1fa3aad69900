"""Speculative decoding on against off, same build, same sitting: output tok/s of `jaxpp bench`
on the demo model for each (workload, batch, pp), alternating off/on runs; the ratio and the
acceptance figures. Every run is a fresh process (its own warm-up, no compile timed).

    JAX_NUM_CPU_DEVICES=2 python scripts/spec_bench.py                # the issue's table
    JAX_NUM_CPU_DEVICES=2 python scripts/spec_bench.py --quick        # batch 1, pp 1 only
    JAX_NUM_CPU_DEVICES=2 python scripts/spec_bench.py --draft DIR    # a draft model proposing
                                                    # (retype: batch 1 at pp 1 and 2, batch 32)

(a draft of the demo model: scripts/train_draft_model.py --out DIR; --draft-window W must be
its sliding window, the one it was trained for.)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import jaxpp

SPEC = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4,
        "prompt_lookup_min": 2}  # fmt: skip


def draft_spec(model: str, window: int) -> dict:
    return {"model": model, "num_speculative_tokens": SPEC["num_speculative_tokens"],
            "draft_window": window}  # fmt: skip


def bench(workload: str, batch: int, pp: int, spec: dict | None, prompts: int, args) -> dict:
    cmd = [
        sys.executable, "-m", "jaxpp.bench", "--model", str(jaxpp.DEMO_MODEL),
        "--workload", workload, "--num-prompts", str(prompts), "--batch-size", str(batch),
        "--input-len", str(args.input_len), "--output-len", str(args.output_len),
        "--pp", str(pp), "--max-num-batched-tokens", str(args.budget), "--json",
    ]  # fmt: skip
    if spec is not None:
        cmd += ["--speculative-config", json.dumps(spec)]
    env = {**os.environ, "JAX_NUM_CPU_DEVICES": str(max(pp, 1))}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--input-len", type=int, default=256)
    p.add_argument("--output-len", type=int, default=96)
    p.add_argument("--budget", type=int, default=256)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--draft", help="a draft model's dir: it proposes instead of prompt lookup")
    p.add_argument("--draft-window", type=int, default=32)
    args = p.parse_args()
    spec = draft_spec(args.draft, args.draft_window) if args.draft else SPEC
    print(f"on: {json.dumps(spec)}")
    cases = [("retype", 1, 1), ("retype", 1, 2)]
    if args.draft:  # batch 32 verifies nothing (disable_by_batch_size): the draft's cost there
        cases += [("retype", 32, 1)]
    else:  # the issue's table for prompt lookup
        cases += [("code", 1, 1), ("random", 1, 1), ("retype", 32, 1), ("random", 32, 1)]
    cases = cases[:1] if args.quick else cases
    print("| workload | batch | pp | off tok/s | on tok/s | on/off | acceptance | tokens/row |")
    print("|---|---|---|---|---|---|---|---|")
    for workload, batch, pp in cases:
        prompts = 4 if batch == 1 else 64
        best = {"off": 0.0, "on": 0.0}
        spec_stats = None
        for _ in range(args.repeats):
            for name, config in (("off", None), ("on", spec)):
                r = bench(workload, batch, pp, config, prompts, args)
                best[name] = max(best[name], r["output_tokens_per_s"])
                spec_stats = r.get("spec_decode") or spec_stats
        rate = f"{spec_stats['acceptance_rate']:.2f}" if spec_stats else "-"
        length = f"{spec_stats['mean_acceptance_length']:.2f}" if spec_stats else "-"
        print(f"| {workload} | {batch} | {pp} | {best['off']:.1f} | {best['on']:.1f} | "
              f"{best['on'] / best['off']:.2f}x | {rate} | {length} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
