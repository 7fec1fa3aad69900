"""Forward and backward through the pipeline (jaxpp/training.py): the loss and every parameter's
gradient equal `jax.value_and_grad` of the unpipelined model (pp=1, one device, no schedule) for
both schedules, pp 1/2/4, an uneven partition, tp=2, dp=2 and the MoE families; the loss (and,
for MoE, the gradient's norm) equals transformers'; the schedules' tick tables and stash keep
what they promise, in the tables and in the compiled program's memory."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from test_parallel import MOE_FAMILIES, _build_moe

import jaxpp
from jaxpp.lora import LoraConfig, merged_slot
from jaxpp.model import embed_lookup, local_logits, rope_tables
from jaxpp.training import (
    ARRIVAL,
    MIRROR,
    SCHEDULES,
    _adapters,
    _split_state,
    causal_attention,
    compiled_memory,
    merge_lora,
    parameters,
    pipeline_value_and_grad,
    schedule_table,
    set_parameters,
    stash_bytes,
)

RTOL = 1e-5
KV = 1 << 22  # bytes of KV pages per device: these engines serve nothing but a score


@pytest.fixture(scope="module")
def model(hf_model):
    return hf_model("llama")


@pytest.fixture(scope="module")
def batch(model):
    rng = np.random.default_rng(0)
    vocab = jaxpp.LLM(model, max_num_seqs=2, kv_cache_memory=KV).config.vocab_size
    tokens = rng.integers(0, vocab, (8, 12))
    mask = np.ones(tokens.shape, np.float32)
    mask[:, -1] = 0
    mask[:2, :5] = 0  # a prompt whose loss does not count
    return tokens, mask


def dense_value_and_grad(llm, tokens, mask, lora=None):
    """The unpipelined reference: embedding, every layer in order, head, mean cross-entropy,
    differentiated by jax.value_and_grad (llm has pp=1, tp=1, dp=1) with respect to every
    parameter, or with `lora` to its adapters only."""
    params, rest = _split_state(llm)
    adapters = {} if lora is None else _adapters(llm, lora)[1]
    pipe = llm.pipeline
    targets = np.concatenate([tokens[:, 1:], np.zeros_like(tokens[:, :1])], axis=1)
    specs = jax.tree.map(lambda _: jax.sharding.PartitionSpec(), (params, rest, adapters))

    def loss(params, rest, adapters):
        model = nnx.merge(pipe.graphdef, params, rest)
        x = embed_lookup(model.embed[...], jnp.asarray(tokens, jnp.int32))
        cos, sin = rope_tables(jnp.arange(tokens.shape[1])[None], pipe.inv_freq, pipe.dtype)
        for i, slot in enumerate(model.layers):  # one stage: every slot holds a layer, in order
            weights = nnx.state(slot, nnx.Param)
            if lora is not None:
                weights = merged_slot(weights, adapters["slots"][i], lora)
            local = jax.tree.map(lambda a: a[0], (weights, nnx.state(slot, nnx.Not(nnx.Param))))
            layer = nnx.merge(pipe.layer_graphdef, *local)
            q, k, v = layer.attn.qkv(layer.input_norm(x), cos, sin)
            x = x + layer.attn.out(causal_attention(q, k, v, layer.window[...]))
            x = x + layer.mlp(layer.post_attn_norm(x))
        logp = jax.nn.log_softmax(local_logits(model, x, llm.config.vocab_size), axis=-1)
        picked = jnp.take_along_axis(logp, jnp.asarray(targets)[..., None], -1)[..., 0]
        return -jnp.sum(picked * mask) / mask.sum()

    # One device: every collective is over axes of size 1, so autodiff through them is exact.
    fn = jax.shard_map(
        loss, mesh=llm.mesh, in_specs=specs, out_specs=jax.sharding.PartitionSpec(), check_vma=False
    )
    with jax.default_matmul_precision("highest"):
        return jax.jit(jax.value_and_grad(fn, argnums=0 if lora is None else 2))(
            params, rest, adapters
        )


def per_layer(llm, grads) -> dict[str, np.ndarray]:
    """Gradients by name, layers by their model index (undoing the stage x slot grid); the
    adapters' as the layers' ("slots" for "layers")."""
    out = {}
    flat = nnx.to_flat_state(grads)
    grid = llm.model_layout.grid
    for path, leaf in flat:
        value = np.asarray(jax.device_get(leaf[...]))
        if path[0] in ("layers", "slots"):
            slot, rest = path[1], path[2:]
            for stage in range(grid.shape[0]):
                if grid[stage, slot] >= 0:
                    out[f"layer{grid[stage, slot]}." + ".".join(map(str, rest))] = value[stage]
        else:
            name = ".".join(map(str, path))
            out[name] = value[: llm.config.vocab_size] if path[0] in ("embed", "lm_head") else value
    return out


@pytest.fixture(scope="module")
def reference(model, batch):
    llm = jaxpp.LLM(model, max_num_seqs=2, kv_cache_memory=KV)
    loss, grads = dense_value_and_grad(llm, *batch)
    return float(loss), per_layer(llm, grads)


def _close(got: dict, want: dict) -> None:
    """Every tensor within RTOL of its scale (the worst is printed: pytest -s)."""
    assert got.keys() == want.keys()
    errors = {}
    for name in want:
        scale = np.max(np.abs(want[name])) + 1e-12
        errors[name] = np.max(np.abs(got[name] - want[name])) / scale
        assert errors[name] <= RTOL, f"{name}: {errors[name]:.2e} of its scale"
    worst = max(errors, key=errors.get)
    print(f"worst gradient: {worst} {errors[worst]:.1e} of its scale")


LAYOUTS = [
    dict(pp=1),
    dict(pp=2),
    dict(pp=4),
    dict(pp=2, layer_partition="3,1"),
    dict(pp=2, tp=2),
    dict(pp=2, dp=2),
]


@pytest.mark.parametrize("schedule", ["1f1b", "gpipe"])
@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda d: "-".join(f"{k}{v}" for k, v in d.items()))
def test_pipelined_gradients_equal_the_unpipelined(model, batch, reference, schedule, layout):
    llm = jaxpp.LLM(model, max_num_seqs=4, kv_cache_memory=KV, **layout)
    microbatches = 4 if layout.get("dp", 1) == 1 else 2
    loss, grads = pipeline_value_and_grad(llm, *batch, schedule=schedule, microbatches=microbatches)
    assert abs(float(loss) - reference[0]) <= RTOL * abs(reference[0])
    _close(per_layer(llm, grads), reference[1])


def test_loss_equals_transformers_cross_entropy(model, batch):
    tokens, _ = batch
    llm = jaxpp.LLM(model, pp=2, max_num_seqs=2, kv_cache_memory=KV)
    loss, _ = pipeline_value_and_grad(llm, tokens)
    hf = transformers.AutoModelForCausalLM.from_pretrained(model, torch_dtype=torch.float32)
    with torch.no_grad():
        want = hf(torch.tensor(tokens), labels=torch.tensor(tokens)).loss.item()
    assert abs(float(loss) - want) <= RTOL * abs(want)


def test_schedule_tables():
    gpipe, one = schedule_table("gpipe", 4, 16), schedule_table("1f1b", 4, 16)
    for table in (gpipe, one):  # every micro-batch forward then backward, once per stage
        for s in range(4):
            assert sorted(table.forward[:, s][table.forward[:, s] >= 0]) == list(range(16))
            assert sorted(table.backward[:, s][table.backward[:, s] >= 0]) == list(range(16))
    assert one.forward.shape[0] == 16 + 2 * 4 - 2 < gpipe.forward.shape[0] == 2 * (16 + 4) - 3
    with pytest.raises(ValueError, match="schedule='zb' is invalid"):
        schedule_table("zb", 2, 2)


@pytest.mark.parametrize("schedule", ["1f1b", "gpipe"])
@pytest.mark.parametrize("stages,microbatches", [(1, 4), (2, 8), (3, 5), (4, 16), (5, 7), (6, 12)])
def test_every_backward_finds_its_input_in_the_stash(schedule, stages, microbatches):
    """Replaying the stash tables: each backward reads the input its stage's forward of the same
    micro-batch got, from the stage's own slots, its mirror's or this tick's arrival. 1F1B keeps
    S - 1 inputs per device whatever M (the lenders park the rest on their mirrors), GPipe M."""
    table = schedule_table(schedule, stages, microbatches)
    held = table.held()
    for t, s in np.argwhere(table.backward >= 0):
        m, source, mirror = table.backward[t, s], table.load[t, s], stages - 1 - s
        before = held[t - 1] if t else np.full_like(held[0], -1)
        if source == ARRIVAL:
            assert table.forward[t, s] == m
        elif source == MIRROR:
            assert table.lends[s] and before[mirror, table.fetch[t, mirror]] == -2 - m
        else:
            assert before[s, source] == m
    if schedule == "1f1b":
        assert table.slots == max(stages - 1, 1)
        assert list(np.flatnonzero(table.lends)) == list(range(stages // 2))
    else:
        assert table.slots == (microbatches if stages > 1 else microbatches - 1)
        assert not table.lends.any()


def test_1f1b_memory_does_not_grow_with_microbatches(model):
    """XLA's memory analysis of the compiled programs (per device, pp=4, two rows per
    micro-batch): 1F1B's temp bytes are the same at M = 4 and 8, its stash 3 inputs; GPipe's
    stash is M inputs (docs/pipeline.md measures the demo model)."""
    llm = jaxpp.LLM(model, pp=4, max_num_seqs=2, kv_cache_memory=KV)
    temp = {}
    for M in (4, 8):
        tokens = np.random.default_rng(M).integers(0, llm.config.vocab_size, (2 * M, 12))
        temp[M] = compiled_memory(llm, tokens, microbatches=M).temp_size_in_bytes
        one, gpipe = (stash_bytes(llm, tokens, schedule=k, microbatches=M) for k in SCHEDULES)
        assert one == 3 * 2 * 12 * llm.config.hidden_size * 4 <= 4 / M * gpipe
    assert temp[4] == temp[8]


def test_a_gradient_step_is_served_and_saved(model, batch, tmp_path):
    """SGD on the pipeline's gradients lowers the loss; the engine then serves the new weights,
    and save_engine_dir writes them as an orbax model dir that LLM loads to the same logits."""
    from jaxpp.loading import save_engine_dir  # noqa: PLC0415
    from jaxpp.training import parameters, set_parameters  # noqa: PLC0415

    tokens, _ = batch
    llm = jaxpp.LLM(model, pp=2, max_num_seqs=2, kv_cache_memory=KV)
    before, grads = pipeline_value_and_grad(llm, tokens)
    stepped = jax.tree.map(lambda p, g: p - 0.5 * g, parameters(llm), grads)
    set_parameters(llm, stepped)
    after, _ = pipeline_value_and_grad(llm, tokens)
    assert float(after) < float(before)
    save_engine_dir(llm, tmp_path / "tuned")
    loaded = jaxpp.LLM(tmp_path / "tuned", pp=2, max_num_seqs=2, kv_cache_memory=KV)
    want, got = llm.logits([tokens[0]])[0], loaded.logits([tokens[0]])[0]
    np.testing.assert_allclose(got, want, rtol=0, atol=5e-6 * np.abs(want).max())


# ---- MoE: routed experts (Qwen2-MoE with a shared expert and a dense layer, Qwen3-MoE)

MOE_CASES = [  # with test_moe_at_pp2_equals_the_unpipelined_and_transformers: pp=2, 1F1B
    ("qwen2_moe", dict(pp=2, tp=2), "gpipe"),
    ("qwen3_moe", dict(pp=2, layer_partition="3,1"), "gpipe"),
    # pp=4: the dense model's pp=4 and the MoE families' pp=2 cover it (`pytest -m slow`)
    pytest.param("qwen3_moe", dict(pp=4), "1f1b", marks=pytest.mark.slow),
]


@pytest.fixture(scope="module")
def moe_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe")
    return {family: _build_moe(root, family) for family in MOE_FAMILIES}


@pytest.fixture(scope="module")
def moe_references(moe_models, batch):
    out = {}
    for family, path in moe_models.items():
        llm = jaxpp.LLM(path, dtype="float32", max_num_seqs=2, kv_cache_memory=KV)
        loss, grads = dense_value_and_grad(llm, *batch)
        out[family] = float(loss), per_layer(llm, grads)
    return out


def moe_llm(path, **layout):
    return jaxpp.LLM(path, dtype="float32", max_num_seqs=4, kv_cache_memory=KV, **layout)


@pytest.mark.parametrize(
    "family,layout,schedule",
    MOE_CASES,
    ids=["qwen2_moe-pp2-tp2-gpipe", "qwen3_moe-pp2-3,1-gpipe", "qwen3_moe-pp4-1f1b"],
)
def test_moe_gradients_equal_the_unpipelined(
    moe_models, moe_references, batch, family, layout, schedule
):
    llm = moe_llm(moe_models[family], **layout)
    loss, grads = pipeline_value_and_grad(llm, *batch, schedule=schedule, microbatches=4)
    want_loss, want = moe_references[family]
    assert abs(float(loss) - want_loss) <= RTOL * abs(want_loss)
    _close(per_layer(llm, grads), want)


@pytest.mark.parametrize("family", list(MOE_FAMILIES))
def test_moe_at_pp2_equals_the_unpipelined_and_transformers(
    moe_models, moe_references, batch, family
):
    """1F1B over 2 stages: every gradient equals the unpipelined one, and the loss and the
    norm of the whole gradient equal torch autograd's through transformers' own MoE (float32
    eager; the weights' layouts differ, their gradient's norm does not)."""
    tokens, mask = batch
    llm = moe_llm(moe_models[family], pp=2)
    loss, grads = pipeline_value_and_grad(llm, tokens, mask, microbatches=4)
    got = per_layer(llm, grads)
    _close(got, moe_references[family][1])
    norm = np.sqrt(sum(np.sum(np.square(v, dtype=np.float64)) for v in got.values()))
    hf = transformers.AutoModelForCausalLM.from_pretrained(moe_models[family], dtype=torch.float32)
    labels = torch.tensor(np.where(mask > 0, np.roll(tokens, -1, axis=1), -100))
    logits = hf(torch.tensor(tokens)).logits.flatten(0, 1)
    want = torch.nn.functional.cross_entropy(logits, labels.flatten(), ignore_index=-100)
    want.backward()
    want_norm = torch.sqrt(
        sum(p.grad.square().sum() for p in hf.parameters() if p.grad is not None)
    )
    loss_error = abs(float(loss) - want.item()) / want.item()
    norm_error = abs(norm - want_norm.item()) / want_norm.item()
    print(f"against transformers: loss {loss_error:.1e}, gradient norm {norm_error:.1e}")
    assert loss_error <= RTOL and norm_error <= 1e-4


# ---- LoRA: adapters trained, the model's weights frozen

LORA = LoraConfig(rank=2, targets=("q_proj", "v_proj", "o_proj", "up_proj", "down_proj"), alpha=4)


def with_drawn_b(llm, lora: LoraConfig) -> None:
    """Give `llm`'s adapters b factors drawn per model layer (fresh ones start at b = 0, where
    the a factors get no gradient), the same whatever the layout."""
    graphdef, state = _adapters(llm, lora)
    adapters = nnx.merge(graphdef, state)
    grid = llm.model_layout.grid
    for i, slot in enumerate(adapters.slots):
        for k, name in enumerate(lora.targets):
            b = slot[name].b
            value = np.zeros(b.shape, np.float32)
            for s, layer in enumerate(grid[:, i]):
                if layer >= 0:
                    value[s] = np.random.default_rng((int(layer), k)).normal(0, 0.1, b.shape[1:])
            b[...] = jax.device_put(value, b[...].sharding)
    set_parameters(llm, nnx.state(adapters), lora=lora)


@pytest.fixture(scope="module")
def lora_reference(model, batch):
    llm = jaxpp.LLM(model, max_num_seqs=2, kv_cache_memory=KV)
    with_drawn_b(llm, LORA)
    loss, grads = dense_value_and_grad(llm, *batch, lora=LORA)
    return float(loss), per_layer(llm, grads)


@pytest.mark.parametrize(
    "layout,schedule",
    [
        (dict(pp=2, tp=2, layer_partition="3,1"), "1f1b"),
        # the adapters' path is the same in every schedule and pp (`pytest -m slow`)
        pytest.param(dict(pp=4), "gpipe", marks=pytest.mark.slow),
    ],
    ids=["pp2-tp2-3,1-1f1b", "pp4-gpipe"],
)
def test_lora_gradients_equal_the_unpipelined(model, batch, lora_reference, layout, schedule):
    """The adapters' gradients (a and b of each target, tp-sharded like their weights) equal
    jax.value_and_grad's of the unpipelined model with the same adapters."""
    llm = jaxpp.LLM(model, max_num_seqs=4, kv_cache_memory=KV, **layout)
    with_drawn_b(llm, LORA)
    loss, grads = pipeline_value_and_grad(llm, *batch, schedule=schedule, microbatches=4, lora=LORA)
    assert abs(float(loss) - lora_reference[0]) <= RTOL * abs(lora_reference[0])
    _close(per_layer(llm, grads), lora_reference[1])


