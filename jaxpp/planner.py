"""`jaxpp.plan(...)`: a layout's memory and speed on hardware you may not have, with no weights.

The memory figures are the engine's own: `plan` builds the same `layout.Layout`, the same
abstract `Transformer` (nnx.eval_shape) and the same KV-cache arrays as `LLM`, on an abstract
mesh, and reads each device's bytes off the shardings of sharding.py's table. `Plan.
device_memory()` has the format of `LLM.device_memory()` and equals it byte for byte on any
layout that `LLM` can load (tests/test_plan.py checks every CPU layout the tests use).

The speed figures are modelled (costmodel.py prices a tick; replay.py runs the engine's scheduler
over a host model of the ring): `Plan.serve(requests)` replays a workload, `Plan.speed(...)` a
batch of equal requests at several batch sizes. `search(...)` ranks the layouts of a device count.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from flax import nnx

from jaxpp.bench import Request as BenchRequest
from jaxpp.bench import preset_path
from jaxpp.config import EngineConfig, ModelConfig, with_quantization
from jaxpp.costmodel import CostModel
from jaxpp.hardware import Hardware, load_hardware, read_json
from jaxpp.layout import (
    Layout,
    abstract_model,
    cache_device_bytes,
    default_kv_budget,
    kv_bytes_per_page,
    make_layout,
    page_count,
    params_device_bytes,
    pipeline_shape,
    row_count,
    stored_kv_heads,
)
from jaxpp.replay import ReplayResult, replay


@dataclasses.dataclass
class Plan:
    model: str
    layout: Layout
    hardware: Hardware
    max_num_seqs: int  # sequence rows
    pages: int  # KV pages per replica
    decode_chunk: int
    params_bytes: int  # per device (every device holds the same shard shapes)
    kv_bytes: int  # per device
    kv_budget: int  # what the engine gives the KV pool per device
    state: nnx.State  # the abstract parameter state
    enable_prefix_caching: bool = True  # as the engine: replays reuse cached prompt pages
    # With FP8 weights: the same layout with the model's float weights, to compare against.
    unquantized: Plan | None = None

    @property
    def shape(self):
        return pipeline_shape(self.layout, self.max_num_seqs, self.pages, self.decode_chunk)

    @property
    def usable_bytes(self) -> int:
        """One device's memory that JAX can allocate (its allocator's fraction)."""
        return int(self.hardware.memory_bytes * self.hardware.memory_fraction)

    @property
    def overflow_bytes(self) -> int:
        """How far params + KV cache exceed a device's usable memory (0: it fits)."""
        return max(0, self.params_bytes + self.kv_bytes - self.usable_bytes)

    @property
    def kv_token_bytes(self) -> float:
        """KV bytes one cached position takes on each device of its replica."""
        return kv_bytes_per_page(self.layout) / self.layout.block_size

    @property
    def kv_capacity_tokens(self) -> int:
        """Positions the pools hold, over all replicas."""
        return self.layout.dp * self.pages * self.layout.block_size

    def sequences_at_once(self, positions: int) -> int:
        """How many sequences of `positions` positions run at once: the rows, or what the
        pages hold."""
        pages = -(-positions // self.layout.block_size)
        return max(1, min(self.max_num_seqs, self.layout.dp * (self.pages // pages)))

    def device_memory(self) -> list[dict]:
        """Bytes of parameters and KV cache per device, in `LLM.device_memory()`'s format."""
        return [
            {"device": d, "params": self.params_bytes, "kv_cache": self.kv_bytes}
            for d in range(self.layout.devices)
        ]

    def cost_model(self) -> CostModel:
        return CostModel(self.layout, self.state, self.shape, self.hardware)

    def serve(
        self, requests: Sequence[BenchRequest], log_interval: float = 5.0, log=lambda line: None
    ) -> ReplayResult:
        """Replay `requests` through the engine's scheduler in modelled time."""
        lay = self.layout
        return replay(
            requests,
            self.shape,
            lay.dp,
            self.cost_model(),
            lay.config.eos_token_ids,
            self.decode_chunk,
            lay.token_budget,
            self.params_bytes / 1e9,
            kv_bytes_per_page(lay) / 1e9,
            log_interval,
            log,
            prefix_caching=self.enable_prefix_caching,
        )

    def speed(self, batch_sizes: Sequence[int], input_len: int, output_len: int) -> list[dict]:
        """Per batch size: B requests of input_len + output_len tokens arriving together, run
        by an engine with B rows (and the pages of this plan)."""
        rows = []
        for batch in batch_sizes:
            # Distinct prompts: no request finds another's pages in the prefix cache.
            rng = np.random.default_rng(batch)
            vocab = self.layout.config.vocab_size
            requests = [
                BenchRequest(rng.integers(0, vocab, size=input_len).tolist(), output_len)
                for _ in range(batch)
            ]
            sized = dataclasses.replace(self, max_num_seqs=row_count(self.layout, batch))
            result = sized.serve(requests)
            rows.append({"batch": batch, **result.summary(requests)})
        return rows


def load_model_config(model: str | os.PathLike) -> tuple[str, ModelConfig]:
    """(name, config) of a model dir, its config.json, or a preset (`jaxpp bench --preset`'s
    names: configs/NAME.json or a path to such a file)."""
    path = Path(model)
    if path.is_dir():
        return path.name, ModelConfig.from_dir(path)
    if path.name == "config.json" and path.is_file():
        return path.parent.name, ModelConfig.from_dir(path.parent)
    try:
        preset = preset_path(model)
    except ValueError as e:
        raise ValueError(f"model {str(model)!r}: not a model dir or a config.json; {e}") from None
    return preset.stem, ModelConfig.from_hf_dict(read_json(preset), source=str(preset))


def plan(
    model: str | os.PathLike,
    *,
    hardware: str | os.PathLike | Hardware = "h100-sxm",
    config: EngineConfig | None = None,
    **settings,
) -> Plan:
    """The memory plan of a layout, as `LLM(model, config)` (or `LLM(model, **settings)`: pp=...,
    tp=..., EngineConfig's fields) would allocate it on `hardware`. A layout whose weights do
    not fit is planned all the same (with one KV page) and flagged by `Plan.overflow_bytes`.
    With FP8 weights (an FP8 checkpoint, or `quantization="fp8"`) `Plan.unquantized` is the
    same layout with float weights."""
    config = config or EngineConfig(**settings)
    name, cfg = load_model_config(model)
    cfg = with_quantization(cfg, config.quantization)
    hw = hardware if isinstance(hardware, Hardware) else load_hardware(hardware)
    result = _plan(name, cfg, hw, config)
    if cfg.quantization is not None:
        float_cfg = dataclasses.replace(cfg, quantization=None)
        result.unquantized = _plan(name, float_cfg, hw, config)
    return result


def _plan(name: str, cfg: ModelConfig, hw: Hardware, config: EngineConfig) -> Plan:
    lay = make_layout(cfg, config, hw.platform)
    _, state = nnx.split(abstract_model(lay))
    params = params_device_bytes(state, lay.mesh)
    limit = int(hw.memory_bytes * hw.memory_fraction)
    budget = config.kv_cache_memory or default_kv_budget(hw.platform, lay.devices, limit, params)
    # The engine's own pool; with no room for one page it would refuse to load: plan one and
    # let overflow_bytes say by how much it misses.
    pages = page_count(lay, budget) if budget >= kv_bytes_per_page(lay) else 1
    result = Plan(
        model=name,
        layout=lay,
        hardware=hw,
        max_num_seqs=row_count(lay, config.max_num_seqs),
        pages=pages,
        decode_chunk=config.decode_chunk,
        params_bytes=params,
        kv_bytes=0,
        kv_budget=budget,
        state=state,
        enable_prefix_caching=config.enable_prefix_caching,
    )
    result.kv_bytes = cache_device_bytes(lay, result.shape, lay.mesh)
    return result


# --- search ---------------------------------------------------------------------------------


@dataclasses.dataclass
class Candidate:
    plan: Plan
    batch: int  # the largest batch that meets the latency bound
    result: dict  # ReplayResult.summary at that batch
    meets_bound: bool

    @property
    def throughput(self) -> float:
        return self.result["output_tokens_per_s"]


def search(
    model: str | os.PathLike,
    devices: int,
    *,
    hardware: str | os.PathLike | Hardware,
    input_len: int,
    output_len: int,
    max_tpot: float | None = None,
    dtype: str | None = None,
    max_model_len: int | None = None,
    max_num_seqs: int | None = None,
    max_num_batched_tokens: int | None = None,
    decode_chunk: int = 16,
    quantization: str | None = None,
) -> list[Candidate]:
    """Every valid (dp, pp, tp, micro-batches) layout of exactly `devices` devices whose
    weights fit, ranked by modelled output tokens/s; each at the largest batch (halving from
    what its rows and pages run at once) whose mean TPOT meets `max_tpot` seconds. The
    partition is the automatic one: jaxpp stores every stage's layers in a grid of
    max(partition) slots per device and splits the embedding and head over every device, so no
    other partition holds less or runs faster (see docs/plan.md)."""
    _, cfg = load_model_config(model)
    hw = hardware if isinstance(hardware, Hardware) else load_hardware(hardware)
    found = []
    for dp, pp, tp in _factorisations(devices):
        if pp > cfg.num_layers or not _valid_tp(cfg, tp):
            continue
        for microbatches in sorted({pp, 2 * pp}):
            try:
                p = plan(
                    model,
                    pp=pp,
                    tp=tp,
                    dp=dp,
                    num_microbatches=microbatches,
                    max_num_seqs=max_num_seqs,
                    max_model_len=max_model_len,
                    dtype=dtype,
                    hardware=hw,
                    max_num_batched_tokens=max_num_batched_tokens,
                    decode_chunk=decode_chunk,
                    quantization=quantization,
                )
            except ValueError:
                continue
            if p.overflow_bytes:
                continue
            found.append(_best_batch(p, input_len, output_len, max_tpot))
    return sorted(found, key=lambda c: (c.meets_bound, c.throughput), reverse=True)


def _best_batch(p: Plan, input_len: int, output_len: int, max_tpot: float | None) -> Candidate:
    unit = p.layout.dp * p.layout.microbatches
    batch = max(unit, p.sequences_at_once(input_len + output_len) // unit * unit)
    while True:
        [row] = p.speed([batch], input_len, output_len)
        meets = max_tpot is None or row["tpot_s"]["mean"] <= max_tpot
        if meets or batch <= unit:
            return Candidate(p, batch, row, meets)
        batch = max(unit, batch // 2 // unit * unit)


def why_first(first: Candidate, second: Candidate) -> str:
    """Which factor makes `first` faster than `second`. Output tokens/s = sequences held x
    tokens per tick per sequence / seconds per tick, and the tick splits into the layers and
    head (compute) and the hand-offs and collectives (transfer); the log of the ratio of the
    two throughputs splits into these four terms (exactly while the device is never idle),
    and the largest names the reason: memory (more sequences at once), bubble (ticks that
    give a sequence no token: a micro-batch's wait for its turn, fill, drain, prefill),
    compute, or transfer."""

    def parts(c: Candidate) -> tuple[float, float, float]:
        r = c.result
        tokens_per_tick = r["output_tokens_per_s"] * r["tick_s"]
        split = r["time_split"]
        compute = (split["compute"] + split["head"]) / r["ticks"]
        transfer = (split["transfer"] + split["collectives"]) / r["ticks"]
        return tokens_per_tick / c.batch, compute, transfer

    (rate_a, comp_a, xfer_a), (rate_b, comp_b, xfer_b) = parts(first), parts(second)
    factors = {
        "memory": math.log(first.batch / second.batch),
        "bubble": math.log(rate_a / rate_b),
        "compute": math.log((comp_b + xfer_a) / (comp_a + xfer_a)),
        "transfer": math.log((comp_b + xfer_b) / (comp_b + xfer_a)),
    }
    details = {
        "memory": f"runs {first.batch} sequences at once ({first.plan.kv_capacity_tokens:,} KV "
        f"positions) against {second.batch} ({second.plan.kv_capacity_tokens:,})",
        "bubble": f"{rate_a:.3f} tokens per tick per sequence against {rate_b:.3f}",
        "compute": f"layers + head {1e3 * comp_a:.2f} ms per tick against {1e3 * comp_b:.2f}",
        "transfer": f"hand-offs + collectives {1e3 * xfer_a:.2f} ms per tick against "
        f"{1e3 * xfer_b:.2f}",
    }
    reason = max(factors, key=factors.get)
    ratio = first.throughput / second.throughput
    return f"{reason}: {details[reason]} ({ratio:.2f}x the output tokens/s)"


def _factorisations(devices: int) -> list[tuple[int, int, int]]:
    out = []
    for dp in range(1, devices + 1):
        if devices % dp:
            continue
        rest = devices // dp
        for pp in range(1, rest + 1):
            if rest % pp == 0:
                out.append((dp, pp, rest // pp))
    return out


def _valid_tp(cfg: ModelConfig, tp: int) -> bool:
    try:
        stored_kv_heads(cfg, tp)
    except ValueError:
        return False
    return True


__all__ = ["Plan", "load_model_config", "plan", "search", "why_first"]
