"""FP8 weights: a checkpoint in each published format gives the logits transformers gives for
the same model with its weights dequantized to float32; quantization="fp8" on load gives those
of its fake-quantized twin and stays close to the float model; every layout and an orbax round
trip give the same answers; the W8A8 GEMM computes what it says; bad configs are refused by
name. Tiny checkpoints are written by fp8_fixtures.py from hf_fixtures' float ones."""

import inspect
import json
import re

import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from fp8_fixtures import fake_quantized_copy, replace_tensor, write_fp8_checkpoint
from hf_fixtures import copy_model_dir, hf_logits, random_seqs, rel_err
from test_parallel import _build_moe

import jaxpp
from jaxpp import cli, fp8, sampling
from jaxpp.checkpoint import CheckpointError
from jaxpp.config import ModelConfig, with_quantization

SEQS = random_seqs([7, 12, 3], seed=3)
ENGINE = dict(dtype="float32", max_num_seqs=4, kv_cache_memory=1 << 22)


# name: (family, write_fp8_checkpoint arguments). Each reaches a different rule of the loader.
CHECKPOINTS = {
    # llm-compressor's FP8 preset: per-tensor weights, static per-tensor input_scale, scales in
    # bf16; an ignore regex leaves layer 1's down_proj in floats (its slot keeps it so)
    "ct_tensor": (
        "llama",
        dict(
            method="compressed-tensors",
            strategy="tensor",
            static_inputs=True,
            scale_dtype=ml_dtypes.bfloat16,
            ignore=("lm_head", r"re:.*layers\.1\.mlp\.down_proj$"),
            keep_float=lambda m: m == "lm_head" or m.endswith("layers.1.mlp.down_proj"),
        ),
    ),
    # FP8_DYNAMIC: per-channel weights, dynamic per-token activations; q/k norms, head_dim 32
    "ct_channel": ("qwen3", dict(method="compressed-tensors", strategy="channel")),
    # Qwen3/DeepSeek FP8: weight_scale_inv per [32, 48] block (partial edge blocks; head_dim 24
    # so a block spans heads), layer 0's attention left out by modules_to_not_convert
    "fp8_block": (
        "mistral",
        dict(
            method="fp8",
            strategy="block",
            block=(32, 48),
            ignore=("lm_head", "model.layers.0.self_attn"),
            keep_float=lambda m: m == "lm_head" or m.startswith("model.layers.0.self_attn."),
        ),
    ),
    # Meta's Llama-3.1-*-FP8: per-channel weight_scale; tied embeddings
    "fbgemm": ("llama_tied", dict(method="fbgemm_fp8", strategy="channel", ignore=())),
}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("fp8")


@pytest.fixture(scope="module")
def checkpoints(root, hf_model):
    """name -> (FP8 dir, its dequantized float32 twin)."""
    out = {}
    for name, (family, kwargs) in CHECKPOINTS.items():
        out[name] = write_fp8_checkpoint(hf_model(family), root, name, **kwargs)
    moe = _build_moe(root, "qwen2_moe")
    # Routers and the shared expert's gate stored in FP8 too (targets "Linear", nothing
    # ignored but the head): the engine keeps them in floats, dequantized on load.
    out["moe"] = write_fp8_checkpoint(
        moe, root, "moe_block", method="compressed-tensors", strategy="block", block=(32, 48)
    )
    return out


@pytest.fixture(scope="module")
def answers():
    """(checkpoint name, layout) -> logits, shared by the tests that compare layouts."""
    return {}


def _logits(path, answers, key=None, **layout):
    key = key or (str(path), repr(sorted(layout.items())))
    if key not in answers:
        answers[key] = jaxpp.LLM(path, **ENGINE, **layout).logits(SEQS)
    return answers[key]


def _fp8_leaves(llm) -> set[str]:
    return {
        ".".join(map(str, k))
        for k, v in nnx.to_flat_state(llm.state)
        if v.get_value().dtype == fp8.FP8
    }


