"""One `jaxpp generate` job run by several processes (one per host, or `jaxpp launch`'s local
ones): the flags that join them, and the checks that they run the same job.

Every process reads the same input and runs the same requests in the same order (the engine's
host decisions are deterministic); process 0 alone writes the output file, progress and the
summary. For `--resume`, process 0 first repairs the output file, then the others read back what
it answers (so the output must be on a filesystem every process sees, as the input must).
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

from jaxpp.cli.errors import UsageError


def add_process_flags(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group(
        "several processes (one per host; the same command on each; process 0 writes)"
    )
    g.add_argument(
        "--coordinator",
        metavar="HOST:PORT",
        help="process 0's address, on which it serves the job's coordination; 'auto' reads "
        "everything from the cluster environment (SLURM, Open MPI, Kubernetes) "
        "(default: $JAXPP_COORDINATOR, else one process)",
    )
    g.add_argument("--num-processes", type=int, metavar="N", help="default: $JAXPP_NUM_PROCESSES")
    g.add_argument("--process-id", type=int, metavar="I", help="default: $JAXPP_PROCESS_ID")


def join(args: argparse.Namespace) -> int:
    """Join the job's other processes, if it has any, before anything touches a device.
    Returns this process's id (0 when alone)."""
    from jaxpp import distributed  # noqa: PLC0415 - imports jax

    coordinator, num, pid = distributed.environment_settings()
    coordinator = args.coordinator or coordinator
    num = args.num_processes if args.num_processes is not None else num
    pid = args.process_id if args.process_id is not None else pid
    if coordinator is None:
        if num is not None or pid is not None:
            raise UsageError("--num-processes and --process-id go with --coordinator HOST:PORT")
        return 0
    if coordinator != distributed.AUTO and (num is None or pid is None or not 0 <= pid < num):
        raise UsageError(
            f"--coordinator {coordinator} needs --num-processes N and --process-id I "
            f"(0 <= I < N), got N={num}, I={pid}"
        )
    if getattr(args, "input", None) == "-":
        raise UsageError("several processes cannot share stdin: pass --input FILE")
    distributed.initialize(coordinator, num, pid)
    import jax  # noqa: PLC0415

    return jax.process_index()


def check_same_job(args: argparse.Namespace, answered_ids: set) -> None:
    """Refuse to start processes given different flags, inputs or resume states."""
    import jax  # noqa: PLC0415

    from jaxpp import distributed  # noqa: PLC0415

    if not jax.distributed.is_initialized():
        return  # one process: nothing to compare (and the input may be stdin)

    flags = {k: v for k, v in vars(args).items() if k not in ("process_id", "func")}
    digest = hashlib.sha256()
    if getattr(args, "input", None) is not None:
        digest.update(Path(args.input).read_bytes())
    distributed.check_same(
        flags=repr(sorted(flags.items())),
        input=digest.hexdigest(),
        answered=repr(sorted(map(repr, answered_ids))),
    )
