#!/usr/bin/env bash
# Per-token streaming: inter-token latency (ITL) p50 / p99 against time per output token (TPOT)
# as a streaming client sees them, with 1, 8 and 32 streams in flight (`jaxpp serve` +
# `jaxpp bench --base-url`: 4 x S requests of 128 prompt tokens and 128 output tokens each,
# greedy, ignore_eos, after a warm-up of the same lengths); then what one-round calls cost the
# whole batch: 32 requests through LLM.generate with SamplingParams(stream=True) against the
# same without (output tok/s, ROUNDS alternating passes).
#
#   bash scripts/stream_latency.sh [ROUNDS]
#
# Default model: the llama-32m preset (float32, random weights; PRESET=... for another).
set -euo pipefail
ROUNDS=${1:-2}
PRESET=${PRESET:-llama-32m}
PORT=${PORT:-8139}
OUT=${OUT:-/tmp/stream_latency}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1
MODEL=$(python -c "from jaxpp.bench import preset_dir; print(preset_dir('$PRESET', None))")

python -m jaxpp.cli serve --model "$MODEL" --dtype float32 --max-num-seqs 32 --port "$PORT" \
    --disable-log-requests > "$OUT/server.log" 2>&1 &
SERVER=$!
trap 'kill -TERM $SERVER 2>/dev/null || true; wait $SERVER 2>/dev/null || true' EXIT
until curl -sf "http://127.0.0.1:$PORT/health" > /dev/null; do
    kill -0 $SERVER || { cat "$OUT/server.log"; exit 1; }
    sleep 1
done
for S in 1 8 32; do
    python -m jaxpp.cli bench --model "$MODEL" --base-url "http://127.0.0.1:$PORT" \
        --num-prompts $((4 * S)) --max-concurrency "$S" --input-len 128 --output-len 128 \
        --seed "$S" --json > "$OUT/streams-$S.json"
done

python - "$MODEL" "$ROUNDS" > "$OUT/batch.json" <<'PY'
import json, sys, time
import numpy as np
import jaxpp
model, rounds = sys.argv[1], int(sys.argv[2])
llm = jaxpp.LLM(model, dtype="float32", max_num_seqs=32)
rng = np.random.default_rng(0)
prompts = [rng.integers(0, llm.config.vocab_size, 128).tolist() for _ in range(32)]
plain = jaxpp.SamplingParams(max_tokens=128, temperature=0.0, ignore_eos=True)
streamed = jaxpp.SamplingParams(max_tokens=128, temperature=0.0, ignore_eos=True, stream=True)
runs = {"without stream": [], "stream=True": []}
for params in (plain, streamed):
    llm.generate(prompts, params)  # compiles the programs of its schedule
for _ in range(rounds):
    for name, params in (("without stream", plain), ("stream=True", streamed)):
        start = time.perf_counter()
        llm.generate(prompts, params)
        runs[name].append(32 * 128 / (time.perf_counter() - start))
        runs[name + " calls"] = llm.last_run_stats["calls"]
print(json.dumps(runs))
PY

python - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
print("| streams | ITL p50 | ITL p99 | TPOT p50 | TPOT p99 | output tok/s |")
print("|---|---|---|---|---|---|")
for s in (1, 8, 32):
    r = json.load(open(f"{out}/streams-{s}.json"))
    itl, tpot = r["itl_s"], r["tpot_s"]
    print(f"| {s} | {itl['p50'] * 1e3:.1f} ms | {itl['p99'] * 1e3:.1f} ms | "
          f"{tpot['p50'] * 1e3:.1f} ms | {tpot['p99'] * 1e3:.1f} ms | "
          f"{r['output_tokens_per_s']:.1f} |")
b = json.load(open(f"{out}/batch.json"))
for name in ("without stream", "stream=True"):
    print(f"LLM.generate, 32 x 128 tokens, {name}: output tok/s "
          f"{' '.join(f'{x:.1f}' for x in b[name])} ({b[name + ' calls']} ring calls)")
PY
