"""Prefix caching on against off, the same engine build, one sitting: three workloads.

    HF_HUB_OFFLINE=1 JAX_NUM_CPU_DEVICES=1 JAX_COMPILATION_CACHE_DIR=/tmp/jaxpp-xla \
        python scripts/prefix_cache_check.py --json

(The compilation cache lets the second engine of each pair reuse the first one's programs:
without it the run spends most of its ~25 minutes compiling.)

- shared: 64 requests after one common 512-token prefix, each with its own 32-token suffix,
  64 new tokens, all at once;
- multi-turn: 8 conversations x 6 turns, questions of 64 tokens, answers of 128: each turn's
  prompt is the previous prompt + its answer + a new question, asked when the answer is done;
- random: 64 prompts of U[16, 512] tokens and U[8, 256] new ones, 32 at a time, nothing shared.

Each workload runs greedy on both engines (timed, the faster of --repeats passes; every pass
starts with an empty cache), then seeded sampling on both (tokens only). Prints output tok/s,
TTFT p50, the hit rate, evictions, the host seconds the prefix cache took (lookup and publish,
per call) and whether every request got the same tokens with caching on and off; exit status
1 if any did not.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from jaxpp.bench.serving import run_pass, summarize
from jaxpp.bench.workloads import (
    multi_turn_requests,
    preset_dir,
    random_requests,
    shared_prefix_requests,
)
from jaxpp.config import ModelConfig, SamplingParams
from jaxpp.engine import LLM
from jaxpp.kv_pages import PagePool


def seeded_params(r) -> SamplingParams:
    # The seed follows the prompt, so that a later turn gets the same one on both engines.
    return SamplingParams(
        max_tokens=r.output_len, temperature=1.0, top_k=50, seed=len(r.prompt), ignore_eos=True
    )


class CacheClock:
    """Host seconds spent in the prefix cache's lookup and publish (wrapped methods)."""

    def __init__(self):
        self.seconds = 0.0
        self._saved = {name: getattr(PagePool, name) for name in ("lookup", "publish")}
        for name, method in self._saved.items():
            setattr(PagePool, name, self._timed(method))

    def _timed(self, method):
        def timed(*args, **kwargs):
            t = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - t

        return timed


def workloads(vocab: int) -> dict[str, tuple[list, int]]:
    """name -> (requests, max_num_seqs)."""
    return {
        "shared": (shared_prefix_requests(64, 512, 1, 32, 64, 0.0, vocab, seed=0), 64),
        "multi-turn": (multi_turn_requests(8, 6, 64, 128, 0.0, vocab, seed=1), 8),
        "random": (random_requests(64, 264, 132, 0.94, vocab, seed=2), 32),
    }


def measure(model_dir, name: str, requests: list, rows: int, repeats: int, clock: CacheClock):
    row: dict = {"workload": name, "requests": len(requests)}
    tokens: dict = {}
    for caching in (False, True):
        llm = LLM(
            model_dir, dtype="float32", max_num_seqs=rows, enable_prefix_caching=caching, seed=0
        )
        run_pass(llm, requests, 1e9, lambda *a: None)  # compiles this workload's programs
        passes = []
        for _ in range(repeats):
            before = clock.seconds
            result = run_pass(llm, requests, 1e9, lambda *a: None)
            passes.append((result, clock.seconds - before))
        best, cache_s = min(passes, key=lambda p: p[0].duration)
        summary = summarize(best)
        stats = best.stats
        key = "on" if caching else "off"
        row[key] = {
            "output_tokens_per_s": summary["output_tokens_per_s"],
            "ttft_p50_s": summary["ttft_s"]["p50"],
            "duration_s": best.duration,
            "passes_s": [p[0].duration for p in passes],
            "prompt_tokens": stats["prompt_tokens"],
            "prefix_cache_hit_tokens": stats["prefix_cache_hit_tokens"],
            "prefix_cache_hit_rate": stats["prefix_cache_hit_rate"],
            "prefix_cache_evictions": stats["prefix_cache_evictions"],
            "calls": stats["calls"],
            "cache_host_s_per_call": cache_s / stats["calls"],
            "compilations_timed": best.compilations,
        }
        seeded = run_pass(llm, requests, 1e9, lambda *a: None, sampling=seeded_params)
        tokens[key] = (
            [list(o.outputs[0].token_ids) for o in best.outputs],
            [list(o.outputs[0].token_ids) for o in seeded.outputs],
        )
        del llm
    row["speedup"] = row["on"]["output_tokens_per_s"] / row["off"]["output_tokens_per_s"]
    row["ttft_p50_ratio_off_on"] = row["off"]["ttft_p50_s"] / row["on"]["ttft_p50_s"]
    row["same_tokens_greedy"] = tokens["on"][0] == tokens["off"][0]
    row["same_tokens_seeded"] = tokens["on"][1] == tokens["off"][1]
    return row


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="llama-32m")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--only", choices=["shared", "multi-turn", "random"], action="append")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    model_dir = preset_dir(args.preset)
    vocab = ModelConfig.from_dir(model_dir).vocab_size
    clock = CacheClock()
    rows = []
    for name, (requests, max_rows) in workloads(vocab).items():
        if args.only and name not in args.only:
            continue
        rows.append(measure(model_dir, name, requests, max_rows, args.repeats, clock))
        r = rows[-1]
        print(json.dumps(r), file=sys.stderr, flush=True)  # kept should a later one fail
        if not args.json:
            print(
                f"{name}: on {r['on']['output_tokens_per_s']:.1f} vs off "
                f"{r['off']['output_tokens_per_s']:.1f} out tok/s = {r['speedup']:.2f}x; TTFT p50 "
                f"{r['on']['ttft_p50_s']:.2f} vs {r['off']['ttft_p50_s']:.2f} s; hit rate "
                f"{r['on']['prefix_cache_hit_rate']:.1%}; evictions "
                f"{r['on']['prefix_cache_evictions']}; cache host "
                f"{r['on']['cache_host_s_per_call'] * 1e6:.0f} us/call; same tokens greedy "
                f"{r['same_tokens_greedy']} seeded {r['same_tokens_seeded']}",
                flush=True,
            )
    if args.json:
        print(json.dumps(rows))
    return 0 if all(r["same_tokens_greedy"] and r["same_tokens_seeded"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
