"""Forward and backward through the pipeline: the mean next-token cross-entropy of a batch and
its gradient with respect to every parameter, in ONE jitted `jax.shard_map` program over the
engine's own mesh and layout (stages, tensor-parallel heads, data-parallel replicas), by the
GPipe or the 1F1B schedule.

The batch [B, T] is cut into M micro-batches. At each tick every stage runs at most one forward
(F: its layers over a micro-batch's activations, which then move s -> s+1 by `ppermute`) and at
most one backward (B: its layers again from the input it kept, under `jax.vjp`; the gradient of
that input then moves s -> s-1). A stage keeps each micro-batch's input from its F to its B:
that stash is what the schedules trade. S = 3, M = 4 (Fm / Bm: forward / backward of m):

    GPipe: every forward, then every backward; stage s keeps all M inputs

    tick     0    1    2    3    4    5      6    7    8    9    10
    stage 0  F0   F1   F2   F3   .    .      .    B3   B2   B1   B0
    stage 1  .    F0   F1   F2   F3   .      B3   B2   B1   B0   .
    stage 2  .    .    F0   F1   F2   F3 B3  B2   B1   B0   .    .

    1F1B: a micro-batch's backward starts in the tick its forward reaches the last stage; in
    the steady state every stage runs one F and one B per tick, and stage s keeps at most
    2(S - 1 - s) + 1 inputs, whatever M

    tick     0    1    2      3      4      5      6    7
    stage 0  F0   F1   F2     F3     B0     B1     B2   B3
    stage 1  .    F0   F1     F2 B0  F3 B1  B2     B3   .
    stage 2  .    .    F0 B0  F1 B1  F2 B2  F3 B3  .    .

Within a tick: the embedding of the micro-batch entering stage 0, every stage's F, the loss of
the micro-batch whose B starts on the last stage, every stage's B, and the embedding's gradient
for the micro-batch whose B ended on stage 0. The embedding, the LM head and the loss are
vocab-parallel over every device (model.py), so every device takes part in them at every tick.
A stage's B recomputes its forward from the kept input (activation recomputation: one
[rows, T, D] input per micro-batch in flight, nothing else). What a stage computes in a tick
where the table gives it nothing is masked out (zero cotangents, a scratch stash slot), as idle
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

from jaxpp.model import VOCAB_AXES, embed_lookup, rope_tables, vocab_shard_index
from jaxpp.sharding import LOGICAL_TO_MESH, logical_to_spec

SCHEDULES = ("1f1b", "gpipe")
MASKED = -1e30  # a score no key reaches (finite: exp(MASKED - max) is exactly 0)
BATCH = LOGICAL_TO_MESH["batch"]
ROWS = P(None, BATCH)  # [micro-batches, rows, T]: rows split over data-parallel replicas


class Schedule(NamedTuple):
    """Which micro-batch each stage runs forward and backward at each tick (-1: none)."""

    forward: np.ndarray  # i32 [ticks, S]
    backward: np.ndarray  # i32 [ticks, S]
    stash: int  # the most inputs a stage keeps at once

    @property
    def bubble(self) -> float:
        """Share of a stage's F and B slots over the ticks that run nothing."""
        ticks, stages = self.forward.shape
        work = (self.forward >= 0).sum() + (self.backward >= 0).sum()
        return float(1.0 - work / (2 * ticks * stages))

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
        width = max(len(c) for row in cells for c in row) + 2
        lines = ["tick     " + "".join(f"{t:<{width}}" for t in range(ticks))]
        lines += [
            f"stage {s:<3}" + "".join(f"{c:<{width}}" for c in row) for s, row in enumerate(cells)
        ]
        return "\n".join(line.rstrip() for line in lines)


