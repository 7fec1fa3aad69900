"""Forward and backward through the pipeline: the mean next-token cross-entropy of a batch and
its gradient with respect to every parameter (or, with LoRA, to adapters only: jaxpp/lora.py),
in ONE jitted `jax.shard_map` program over the engine's own mesh and layout (stages,
tensor-parallel heads, data-parallel replicas), by the GPipe or the 1F1B schedule.

The batch [B, T] is cut into M micro-batches. At each tick every stage runs at most one forward
(F: its layers over a micro-batch's activations, which then move s -> s+1 by `ppermute`) and at
most one backward (B: its layers again from the input it kept, under `jax.vjp`; the gradient of
that input then moves s -> s-1). A stage keeps each micro-batch's input from its F to its B:
that stash is what the schedules trade. S = 3, M = 4 (Fm / Bm: forward / backward of m):

    GPipe: every forward, then every backward

    tick     0    1    2    3    4    5      6    7    8    9    10
    stage 0  F0   F1   F2   F3   .    .      .    B3   B2   B1   B0
    stage 1  .    F0   F1   F2   F3   .      B3   B2   B1   B0   .
    stage 2  .    .    F0   F1   F2   F3 B3  B2   B1   B0   .    .

    1F1B: a micro-batch's backward starts in the tick its forward reaches the last stage; in
    the steady state every stage runs one F and one B per tick

    tick     0    1    2      3      4      5      6    7
    stage 0  F0   F1   F2     F3     B0     B1     B2   B3
    stage 1  .    F0   F1     F2 B0  F3 B1  B2     B3   .
    stage 2  .    .    F0 B0  F1 B1  F2 B2  F3 B3  .    .

The stash. An input is kept from the end of its F's tick to its B's tick, which reads it before
that tick's arrival is written (the two may share a slot; the last stage, whose B runs in its
F's tick, keeps nothing). GPipe keeps M inputs per stage. 1F1B keeps 2(S - 1 - s) on stage s
whatever M: 2S - 2 on stage 0, none on the last; but one SPMD program gives every device the
same buffers, so the largest would be everyone's. Stage s and its mirror S - 1 - s together
keep at most 2S - 2, so every device gets S - 1 slots, and the stage of a pair that needs more
(the lender) parks an arrival on its mirror when its own slots are full; the mirror sends it
back in the tick of its B. Each tick then moves at most one input each way between the pair:
one `ppermute` over the pairs, issued every tick (`_place` decides the slots; S = 4, M = 8 in
docs/pipeline.md, `Schedule.drawn_stash()`). S - 1 inputs is below the S/M of GPipe's M that
1F1B promises.

Why not parity ticks instead (one F or one B per stage and tick, 1F1B as drawn with unit-time
operations, which keeps S - s inputs on stage s): a tick then lasts its slowest stage's B, and
takes 2(M + S - 1) of them against M + 2S - 2 ticks of F + B here. With B = beta F, parity
ticks are faster only where beta < 1 + (2S - 2) / M (1.375 at S = 4, M = 16), and a B that
recomputes its forward costs beta >= 3 (4.5 measured on the demo model on CPU). They would
also need a conditional per tick (each stage its own branch); this program has none: a
`fori_loop` of a fixed count over tables of constants, and selects.

Within a tick: the embedding of the micro-batch entering stage 0, every stage's F, the loss of
the micro-batch whose B starts on the last stage, every stage's B, and the embedding's gradient
for the micro-batch whose B ended on stage 0. The embedding, the LM head and the loss are
vocab-parallel over every device (model.py), so every device takes part in them at every tick.
A stage's B recomputes its forward from the kept input (activation recomputation: one
[rows, T, D] input per micro-batch in flight, nothing else). What a stage computes in a tick
where the table gives it nothing is masked out (zero cotangents, no stash write), as idle
stages compute padding when serving. The program is traced with `check_vma=True`, so that
autodiff through the tensor-parallel sums inside a stage (and the vocab-parallel ones of the
embedding and head) is exact: the transpose of a `psum` over devices that held the same value
is a broadcast, not another sum.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P

from jaxpp.lora import Adapters, LoraConfig, merged_slot, new_adapters
from jaxpp.model import VOCAB_AXES, embed_lookup, rope_tables, vocab_shard_index
from jaxpp.sharding import LOGICAL_TO_MESH, logical_to_spec

SCHEDULES = ("1f1b", "gpipe")
MASKED = -1e30  # a score no key reaches (finite: exp(MASKED - max) is exactly 0)
BATCH = LOGICAL_TO_MESH["batch"]
ROWS = P(None, BATCH)  # [micro-batches, rows, T]: rows split over data-parallel replicas
ARRIVAL, MIRROR = -1, -2  # a backward's input other than a slot: this tick's arrival, or the
# input the stage's mirror sends back (Schedule.load)


class Schedule(NamedTuple):
    """Which micro-batch each stage runs forward and backward at each tick (-1: none), and
    where each kept input lives (module docstring, "The stash"). Tables are [ticks, S]."""

    forward: np.ndarray  # i32: the micro-batch F
    backward: np.ndarray  # i32: the micro-batch B
    slots: int  # the stash of every device: this many [rows, T, D] inputs
    store: np.ndarray  # i32: the slot this tick's arrival is written to (-1: not kept here)
    lodge: np.ndarray  # i32: the slot the input the mirror parks this tick goes to (-1: none)
    fetch: np.ndarray  # i32: the slot sent back to the mirror for its backward (-1: none)
    load: np.ndarray  # i32: the backward's input: a slot, ARRIVAL or MIRROR
    lends: np.ndarray  # bool [S]: the stage parks inputs on its mirror

    @property
    def bubble(self) -> float:
        """Share of a stage's F and B slots over the ticks that run nothing."""
        ticks, stages = self.forward.shape
        work = (self.forward >= 0).sum() + (self.backward >= 0).sum()
        return float(1.0 - work / (2 * ticks * stages))

    def held(self) -> np.ndarray:
        """[ticks, S, slots] the input each slot holds after each tick, replayed from the
        tables: m for the stage's own micro-batch m, -2 - m for its mirror's, -1 for none."""
        ticks, stages = self.forward.shape
        held = np.full((ticks, stages, self.slots), -1, np.int32)
        now = np.full((stages, self.slots), -1, np.int32)
        for t in range(ticks):
            for s in range(stages):  # a backward's read comes first: its slot is free again
                for slot in (self.load[t, s], self.fetch[t, s]):
                    if slot >= 0:
                        now[s, slot] = -1
            for s in range(stages):
                if self.store[t, s] >= 0:
                    now[s, self.store[t, s]] = self.forward[t, s]
                if self.lodge[t, s] >= 0:
                    now[s, self.lodge[t, s]] = -2 - self.forward[t, stages - 1 - s]
            held[t] = now
        return held

    def drawn(self) -> str:
        """The tick table as in the module docstring."""
        ticks, stages = self.forward.shape
        cells = [
            [
                " ".join(
                    f"{kind}{m[t, s]}"
                    for kind, m in (("F", self.forward), ("B", self.backward))
                    if m[t, s] >= 0
                )
                or "."
                for t in range(ticks)
            ]
            for s in range(stages)
        ]
        return _grid([f"stage {s}" for s in range(stages)], cells)

    def drawn_stash(self) -> str:
        """Each device's slots after each tick: m its own input m, m' its mirror's, . none."""
        held = self.held()
        ticks, stages, slots = held.shape

        def name(code: int) -> str:
            return "." if code == -1 else f"{-2 - code}'" if code < -1 else str(code)

        cells = [
            [name(held[t, s, k]) for t in range(ticks)] for s in range(stages) for k in range(slots)
        ]
        return _grid([f"stage {s} slot {k}" for s in range(stages) for k in range(slots)], cells)


