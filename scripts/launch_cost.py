"""What launching one small program over all the (simulated) devices costs: chained calls of a
shard_map over a "stage" axis on [32 per device, 512] float32, without a collective, with a
psum, and with a psum and a ppermute; the best of 5 runs of 200 calls.

    JAX_NUM_CPU_DEVICES=4 python scripts/launch_cost.py

The engine launches two programs per tick (forward, sample); this is the floor of that.
"""

from __future__ import annotations

import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

CALLS, RUNS = 200, 5
IN_FLIGHT = 8  # XLA:CPU deadlocks past 32 multi-device programs in flight (engine._pace)


def main() -> int:
    n = len(jax.devices())
    mesh = Mesh(np.array(jax.devices()), ("stage",))
    sharding = NamedSharding(mesh, P("stage"))
    for collectives in ("none", "psum", "psum+ppermute"):
        program = _program(mesh, collectives, n)
        x = program(jax.device_put(jnp.ones((32 * n, 512)), sharding))
        best = float("inf")
        for _ in range(RUNS):
            start = time.perf_counter()
            for i in range(CALLS):
                x = program(x)
                if i % IN_FLIGHT == IN_FLIGHT - 1:
                    x.block_until_ready()
            x.block_until_ready()
            best = min(best, (time.perf_counter() - start) / CALLS)
        print(f"{n} devices, {collectives}: {1e3 * best:.3f} ms per launch")
    return 0


def _program(mesh: Mesh, collectives: str, n: int):
    def body(x):
        y = x * 1.0001
        if collectives != "none":
            y = y + 1e-6 * jax.lax.psum(y, "stage")
        if collectives == "psum+ppermute":
            y = jax.lax.ppermute(y, "stage", [(i, (i + 1) % n) for i in range(n)])
        return y

    mapped = jax.shard_map(body, mesh=mesh, in_specs=P("stage"), out_specs=P("stage"))
    return jax.jit(mapped, donate_argnums=0)


if __name__ == "__main__":
    sys.exit(main())