def schedule_table(name: str, stages: int, microbatches: int) -> Schedule:
    """The tick table of a schedule (module docstring): F(m, s) at tick m + s in both;
    B(m, s) at m + 2S - 2 - s (1F1B) or at (M + S - 2) + (M - 1 - m) + (S - 1 - s) (GPipe)."""
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
    held = max(
        sum(1 for m in range(M) if m + s <= t <= b_tick[m, s])
        for s in range(S)
        for t in range(ticks)
    )
    return Schedule(forward, backward, held)


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
) -> tuple[jax.Array, nnx.State]:
    """(loss, grads): the mean next-token cross-entropy of `token_ids` [B, T] under `llm`'s
    weights, and its gradient, through `llm`'s pipeline (its mesh, partition, tp and dp).

    `loss_mask` [B, T]: nonzero where the loss of predicting the next token counts (default:
    every position but the last, which has no next token and must be 0). `grads` is an
    `nnx.State` of the model's parameters in the engine's layout and sharding: slot i of stage
    s holds the gradient of layer `llm.model_layout.grid[s, i]` (zeros in empty slots).
    `microbatches` (default: the number of stages) must split the batch into equal parts, each
    split again over the data-parallel replicas."""
    tokens, targets, weights, count = _batch(llm, token_ids, loss_mask)
    M = llm.pp if microbatches is None else microbatches
    B, T = tokens.shape
    if not isinstance(M, int) or M < 1 or B % (M * llm.dp):
        raise ValueError(
            f"a batch of {B} does not split into microbatches={M} x dp={llm.dp} equal parts"
        )
    table = schedule_table(schedule, llm.pp, M)
    params, rest = _split_state(llm)
    program = _program(llm, table, (M, B // M, T))
    shaped = [a.reshape(M, B // M, T) for a in (tokens, targets, weights)]
    return program(params, rest, *shaped, np.float32(count))


def parameters(llm) -> nnx.State:
    """`llm`'s parameters, as `pipeline_value_and_grad`'s gradients are laid out (an optimizer
    such as optax updates them leaf by leaf, keeping their sharding)."""
    return _split_state(llm)[0]


def set_parameters(llm, params: nnx.State) -> None:
    """Serve (and differentiate) `params` from now on: the next step programs read them."""
    _, rest = _split_state(llm)
    llm.state = nnx.state(nnx.merge(llm.pipeline.graphdef, params, rest))
    llm.reset_prefix_cache()  # the cached pages hold the old weights' keys and values


def compiled_memory(llm, token_ids, *, schedule: str, microbatches: int):
    """XLA's memory analysis of the program `pipeline_value_and_grad` runs (per device):
    `temp_size_in_bytes` is what the schedule's activations and stash cost."""
    tokens, targets, weights, count = _batch(llm, token_ids, None)
    B, T = tokens.shape
    M = microbatches
    table = schedule_table(schedule, llm.pp, M)
    params, rest = _split_state(llm)
    program = _program(llm, table, (M, B // M, T))
    shaped = [a.reshape(M, B // M, T) for a in (tokens, targets, weights)]
    return program.lower(params, rest, *shaped, np.float32(count)).compile().memory_analysis()


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


def _program(llm, table: Schedule, shape: tuple[int, int, int]):
    """The jitted program for a schedule and batch shape, built once per LLM."""
    programs = llm.__dict__.setdefault("_gradient_programs", {})
    key = (table.forward.tobytes(), table.backward.tobytes(), table.forward.shape, shape)
    if key not in programs:
        programs[key] = _build(llm, table, shape)
    return programs[key]


def _build(llm, table: Schedule, shape: tuple[int, int, int]):
    pipe = llm.pipeline
    S = llm.pp
    M, _, T = shape
    last = S - 1
    ticks = table.forward.shape[0]
    cap = table.stash  # slots cap..: a scratch slot for ticks that keep nothing
    forward_of, backward_of = jnp.asarray(table.forward), jnp.asarray(table.backward)
    ahead = [(i, i + 1) for i in range(S - 1)]
    behind = [(i + 1, i) for i in range(S - 1)]
    vocab = llm.config.vocab_size
    tied = llm.config.tie_word_embeddings
    params_abstract, rest_abstract = _split_state(llm)
    param_specs, rest_specs = _specs(params_abstract), _specs(rest_abstract)

    def spec_axes(spec: P) -> set[str]:
        names = set()
        for entry in spec:
            names.update((entry,) if isinstance(entry, str) else entry or ())
        return names

    def varying_over(x, axes: set[str]):
        """x typed as varying over `axes` (what the loop's carries must keep from tick to
        tick): a value computed alike on those devices is cast, nothing is communicated."""
        missing = tuple(sorted(set(axes) - _varying_axes(x)))
        return jax.lax.pcast(x, missing, to="varying") if missing else x

    # The carries' types: activations and their gradients differ per stage and per replica's
    # rows, never across a stage's tensor-parallel devices (each holds the whole residual
    # stream); a parameter's gradient varies where the parameter does, and per replica.
    flowing = {"stage", BATCH}

    def program(params, rest, tokens, targets, weights, count):
        s = jax.lax.axis_index("stage")
        model = nnx.merge(pipe.graphdef, params, rest)
        layer_params = [nnx.state(slot, nnx.Param) for slot in model.layers]
        layer_rest = [nnx.state(slot, nnx.Not(nnx.Param)) for slot in model.layers]
        norm_graphdef, norm_params = nnx.split(model.final_norm, nnx.Param)
        embed = model.embed[...]
        head = None if tied else model.lm_head[...]
        cos, sin = rope_tables(jnp.arange(T)[None], pipe.inv_freq, pipe.dtype)
        rows, D = tokens.shape[1], embed.shape[-1]

        def stage(layer_params, x):
            """This device's layer slots over x [rows, T, D]."""
            for i, (lp, lr) in enumerate(zip(layer_params, layer_rest, strict=True)):
                local = jax.tree.map(lambda a: a[0], (lp, lr))
                layer = nnx.merge(pipe.layer_graphdef, *local)
                q, k, v = layer.attn.qkv(layer.input_norm(x), cos, sin)
                y = x + layer.attn.out(causal_attention(q, k, v, layer.window[...]))
                y = y + layer.mlp(layer.post_attn_norm(y))
                x = jnp.where(layer.filled[...], y, x) if pipe.masked_slots[i] else y
            return x

        def loss_of(norm_params, head, embed, h, target, weight):
            """Sum over counted positions of the cross-entropy / count (vocab-parallel)."""
            normed = nnx.merge(norm_graphdef, norm_params)(h)
            table = embed if head is None else head
            logits = jnp.einsum("btd,vd->btv", normed, table).astype(jnp.float32)
            width = logits.shape[-1]
            first = vocab_shard_index() * width
            logits = jnp.where(first + jnp.arange(width) < vocab, logits, MASKED)
            # The shift of the log-sum-exp: its gradient cancels, so none flows through it.
            top = jax.lax.pmax(jax.lax.stop_gradient(jnp.max(logits, axis=-1)), VOCAB_AXES)
            total = jax.lax.psum(jnp.sum(jnp.exp(logits - top[..., None]), axis=-1), VOCAB_AXES)
            local = target - first
            mine = (local >= 0) & (local < width)
            picked = jnp.take_along_axis(logits, jnp.clip(local, 0, width - 1)[..., None], -1)
            target_logit = jax.lax.psum(jnp.where(mine, picked[..., 0], 0.0), VOCAB_AXES)
            return jnp.sum((top + jnp.log(total) - target_logit) * weight) / count

        primal = (layer_params, norm_params, head, embed)

        def gradients_varying(grads):
            """Each gradient typed as varying where its parameter does. Not per replica: the
            parameters are the same on every replica, so autodiff already sums their
            gradients over the replicas' rows (the transpose of using one value everywhere)."""
            return jax.tree.map(lambda g, p: varying_over(g, _varying_axes(p)), grads, primal)

        def tick(t, carry):
            x_in, g_in, stash, grads, loss = carry
            f, b = forward_of[t, s], backward_of[t, s]
            # The micro-batch entering stage 0 (every device: the table is vocab-parallel).
            x0 = embed_lookup(embed, tokens[jnp.maximum(forward_of[t, 0], 0)])
            x = jnp.where(s == 0, x0, x_in)
            stash = stash.at[jnp.where(f >= 0, f % cap, cap)].set(x)
            x_next = jax.lax.ppermute(stage(layer_params, x), "stage", ahead)
            # The backward: recompute this stage's forward from the kept input.
            h, stage_vjp = jax.vjp(stage, layer_params, stash[jnp.where(b >= 0, b % cap, cap)])
            # The loss of the micro-batch whose backward starts on the last stage.
            m = backward_of[t, last]
            h_last = jax.lax.psum(jnp.where(s == last, h, 0), "stage")
            weight = weights[jnp.maximum(m, 0)] * (m >= 0)
            target = targets[jnp.maximum(m, 0)]
            part, loss_vjp = jax.vjp(
                lambda n, hd, e, hh: loss_of(n, hd, e, hh, target, weight),
                norm_params, head, embed, h_last,
            )  # fmt: skip
            d_norm, d_head, d_embed, d_h = loss_vjp(jnp.ones_like(part))
            cotangent = jnp.where(b >= 0, jnp.where(s == last, d_h, g_in), 0)
            d_layers, d_x = stage_vjp(varying_over(cotangent, flowing))
            g_next = jax.lax.ppermute(d_x, "stage", behind)
            # The embedding's gradient for the micro-batch whose backward ended on stage 0.
            m0 = backward_of[t, 0]
            d_x0 = jax.lax.psum(jnp.where((s == 0) & (m0 >= 0), d_x, 0), "stage")
            _, embed_vjp = jax.vjp(lambda e: embed_lookup(e, tokens[jnp.maximum(m0, 0)]), embed)
            (d_lookup,) = embed_vjp(d_x0)
            step = (d_layers, d_norm, d_head, d_embed + d_lookup)
            grads = gradients_varying(jax.tree.map(jnp.add, grads, step))
            return (
                varying_over(x_next, flowing),
                varying_over(g_next, flowing),
                varying_over(stash, flowing),
                grads,
                varying_over(loss + part, {BATCH}),
            )

        zero_x = varying_over(jnp.zeros((rows, T, D), pipe.dtype), flowing)
        carry = (
            zero_x,
            zero_x,
            varying_over(jnp.zeros((cap + 1, rows, T, D), pipe.dtype), flowing),
            gradients_varying(jax.tree.map(jnp.zeros_like, primal)),
            varying_over(jnp.zeros((), jnp.float32), {BATCH}),
        )
        _, _, _, grads, loss = jax.lax.fori_loop(0, ticks, tick, carry)
        d_layers, d_norm, d_head, d_embed = grads
        # The gradients in the parameters' own state (the model here is this trace's copy).
        for layer, d in zip(model.layers, d_layers, strict=True):
            nnx.update(layer, d)
        nnx.update(model.final_norm, d_norm)
        model.embed.value = d_embed
        if head is not None:
            model.lm_head[...] = d_head
        return jax.lax.psum(loss, BATCH), nnx.state(model, nnx.Param)

    precision = "highest" if jnp.dtype(pipe.dtype) == jnp.float32 else None

    def precise(*args):
        with jax.default_matmul_precision(precision):
            return program(*args)

    fn = jax.shard_map(
        precise,
        mesh=llm.mesh,
        in_specs=(param_specs, rest_specs, ROWS, ROWS, ROWS, P()),
        out_specs=(P(), param_specs),
        check_vma=True,
    )
    return jax.jit(fn)