@pytest.mark.parametrize(
    "name",
    # fbgemm_fp8 reads per-channel scales as ct_channel does (its config: the parse test)
    ["ct_tensor", "ct_channel", "fp8_block", "moe", pytest.param("fbgemm", marks=pytest.mark.slow)],
)
def test_fp8_checkpoint_gives_transformers_logits_of_its_dequantized_weights(
    checkpoints, answers, name
):
    fp8_dir, reference_dir = checkpoints[name]
    ref = hf_logits(reference_dir, SEQS)
    got = _logits(fp8_dir, answers)
    worst = max(rel_err(g, r) for g, r in zip(got, ref, strict=True))
    print(f"{name}: max|diff|/max|logit| = {worst:.2e}")
    assert worst <= 1e-5


def test_ignored_modules_stay_in_floats_and_the_rest_is_fp8(checkpoints):
    llm = jaxpp.LLM(checkpoints["ct_tensor"][0], **ENGINE)
    stored = _fp8_leaves(llm)
    # Layer 1's down_proj is ignored: slot 1 (pp=1: one layer per slot) keeps it in floats.
    assert "layers.1.mlp.down_proj" not in stored
    linears = ("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj", "mlp.gate_up_proj")
    for slot in range(4):
        assert {f"layers.{slot}.{w}" for w in linears} <= stored
    assert {"layers.0.mlp.down_proj", "layers.2.mlp.down_proj"} <= stored
    assert not any(leaf.startswith(("embed", "lm_head", "final_norm")) for leaf in stored)


@pytest.mark.parametrize(
    "name,layout",
    [
        # the ignored layer 1 shares slot 1 with layer 2 on an uneven partition, over 2 replicas
        ("ct_tensor", dict(dp=2, pp=3, layer_partition=[1, 2, 1])),
        # block scales' runs split over tensor ranks: down_proj's 128 inputs, 64 per rank
        ("fp8_block", dict(pp=2, tp=2)),
        # MoE layouts in floats: test_parallel; FP8 MoE experts: the parity test above
        pytest.param("moe", dict(pp=2, tp=2), marks=pytest.mark.slow),
    ],
)
def test_every_layout_gives_the_same_answers(checkpoints, answers, name, layout):
    path = checkpoints[name][0]
    one = _logits(path, answers)
    split = _logits(path, answers, **layout)
    worst = max(rel_err(a, b) for a, b in zip(split, one, strict=True))
    print(f"{name} {layout}: {worst:.2e} from one device")
    assert worst <= 5e-6


def test_orbax_round_trip_restores_fp8_weights_bit_identically(checkpoints, answers, root):
    path = checkpoints["fp8_block"][0]
    out = root / "fp8_block-orbax"
    assert cli.main(["convert", str(path), str(out), "--pp", "2", "--tp", "2"]) == 0
    assert json.loads((out / "jaxpp_layout.json").read_text())["fp8"]
    restored = jaxpp.LLM(out, pp=2, tp=2, **ENGINE).logits(SEQS)
    for a, b in zip(restored, _logits(path, answers, pp=2, tp=2), strict=True):
        np.testing.assert_array_equal(a, b)


# --- quantization on load -------------------------------------------------------------------


@pytest.fixture(scope="module")
def quantized(hf_model, root):
    """The tiny llama quantized on load, and its float and fake-quantized twins' logits."""
    model = hf_model("llama")
    llm = jaxpp.LLM(model, quantization="fp8", **ENGINE)
    return {
        "model": model,
        "llm": llm,
        "logits": llm.logits(SEQS),
        "float": jaxpp.LLM(model, **ENGINE),
        "fake_quantized": hf_logits(fake_quantized_copy(model, root / "llama-fake-fp8"), SEQS),
        "reference": hf_logits(model, SEQS),
    }


