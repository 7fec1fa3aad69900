"""Soak `jaxpp serve`: thousands of requests from many clients, a share of which hang up part
way (streaming after a few events, or a whole answer's client timing out), against one server
process on the demo model. Checks at the end that nothing leaked: no request running or
waiting, no KV page held (/metrics), and the server's resident memory flat: its RSS grows while
a new step program compiles (a batch shape first met: tens of MB each, printed), so the check
adds up the growth over the tenths in which no program was compiled, against the RSS after the
first tenth.

    python scripts/serve_soak.py [--requests 3000] [--concurrency 32] [--hang-up 0.3]

Prints one line per tenth (requests done, failures, RSS, KV in use) and exits 1 on a leak.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1]))

from jaxpp.bench.client import post_json, scrape, stream_completion  # noqa: E402

PROMPTS = ["def fibonacci(n):", "import os\n", "class Stack:", "# sort a list\n", "SELECT"]
RSS_GROWTH_LIMIT = 0.10  # the end's RSS at most this much above the baseline's


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_request(url: str, rng: random.Random, hang_up: float) -> str:
    """One client: 'ok', 'hung up' or 'failed: ...'."""
    body = {
        "model": "demo_model",
        "prompt": rng.choice(PROMPTS) + " " * rng.randrange(8),
        "max_tokens": rng.randint(1, 48),
        "temperature": rng.choice([0.0, 0.8]),
        "seed": rng.randrange(1000),
    }
    gone = rng.random() < hang_up
    if rng.random() < 0.7:  # streaming
        body["stream"] = True
        t = stream_completion(url + "/v1/completions", body, rng.randint(1, 3) if gone else None)
        if t.error:
            return f"failed: {t.error}"
        return "hung up" if gone else ("ok" if t.done else "failed: no [DONE]")
    try:
        with post_json(url + "/v1/completions", body, timeout=0.02 if gone else 300) as r:
            json.loads(r.read())
        return "ok"
    except TimeoutError:
        return "hung up" if gone else "failed: timeout"
    except OSError as e:
        if gone and "timed out" in str(e):
            return "hung up"
        return f"failed: {e}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=3000)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--hang-up", type=float, default=0.3, help="share of clients that hang up")
    p.add_argument("--max-num-seqs", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [sys.executable, "-m", "jaxpp.cli", "serve", "--port", str(port), "--max-num-seqs",
         str(args.max_num_seqs)],
        env={**os.environ, "HF_HUB_OFFLINE": "1"}, cwd=Path(__file__).parents[1],
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                urllib.request.urlopen(url + "/health", timeout=2)
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    print("the server did not come up", file=sys.stderr)
                    return 1
                time.sleep(0.5)
        outcomes: dict[str, int] = {}
        lock = threading.Lock()
        next_index = iter(range(args.requests))
        baseline = None
        last_seen = None  # (step programs, RSS) at the previous report
        growth_mb = 0.0  # RSS growth over reports that compiled nothing
        started = time.perf_counter()

        def client(worker: int) -> None:
            rng = random.Random(args.seed * 1000 + worker)
            for _ in iter(lambda: next(next_index, None), None):
                outcome = one_request(url, rng, args.hang_up)
                with lock:
                    key = outcome if not outcome.startswith("failed") else outcome[:120]
                    outcomes[key] = outcomes.get(key, 0) + 1

        threads = [threading.Thread(target=client, args=(w,)) for w in range(args.concurrency)]
        for t in threads:
            t.start()
        tenth = max(1, args.requests // 10)
        reported = 0
        while any(t.is_alive() for t in threads):
            time.sleep(0.5)
            done = sum(outcomes.values())
            if done >= reported + tenth or not any(t.is_alive() for t in threads):
                reported = done
                rss = rss_mb(server.pid)
                baseline = rss if baseline is None else baseline
                m = scrape(url)
                programs = int(m["jaxpp:step_programs"])
                if last_seen is not None and last_seen[0] == programs:
                    growth_mb += max(0.0, rss - last_seen[1])
                last_seen = (programs, rss)
                failed = sum(v for k, v in outcomes.items() if k.startswith("failed"))
                print(
                    f"{done:6d} done in {time.perf_counter() - started:6.1f}s  failed {failed}  "
                    f"RSS {rss:7.1f} MB  KV in use {100 * m['vllm:kv_cache_usage_perc']:.2f}%  "
                    f"step programs {programs}",
                    flush=True,
                )
        for t in threads:
            t.join()
        time.sleep(1.0)  # the last hang-ups' aborts
        m = scrape(url)
        end_rss = rss_mb(server.pid)
        print("outcomes:", json.dumps(outcomes, sort_keys=True))
        leaks = {
            "running": m["vllm:num_requests_running"],
            "waiting": m["vllm:num_requests_waiting"],
            "kv_cache_usage_perc": m["vllm:kv_cache_usage_perc"],
        }
        if last_seen[0] == int(m["jaxpp:step_programs"]):
            growth_mb += max(0.0, end_rss - last_seen[1])
        growth = growth_mb / baseline
        print(
            f"at the end: {json.dumps(leaks)}; RSS {baseline:.1f} -> {end_rss:.1f} MB "
            f"({100 * (end_rss - baseline) / baseline:+.1f}%), of which {growth_mb:.1f} MB "
            f"({100 * growth:+.1f}%) while no step program compiled"
        )
        failed = sum(v for k, v in outcomes.items() if k.startswith("failed"))
        ok = not any(leaks.values()) and growth <= RSS_GROWTH_LIMIT and failed == 0
        print("PASS" if ok else "FAIL: a leak, RSS growth or failed requests")
        return 0 if ok else 1
    finally:
        server.terminate()
        server.wait(timeout=60)


if __name__ == "__main__":
    sys.exit(main())
