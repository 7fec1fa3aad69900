"""One process of a 2-process test job (tests/test_multihost.py): joins the job on 127.0.0.1,
runs the same requests as the in-process reference, and writes what it saw as JSON.

    python multihost_worker.py MODE MODEL_DIR PORT PROCESS_ID OUT_JSON [ORBAX_DIR]

MODE "layouts": tokens, logits and load stats for each layout of LAYOUTS, and for pp=4 from
ORBAX_DIR (the model converted by `jaxpp convert --pp 4`);
MODE "mismatch": process 1 asks for another layout, and every process reports the error.
"""

import json
import os
import sys

os.environ["JAX_NUM_CPU_DEVICES"] = "2"
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

from jaxpp import LLM, SamplingParams, distributed  # noqa: E402

# (pp, tp) over 2 processes x 2 devices: the stage axis crosses the processes. (pp=2 x tp=2
# crosses them on the stage axis just the same; tp inside a process is tested in-process.)
LAYOUTS = [(4, 1)]
PROMPTS = [[3, 4, 5], [7, 8, 9, 10, 11, 12], [20, 21]]
SCORED = [[5, 6, 7, 8, 9, 10, 11], [40, 41, 42]]
ENGINE = dict(max_model_len=64, max_num_seqs=8)


def run(llm: LLM) -> dict:
    greedy = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    sampled = SamplingParams(max_tokens=8, temperature=0.9, top_p=0.9, seed=7, ignore_eos=True)
    outs = llm.generate(PROMPTS + PROMPTS, [greedy] * len(PROMPTS) + [sampled] * len(PROMPTS))
    return {
        "tokens": [o.outputs[0].token_ids for o in outs],
        "logits": [x.tolist() for x in llm.logits(SCORED)],
        "load_stats": llm.load_stats,
    }


def main() -> None:
    mode, model, port, process, out, *orbax = sys.argv[1:]
    # The engines of one process share compiled programs (the orbax one is the pp=4 one again).
    jax.config.update("jax_compilation_cache_dir", os.environ["JAXPP_WORKER_CACHE"])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    distributed.initialize(f"127.0.0.1:{port}", 2, int(process))
    if mode == "layouts":
        result = {f"{pp}x{tp}": run(LLM(model, pp=pp, tp=tp, **ENGINE)) for pp, tp in LAYOUTS}
        result["orbax"] = run(LLM(orbax[0], pp=4, **ENGINE))
    else:
        try:
            LLM(model, pp=4 if process == "1" else 2, **ENGINE)
            result = {"error": None}
        except distributed.MismatchError as e:
            result = {"error": str(e)}
    with open(out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
