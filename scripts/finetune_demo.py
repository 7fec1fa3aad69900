"""Fine-tune the demo model through the pipeline: a few hundred AdamW steps (optax) on a small
local text (this repository's docs), each loss and gradient from `pipeline_value_and_grad`
(1F1B over 2 stages on simulated CPU devices), then the tuned weights saved as an orbax
checkpoint that `jaxpp.LLM` loads and serves.

    pip install optax   # or: pip install -e ".[train]"
    python scripts/finetune_demo.py [--steps 300] [--out /tmp/demo-tuned]
    python scripts/finetune_demo.py --lora 8 [--steps 300]   # LoRA: adapters of rank 8

With --lora RANK every weight of the model stays frozen: adapters on all seven projections of
each layer are trained (their gradients and AdamW's state are all that is kept), then merged
into the weights (`merge_lora`) before the checkpoint is saved.

Prints the loss every 25 steps, the loss of the first and last 10 steps, and a completion of
the tuned model served from the saved checkpoint.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("JAX_NUM_CPU_DEVICES", "2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import optax  # noqa: E402

import jaxpp  # noqa: E402
from jaxpp.loading import save_engine_dir  # noqa: E402
from jaxpp.lora import TARGETS, LoraConfig  # noqa: E402
from jaxpp.training import (  # noqa: E402
    merge_lora,
    parameters,
    pipeline_value_and_grad,
    set_parameters,
)


def windows(llm, length: int) -> np.ndarray:
    """The docs' text as token windows of `length` (the training set)."""
    text = "\n\n".join(p.read_text() for p in sorted((ROOT / "docs").glob("*.md")))
    ids = np.asarray(llm.tokenizer.encode(text), np.int32)
    count = len(ids) // length
    return ids[: count * length].reshape(count, length)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--length", type=int, default=64)
    p.add_argument("--lr", type=float, default=None, help="default 3e-4, with --lora 2e-3")
    p.add_argument("--pp", type=int, default=2)
    p.add_argument("--schedule", default="1f1b", choices=["1f1b", "gpipe"])
    p.add_argument("--lora", type=int, default=0, metavar="RANK", help="train adapters only")
    p.add_argument("--out", default="/tmp/jaxpp-demo-tuned")
    args = p.parse_args()
    lora = LoraConfig(args.lora, targets=tuple(TARGETS)) if args.lora else None
    lr = args.lr or (2e-3 if lora else 3e-4)
    llm = jaxpp.LLM(jaxpp.DEMO_MODEL, pp=args.pp, dtype="float32", max_num_seqs=4)
    data = windows(llm, args.length)
    rng = np.random.default_rng(0)
    print(f"{len(data)} windows of {args.length} tokens; pp={args.pp} {args.schedule}; {lora}")
    optimizer = optax.adamw(lr, weight_decay=0.0)
    params = parameters(llm, lora=lora)
    state = optimizer.init(params)
    losses, started = [], time.perf_counter()
    for step in range(args.steps):
        batch = data[rng.choice(len(data), args.batch, replace=False)]
        loss, grads = pipeline_value_and_grad(llm, batch, schedule=args.schedule, lora=lora)
        updates, state = optimizer.update(grads, state, params)
        params = optax.apply_updates(params, updates)
        set_parameters(llm, params, lora=lora)
        losses.append(float(loss))
        if step % 25 == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss {losses[-1]:.4f}  ({time.perf_counter() - started:.0f} s)")
    first, last = np.mean(losses[:10]), np.mean(losses[-10:])
    print(f"mean loss of the first 10 steps {first:.4f}, of the last 10 {last:.4f}")
    if lora:
        merge_lora(llm, lora)
    save_engine_dir(llm, Path(args.out))
    tuned = jaxpp.LLM(args.out, pp=args.pp, max_num_seqs=4)
    prompt = "The engine"
    out = tuned.generate([prompt], jaxpp.SamplingParams(max_tokens=24, temperature=0.0))
    print(f"served from {args.out}: {prompt!r} -> {out[0].outputs[0].text!r}")
    return 0 if last < first else 1


if __name__ == "__main__":
    sys.exit(main())