def test_quantize_on_load_computes_with_per_channel_fp8_weights(quantized):
    llm, got = quantized["llm"], quantized["logits"]
    exact = max(rel_err(g, r) for g, r in zip(got, quantized["fake_quantized"], strict=True))
    drift = max(rel_err(g, r) for g, r in zip(got, quantized["reference"], strict=True))
    print(f"fake-quantized {exact:.2e}, float model {drift:.3f}")
    assert exact <= 1e-5
    # The bound of this random tiny model; a trained one stays much closer (the next test).
    assert drift <= 0.25
    # Every linear weight of every layer (not the embedding, head, norms) is FP8: 1 byte per
    # parameter, against 4 in float32, plus 4 per scale.
    linears = sorted(_fp8_leaves(llm))
    assert len(linears) == 4 * 6  # q, k, v, o, gate_up, down of every layer
    sizes = {".".join(map(str, k)): v.get_value() for k, v in nnx.to_flat_state(llm.state)}
    params = sum(sizes[w].size for w in linears)
    scales = sum(sizes[f"{w}_scale"].nbytes for w in linears)
    before = quantized["float"].device_memory()[0]["params"]
    after = llm.device_memory()[0]["params"]
    print(f"params per device {before} -> {after} bytes ({params} FP8 weights, {scales} B scales)")
    assert after == before - 3 * params + scales


def test_quantized_layouts_and_conversion_give_the_same_answers(quantized, root):
    """The scales come from whole layers, so no split changes them (hence the answers)."""
    model, one = quantized["model"], quantized["logits"]
    layout = dict(dp=2, pp=2, tp=2)
    split = jaxpp.LLM(model, quantization="fp8", **layout, **ENGINE).logits(SEQS)
    assert max(rel_err(a, b) for a, b in zip(split, one, strict=True)) <= 5e-6
    out = root / "llama-fp8-orbax"
    argv = ["convert", str(model), str(out), "--quantization", "fp8", "--pp", "2", "--tp", "2"]
    assert cli.main(argv) == 0
    with pytest.raises(CheckpointError, match="FP8 weights.*quantization='fp8'"):
        jaxpp.LLM(out, **layout, **ENGINE)
    restored = jaxpp.LLM(out, quantization="fp8", **layout, **ENGINE).logits(SEQS)
    for a, b in zip(restored, split, strict=True):
        np.testing.assert_array_equal(a, b)


def test_quantize_on_load_keeps_a_trained_models_choices():
    """The demo model (trained on Python) over 256 tokens of real Python: FP8 weights pick the
    float model's next token wherever the float model's top two are not a near tie."""
    text = inspect.getsource(sampling)
    engine = dict(ENGINE, max_num_batched_tokens=256, max_model_len=256)
    base = jaxpp.LLM(jaxpp.DEMO_MODEL, **engine)
    ids = base.tokenizer.encode(text)[:256]
    ref = base.logits([ids])[0]
    got = jaxpp.LLM(jaxpp.DEMO_MODEL, quantization="fp8", **engine).logits([ids])[0]
    top2 = np.sort(ref, axis=-1)[:, -2:]
    margin = top2[:, 1] - top2[:, 0]
    changed = ref.argmax(-1) != got.argmax(-1)
    moved = np.abs(got - ref).max()
    agree = 1 - changed.mean()
    print(f"rel {rel_err(got, ref):.4f}, argmax agrees at {agree:.3f}, margins {margin[changed]}")
    assert rel_err(got, ref) <= 0.03
    assert agree >= 0.97
    assert (margin[changed] < 2 * moved).all()


# --- the W8A8 GEMM ----------------------------------------------------------------------------


