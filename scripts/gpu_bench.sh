#!/usr/bin/env bash
# jaxpp offline benchmark on ONE NVIDIA H100 / H200 (JAX with CUDA, PyTorch with CUDA and
# transformers installed; no network needed).
#
# Model: the Llama-3.1-8B shape (configs/llama-3.1-8b.json) with random weights, bfloat16. The
# checkpoint is written once by transformers (save_pretrained, ~16 GB) into
# ~/.cache/jaxpp/presets (or $JAXPP_CACHE_DIR); that takes a minute or two the first time.
#
# Figures (each run also times transformers `generate` in the same process, sdpa attention,
# bf16, same prompts and batches, and prints the ratio jaxpp / transformers):
#   * decode at batch 1, 8, 64 (prompt 128, 256 new tokens, greedy, ignore_eos): tokens/s and
#     the achieved memory bandwidth (weights + KV bytes one decode step reads / step time),
#     against the rate of a large device-to-device copy measured in the same process;
#   * prefill at 2048 tokens (one slot, one new token, one 2048-token chunk): MFU = (2 * params *
#     tokens + causal attention FLOPs) / pass duration / peak dense bf16 FLOP/s (989 TFLOP/s for
#     H100 SXM and H200; override with PEAK_TFLOPS, e.g. 756 for H100 PCIe).
#
# Usage:  scripts/gpu_bench.sh [OUT_DIR]      (env: PYTHON, PRESET, REPEATS, PEAK_TFLOPS)
# Writes one JSON object per run into OUT_DIR and prints a summary table at the end.
set -euo pipefail

cd "$(dirname "$0")/.."
OUT=${1:-bench-gpu-$(date +%Y%m%d-%H%M%S)}
PY=${PYTHON:-python}
PRESET=${PRESET:-llama-3.1-8b}
REPEATS=${REPEATS:-3}
mkdir -p "$OUT"

export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# JAX and PyTorch share the GPU in one process: JAX must not preallocate 75% of it.
# 0.45 of 80 GB leaves JAX 36 GB (16 GB of weights, KV cache of 64 slots x 512 positions = 4.3 GB,
# activations) and PyTorch the rest (its own 16 GB copy of the weights plus its KV cache).
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.45}

PEAK_ARGS=()
if [[ -n "${PEAK_TFLOPS:-}" ]]; then PEAK_ARGS=(--peak-tflops "$PEAK_TFLOPS"); fi

{
  date -u +"%Y-%m-%dT%H:%M:%SZ"
  echo "commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv \
    || echo "nvidia-smi not found: NOT a GPU machine, figures below are not GPU figures"
  "$PY" -c "import jax, torch, transformers; print('jax', jax.__version__, jax.devices()); \
print('torch', torch.__version__, 'cuda' if torch.cuda.is_available() else 'no cuda'); \
print('transformers', transformers.__version__)"
} | tee "$OUT/machine.txt"

# Fail early (and build the preset checkpoint) before the long runs.
"$PY" -c "from jaxpp.bench import preset_dir; print('checkpoint', preset_dir('$PRESET'))"

for B in 1 8 64; do
  echo "== decode, batch $B"
  "$PY" -m jaxpp.bench --preset "$PRESET" --dtype bfloat16 --max-model-len 512 \
    --input-len 128 --output-len 256 --num-prompts "$B" --batch-size "$B" \
    --repeats "$REPEATS" --compare-hf --measure-bandwidth "${PEAK_ARGS[@]}" \
    --json > "$OUT/decode_b$B.json"
done

echo "== prefill, 2048 tokens"
"$PY" -m jaxpp.bench --preset "$PRESET" --dtype bfloat16 --max-model-len 2304 \
  --input-len 2048 --output-len 1 --num-prompts 4 --batch-size 1 --prefill-chunk 2048 \
  --repeats "$REPEATS" --compare-hf "${PEAK_ARGS[@]}" \
  --json > "$OUT/prefill_2048.json"

"$PY" - "$OUT" <<'EOF'
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
print(f"\nresults in {out}/  (ratios are jaxpp / transformers, same process)\n")
print("| run | jaxpp out tok/s | ms/tick | GB/s (of copy) | HF out tok/s | ratio |")
print("|---|---|---|---|---|---|")
for b in (1, 8, 64):
    r = json.loads((out / f"decode_b{b}.json").read_text())
    bw = r["decode_bandwidth"]
    frac = bw.get("fraction_of_copy")
    print(f"| decode batch {b} | {r['output_tokens_per_s']:.0f} | "
          f"{bw['tick_s'] * 1e3:.2f} | {bw['bytes_per_s_per_device'] / 1e9:.0f} "
          f"({100 * frac:.0f}% of {r['copy_bandwidth']['bytes_per_s'] / 1e9:.0f}) | "
          f"{r['hf']['output_tokens_per_s']:.0f} | {r['ratio_output_tokens_per_s']:.2f}x |")
r = json.loads((out / "prefill_2048.json").read_text())
p = r["prefill"]
mfu = "n/a" if p["mfu"] is None else f"{100 * p['mfu']:.1f}%"
print(f"\nprefill 2048 tokens: TTFT p50 {r['ttft_s']['p50'] * 1e3:.1f} ms, "
      f"{p['flops_per_s'] / 1e12:.0f} TFLOP/s over the pass, MFU {mfu}; transformers "
      f"{r['hf']['duration_s'] / r['num_prompts'] * 1e3:.1f} ms per prompt "
      f"(ratio of total tokens/s {r['ratio_total_tokens_per_s']:.2f}x)")
print(f"XLA compilations in timed parts: "
      + ", ".join(f"{f.stem} {json.loads(f.read_text())['compilations_timed']}"
                  for f in sorted(out.glob("*.json"))))
EOF