def test_lora_trains_adapters_only_and_merges_into_the_served_weights(model, batch):
    """Fresh adapters leave the model as it is; the gradients (and the program's outputs) are
    the adapters' only; a step lowers the loss; merge_lora puts the tuned model into the
    weights the engine serves: the cross-entropy of its served logits is the adapted loss."""
    tokens, _ = batch
    llm = jaxpp.LLM(model, pp=2, max_num_seqs=8, kv_cache_memory=KV)
    lora = LoraConfig(rank=4, targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj"))
    base, _ = pipeline_value_and_grad(llm, tokens)
    before, grads = pipeline_value_and_grad(llm, tokens, lora=lora)
    assert abs(float(before) - float(base)) <= RTOL * float(base)
    adapters = parameters(llm, lora=lora)
    assert jax.tree.structure(grads) == jax.tree.structure(adapters)
    adapter_bytes = sum(a.nbytes for a in jax.tree.leaves(adapters)) // 2  # per device (pp=2)
    memory = compiled_memory(llm, tokens, lora=lora)
    assert memory.output_size_in_bytes <= adapter_bytes + 1024  # and the loss
    set_parameters(llm, jax.tree.map(lambda p, g: p - 0.5 * g, adapters, grads), lora=lora)
    after, _ = pipeline_value_and_grad(llm, tokens, lora=lora)
    assert float(after) < float(before)
    merge_lora(llm, lora)
    merged, _ = pipeline_value_and_grad(llm, tokens)
    assert abs(float(merged) - float(after)) <= RTOL * float(after)
    logits = np.stack(llm.logits(list(tokens)))[:, :-1].astype(np.float64)
    top = logits.max(-1, keepdims=True)
    logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
    served = -np.take_along_axis(logp, tokens[:, 1:, None], -1).mean()
    assert abs(served - float(after)) <= RTOL * float(after)


def test_lora_bad_configurations(moe_models):
    with pytest.raises(ValueError, match="rank=0 is invalid"):
        LoraConfig(rank=0)
    with pytest.raises(ValueError, match=r"targets=\('qkv',\) is invalid"):
        LoraConfig(rank=2, targets=("qkv",))
    with pytest.raises(ValueError, match="expected a tuple of names"):
        LoraConfig(rank=2, targets="q_proj")
    llm = moe_llm(moe_models["qwen3_moe"])
    with pytest.raises(ValueError, match="mixtures of experts"):
        parameters(llm, lora=LoraConfig(rank=2, targets=("q_proj", "down_proj")))