@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("n_in", [1, 2])
def test_fp8_gemm_is_its_definition(monkeypatch, static, n_in):
    """project() in w8a8: activations quantized per token (or by the static input_scale),
    an FP8 x FP8 dot in float32, then both scales: against numpy doing exactly that."""
    monkeypatch.setenv("JAXPP_FP8_GEMM", "w8a8")
    rng = np.random.default_rng(n_in)
    x = rng.normal(size=(2, 5, 4, 6)[: 2 + n_in]).astype(np.float32)
    w = rng.normal(size=(*x.shape[2:], 3)).astype(ml_dtypes.float8_e4m3fn)
    scale = rng.uniform(0.5, 2, (1,) * n_in + (3,)).astype(np.float32)
    storage = fp8.FP8Storage(frozenset(), None, 1, "static" if static else "dynamic", 2.0)
    input_scale = np.float32(0.01) if static else None
    got = fp8.project(x, w, n_in, scale, storage, input_scale)
    axes = tuple(range(x.ndim - n_in, x.ndim))
    amax = np.minimum(np.abs(x).max(axis=axes, keepdims=True), 2.0)
    sx = input_scale if static else amax / np.float32(448)
    xq = np.clip(x / sx, -448, 448).astype(ml_dtypes.float8_e4m3fn).astype(np.float32)
    y = np.tensordot(xq, w.astype(np.float32), axes=n_in)
    sx = sx if static else sx.reshape(sx.shape[: x.ndim - n_in] + (1,))
    np.testing.assert_allclose(got, y * sx * scale.reshape(3), rtol=1e-5, atol=1e-6)


def test_w8a8_engine_runs_fp8_dots(checkpoints, answers, monkeypatch):
    """JAXPP_FP8_GEMM=w8a8 (the GPU default): every dense projection is a dot of FP8 operands,
    and the answers stay near W8A16's (activation rounding only)."""
    monkeypatch.setenv("JAXPP_FP8_GEMM", "w8a8")
    path = checkpoints["ct_channel"][0]
    llm = jaxpp.LLM(path, **ENGINE)
    got = llm.logits(SEQS)
    jitted, shapes = llm.programs.lowered("forward")[0]
    dots = re.findall(r"dot_general.*f8E4M3FN.*f8E4M3FN", jitted.lower(*shapes).as_text())
    worst = max(rel_err(a, b) for a, b in zip(got, _logits(path, answers), strict=True))
    print(f"{len(dots)} FP8 dots, {worst:.3f} from W8A16")
    assert len(dots) == 4 * 6
    assert worst <= 0.25


# --- refusals -------------------------------------------------------------------------------

BASE_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 32,
    "hidden_size": 8,
    "num_attention_heads": 2,
    "num_hidden_layers": 1,
}
FP8_GROUP = {"targets": ["Linear"], "weights": {"num_bits": 8, "type": "float"}}


