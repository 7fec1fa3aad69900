"""A fresh `jaxpp serve`'s first burst: start the server, wait until /health says it is ready,
send a burst of random requests all at once, then a burst of the same lengths again (other ids,
so that the prefix cache serves neither); compare the TTFT p50 of the two and count the
programs compiled while they ran (the server's jaxpp:step_programs).

    python scripts/first_burst.py                # the demo model, 64 requests
    python scripts/first_burst.py --requests 64 --max-prompt 256 --max-output 64

Prints the seconds from start to ready, each burst's TTFT p50/p99 and output tok/s, and the
programs compiled during the bursts (0 expected: warm-up compiled them before /health said 200).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--max-prompt", type=int, default=256)
    p.add_argument("--max-output", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("serve_args", nargs="*", help="extra `jaxpp serve` flags (after --)")
    args = p.parse_args(argv)
    from jaxpp.bench.client import run_requests, scrape  # noqa: PLC0415
    from jaxpp.bench.serving import percentiles  # noqa: PLC0415
    from jaxpp.bench.workloads import Request  # noqa: PLC0415

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "jaxpp.cli", "serve", "--port", str(port), *args.serve_args]
    start = time.perf_counter()
    server = subprocess.Popen(command, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        ready = _wait_ready(base, server) - start
        rng = np.random.default_rng(args.seed)
        burst = [
            Request(rng.integers(3, 4000, size=int(rng.integers(1, args.max_prompt))).tolist(),
                    int(rng.integers(1, args.max_output)))
            for _ in range(args.requests)
        ]  # fmt: skip
        report = {"ready_s": ready, "bursts": []}
        model = _model(base)
        for shift in range(2):
            burst = [Request([3 + (t - 3 + shift) % 3997 for t in r.prompt], r.output_len)
                     for r in burst]  # fmt: skip
            before = scrape(base)["jaxpp:step_programs"]
            timings, seconds = run_requests(base, model, burst, None, False)
            failed = [t.error for t in timings if t.error]
            ttft = [t.first_text - t.sent for t in timings if not t.error]
            report["bursts"].append({
                "seconds": seconds, "failed": len(failed),
                "ttft_s": percentiles(ttft),
                "output_tok_s": sum(t.output_tokens for t in timings) / seconds,
                "programs_compiled": scrape(base)["jaxpp:step_programs"] - before,
            })  # fmt: skip
        first, again = (b["ttft_s"]["p50"] for b in report["bursts"])
        report["ttft_p50_ratio"] = first / again
        print(json.dumps(report, indent=1))
    finally:
        server.terminate()
        server.wait(timeout=60)
    return 0


def _model(base: str) -> str:
    with urllib.request.urlopen(base + "/v1/models", timeout=30) as r:
        return json.loads(r.read())["data"][0]["id"]


def _wait_ready(base: str, server: subprocess.Popen) -> float:
    """The moment /health first answers 200."""
    while server.poll() is None:
        try:
            with urllib.request.urlopen(base + "/health", timeout=5) as r:
                if r.status == 200:
                    return time.perf_counter()
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"the server exited with {server.returncode} before it was ready")


if __name__ == "__main__":
    sys.exit(main())
