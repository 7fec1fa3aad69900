"""Two processes x two CPU devices joined through jax.distributed (gloo) give the answers of
one process with four devices: pp=4 (the stage axis crosses the processes), greedy and seeded
sampling, logits within float32 rounding; each process reads only its own
shards of the checkpoint; an orbax checkpoint from `jaxpp convert` restores bit-identical
logits, in one process and across two; processes started with different layouts refuse."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from multihost_worker import ENGINE, LAYOUTS, run

import jaxpp
from jaxpp import cli

WORKER = Path(__file__).with_name("multihost_worker.py")
ROOT = Path(__file__).parents[1]  # the workers import this checkout's jaxpp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _job(mode: str, model: Path, tmp: Path, *extra: Path) -> list[dict]:
    """Run a 2-process job of the worker; each process's JSON result."""
    port = _free_port()
    outs = [tmp / f"{mode}-{i}.json" for i in range(2)]
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                str(WORKER),
                mode,
                str(model),
                str(port),
                str(i),
                str(outs[i]),
                *map(str, extra),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT), "JAXPP_WORKER_CACHE": str(tmp / "xla")},
        )
        for i in range(2)
    ]
    logs = [p.communicate(timeout=240)[0] for p in procs]
    for p, log in zip(procs, logs, strict=True):
        assert p.returncode == 0, log[-3000:]
    return [json.loads(o.read_text()) for o in outs]


@pytest.fixture(scope="module")
def model(hf_model):
    return hf_model("llama")


@pytest.fixture(scope="module")
def converted(model, tmp_path_factory):
    """The model as an orbax checkpoint in the engine's pp=4 layout."""
    out = tmp_path_factory.mktemp("orbax") / "llama-pp4"
    assert cli.main(["convert", str(model), str(out), "--pp", "4"]) == 0
    return out


@pytest.fixture(scope="module")
def two_processes(model, converted, tmp_path_factory):
    return _job("layouts", model, tmp_path_factory.mktemp("multihost"), converted)


@pytest.fixture(scope="module")
def reference(model):
    """The same requests in this process over 4 of its devices."""
    return {f"{pp}x{tp}": run(jaxpp.LLM(model, pp=pp, tp=tp, **ENGINE)) for pp, tp in LAYOUTS}


@pytest.mark.parametrize("layout", [f"{pp}x{tp}" for pp, tp in LAYOUTS])
def test_two_processes_match_one(two_processes, reference, layout):
    ref = reference[layout]
    for result in two_processes:
        got = result[layout]
        assert got["tokens"] == ref["tokens"]
        for g, r in zip(got["logits"], ref["logits"], strict=True):
            g, r = np.array(g), np.array(r)
            assert np.abs(g - r).max() <= 5e-6 * np.abs(r).max()


def test_each_process_reads_only_its_shards(two_processes, reference):
    """pp=4 over 2 processes: each holds 2 stages' layers and half the vocabulary."""
    whole = reference["4x1"]["load_stats"]
    assert whole["bytes_read"] <= whole["checkpoint_bytes"]
    for result in two_processes:
        stats = result["4x1"]["load_stats"]
        assert stats["checkpoint_bytes"] == whole["checkpoint_bytes"]
        assert 0.4 * whole["bytes_read"] <= stats["bytes_read"] <= 0.55 * stats["checkpoint_bytes"]


def test_orbax_checkpoint_restores_bit_identical_logits(converted, two_processes, reference):
    ref = reference["4x1"]
    restored = run(jaxpp.LLM(converted, pp=4, **ENGINE))
    assert restored["tokens"] == ref["tokens"]
    assert restored["logits"] == ref["logits"]
    for result in two_processes:  # each process restores only its own shards
        assert result["orbax"]["logits"] == ref["logits"]
        stats = result["orbax"]["load_stats"]
        assert stats["bytes_read"] <= 0.55 * restored["load_stats"]["bytes_read"]
    with pytest.raises(ValueError, match="converted for pp=4"):
        jaxpp.LLM(converted, pp=2, **ENGINE)


def test_processes_started_with_different_layouts_refuse(model, tmp_path):
    for result in _job("mismatch", model, tmp_path):
        assert result["error"] is not None
        assert "layout differs on process(es) 1" in result["error"]


