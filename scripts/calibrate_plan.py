"""Calibrate `jaxpp plan` on this CPU: predicted vs measured decode tick of llama-32m.

For each pp in --pp (default 1, 2, 4) this runs `python -m jaxpp.bench` on pp simulated devices
(JAX_NUM_CPU_DEVICES=pp; batch 32, 64 prompt + 128 output tokens, float32, best of --repeats),
then plans the same layout and workload with the "this-cpu" profile measured in this process
beside it, and prints one table row: measured and predicted tick (the run's duration / ticks, as
`jaxpp bench` reports it) and TPOT. docs/plan.md records the table.

    python scripts/calibrate_plan.py            # about 5 minutes on 2 cores
"""

import argparse
import json
import os
import subprocess
import sys

WORKLOAD = dict(batch=32, input_len=64, output_len=128)


def measure(pp: int, repeats: int) -> dict:
    cmd = [sys.executable, "-m", "jaxpp.bench", "--preset", "llama-32m", "--pp", str(pp)]
    cmd += ["--batch-size", str(WORKLOAD["batch"]), "--num-prompts", str(WORKLOAD["batch"])]
    cmd += ["--input-len", str(WORKLOAD["input_len"]), "--output-len"]
    cmd += [str(WORKLOAD["output_len"]), "--dtype", "float32", "--repeats", str(repeats), "--json"]
    env = {**os.environ, "JAX_NUM_CPU_DEVICES": str(pp), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pp", default="1,2,4")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    stages = [int(p) for p in args.pp.split(",")]
    # This process measures the profile: two simulated devices at least, for the link probe.
    os.environ["JAX_NUM_CPU_DEVICES"] = str(max(2, *stages))
    import jaxpp  # noqa: PLC0415
    from jaxpp.hardware import measure_this_cpu  # noqa: PLC0415

    print("  pp  measured tick ms  predicted tick ms  error   measured TPOT ms  predicted TPOT ms")
    for pp in stages:
        real = measure(pp, args.repeats)
        measure_this_cpu.cache_clear()  # the machine as it is now, beside the run
        hardware = measure_this_cpu()
        plan = jaxpp.plan(
            "llama-32m", pp=pp, dtype="float32", hardware=hardware, max_num_seqs=WORKLOAD["batch"]
        )
        [row] = plan.speed([WORKLOAD["batch"]], WORKLOAD["input_len"], WORKLOAD["output_len"])
        tick, predicted = real["tick_s"], row["tick_s"]
        print(
            f"  {pp:2d}  {1e3 * tick:16.1f}  {1e3 * predicted:17.1f}  {predicted / tick - 1:+5.0%}"
            f"   {1e3 * real['tpot_s']['mean']:16.1f}  {1e3 * row['tpot_s']['mean']:17.1f}",
            flush=True,
        )
        print(
            f"      profile: {hardware.memory_bandwidth / 1e9:.1f} GB/s copy, "
            f"{hardware.peak_flops['float32'] / 1e9:.0f} GFLOP/s float32, "
            f"link {1e6 * hardware.intra_node.latency:.0f} us",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
