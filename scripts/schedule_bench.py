"""GPipe against 1F1B through the program of `jaxpp.pipeline_value_and_grad` on the demo model:
per schedule the ticks, the bubble (idle F/B slots of the tick table), the stash each device
keeps (slots and bytes), XLA's temp bytes of the compiled program and its output bytes (the
loss and the gradients), per device, and the time of a step; also 1F1B with nothing parked on
mirrors (2S - 2 slots, no swap), which prices the pair swap.

    python scripts/schedule_bench.py [--stages 4] [--microbatches 16] [--batch 32] [--length 128]
                                     [--steps 5] [--lora 8]

Simulated CPU devices (JAX_NUM_CPU_DEVICES, default 8) share the host's cores: every stage's
work runs on them one after another, masked slots included, so a step's time follows its ticks
rather than a real pipeline's overlap. Each line is one schedule: the median step time of
`--steps` after a compiled warm-up step, the schedules taking turns. With --lora RANK, adapters
of that rank on the attention projections (the model's weights frozen).
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
from jaxpp import training  # noqa: E402
from jaxpp.lora import LoraConfig  # noqa: E402


def tables(stages: int, microbatches: int) -> dict[str, training.Schedule]:
    """GPipe, 1F1B, and 1F1B with nothing parked (every stage its own peak of 2S - 2 slots, no
    swap between mirrors: what the pair swap costs in time and saves in memory)."""
    gpipe = training.schedule_table("gpipe", stages, microbatches)
    one = training.schedule_table("1f1b", stages, microbatches)
    own_peak = max(2 * stages - 2, 1)
    unparked = training._try_place(one.forward, one.backward, own_peak, set())
    return {"gpipe": gpipe, "1f1b": one, "1f1b unparked": training.Schedule(*one[:2], *unparked)}


def measure(llm, tokens: np.ndarray, M: int, steps: int, lora) -> dict[str, dict]:
    """Per schedule: its tables' figures, XLA's memory analysis, and the median step time of
    `steps` rounds that run every schedule once each (alternating: drift hits all alike)."""
    _, args = training._prepared(llm, tokens, None, "1f1b", M, lora)
    rows = tokens.shape[0] // (M * llm.dp)
    per_input = rows * tokens.shape[1] * llm.config.hidden_size * np.dtype(np.float32).itemsize
    out, programs = {}, {}
    for name, table in tables(llm.pp, M).items():
        programs[name] = training._program(
            llm, table, (M, tokens.shape[0] // M, tokens.shape[1]), lora
        )
        memory = programs[name].lower(*args).compile().memory_analysis()
        jax.block_until_ready(programs[name](*args))
        out[name] = {
            "ticks": table.forward.shape[0],
            "bubble": round(table.bubble, 3),
            "stash_slots": table.slots,
            "stash_bytes": table.slots * per_input,
            "temp_bytes": memory.temp_size_in_bytes,
            "gradient_bytes": memory.output_size_in_bytes,
        }
    times = {name: [] for name in programs}
    for _ in range(steps):
        for name, program in programs.items():
            started = time.perf_counter()
            jax.block_until_ready(program(*args))
            times[name].append(time.perf_counter() - started)
    for name in out:
        out[name]["step_s"] = round(float(np.median(times[name])), 3)
    return out


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
    for name, figures in measure(llm, tokens, args.microbatches, args.steps, lora).items():
        print(f"{name:14s}", figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