def _grid(labels: list[str], cells: list[list[str]]) -> str:
    """Rows of cells under a header of tick numbers, each row led by its label."""
    lead = max(len(x) for x in labels) + 2
    width = max(len(c) for row in cells for c in row) + 2
    lines = ["tick".ljust(lead) + "".join(f"{t:<{width}}" for t in range(len(cells[0])))]
    lines += [
        label.ljust(lead) + "".join(f"{c:<{width}}" for c in row)
        for label, row in zip(labels, cells, strict=True)
    ]
    return "\n".join(line.rstrip() for line in lines)


def schedule_table(name: str, stages: int, microbatches: int) -> Schedule:
    """The tick table of a schedule (module docstring): F(m, s) at tick m + s in both;
    B(m, s) at m + 2S - 2 - s (1F1B) or at (M + S - 2) + (M - 1 - m) + (S - 1 - s) (GPipe);
    then where each input is kept (`_place`)."""
    S, M = stages, microbatches
    if name not in SCHEDULES:
        raise ValueError(f"schedule={name!r} is invalid: expected one of {SCHEDULES}")
    if name == "1f1b":
        b_tick = {(m, s): m + 2 * S - 2 - s for m in range(M) for s in range(S)}
    else:
        b_tick = {(m, s): 2 * M + 2 * S - 4 - m - s for m in range(M) for s in range(S)}
    ticks = max(b_tick.values()) + 1
    forward = np.full((ticks, S), -1, np.int32)
    backward = np.full((ticks, S), -1, np.int32)
    for (m, s), t in b_tick.items():
        forward[m + s, s] = m
        backward[t, s] = m
    return Schedule(forward, backward, *_place(forward, backward))


