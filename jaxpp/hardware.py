"""Hardware profiles for `jaxpp plan`: what one device holds and moves, and how devices connect.

A profile is a JSON file in configs/hardware/ (`--hardware h100-sxm`), any path to one, an
LLMServingSim cluster config read as it is (`--cluster-config FILE`), or "this-cpu": this machine,
measured on the spot (a large copy for the memory bandwidth, a GEMM for the FLOP rate, an exchange
between two simulated devices for the link latency).

Every number in a profile file says where it comes from (its "sources" object): a vendor spec
sheet, a measurement (with the command or issue that made it), or an assumption, named as one.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from pathlib import Path

HARDWARE_DIR = Path(__file__).resolve().parent.parent / "configs" / "hardware"
THIS_CPU = "this-cpu"
# LLMServingSim's hardware names -> our profiles: its cluster configs give memory and links but
# take compute from its own profiled kernels, so the FLOP rate comes from the matching profile.
CLUSTER_HARDWARE = {
    "H100": "h100-sxm",
    "H200": "h200",
    "A100": "a100-80gb",
    "RTXPRO6000": "rtx-pro-6000",
    "L4": "l4",
}


@dataclasses.dataclass(frozen=True)
class Link:
    bandwidth: float  # bytes/s, one direction, per device
    latency: float  # seconds per message step


@dataclasses.dataclass(frozen=True)
class Hardware:
    name: str
    platform: str  # "gpu" or "cpu": decides the engine's KV budget rule and attention reads
    memory_bytes: int  # one device's memory
    memory_bandwidth: float  # bytes/s one device reads (a measured copy rate when known)
    peak_flops: dict[str, float]  # dense FLOP/s per dtype name ("bfloat16", "float32", ...)
    devices_per_node: int
    intra_node: Link
    inter_node: Link
    # Simulated devices that share one host's cores and memory (this-cpu): each of n devices
    # in use gets 1/n of the bandwidth and FLOP rate.
    shared_host: bool = False
    # JAX's allocator takes this fraction of a GPU's memory (XLA_PYTHON_CLIENT_MEM_FRACTION,
    # default 0.75): the engine's memory limit, of which it gives 90% of what the weights leave
    # to the KV cache.
    memory_fraction: float = 1.0
    sources: dict[str, str] = dataclasses.field(default_factory=dict)

    def flops(self, dtype_name: str) -> float:
        if dtype_name not in self.peak_flops:
            raise ValueError(
                f"hardware {self.name!r} gives no FLOP rate for {dtype_name}: "
                f"known {sorted(self.peak_flops)}"
            )
        return self.peak_flops[dtype_name]

    def link(self, crosses_nodes: bool) -> Link:
        return self.inter_node if crosses_nodes else self.intra_node


def known_profiles() -> list[str]:
    return sorted(p.stem for p in HARDWARE_DIR.glob("*.json")) + [THIS_CPU]


def load_hardware(name: str | os.PathLike) -> Hardware:
    """A profile by name (configs/hardware/NAME.json, or "this-cpu") or by path."""
    if str(name) == THIS_CPU:
        return measure_this_cpu()
    path = Path(name)
    if path.suffix != ".json":
        path = HARDWARE_DIR / f"{name}.json"
    if not path.is_file():
        raise ValueError(f"hardware {str(name)!r} not found ({path}); known: {known_profiles()}")
    return profile_from_dict(read_json(path), str(path))


def profile_from_dict(raw: dict, source: str) -> Hardware:
    """A profile from its JSON object (units: GB, GB/s, TFLOP/s, microseconds)."""

    def number(obj: dict, key: str, where: str) -> float:
        value = obj.get(key)
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            raise ValueError(f"{source}: {where}{key}={value!r} is invalid: expected a number >= 0")
        return float(value)

    def link(key: str) -> Link:
        obj = raw.get(key)
        if not isinstance(obj, dict):
            raise ValueError(f"{source}: {key!r} is missing: expected an object")
        return Link(
            number(obj, "bandwidth_gbps", f"{key}.") * 1e9,
            number(obj, "latency_us", f"{key}.") * 1e-6,
        )

    tflops = raw.get("dense_tflops")
    if not isinstance(tflops, dict) or not tflops:
        raise ValueError(f"{source}: 'dense_tflops' is missing: expected {{dtype: TFLOP/s}}")
    bandwidth = raw.get("measured_copy_bandwidth_gbps") or number(raw, "memory_bandwidth_gbps", "")
    return Hardware(
        name=str(raw.get("name", Path(source).stem)),
        platform=str(raw.get("platform", "gpu")),
        memory_bytes=int(number(raw, "memory_gb", "") * 1e9),
        memory_bandwidth=float(bandwidth) * 1e9,
        peak_flops={k: number(tflops, k, "dense_tflops.") * 1e12 for k in tflops},
        devices_per_node=int(number(raw, "devices_per_node", "")),
        intra_node=link("intra_node"),
        inter_node=link("inter_node"),
        shared_host=bool(raw.get("shared_host", False)),
        memory_fraction=float(raw.get("memory_fraction", 1.0)),
        sources={str(k): str(v) for k, v in (raw.get("sources") or {}).items()},
    )


def read_cluster_config(path: str | os.PathLike) -> tuple[Hardware, dict]:
    """An LLMServingSim cluster config as it is: (the profile of its first instance's devices,
    the layout it names: {"num_npus", "tp_size", "pp_size"} where given).

    Its units: npu_mem.mem_size GB, npu_mem.mem_bw GB/s, link_bw GB/s, link_latency ns. Its
    single link stands for every link (LLMServingSim has one); the FLOP rate, which it takes
    from profiled kernels instead, comes from our profile of the same `hardware`.
    """
    raw = read_json(Path(path))
    where = f"--cluster-config {path}"
    try:
        instance = raw["nodes"][0]["instances"][0]
        memory = instance["npu_mem"]
        name = str(instance.get("hardware", ""))
        link = Link(float(raw["link_bw"]) * 1e9, float(raw.get("link_latency", 0)) * 1e-9)
        size, bandwidth = float(memory["mem_size"]), float(memory["mem_bw"])
    except (KeyError, IndexError, TypeError, ValueError) as e:
        raise ValueError(
            f"{where}: not an LLMServingSim cluster config (nodes[0].instances[0].npu_mem, "
            f"link_bw): {e!r}"
        ) from None
    profile = CLUSTER_HARDWARE.get(name)
    if profile is None:
        raise ValueError(
            f"{where}: hardware {name!r} has no FLOP rate here; known: {sorted(CLUSTER_HARDWARE)}"
        )
    base = load_hardware(profile)
    devices = instance.get("num_npus") or instance.get("npu_num") or 1
    per_node = sum(
        (i.get("num_npus") or i.get("npu_num") or 1) for i in raw["nodes"][0]["instances"]
    )
    layout = {k: instance[k] for k in ("tp_size", "pp_size") if k in instance}
    layout["num_npus"] = devices
    hardware = dataclasses.replace(
        base,
        name=f"{name} ({Path(path).name})",
        memory_bytes=int(size * 1e9),
        memory_bandwidth=bandwidth * 1e9,
        devices_per_node=int(per_node),
        intra_node=link,
        inter_node=link,
        sources={
            **{k: v for k, v in base.sources.items() if "flops" in k},
            "memory": f"{path}: npu_mem",
            "links": f"{path}: link_bw, link_latency",
        },
    )
    return hardware, layout


def read_json(path: Path) -> dict:
    """A JSON object from a file; anything else is a ValueError naming the file."""
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot read it as JSON ({e})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return raw


# --- this machine, measured --------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def measure_this_cpu() -> Hardware:
    """This host as a profile, measured now: copy bandwidth of a 512 MiB array (read + write,
    best of 5), float32 and bfloat16 GEMM rates at a decode-like shape (64 x 2048 @ 2048 x 2048),
    and the latency of an exchange between two simulated devices when the process has them. Every
    simulated device shares these (shared_host)."""
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    def best_of(fn, *args, repeats: int = 5) -> float:
        jax.block_until_ready(fn(*args))
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            jax.block_until_ready(fn(*args))
            best = min(best, time.perf_counter() - start)
        return best

    n = 512 * 2**20 // 4
    x = jnp.ones((n,), jnp.float32)
    copy_s = best_of(jax.jit(lambda a: a + 1.0), x)
    del x
    bandwidth = 2 * n * 4 / copy_s
    flops = {}
    rows, width = 64, 2048
    for dtype in ("float32", "bfloat16"):
        a = jnp.ones((rows, width), dtype)
        b = jnp.ones((width, width), dtype)
        gemm = jax.jit(lambda p, q: p @ q, inline=True)
        flops[dtype] = 2 * rows * width * width / best_of(gemm, a, b)
    flops["float16"] = flops["bfloat16"]
    latency = _exchange_latency(jax, jnp, np)
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    link = Link(bandwidth / 2, latency)  # a transfer between simulated devices is one copy
    measured = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    return Hardware(
        name=f"this-cpu ({os.cpu_count()} cores)",
        platform="cpu",
        memory_bytes=memory,
        memory_bandwidth=bandwidth,
        peak_flops=flops,
        devices_per_node=len(jax.devices()),
        intra_node=link,
        inter_node=link,
        shared_host=True,
        sources={
            "memory_bandwidth": f"measured {measured}: 512 MiB jitted a + 1 (read + write)",
            "dense_flops": f"measured {measured}: jitted {rows}x{width} @ {width}x{width} GEMM",
            "links": f"measured {measured}: ppermute of 4 KiB between 2 CPU devices"
            if latency
            else "one simulated device in this process: no link to measure",
            "memory": "os.sysconf physical pages",
        },
    )


def _exchange_latency(jax, jnp, np) -> float:
    """Seconds per exchange (ppermute, the stage hand-off's collective) of a 4 KiB array
    between two simulated devices (0 with one)."""
    if len(jax.devices()) < 2:
        return 0.0
    from jax.sharding import Mesh  # noqa: PLC0415
    from jax.sharding import PartitionSpec as P  # noqa: PLC0415

    mesh = Mesh(np.array(jax.devices()[:2]), ("x",))
    steps = 200

    def body(v):
        swap = [(0, 1), (1, 0)]
        return jax.lax.fori_loop(0, steps, lambda _, a: jax.lax.ppermute(a, "x", swap), v)

    run = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P("x"), out_specs=P("x")))
    value = jnp.ones((2, 1024), jnp.float32)
    jax.block_until_ready(run(value))
    start = time.perf_counter()
    jax.block_until_ready(run(value))
    return (time.perf_counter() - start) / steps
