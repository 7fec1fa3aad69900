"""KV capacity of the page pool against the slot design it replaced, on real request lengths.

    HF_HUB_OFFLINE=1 python scripts/capacity_check.py --trace sharegpt.jsonl --scale 0.25

The trace is LLMServingSim's JSONL (`input_toks`, `output_toks`; arrival times are ignored:
every request arrives at once, so the pool, not the arrival rate, bounds how many run). The
pool holds what `--slots` slots of `--slot-len` positions held in the slot design (default
32 x 2,048); `--max-num-seqs` rows may decode at once. The same requests then run with a pool
that never fills, and the two runs must give every request the same tokens (greedy).
Prints peak_running (most sequences decoding at once), the pool's pages, preemptions and
whether the tokens matched; exit status 1 if they did not.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from jaxpp.bench.serving import greedy_params
from jaxpp.bench.workloads import preset_dir, read_trace
from jaxpp.config import EngineConfig, ModelConfig
from jaxpp.engine import LLM
from jaxpp.layout import kv_bytes_per_page, make_layout


def serve(model_dir, requests, kv_cache_memory: int | None, args) -> tuple[list, dict, float]:
    llm = LLM(
        model_dir,
        dtype="float32",
        max_num_seqs=args.max_num_seqs,
        max_model_len=args.slot_len,
        kv_cache_memory=kv_cache_memory,
        block_size=args.block_size,
        seed=0,
    )
    t = time.perf_counter()
    outputs = llm.generate([r.prompt for r in requests], [greedy_params(r) for r in requests])
    seconds = time.perf_counter() - t
    stats = dict(llm.last_run_stats, kv_pages=llm.kv_pages, page_bytes=llm.kv_bytes_per_page())
    return [o.outputs[0].token_ids for o in outputs], stats, seconds


def page_bytes_of(cfg: ModelConfig, args) -> int:
    """KV bytes of one page at pp = tp = dp = 1, from the engine's own layout (no weights)."""
    config = EngineConfig(dtype="float32", max_model_len=args.slot_len, block_size=args.block_size)
    layout = make_layout(cfg, config, "cpu")
    return kv_bytes_per_page(layout)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trace", required=True, help="LLMServingSim JSONL trace")
    p.add_argument("--scale", type=float, default=0.25, help="multiply every length by this")
    p.add_argument("--preset", default="llama-32m")
    p.add_argument("--slots", type=int, default=32, help="slots of the design being compared")
    p.add_argument("--slot-len", type=int, default=2048, help="positions per slot (max_model_len)")
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--block-size", type=int, default=16)
    args = p.parse_args()

    model_dir = preset_dir(args.preset)
    cfg = ModelConfig.from_dir(model_dir)
    requests = read_trace(args.trace, cfg.vocab_size, seed=0, scale=args.scale)
    requests = [r for r in requests if len(r.prompt) + r.output_len <= args.slot_len]
    page_bytes = page_bytes_of(cfg, args)
    pool_bytes = args.slots * args.slot_len // args.block_size * page_bytes
    needed = sum(len(r.prompt) + r.output_len for r in requests)
    roomy_bytes = (needed // args.block_size + 2 * len(requests)) * page_bytes

    tokens, stats, seconds = serve(model_dir, requests, pool_bytes, args)
    reference, roomy, roomy_seconds = serve(model_dir, requests, roomy_bytes, args)
    same = tokens == reference
    keys = ("peak_running", "kv_blocks_total", "kv_blocks_peak", "preemptions", "prompt_tokens")
    report = {
        "requests": len(requests),
        "positions_needed_all_at_once": needed,
        "pool_positions": args.slots * args.slot_len,
        "slot_design_sequences": args.slots,
        "pool": {k: stats[k] for k in keys} | {"seconds": round(seconds, 1)},
        "never_full": {k: roomy[k] for k in keys} | {"seconds": round(roomy_seconds, 1)},
        "capacity_ratio": stats["peak_running"] / args.slots,
        "tokens_identical": same,
    }
    print(json.dumps(report, indent=1))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
