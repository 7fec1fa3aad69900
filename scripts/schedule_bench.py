"""GPipe against 1F1B through `jaxpp.pipeline_value_and_grad` on the demo model: per schedule the
ticks, the bubble (idle F/B slots of the tick table), the stash each device keeps (slots and
bytes), XLA's temp bytes of the compiled program and its output bytes (the loss and the
gradients), per device, and the time of a step.

    python scripts/schedule_bench.py [--stages 4] [--microbatches 16] [--batch 32] [--length 128]
                                     [--steps 5] [--lora 8]

Simulated CPU devices (JAX_NUM_CPU_DEVICES, default 8) share the host's cores: every stage's
work runs on them one after another, masked slots included, so a step's time follows its ticks
rather than a real pipeline's overlap. Each line is one schedule: the median step time of
`--steps` after a compiled warm-up step. With --lora RANK, LoRA on the attention projections.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1]))
os.environ.setdefault("JAX_NUM_CPU_DEVICES", "8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import numpy as np  # noqa: E402

import jaxpp  # noqa: E402
from jaxpp.lora import LoraConfig  # noqa: E402
from jaxpp.training import (  # noqa: E402
    compiled_memory,
    pipeline_value_and_grad,
    schedule_table,
    stash_bytes,
)


def measure(llm, tokens: np.ndarray, schedule: str, M: int, steps: int, lora) -> dict:
    table = schedule_table(schedule, llm.pp, M)
    memory = compiled_memory(llm, tokens, schedule=schedule, microbatches=M, lora=lora)
    jax.block_until_ready(
        pipeline_value_and_grad(llm, tokens, schedule=schedule, microbatches=M, lora=lora)
    )
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        jax.block_until_ready(
            pipeline_value_and_grad(llm, tokens, schedule=schedule, microbatches=M, lora=lora)
        )
        times.append(time.perf_counter() - started)
    return {
        "ticks": table.forward.shape[0],
        "bubble": round(table.bubble, 3),
        "stash_slots": table.slots,
        "stash_bytes": stash_bytes(llm, tokens, schedule=schedule, microbatches=M),
        "temp_bytes": memory.temp_size_in_bytes,
        "gradient_bytes": memory.output_size_in_bytes,
        "step_s": round(float(np.median(times)), 3),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--stages", type=int, default=4)
    p.add_argument("--microbatches", type=int, default=16)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--length", type=int, default=128)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--lora", type=int, default=0, help="adapters of this rank (0: every weight)")
    args = p.parse_args()
    llm = jaxpp.LLM(
        jaxpp.DEMO_MODEL, pp=args.stages, dtype="float32", max_num_seqs=2, kv_cache_memory=1 << 22
    )
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, llm.config.vocab_size, (args.batch, args.length))
    lora = LoraConfig(args.lora) if args.lora else None
    print(
        f"S={args.stages} M={args.microbatches}, {args.batch} x {args.length} tokens, lora={lora}"
    )
    for schedule in ("gpipe", "1f1b"):
        print(schedule, measure(llm, tokens, schedule, args.microbatches, args.steps, lora))
    return 0


if __name__ == "__main__":
    sys.exit(main())
