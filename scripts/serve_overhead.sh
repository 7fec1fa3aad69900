#!/usr/bin/env bash
# The server's overhead: the same workload through `jaxpp bench` in process and through
# `jaxpp serve` + `jaxpp bench --base-url`, alternating ROUNDS times so that all see the same
# machine load. The server has 32 rows as the in-process engine has; the client sends either
# every request at once (the server queues them, as the in-process bench does) or keeps 32 in
# flight (--max-concurrency 32: a freed row waits for the client's next request). Each pass
# draws other prompts (--seed), so no pass finds another's in the prefix cache. Prints each
# pass's output tok/s and the ratios of medians.
#
#   bash scripts/serve_overhead.sh [ROUNDS] [extra workload flags...]
#
# Default workload: llama-32m float32 (random weights), 128 requests of 128 prompt tokens and
# 128 output tokens, 32 rows.
set -euo pipefail
ROUNDS=${1:-2}
shift || true
PRESET=llama-32m
WORKLOAD=(--num-prompts 128 --input-len 128 --output-len 128 "$@")
PORT=${PORT:-8137}
OUT=${OUT:-/tmp/serve_overhead}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1
MODEL=$(python -c "from jaxpp.bench import preset_dir; print(preset_dir('$PRESET', None))")

python -m jaxpp.cli serve --model "$MODEL" --dtype float32 --max-num-seqs 32 --port "$PORT" \
    > "$OUT/server.log" 2>&1 &
SERVER=$!
trap 'kill -TERM $SERVER 2>/dev/null || true; wait $SERVER 2>/dev/null || true' EXIT
until curl -sf "http://127.0.0.1:$PORT/health" > /dev/null; do
    kill -0 $SERVER || { cat "$OUT/server.log"; exit 1; }
    sleep 1
done

CLIENT=(python -m jaxpp.cli bench --preset "$PRESET" "${WORKLOAD[@]}" --base-url "http://127.0.0.1:$PORT" --json)
for i in $(seq "$ROUNDS"); do
    python -m jaxpp.cli bench --preset "$PRESET" --dtype float32 --batch-size 32 "${WORKLOAD[@]}" \
        --seed "$i" --json > "$OUT/inprocess-$i.json"
    "${CLIENT[@]}" --seed "$((100 + i))" > "$OUT/client-$i.json"
    "${CLIENT[@]}" --seed "$((200 + i))" --max-concurrency 32 > "$OUT/client32-$i.json"
    echo "round $i done" >&2
done

python - "$OUT" "$ROUNDS" <<'PY'
import json, statistics, sys
out, rounds = sys.argv[1], int(sys.argv[2])
def load(kind):
    return [json.load(open(f"{out}/{kind}-{i}.json")) for i in range(1, rounds + 1)]
runs = {
    "in process": load("inprocess"),
    "server, all at once": load("client"),
    "server, 32 in flight": load("client32"),
}
here = statistics.median(r["output_tokens_per_s"] for r in runs["in process"])
for name, passes in runs.items():
    tps = [r["output_tokens_per_s"] for r in passes]
    ttft = [r["ttft_s"]["p50"] for r in passes]
    print(f"{name:22s} output tok/s {' '.join(f'{x:.1f}' for x in tps)}  "
          f"TTFT p50 s {' '.join(f'{x:.3f}' for x in ttft)}  "
          f"ratio of medians {statistics.median(tps) / here:.3f}")
    if "server" in passes[0]:
        means = " ".join(f"{r['server']['running_mean']:.1f}" for r in passes)
        compiled = sum(r["server"]["step_programs_compiled"] for r in passes)
        print(f"{'':22s} failed {sum(r['failed'] for r in passes)}, server rows running (mean) "
              f"{means}, step programs compiled while timed {compiled:.0f}")
PY
