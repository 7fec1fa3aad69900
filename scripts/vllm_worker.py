"""vLLM's side of scripts/vllm_compare.py: run by the python of vLLM's own virtualenv (vLLM is
never imported by jaxpp or its tests), it loads one offline `vllm.LLM` and serves batches sent
as JSON lines on stdin, one JSON line back per command on the stdout it was started with:

    {"cmd": "generate", "prompts": [[ids...], ...], "max_tokens": [n, ...]}
        -> {"seconds": s, "tokens": [[ids...], ...]}   (greedy, ignore_eos, token ids only)
    {"cmd": "reset_prefix_cache"} -> {"ok": true}

The first line it writes says it is ready, with the settings vLLM chose. Everything vLLM and its
engine processes print goes to stderr: fd 1 is pointed there before vLLM is imported, so no
log line can fall into the answers. `seconds` times `LLM.generate` alone (the same span the
jaxpp side times), not the pipe.

    python scripts/vllm_worker.py MODEL_DIR --max-num-seqs 32 [--max-num-batched-tokens N]

The CPU settings (VLLM_CPU_KVCACHE_SPACE, VLLM_CPU_OMP_THREADS_BIND, LD_PRELOAD) come from the
environment that vllm_compare.py sets.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def answers_channel():
    """The stdout this process was started with, for answers only; fd 1 becomes stderr, which
    vLLM's engine processes inherit."""
    channel = os.fdopen(os.dup(1), "w", buffering=1)  # os.dup: not inherited by children
    sys.stdout.flush()
    os.dup2(2, 1)
    return channel


def load(args: argparse.Namespace):
    from vllm import LLM  # noqa: PLC0415

    options = {} if args.max_num_batched_tokens is None else {
        "max_num_batched_tokens": args.max_num_batched_tokens
    }  # fmt: skip
    return LLM(
        model=args.model,
        dtype="float32",
        max_num_seqs=args.max_num_seqs,
        skip_tokenizer_init=True,  # token ids in and out, as on the jaxpp side
        enable_prefix_caching=True,  # vLLM's default, and jaxpp's
        seed=args.seed,
        **options,
    )


def generate(llm, prompts: list[list[int]], max_tokens: list[int]) -> dict:
    from vllm import SamplingParams  # noqa: PLC0415
    from vllm.inputs import TokensPrompt  # noqa: PLC0415

    inputs = [TokensPrompt(prompt_token_ids=p) for p in prompts]
    params = [
        SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, detokenize=False)
        for n in max_tokens
    ]
    start = time.perf_counter()
    outputs = llm.generate(inputs, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "tokens": [list(o.outputs[0].token_ids) for o in outputs]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model")
    p.add_argument("--max-num-seqs", type=int, required=True)
    p.add_argument("--max-num-batched-tokens", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    channel = answers_channel()
    start = time.perf_counter()
    llm = load(args)
    import vllm  # noqa: PLC0415

    scheduler = llm.llm_engine.vllm_config.scheduler_config
    ready = {
        "ready": True,
        "version": vllm.__version__,
        "load_s": time.perf_counter() - start,
        "max_num_seqs": scheduler.max_num_seqs,
        "max_num_batched_tokens": scheduler.max_num_batched_tokens,
        "env": {k: os.environ.get(k) for k in ("VLLM_CPU_KVCACHE_SPACE",
                                                "VLLM_CPU_OMP_THREADS_BIND", "LD_PRELOAD")},
    }  # fmt: skip
    channel.write(json.dumps(ready) + "\n")
    for line in sys.stdin:
        command = json.loads(line)
        if command["cmd"] == "generate":
            answer = generate(llm, command["prompts"], command["max_tokens"])
        elif command["cmd"] == "reset_prefix_cache":
            answer = {"ok": bool(llm.reset_prefix_cache())}
        else:
            answer = {"error": f"unknown command {command['cmd']!r}"}
        channel.write(json.dumps(answer) + "\n")


if __name__ == "__main__":  # vLLM starts its engine processes by spawn: they import this file
    main()
