"""Soak `jaxpp generate`: many short requests through the real CLI process, resident memory
sampled from /proc while it runs, to show that memory stays flat after warm-up.

    HF_HUB_OFFLINE=1 python scripts/soak_cli.py --requests 10000

The input mixes good requests (max_tokens 1-2, greedy, prompts of 1-4 tokens) with one bad
line in 100 of several kinds, so the error path is soaked too. The CLI runs the embedded demo
model as a subprocess; its RSS (VmRSS) is sampled every --sample-every seconds together with
the number of answer lines written. Reported: RSS once --warmup lines are answered, at the end,
and the peak after warm-up. Exit status 1 if the end exceeds warm-up by more than --max-growth-mb
or if any input line was not answered exactly once.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BAD_LINES = [
    '{"id": "broken", "prompt": ',
    '{"id": "bad-%d", "prompt": "x", "top_p": 2}',
    '{"id": "bad-%d", "prompt": "\\ud800"}',
    '{"custom_id": "bad-%d", "url": "/v1/completions", "body": {"prompt": "x", "n": 1000000}}',
]


def write_input(path: Path, requests: int) -> int:
    """The soak input; returns how many lines must come back as errors."""
    errors = 0
    with open(path, "w") as f:
        for i in range(requests):
            if i % 100 == 99:
                f.write(BAD_LINES[(i // 100) % len(BAD_LINES)].replace("%d", str(i)) + "\n")
                errors += 1
            else:
                line = {"id": i, "prompt": f"x{i % 97}", "max_tokens": 1 + i % 2, "temperature": 0}
                f.write(json.dumps(line) + "\n")
    return errors


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def count_lines(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except OSError:
        return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--warmup", type=int, default=1_000, help="lines answered = warmed up")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--sample-every", type=float, default=0.5)
    parser.add_argument("--max-growth-mb", type=float, default=50.0)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="jaxpp-soak-") as tmp:
        inp, out = Path(tmp) / "in.jsonl", Path(tmp) / "out.jsonl"
        expected_errors = write_input(inp, args.requests)
        cmd = [sys.executable, "-m", "jaxpp.cli", "generate", "-i", str(inp), "-o", str(out)]
        cmd += ["--batch-size", str(args.batch_size), "--quiet"]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "JAX_NUM_CPU_DEVICES": "1"}
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
        samples: list[tuple[float, int, float]] = []  # (seconds, lines answered, RSS MB)
        while proc.poll() is None:
            rss = rss_mb(proc.pid)
            if rss is not None:
                samples.append((time.perf_counter() - start, count_lines(out), rss))
            time.sleep(args.sample_every)
        stderr = proc.stderr.read()
        elapsed = time.perf_counter() - start
        records = [json.loads(line) for line in out.read_text().splitlines()]

    warm = [s for s in samples if s[1] >= args.warmup]
    if proc.returncode not in (0, 1) or not warm:
        print(f"soak failed: exit {proc.returncode}, {len(samples)} samples\n{stderr}")
        return 1
    errors = sum(r.get("error") is not None for r in records)
    at_warmup, at_end = warm[0][2], warm[-1][2]
    peak = max(s[2] for s in warm)
    print(
        json.dumps(
            {
                "requests": args.requests,
                "answer_lines": len(records),
                "error_lines": errors,
                "seconds": round(elapsed, 1),
                "requests_per_s": round(args.requests / elapsed, 1),
                "rss_mb_at_warmup": round(at_warmup, 1),
                "rss_mb_at_end": round(at_end, 1),
                "rss_mb_peak_after_warmup": round(peak, 1),
                "rss_growth_mb": round(at_end - at_warmup, 1),
                "samples": len(samples),
            }
        )
    )
    ok = len(records) == args.requests and errors == expected_errors
    return 0 if ok and at_end - at_warmup <= args.max_growth_mb else 1


if __name__ == "__main__":
    sys.exit(main())
