"""The FP8 table of docs/fp8.md: what FP8 weights open for Llama-3.1-70B and 405B on H200s,
planned with the engine's own bytes (`jaxpp.plan`, no weights, no GPU; a few seconds).

1. The fewest H200s that hold each model in bfloat16 and in FP8 (`quantization="fp8"`): for
   each device count, every pp x tp layout (dp = 1) whose weights fit, the one with the most
   KV pages.
2. A fixed layout in both: KV pages (sequences of 4,096 positions at once) and the modelled
   batch-1 decode TPOT (costmodel.py; a decode tick reads every weight once).

Usage:  python scripts/fp8_plan_table.py [--hardware h200] [--memory-fraction 0.75]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jaxpp  # noqa: E402
from jaxpp.hardware import load_hardware  # noqa: E402

MODELS = {"llama-3.1-70b": (2, 1), "llama-3.1-405b": (8, 1)}  # preset: fixed (tp, pp)
GB = 1e9


def fewest(preset: str, quantization: str | None, hardware) -> jaxpp.planner.Plan | None:
    for devices in range(1, 33):
        found = []
        for tp in (1, 2, 4, 8):
            if devices % tp:
                continue
            try:
                p = jaxpp.plan(preset, pp=devices // tp, tp=tp, hardware=hardware,
                               quantization=quantization)  # fmt: skip
            except ValueError:
                continue
            if not p.overflow_bytes:
                found.append(p)
        if found:
            return max(found, key=lambda p: p.pages)
    return None


def row(p, name: str, gain: str = "") -> str:
    lay = p.layout
    [speed] = p.speed([1], 128, 128)
    return (
        f"| {p.model} | {name} | {lay.devices} | pp={lay.pp} tp={lay.tp} | "
        f"{p.params_bytes / GB:.1f} GB | {p.pages:,}{gain} | {p.sequences_at_once(4096):,} | "
        f"{1e3 * speed['tpot_s']['mean']:.1f} ms |"
    )


def main() -> int:
    a = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    a.add_argument("--hardware", default="h200")
    a.add_argument("--memory-fraction", type=float, default=None)
    args = a.parse_args()
    hw = load_hardware(args.hardware)
    if args.memory_fraction:
        hw = dataclasses.replace(hw, memory_fraction=args.memory_fraction)
    print(f"{hw.name}, {hw.memory_fraction:g} of its memory usable by JAX\n")
    head = (
        "| model | weights | devices | layout | params per device | KV pages (16 positions) "
        "| sequences of 4,096 at once | batch-1 TPOT (modelled) |\n" + "|---" * 8 + "|"
    )
    print("Fewest devices:\n" + head)
    for preset in MODELS:
        for quantization, name in ((None, "bfloat16"), ("fp8", "FP8")):
            p = fewest(preset, quantization, hw)
            print(row(p, name) if p else f"| {preset} | {name} | more than 32 | | | | | |")
    print("\nThe same layout in both:\n" + head)
    for preset, (tp, pp) in MODELS.items():
        p = jaxpp.plan(preset, pp=pp, tp=tp, hardware=hw, quantization="fp8")
        print(row(p.unquantized, "bfloat16"))
        print(row(p, "FP8", f" (+{p.pages - p.unquantized.pages:,})"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