def test_formats_read_into_one_scheme():
    def scheme(quantization_config):
        return ModelConfig.from_hf_dict({**BASE_CONFIG, "quantization_config": quantization_config})

    meta = scheme({"quant_method": "fbgemm_fp8", "activation_scale_ub": 1200.0,
                   "modules_to_not_convert": ["lm_head", "model.layers.0.self_attn"]})  # fmt: skip
    q = meta.quantization
    assert (q.strategy, q.scale_name, q.activations, q.activation_scale_ub) == (
        "channel", "weight_scale", "dynamic", 1200.0,
    )  # fmt: skip
    # transformers' rule: a prefix up to a module boundary, or a suffix
    assert not q.quantizes("model.layers.0.self_attn.q_proj")
    assert q.quantizes("model.layers.10.self_attn.q_proj") and not q.quantizes("lm_head")
    qwen = scheme({"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                   "weight_block_size": [128, 128]}).quantization  # fmt: skip
    assert (qwen.strategy, qwen.weight_block, qwen.scale_name) == (
        "block", (128, 128), "weight_scale_inv",
    )  # fmt: skip
    ct = scheme({"quant_method": "compressed-tensors", "format": "float-quantized",
                 "config_groups": {"g": FP8_GROUP}, "ignore": ["lm_head", "re:.*mlp\\.gate$"],
                 "kv_cache_scheme": {"num_bits": 8, "type": "float"}}).quantization  # fmt: skip
    assert (ct.strategy, ct.activations) == ("tensor", None)  # weight only: W8A16 always
    assert ct.quantizes("model.layers.3.mlp.gate_proj") and not ct.quantizes(
        "model.layers.3.mlp.gate"
    )


@pytest.mark.parametrize(
    "quantization_config,named",
    [
        ({"quant_method": "awq", "bits": 4}, "quant_method 'awq'"),
        ({"quant_method": "gptq", "bits": 4}, "quant_method 'gptq'"),
        ({"quant_method": "bitsandbytes", "load_in_4bit": True}, "quant_method 'bitsandbytes'"),
        ({"bits": 4}, "quant_method None"),
        (
            {"quant_method": "compressed-tensors", "format": "pack-quantized",
             "config_groups": {"g": FP8_GROUP}},
            "format 'pack-quantized'",
        ),
        (
            {"quant_method": "compressed-tensors", "format": "float-quantized",
             "config_groups": {"g": {**FP8_GROUP, "weights": {"num_bits": 8, "type": "int"}}}},
            "type 'int'",
        ),
        (
            {"quant_method": "compressed-tensors", "format": "float-quantized",
             "config_groups": {"g": {**FP8_GROUP, "weights": {"num_bits": 8, "type": "float",
                                                              "strategy": "group"}}}},
            "strategy 'group'",
        ),
        (
            {"quant_method": "compressed-tensors", "format": "float-quantized",
             "config_groups": {"g": {**FP8_GROUP, "input_activations": {
                 "num_bits": 8, "type": "float", "strategy": "token", "dynamic": False}}}},
            "static config_groups.g.input_activations of strategy 'token'",
        ),
        (
            {"quant_method": "compressed-tensors", "format": "float-quantized",
             "config_groups": {"g": {**FP8_GROUP, "output_activations": {"num_bits": 8}}}},
            "output_activations",
        ),
        ({"quant_method": "fp8", "activation_scheme": "static"}, "activation_scheme 'static'"),
        ({"quant_method": "fp8", "scale_fmt": "ue8m0"}, "scale_fmt 'ue8m0'"),
        ({"quant_method": "fp8", "fmt": "e5m2"}, "fmt 'e5m2'"),
        ({"quant_method": "fp8", "weight_block_size": [128]}, "weight_block_size=\\[128\\]"),
        ({"quant_method": "fp8", "modules_to_not_convert": ["(lm_head"]}, "'\\(lm_head'"),
        ({"quant_method": "fbgemm_fp8", "activation_scale_ub": -1}, "activation_scale_ub=-1"),
    ],
)  # fmt: skip
def test_unsupported_quantization_is_refused_by_name(quantization_config, named):
    raw = {**BASE_CONFIG, "quantization_config": quantization_config}
    with pytest.raises(ValueError, match=named):
        ModelConfig.from_hf_dict(raw)
    with pytest.raises(ValueError, match="quantization='int8' is invalid"):
        with_quantization(ModelConfig.from_hf_dict(BASE_CONFIG), "int8")


def test_a_checkpoint_that_contradicts_its_config_names_the_tensor(checkpoints, root):
    path = checkpoints["ct_tensor"][0]
    # quantization_config without the ignore entry: layer 1's float down_proj is a lie
    wrong = copy_model_dir(path, root / "ct-wrong-ignore")
    config = json.loads((wrong / "config.json").read_text())
    config["quantization_config"]["ignore"] = ["lm_head"]
    (wrong / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="layers.1.mlp.down_proj.weight.*float32.*says"):
        jaxpp.LLM(wrong, **ENGINE)
    # a scale of the wrong shape
    bad = copy_model_dir(path, root / "ct-bad-scale")
    name = "model.layers.2.self_attn.q_proj.weight_scale"
    replace_tensor(bad / "model.safetensors", name, np.ones((2, 3), np.float32))
    with pytest.raises(CheckpointError, match=f"{re.escape(name)}.*expected \\(1, 1\\)"):
        jaxpp.LLM(bad, **ENGINE)
    # a missing scale: named before any weight is read
    replace_tensor(bad / "model.safetensors", name, None)
    with pytest.raises(CheckpointError, match=re.escape(name)):
        jaxpp.LLM(bad, **ENGINE)
