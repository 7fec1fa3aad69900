"""Many processes, one program: joining JAX's distributed runtime, checking that every process
runs the same job, and reading results back from arrays that span processes.

JAX is multi-controller: each process runs this same Python program, owns some devices, and
every jitted program runs over the global mesh of all processes' devices. So jaxpp needs no
messages of its own between processes, only three rules, all kept here:

1. `initialize()` joins the runtime before anything touches a device (a backend that is up
   cannot join any more).
2. Every process makes the same host decisions in the same order: the scheduler is
   deterministic, and `check_same()` refuses to start processes given different models,
   layouts or inputs (a mismatch would otherwise deadlock in the first collective, or worse,
   silently compute garbage).
3. Host values go into programs as plain numpy (jit treats a host value as the same on every
   process), and come out through `to_host()`: an output sharded over devices of other
   processes is gathered to every process by one small collective program.
"""

from __future__ import annotations

import hashlib
import json
import os

import jax
import numpy as np
from jax.experimental import multihost_utils

# A lost process is noticed by the coordination service when its heartbeats stop: after this
# many seconds every other process is told and exits (JAX's default is 100 s).
HEARTBEAT_TIMEOUT_S = 20
AUTO = "auto"  # --coordinator auto: the cluster environment (SLURM, Open MPI, ...) says


class MismatchError(ValueError):
    """Processes of one job were started with different models, layouts or inputs."""


def initialize(
    coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None
) -> None:
    """Join the processes of one job. `coordinator` HOST:PORT (process 0 serves there) with
    `num_processes` and this `process_id`, or `AUTO` to let JAX read them from the cluster
    environment. Without arguments they come from the environment `jaxpp launch` sets
    (`environment_settings`), as torchrun's do for PyTorch. On CPU the processes talk through
    gloo."""
    if jax.distributed.is_initialized():
        return
    if coordinator is None:
        coordinator, num_processes, process_id = environment_settings()
        if coordinator is None:
            raise ValueError(
                "jaxpp.distributed.initialize() without arguments reads JAXPP_COORDINATOR, "
                "JAXPP_NUM_PROCESSES and JAXPP_PROCESS_ID (set by `jaxpp launch`): none is set"
            )
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    explicit = (
        {}
        if coordinator == AUTO
        else {
            "coordinator_address": coordinator,
            "num_processes": num_processes,
            "process_id": process_id,
        }
    )
    jax.distributed.initialize(**explicit, heartbeat_timeout_seconds=HEARTBEAT_TIMEOUT_S)


def environment_settings() -> tuple[str | None, int | None, int | None]:
    """(coordinator, num_processes, process_id) from JAXPP_COORDINATOR, JAXPP_NUM_PROCESSES
    and JAXPP_PROCESS_ID: how `jaxpp launch` hands them to its children."""
    num, pid = os.environ.get("JAXPP_NUM_PROCESSES"), os.environ.get("JAXPP_PROCESS_ID")
    return (
        os.environ.get("JAXPP_COORDINATOR"),
        None if num is None else int(num),
        None if pid is None else int(pid),
    )


def barrier(name: str) -> None:
    """Wait until every process reaches the barrier `name`."""
    if jax.distributed.is_initialized():
        multihost_utils.sync_global_devices(name)


def check_same(**fields: str) -> None:
    """Every process must pass the same `fields` (e.g. model=..., layout=...): their digests
    are gathered to all processes, and each raises MismatchError naming the fields and the
    processes that differ from process 0. A no-op in a single process."""
    if not jax.distributed.is_initialized():
        return
    names = sorted(fields)
    digests = np.array(
        [list(hashlib.sha256(fields[n].encode()).digest()[:16]) for n in names], np.uint8
    )
    everyone = np.asarray(multihost_utils.process_allgather(digests))  # [processes, fields, 16]
    differ = {
        name: [p for p in range(len(everyone)) if (everyone[p, i] != everyone[0, i]).any()]
        for i, name in enumerate(names)
    }
    bad = {name: procs for name, procs in differ.items() if procs}
    if bad:
        what = "; ".join(
            f"{name} differs on process(es) {', '.join(map(str, procs))}"
            for name, procs in bad.items()
        )
        raise MismatchError(
            f"the {jax.process_count()} processes of this job were not started alike "
            f"(compared with process 0): {what}"
        )


def broadcast_json(value=None):
    """Process 0's JSON-able `value`, on every process (the others pass nothing): how a server's
    requests reach every process's engine in the same order. JSON, never pickle. Two small
    collectives (the length, then the bytes padded to a power of two, so that few shapes
    compile). A no-op in a single process."""
    if not jax.distributed.is_initialized():
        return value
    leader = jax.process_index() == 0
    data = json.dumps(value).encode() if leader else b""
    size = int(multihost_utils.broadcast_one_to_all(np.array(len(data), np.int64)))
    padded = np.zeros(max(256, 1 << (size - 1).bit_length()), np.uint8)
    padded[: len(data)] = np.frombuffer(data, np.uint8)
    data = np.asarray(multihost_utils.broadcast_one_to_all(padded))[:size].tobytes()
    return value if leader else json.loads(data)


def smallest(value: int) -> int:
    """The smallest of every process's `value`: a host decision (e.g. the KV-cache budget from
    each process's free memory) that must come out the same everywhere."""
    if not jax.distributed.is_initialized():
        return value
    return int(np.min(multihost_utils.process_allgather(np.array(value, np.int64))))


def to_host(tree):
    """The pytree's arrays as numpy, each whole on every process. Arrays this process holds
    whole (fully addressable, or replicated) are read locally; the rest are gathered in one
    collective program, which every process reaches at the same point (rule 2)."""
    leaves, treedef = jax.tree.flatten(tree)
    spread = [
        i
        for i, leaf in enumerate(leaves)
        if isinstance(leaf, jax.Array)
        and not leaf.is_fully_addressable
        and not leaf.sharding.is_fully_replicated
    ]
    host = [None if i in spread else np.asarray(leaf) for i, leaf in enumerate(leaves)]
    if spread:
        gathered = multihost_utils.process_allgather([leaves[i] for i in spread], tiled=True)
        for i, value in zip(spread, gathered, strict=True):
            host[i] = np.asarray(value)
    return jax.tree.unflatten(treedef, host)