def _children(parent: int) -> dict[int, int]:
    """JAXPP_PROCESS_ID -> pid of each child process of `parent` (read from /proc)."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            environ = (stat.parent / "environ").read_bytes().split(b"\0") if ppid == parent else []
        except (OSError, ValueError, IndexError):
            continue
        for item in environ:
            if item.startswith(b"JAXPP_PROCESS_ID="):
                found[int(item.split(b"=", 1)[1])] = int(stat.parent.name)
    return found


def _answered(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


# Slow (81 s: two jobs of two processes): resuming a killed job is test_cli.py's SIGKILL test on
# one process (the same resume path), and the launcher's other tests start and end processes.
@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="reads /proc")
def test_a_killed_process_ends_the_job_and_resume_completes_it(model, tmp_path):
    """`jaxpp launch` of a pp=4 job over 2 processes; process 1 is SIGKILLed once answers
    are being written: the job ends non-zero within 60 s naming process 1, every answer
    written so far stays, and `--resume` completes the job with nothing lost or duplicated."""
    n = 80
    (tmp_path / "in.jsonl").write_text(
        "".join(
            json.dumps({"id": f"q{i}", "prompt": [3 + i % 40, 4, 5], "max_tokens": 12}) + "\n"
            for i in range(n)
        )
    )
    out = tmp_path / "out.jsonl"
    command = [
        sys.executable, "-m", "jaxpp.cli", "launch", "--nproc", "2", "--devices-per-process",
        "2", "--grace", "1", "--", "generate", "--model", str(model), "--pp", "4",
        "--max-num-seqs", "4", "--max-model-len", "64", "--temperature", "0",
        "--input", str(tmp_path / "in.jsonl"), "--output", str(out), "--quiet",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    launcher = subprocess.Popen(
        command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env
    )
    deadline = time.monotonic() + 180
    while len(_answered(out)) < 3 and launcher.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    victim = _children(launcher.pid).get(1)
    assert victim is not None and launcher.poll() is None, "the job ended before the kill"
    os.kill(victim, signal.SIGKILL)
    killed = time.monotonic()
    stderr = launcher.communicate(timeout=90)[1]
    assert time.monotonic() - killed <= 60
    assert launcher.returncode != 0
    assert "process 1" in stderr, stderr[-2000:]
    before = _answered(out)
    assert 3 <= len(before) < n

    resumed = subprocess.run(
        command + ["--resume"], capture_output=True, text=True, env=env, timeout=240
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    after = _answered(out)
    assert after[: len(before)] == before  # nothing written before the kill changed
    assert sorted(a["id"] for a in after) == sorted(f"q{i}" for i in range(n))
    assert all("error" not in a or a["error"] is None for a in after)


def test_launch_starts_a_users_own_program(tmp_path):
    """`jaxpp launch -- python job.py`: the program joins with jaxpp.distributed.initialize()
    (no arguments: the launcher's environment) and sees both processes' devices; process 0's
    JSON reaches process 1 through broadcast_json. A program that does not exist: exit 2."""
    job = tmp_path / "job.py"
    job.write_text(
        "import sys, json, jax\n"
        "from jaxpp import distributed\n"
        "distributed.initialize()\n"
        "got = distributed.broadcast_json({'from': jax.process_index()} if jax.process_index() "
        "== 0 else None)\n"
        "print('RESULT', json.dumps([jax.process_index(), jax.process_count(), jax.device_count(), "
        "got]))\n"
    )
    done = subprocess.run(
        [sys.executable, "-m", "jaxpp.cli", "launch", "--nproc", "2", "--devices-per-process",
         "2", "--", sys.executable, str(job)],
        capture_output=True, text=True, timeout=240, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    lines = sorted(json.loads(x[7:]) for x in done.stdout.splitlines() if x.startswith("RESULT "))
    assert lines == [[0, 2, 4, {"from": 0}], [1, 2, 4, {"from": 0}]]
    missing = subprocess.run(
        [sys.executable, "-m", "jaxpp.cli", "launch", "--", "no-such-program-xyz"],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )  # fmt: skip
    assert missing.returncode == 2 and "cannot start 'no-such-program-xyz'" in missing.stderr


def test_launch_keeps_each_childs_lines_whole(tmp_path):
    """Two children write a line in pieces at the same moment (as an unbuffered print does: the
    text, the separator, the newline; gloo logs word by word), then a last line without a
    newline: the launcher's stdout still holds every line whole and nothing is lost. When the
    children shared the launcher's stdout, their pieces interleaved ('RESULTRESULT  [0, ...]')
    and test_launch_starts_a_users_own_program failed on a busy machine with exit 0."""
    job = tmp_path / "pieces.py"
    job.write_text(
        "import os, pathlib, sys, time\n"
        "me = int(os.environ['JAXPP_PROCESS_ID'])\n"
        "os.write(1, b'line of %d: ' % me)\n"
        "pathlib.Path(sys.argv[1], str(me)).touch()\n"
        "other, deadline = pathlib.Path(sys.argv[1], str(1 - me)), time.monotonic() + 60\n"
        "while not other.exists() and time.monotonic() < deadline:  # both are mid-line now\n"
        "    time.sleep(0.01)\n"
        "os.write(1, b'end\\n')\n"
        "os.write(1, b'last of %d' % me)\n"
    )
    done = subprocess.run(
        [sys.executable, "-m", "jaxpp.cli", "launch", "--nproc", "2", "--", sys.executable,
         str(job), str(tmp_path)],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(done.stdout.splitlines()) == [
        "last of 0", "last of 1", "line of 0: end", "line of 1: end"
    ], done.stdout  # fmt: skip
