"""`jaxpp convert HF_DIR OUT_DIR`: a Hugging Face model as an orbax checkpoint in the engine's own
stacked, stage-major layout, so that `jaxpp.LLM(OUT_DIR)` restores each device's shard straight
from its files (loading.py). The checkpoint is tied to the layout it is converted for (--pp,
--tp, --layer-partition, --quantization): pass the layout you will serve with.

OUT_DIR gets `params/` (orbax), `jaxpp_layout.json`, and the model's config (its dtype set to
the converted one), generation config and tokenizer files.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from jaxpp.cli.errors import UsageError
from jaxpp.cli.flags import DTYPE_CHOICES, add_quantization_flag
from jaxpp.cli.generate import provide_cpu_devices


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "convert",
        help="write a Hugging Face model as an orbax checkpoint in the engine's layout",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("hf_dir", metavar="HF_DIR", help="Hugging Face model dir (safetensors)")
    p.add_argument("out_dir", metavar="OUT_DIR", help="new directory for the orbax checkpoint")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, help="default: the checkpoint's dtype")
    p.add_argument("--pp", type=int, default=1, help="pipeline stages to serve with (default 1)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel ways (default: 1)")
    p.add_argument("--layer-partition", metavar="N,N,...", help="default: even split")
    add_quantization_flag(p)
    p.set_defaults(func=run_convert)


def run_convert(args: argparse.Namespace) -> int:
    hf_dir, out_dir = Path(args.hf_dir), Path(args.out_dir)
    if not (hf_dir / "config.json").is_file():
        raise UsageError(f"{hf_dir} is not a Hugging Face model dir (no config.json)")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise UsageError(f"{out_dir} exists and is not empty")
    provide_cpu_devices(args.pp * args.tp)
    from jaxpp import LLM  # noqa: PLC0415
    from jaxpp.loading import save_engine_dir  # noqa: PLC0415

    # The smallest engine that holds the weights: one row per micro-batch, one KV page.
    llm = LLM(
        hf_dir,
        dtype=args.dtype,
        pp=args.pp,
        tp=args.tp,
        layer_partition=args.layer_partition,
        quantization=args.quantization,
        max_model_len=2,
        max_num_seqs=1,
        max_num_batched_tokens=1,
        block_size=2,
        kv_cache_memory=1 << 26,  # a few pages of any model
    )
    save_engine_dir(llm, out_dir)
    print(f"jaxpp convert: {out_dir} ({llm.load_stats['seconds']:.1f} s to read {hf_dir})")
    return 0