def _place(forward: np.ndarray, backward: np.ndarray) -> tuple:
    """The fewest slots per device that hold every stage's inputs, a stage parking what it
    cannot hold on its mirror S-1-s, and the tables that say where (Schedule's fields).

    An input is kept from the end of its forward's tick to its backward's tick, which reads it
    before that tick's arrival is written (so the two may share a slot; one whose backward runs
    in its forward's tick is never kept). Stage s and its mirror need `need[t, s] +
    need[t, mirror]` slots at the end of tick t: no fewer than half the peak of that sum each.
    The stage of the pair that needs more (the lender) parks an arrival on its mirror when its
    own slots are full; the mirror never parks, so each tick moves at most one input each way
    between them (the lender's arrival out, and the input of the lender's backward back)."""
    ticks, S = forward.shape
    need = np.zeros((ticks, S), np.int32)
    for s in range(S):
        for t_f, m in enumerate(forward[:, s]):
            if m >= 0:
                need[t_f : int(np.flatnonzero(backward[:, s] == m)[0]), s] += 1
    lower, lenders = 1, set()
    for s in range((S + 1) // 2):
        mirror = S - 1 - s
        if s == mirror:  # the middle stage of an odd S has no one to park on
            lower = max(lower, int(need[:, s].max()))
            continue
        lower = max(lower, -(-int((need[:, s] + need[:, mirror]).max()) // 2))
        lenders.add(s if need[:, s].max() >= need[:, mirror].max() else mirror)
    enough = max(int(need.max()), 1)  # as many as any stage needs: nothing parked, it fits
    for slots in range(lower, enough):
        placed = _try_place(forward, backward, slots, lenders)
        if placed is not None:
            return placed
    return _try_place(forward, backward, enough, lenders)


def _try_place(forward: np.ndarray, backward: np.ndarray, slots: int, lenders: set[int]):
    """Schedule's stash fields for `slots` per device, or None where they do not fit: each
    tick the backwards read their inputs first, then each arrival goes to a free slot of its
    own stage, or of the mirror's where a lender's own are full."""
    ticks, S = forward.shape
    store, lodge, fetch = (np.full((ticks, S), -1, np.int32) for _ in range(3))
    load = np.full((ticks, S), ARRIVAL, np.int32)
    free = [set(range(slots)) for _ in range(S)]
    kept: dict[tuple[int, int], tuple[int, int]] = {}  # (stage, m) -> (device, slot)
    lends = np.zeros(S, bool)
    for t in range(ticks):
        for s in range(S):
            if (s, int(backward[t, s])) in kept:
                device, slot = kept.pop((s, int(backward[t, s])))
                free[device].add(slot)
                load[t, s] = slot if device == s else MIRROR
                if device != s:
                    fetch[t, device] = slot
        for s in sorted(range(S), key=lambda s: s in lenders):  # the mirrors' own come first
            m, mirror = int(forward[t, s]), S - 1 - s
            if m < 0 or backward[t, s] == m:  # nothing arrives, or its backward reads it now
                continue
            if free[s]:
                device, table = s, store
            elif s in lenders and free[mirror]:
                device, table, lends[s] = mirror, lodge, True
            else:
                return None
            slot = min(free[device])
            free[device].remove(slot)
            table[t, device] = slot
            kept[s, m] = (device, slot)
    return slots, store, lodge, fetch, load, lends


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, window: jax.Array) -> jax.Array:
    """q [B, T, Hq, Dh] over k, v [B, T, Hkv, Dh] at positions 0..T-1: causal, within `window`
    (0 = full) when set, query head j on KV head j // (Hq / Hkv); scores and softmax in float32
    (shared/reference/hf-parity.md)."""
    b, t, hq, dh = q.shape
    hkv = k.shape[2]
    grouped = q.reshape(b, t, hkv, hq // hkv, dh)
    scores = jnp.einsum("bqhgd,bkhd->bhgqk", grouped, k).astype(jnp.float32) * dh**-0.5
    qp, kp = jnp.arange(t)[:, None], jnp.arange(t)[None, :]
    visible = (kp <= qp) & ((window == 0) | (kp > qp - window))
    probs = jax.nn.softmax(jnp.where(visible, scores, MASKED), axis=-1)
    out = jnp.einsum("bhgqk,bkhd->bqhgd", probs.astype(v.dtype), v)
    return out.reshape(b, t, hq, dh)


def pipeline_value_and_grad(
    llm,
    token_ids,
    loss_mask=None,
    *,
    schedule: str = "1f1b",
    microbatches: int | None = None,
    lora: LoraConfig | None = None,
) -> tuple[jax.Array, nnx.State]:
    """(loss, grads): the mean next-token cross-entropy of `token_ids` [B, T] under `llm`'s
    weights, and its gradient, through `llm`'s pipeline (its mesh, partition, tp and dp).

    `loss_mask` [B, T]: nonzero where the loss of predicting the next token counts (default:
    every position but the last, which has no next token and must be 0). `grads` is an
    `nnx.State` of the model's parameters in the engine's layout and sharding: slot i of stage
    s holds the gradient of layer `llm.model_layout.grid[s, i]` (zeros in empty slots). With
    `lora`, the model's weights are frozen and `grads` holds the gradients of the adapters
    `parameters(llm, lora=lora)` only (jaxpp/lora.py). `microbatches` (default: the number of
    stages) must split the batch into equal parts, each split again over the data-parallel
    replicas."""
    program, args = _prepared(llm, token_ids, loss_mask, schedule, microbatches, lora)
    return program(*args)


def compiled_memory(
    llm,
    token_ids,
    *,
    schedule: str = "1f1b",
    microbatches: int | None = None,
    lora: LoraConfig | None = None,
):
    """XLA's memory analysis of the program `pipeline_value_and_grad` runs (per device):
    `temp_size_in_bytes` is what the schedule's activations and stash cost."""
    program, args = _prepared(llm, token_ids, None, schedule, microbatches, lora)
    return program.lower(*args).compile().memory_analysis()


def stash_bytes(llm, token_ids, *, schedule: str = "1f1b", microbatches: int | None = None) -> int:
    """Bytes of the stash each device keeps (Schedule.slots inputs of [rows, T, D])."""
    tokens = np.asarray(token_ids)
    M = llm.pp if microbatches is None else microbatches
    rows = tokens.shape[0] // (M * llm.dp)
    per_input = rows * tokens.shape[1] * llm.config.hidden_size * jnp.dtype(llm.dtype).itemsize
    return schedule_table(schedule, llm.pp, M).slots * per_input


def parameters(llm, lora: LoraConfig | None = None) -> nnx.State:
    """`llm`'s parameters, as `pipeline_value_and_grad`'s gradients are laid out (an optimizer
    such as optax updates them leaf by leaf, keeping their sharding); with `lora`, the
    adapters of that configuration (fresh ones on first use: the model itself, b = 0)."""
    return _split_state(llm)[0] if lora is None else _adapters(llm, lora)[1]


def set_parameters(llm, params: nnx.State, lora: LoraConfig | None = None) -> None:
    """Serve (and differentiate) `params` from now on: the next step programs read them. With
    `lora`, `params` are that configuration's adapters: the next gradients are taken with
    them (serving is unchanged until `merge_lora`)."""
    if lora is not None:
        graphdef, current = _adapters(llm, lora)
        shapes = [np.shape(leaf) for leaf in jax.tree.leaves(params)]
        if jax.tree.structure(params) != jax.tree.structure(current) or shapes != [
            leaf.shape for leaf in jax.tree.leaves(current)
        ]:
            raise ValueError(f"these are not the adapters of {lora}: their structure differs")
        llm.__dict__["_lora_adapters"][lora] = (graphdef, params)
        return
    _, rest = _split_state(llm)
    llm.state = nnx.state(nnx.merge(llm.pipeline.graphdef, params, rest))
    llm.reset_prefix_cache()  # the cached pages hold the old weights' keys and values


def merge_lora(llm, lora: LoraConfig) -> None:
    """Add the adapters of `lora` into `llm`'s weights (W + scale * a b): the engine serves
    the tuned model from its next step, `jaxpp.loading.save_engine_dir` writes it as a model
    dir that `jaxpp.LLM` loads. The adapters are then spent: the next ones start from zero."""
    graphdef, adapters = _adapters(llm, lora)
    params, rest = _split_state(llm)
    model = nnx.merge(llm.pipeline.graphdef, params, rest)
    for layer, slot in zip(model.layers, nnx.merge(graphdef, adapters).slots, strict=True):
        nnx.update(layer, merged_slot(nnx.state(layer, nnx.Param), nnx.state(slot), lora))
    merged = jax.tree.map(
        lambda new, old: jax.device_put(new, old.sharding), nnx.state(model, nnx.Param), params
    )
    set_parameters(llm, merged)
    del llm.__dict__["_lora_adapters"][lora]


def _adapters(llm, lora: LoraConfig):
    """(graphdef, state) of `llm`'s adapters for `lora`, made on first use."""
    if not isinstance(lora, LoraConfig):
        raise ValueError(f"lora={lora!r} is invalid: expected a jaxpp.lora.LoraConfig")
    held = llm.__dict__.setdefault("_lora_adapters", {})
    if lora not in held:
        model = nnx.merge(llm.pipeline.graphdef, *_split_state(llm))
        held[lora] = new_adapters(model, llm.model_layout.grid, llm.mesh, lora)
    return held[lora]


def _prepared(llm, token_ids, loss_mask, schedule, microbatches, lora):
    """The program for this batch shape, schedule and training mode, and its arguments."""
    tokens, targets, weights, count = _batch(llm, token_ids, loss_mask)
    M = llm.pp if microbatches is None else microbatches
    B, T = tokens.shape
    if not isinstance(M, int) or M < 1 or B % (M * llm.dp):
        raise ValueError(
            f"a batch of {B} does not split into microbatches={M} x dp={llm.dp} equal parts"
        )
    table = schedule_table(schedule, llm.pp, M)
    params, rest = _split_state(llm)
    adapters = {} if lora is None else _adapters(llm, lora)[1]
    program = _program(llm, table, (M, B // M, T), lora)
    shaped = [a.reshape(M, B // M, T) for a in (tokens, targets, weights)]
    return program, (params, rest, adapters, *shaped, np.float32(count))


def _varying_axes(x) -> set[str]:
    """The mesh axes x's value differs over, as shard_map's type checking tracks them (JAX 0.10
    names this `manual_axis_type.varying`, earlier releases `vma`)."""
    aval = jax.typeof(x)
    mat = getattr(aval, "manual_axis_type", None)
    return set(mat.varying) if mat is not None else set(aval.vma)


def _batch(llm, token_ids, loss_mask):
    """(tokens, next tokens, loss weights, counted positions), checked."""
    tokens = np.asarray(token_ids)
    if tokens.ndim != 2 or tokens.shape[1] < 2 or not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(
            f"token_ids must be integers [batch, length >= 2], got shape {tokens.shape} "
            f"of {tokens.dtype}"
        )
    vocab = llm.config.vocab_size
    if tokens.min() < 0 or tokens.max() >= vocab:
        raise ValueError(f"token_ids must be in [0, {vocab}): found {tokens.min()}..{tokens.max()}")
    if loss_mask is None:
        mask = np.ones(tokens.shape, bool)
        mask[:, -1] = False
    else:
        mask = np.asarray(loss_mask) != 0
        if mask.shape != tokens.shape:
            raise ValueError(f"loss_mask has shape {mask.shape}, token_ids {tokens.shape}")
        if mask[:, -1].any():
            raise ValueError("loss_mask must be 0 at the last position: it has no next token")
    count = int(mask.sum())
    if count == 0:
        raise ValueError("loss_mask counts no position")
    targets = np.concatenate([tokens[:, 1:], np.zeros_like(tokens[:, :1])], axis=1)
    return tokens.astype(np.int32), targets.astype(np.int32), mask.astype(np.float32), count


def _split_state(llm) -> tuple[nnx.State, nnx.State]:
    """The model's parameters, and the rest of its state (layer masks, windows)."""
    if llm.config.quantization is not None:
        raise ValueError(
            "gradients need float weights: this engine holds FP8 weights "
            f"({llm.config.quantization.method}); load the float checkpoint without quantization"
        )
    model = nnx.merge(llm.pipeline.graphdef, llm.state)
    return nnx.state(model, nnx.Param), nnx.state(model, nnx.Not(nnx.Param))


def _specs(state: nnx.State):
    return jax.tree.map(
        lambda v: logical_to_spec(v.get_metadata()["logical_axes"]),
        state,
        is_leaf=lambda x: isinstance(x, nnx.Variable),
    )


def _program(llm, table: Schedule, shape: tuple[int, int, int], lora: LoraConfig | None):
    """The jitted program for a schedule, batch shape and training mode, built once per LLM."""
    programs = llm.__dict__.setdefault("_gradient_programs", {})
    key = (tuple(np.asarray(v).tobytes() for v in table), table.forward.shape, shape, lora)
    if key not in programs:
        programs[key] = _build(llm, table, shape, lora)
    return programs[key]


def _put(stash: jax.Array, slot: jax.Array, x: jax.Array) -> jax.Array:
    """x written to `slot` of the stash; the stash unchanged where slot < 0."""
    at = jnp.maximum(slot, 0)
    kept = jax.lax.dynamic_index_in_dim(stash, at, keepdims=False)
    return jax.lax.dynamic_update_index_in_dim(stash, jnp.where(slot >= 0, x, kept), at, 0)


def _stash_step(stash: jax.Array, x: jax.Array, at: dict, lends: jax.Array | None, S: int):
    """One tick's stash traffic on a stage (`at`: its row of the Schedule's tables; `lends`:
    whether it lends, None where no stage does): (the input of its backward, the stash).

    Reads come first, so that the slot a backward empties may take this tick's arrival. A lender
    sends its arrival to its mirror, which sends back the input of the lender's backward: one
    `ppermute` of one input each way over every pair."""
    kept = jax.lax.dynamic_index_in_dim(stash, jnp.maximum(at["load"], 0), keepdims=False)
    b_in = jnp.where(at["load"] == ARRIVAL, x, kept)
    if lends is not None:
        fetched = jax.lax.dynamic_index_in_dim(stash, jnp.maximum(at["fetch"], 0), keepdims=False)
        pairs = [(i, S - 1 - i) for i in range(S) if i != S - 1 - i]
        received = jax.lax.ppermute(jnp.where(lends, x, fetched), "stage", pairs)
        b_in = jnp.where(at["load"] == MIRROR, received, b_in)
        stash = _put(stash, at["lodge"], received)
    return b_in, _put(stash, at["store"], x)


def _varying_over(x, axes: set[str]):
    """x typed as varying over `axes` (what the loop's carries must keep from tick to tick): a
    value computed alike on those devices is cast, nothing is communicated."""
    missing = tuple(sorted(set(axes) - _varying_axes(x)))
    return jax.lax.pcast(x, missing, to="varying") if missing else x


def _typed_like(grads, primal):
    """Each gradient typed as varying where its parameter does. Not per replica: the parameters
    are the same on every replica, so autodiff already sums their gradients over the replicas'
    rows (the transpose of using one value everywhere)."""
    return jax.tree.map(lambda g, p: _varying_over(g, _varying_axes(p)), grads, primal)


def _stage_fn(pipe, model, lora: LoraConfig | None, cos, sin):
    """stage(trained, x): this device's layer slots over x [rows, T, D], where `trained` is
    what is differentiated: the slots' parameters, or with `lora` their adapters."""
    layer_params = [nnx.state(slot, nnx.Param) for slot in model.layers]
    layer_rest = [nnx.state(slot, nnx.Not(nnx.Param)) for slot in model.layers]

    def stage(trained, x):
        for i, lr in enumerate(layer_rest):
            lp = trained[i] if lora is None else merged_slot(layer_params[i], trained[i], lora)
            local = jax.tree.map(lambda a: a[0], (lp, lr))
            layer = nnx.merge(pipe.layer_graphdef, *local)
            q, k, v = layer.attn.qkv(layer.input_norm(x), cos, sin)
            y = x + layer.attn.out(causal_attention(q, k, v, layer.window[...]))
            y = y + layer.mlp(layer.post_attn_norm(y))
            x = jnp.where(layer.filled[...], y, x) if pipe.masked_slots[i] else y
        return x

    return stage, layer_params


def _loss_fn(norm_graphdef, vocab: int, count, frozen_top: tuple, lora: LoraConfig | None):
    """loss(trained_top, h, target, weight): (the sum over counted positions of the
    cross-entropy / count, vocab-parallel; its gradients with respect to trained_top and h).
    The top is (final norm's parameters, LM head or None, embedding): trained_top itself, or
    with `lora` (trained_top = ()) the frozen one."""

    def value_and_grads(trained_top, h, target, weight):
        def of(top, h):
            return loss(frozen_top if lora is not None else top, h, target, weight)

        part, loss_vjp = jax.vjp(of, trained_top, h)
        return part, *loss_vjp(jnp.ones_like(part))

    def loss(top, h, target, weight):
        norm_params, head, embed = top
        normed = nnx.merge(norm_graphdef, norm_params)(h)
        table = embed if head is None else head
        logits = jnp.einsum("btd,vd->btv", normed, table).astype(jnp.float32)
        width = logits.shape[-1]
        first = vocab_shard_index() * width
        logits = jnp.where(first + jnp.arange(width) < vocab, logits, MASKED)
        # The shift of the log-sum-exp: its gradient cancels, so none flows through it.
        top_logit = jax.lax.pmax(jax.lax.stop_gradient(jnp.max(logits, axis=-1)), VOCAB_AXES)
        total = jax.lax.psum(jnp.sum(jnp.exp(logits - top_logit[..., None]), axis=-1), VOCAB_AXES)
        local = target - first
        mine = (local >= 0) & (local < width)
        picked = jnp.take_along_axis(logits, jnp.clip(local, 0, width - 1)[..., None], -1)
        target_logit = jax.lax.psum(jnp.where(mine, picked[..., 0], 0.0), VOCAB_AXES)
        return jnp.sum((top_logit + jnp.log(total) - target_logit) * weight) / count

    return value_and_grads


def _gradient_state(trained, grads) -> nnx.State:
    """The gradients in the state of what was differentiated: the model's parameters, or the
    adapters (`trained` is this trace's copy of their module, free to overwrite)."""
    d_layers, d_top = grads
    slots = trained.slots if isinstance(trained, Adapters) else trained.layers
    for slot, d in zip(slots, d_layers, strict=True):
        nnx.update(slot, d)
    if isinstance(trained, Adapters):
        return nnx.state(trained)
    d_norm, d_head, d_embed = d_top
    nnx.update(trained.final_norm, d_norm)
    trained.embed[...] = d_embed
    if d_head is not None:
        trained.lm_head[...] = d_head
    return nnx.state(trained, nnx.Param)


def _build(llm, table: Schedule, shape: tuple[int, int, int], lora: LoraConfig | None):
    pipe, S, T = llm.pipeline, llm.pp, shape[2]
    ticks = table.forward.shape[0]
    plan = {
        name: jnp.asarray(getattr(table, name))
        for name in ("forward", "backward", "store", "lodge", "fetch", "load")
    }
    lenders = jnp.asarray(table.lends) if table.lends.any() else None
    adapter_graphdef = None if lora is None else _adapters(llm, lora)[0]
    params_abstract, rest_abstract = _split_state(llm)
    adapter_specs = {} if lora is None else _specs(_adapters(llm, lora)[1])
    # The carries' types: activations and their gradients differ per stage and per replica's
    # rows, never across a stage's tensor-parallel devices (each holds the whole residual
    # stream); a parameter's gradient varies where the parameter does, and per replica.
    flowing = {"stage", BATCH}

    def program(params, rest, adapters, tokens, targets, weights, count):
        s = jax.lax.axis_index("stage")
        model = nnx.merge(pipe.graphdef, params, rest)
        norm_graphdef, norm_params = nnx.split(model.final_norm, nnx.Param)
        embed = model.embed[...]
        frozen_top = (norm_params, None if llm.config.tie_word_embeddings else model.lm_head[...])
        cos, sin = rope_tables(jnp.arange(T)[None], pipe.inv_freq, pipe.dtype)
        stage, layer_params = _stage_fn(pipe, model, lora, cos, sin)
        # What is differentiated (the layer slots' part, the rest), in the module it returns in.
        if lora is None:
            trained, primal = model, (layer_params, (*frozen_top, embed))
        else:
            trained = nnx.merge(adapter_graphdef, adapters)
            primal = ([nnx.state(slot) for slot in trained.slots], ())

        loss_of = _loss_fn(norm_graphdef, llm.config.vocab_size, count, (*frozen_top, embed), lora)

        def tick(t, carry):
            x_in, g_in, stash, grads, loss = carry
            # The micro-batch entering stage 0 (every device: the table is vocab-parallel).
            x0 = embed_lookup(embed, tokens[jnp.maximum(plan["forward"][t, 0], 0)])
            x = jnp.where(s == 0, x0, x_in)
            at = {name: tab[t, s] for name, tab in plan.items()}
            x_next = jax.lax.ppermute(
                stage(primal[0], x), "stage", [(i, i + 1) for i in range(S - 1)]
            )
            b_in, stash = _stash_step(stash, x, at, None if lenders is None else lenders[s], S)
            # The backward: recompute this stage's forward from the kept input.
            h, stage_vjp = jax.vjp(stage, primal[0], b_in)
            # The loss of the micro-batch whose backward starts on the last stage.
            m = plan["backward"][t, S - 1]
            h_last = jax.lax.psum(jnp.where(s == S - 1, h, 0), "stage")
            weight = weights[jnp.maximum(m, 0)] * (m >= 0)
            part, d_top, d_h = loss_of(primal[1], h_last, targets[jnp.maximum(m, 0)], weight)
            b = plan["backward"][t, s]
            cotangent = jnp.where(b >= 0, jnp.where(s == S - 1, d_h, g_in), 0)
            d_layers, d_x = stage_vjp(_varying_over(cotangent, flowing))
            g_next = jax.lax.ppermute(d_x, "stage", [(i + 1, i) for i in range(S - 1)])
            if lora is None:  # the embedding's gradient for the backward that ended on stage 0
                m0 = plan["backward"][t, 0]
                d_x0 = jax.lax.psum(jnp.where((s == 0) & (m0 >= 0), d_x, 0), "stage")
                ids = tokens[jnp.maximum(m0, 0)]
                d_lookup = jax.vjp(lambda e: embed_lookup(e, ids), embed)[1](d_x0)[0]
                d_top = (*d_top[:2], d_top[2] + d_lookup)
            grads = _typed_like(jax.tree.map(jnp.add, grads, (d_layers, d_top)), primal)
            return (
                _varying_over(x_next, flowing),
                _varying_over(g_next, flowing),
                _varying_over(stash, flowing),
                grads,
                _varying_over(loss + part, {BATCH}),
            )

        zero_x = jnp.zeros((tokens.shape[1], T, embed.shape[-1]), pipe.dtype)
        carry = (
            _varying_over(zero_x, flowing),  # the input arriving from the stage before
            _varying_over(zero_x, flowing),  # the gradient arriving from the stage after
            _varying_over(jnp.zeros((table.slots, *zero_x.shape), pipe.dtype), flowing),
            _typed_like(jax.tree.map(jnp.zeros_like, primal), primal),
            _varying_over(jnp.zeros((), jnp.float32), {BATCH}),
        )
        _, _, _, grads, loss = jax.lax.fori_loop(0, ticks, tick, carry)
        return jax.lax.psum(loss, BATCH), _gradient_state(trained, grads)

    grad_specs = _specs(params_abstract) if lora is None else adapter_specs
    return _jitted(
        llm, program, (_specs(params_abstract), _specs(rest_abstract), adapter_specs), grad_specs
    )


def _jitted(llm, program, state_specs: tuple, grad_specs):
    """`program` over `llm`'s mesh (float32 matmuls at full precision), jitted."""
    precision = "highest" if jnp.dtype(llm.pipeline.dtype) == jnp.float32 else None

    def precise(*args):
        with jax.default_matmul_precision(precision):
            return program(*args)

    fn = jax.shard_map(
        precise,
        mesh=llm.mesh,
        in_specs=(*state_specs, ROWS, ROWS, ROWS, P()),
        out_specs=(P(), grad_specs),
        check_vma=True,
    )
    return jax.jit(fn)
