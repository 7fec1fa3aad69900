"""`jaxpp launch`: run one jaxpp command, or a program of your own, as several local processes,
each with its own CPU devices, joined through JAX's distributed runtime (for tests, and to try
multi-host on a laptop).

    jaxpp launch --nproc 2 --devices-per-process 2 -- generate --pp 4 --input q.jsonl ...
    jaxpp launch --nproc 2 --devices-per-process 2 -- python my_job.py

Each child is `python -m jaxpp.cli COMMAND...` (COMMAND a jaxpp command) or the command line
as given, with JAXPP_COORDINATOR=127.0.0.1:<a free port>, JAXPP_NUM_PROCESSES, JAXPP_PROCESS_ID
and JAX_NUM_CPU_DEVICES set (gloo collectives on CPU): what `jaxpp.distributed.initialize()`
reads, as torchrun's variables are for PyTorch.
SIGINT and SIGTERM are forwarded to every child. When a child fails the others get `--grace`
seconds (default GRACE_S) to finish on their own (they run the same work, so they usually fail
the same way), then are stopped (SIGTERM, and SIGKILL after as long again); the launcher exits
with the first failing child's status (128 + signal for a child killed by a signal), naming it
on stderr.

Each child's stdout comes through a pipe of its own and is copied to the launcher's stdout a
whole line at a time (a last line without a newline gets one), so lines of different children
never mix: sharing one stdout, they did, because a line often leaves a process in pieces (an
unbuffered print writes the text, the separator and the newline separately; gloo logs word by
word), and on a busy machine two children's pieces interleaved ('RESULTRESULT  [0, ...]').
The launcher returns only when every child has exited and its pipe is drained. stderr stays the
launcher's own (progress bars and logs keep their terminal).
"""

from __future__ import annotations

import argparse
import functools
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import BinaryIO

GRACE_S = 10.0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "launch",
        help="run a command as several local processes (CPU devices, gloo)",
        description="Run COMMAND (a jaxpp command, or any program) as N local processes joined "
        "into one job, e.g.\n"
        "  jaxpp launch --nproc 2 --devices-per-process 2 -- generate --pp 4 --input q.jsonl\n"
        "  jaxpp launch --nproc 2 --devices-per-process 2 -- python my_job.py",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--nproc", type=int, default=2, metavar="N", help="processes (default: 2)")
    p.add_argument(
        "--devices-per-process",
        type=int,
        default=1,
        metavar="D",
        help="CPU devices each process simulates (default: 1)",
    )
    p.add_argument(
        "--grace",
        type=float,
        default=GRACE_S,
        metavar="SECONDS",
        help=f"after a child fails, how long the others may run on (default: {GRACE_S:.0f})",
    )
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- then a jaxpp command or a program")
    # The jaxpp commands, read when launch runs (by then every one is registered).
    p.set_defaults(func=functools.partial(run_launch, jaxpp_commands=subparsers.choices))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _status(code: int) -> str:
    return f"signal {signal.Signals(-code).name}" if code < 0 else f"status {code}"


def run_launch(args: argparse.Namespace, jaxpp_commands=()) -> int:
    from jaxpp.cli.errors import UsageError  # noqa: PLC0415

    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        raise UsageError("launch needs a command after '--', e.g. -- generate --pp 2 ...")
    if command[0] in jaxpp_commands:
        command = [sys.executable, "-m", "jaxpp.cli", *command]
    if args.nproc < 1 or args.devices_per_process < 1:
        raise UsageError("--nproc and --devices-per-process must be positive")
    if not args.grace >= 0:
        raise UsageError(f"--grace={args.grace} is invalid: expected seconds >= 0")
    coordinator = f"127.0.0.1:{_free_port()}"
    children, relays = [], []
    for i in range(args.nproc):
        env = dict(
            os.environ,
            JAXPP_COORDINATOR=coordinator,
            JAXPP_NUM_PROCESSES=str(args.nproc),
            JAXPP_PROCESS_ID=str(i),
            JAX_NUM_CPU_DEVICES=str(args.devices_per_process),
            JAX_PLATFORMS="cpu",
        )
        # A session of its own: a Ctrl-C reaches the children once, through the launcher.
        try:
            child = subprocess.Popen(
                command, env=env, stdout=subprocess.PIPE, start_new_session=True
            )
        except OSError as e:  # no such program, not executable
            for started in children:
                started.kill()
            raise UsageError(f"cannot start {command[0]!r}: {e.strerror}") from None
        children.append(child)
        # Daemon: should the launcher itself fail, a pipe held open by a program the child
        # started in the background cannot keep it alive.
        relays.append(threading.Thread(target=_relay_lines, args=(child.stdout,), daemon=True))
        relays[-1].start()

    def forward(signum, _frame):
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, forward)
    status = _wait(children, args.grace)
    for relay in relays:  # a child's last lines may still be in its pipe when it has exited
        relay.join()
    return status


_STDOUT_LOCK = threading.Lock()


def _relay_lines(pipe: BinaryIO) -> None:
    """Copy a child's stdout to ours, one whole line per write, until the pipe's end (the child
    and whatever it started that shares its stdout have closed it). When our stdout is gone
    (`jaxpp launch ... | head`), the pipe is closed, so the child's next write fails as it
    would have on the launcher's stdout."""
    with pipe:
        for line in iter(pipe.readline, b""):
            if not line.endswith(b"\n"):
                line += b"\n"
            with _STDOUT_LOCK:
                try:
                    sys.stdout.buffer.write(line)
                    sys.stdout.buffer.flush()
                except OSError:  # BrokenPipeError, or stdout closed
                    return


def _wait(children: list[subprocess.Popen], grace: float) -> int:
    """Wait for every child; after the first failure, stop the stragglers after `grace` s."""
    failed: tuple[int, int] | None = None  # (process, code) of the first failure
    deadline = None
    while any(child.poll() is None for child in children):
        for i, child in enumerate(children):
            code = child.poll()
            if code not in (None, 0) and failed is None:
                failed, deadline = (i, code), time.monotonic() + grace
                print(
                    f"jaxpp launch: process {i} exited with {_status(code)}; the others get "
                    f"{grace:g} s to finish",
                    file=sys.stderr,
                )
        if deadline is not None and time.monotonic() > deadline:
            for child in children:
                if child.poll() is None:
                    child.terminate()
            deadline = time.monotonic() + grace
            for child in children:
                if child.poll() is None:
                    try:
                        child.wait(max(0.0, deadline - time.monotonic()))
                    except subprocess.TimeoutExpired:
                        child.kill()
        time.sleep(0.05)
    if failed is None:
        failed = next(((i, c.returncode) for i, c in enumerate(children) if c.returncode), None)
    if failed is None:
        return 0
    code = failed[1]
    return 128 - code if code < 0 else code
