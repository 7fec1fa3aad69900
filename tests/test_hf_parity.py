"""jaxpp against Hugging Face transformers (float32 eager) on tiny random checkpoints of every
supported dense family: logits, greedy tokens, bf16, both config schemas, sharded checkpoints.

Each family's checkpoint, reference and float32 engine are built once (module-scoped fixtures
parametrized by family, so pytest runs all tests of one family together).  The fixtures
themselves are checked too: test_fixture_exposes_bugs injects well-known implementation bugs
into the reference and requires each to move the logits far beyond the tolerance used here.
"""

import json

import numpy as np
import pytest
from hf_fixtures import (
    FAMILIES,
    MODEL_VOCAB,
    SLIDING_WINDOW,
    copy_model_dir,
    hf_greedy_with_margins,
    hf_logits,
    hf_logits_mutated,
    mutations_for,
    random_seqs,
    rewrite_config_v4,
    write_sharded_copy,
)

import jaxpp

F32_RTOL = 1e-4  # max|diff| <= F32_RTOL * max|logit|
BF16_RTOL = 2e-2  # max|diff| / max|ref| for a bfloat16 run against the float32 reference
NEW_TOKENS = 32
# Logit sequences: two are longer than the sliding window, the longest is 5x it.
LOGIT_LENGTHS = [5, 12, 23, 40]
# Greedy prompts: mixed lengths, some beyond the window; prompt + 32 new tokens go to 62.
PROMPT_LENGTHS = [3, 17, 9, 30]
# Chunked prefill and blockwise cache reads against HF: no window, every layer windowed, some.
# (llama's chunks and pages are test_serving.py's and test_pipeline.py's: slow here)
CHUNKED_FAMILIES = (pytest.param("llama", marks=pytest.mark.slow), "mistral", "qwen2_layer_types")
# Sharded checkpoints are family independent: two families with different tensor sets.
SHARDED_FAMILIES = ("llama_tied", "qwen3")

assert max(LOGIT_LENGTHS) > 4 * SLIDING_WINDOW


def _rel(got: list[np.ndarray], ref: list[np.ndarray]) -> tuple[float, float, float]:
    """(max|diff| / max|ref|, max|diff|, max|ref|) over a whole batch."""
    diff = max(
        float(np.max(np.abs(np.asarray(g, np.float64) - r))) for g, r in zip(got, ref, strict=True)
    )
    scale = max(float(np.max(np.abs(r))) for r in ref)
    return diff / scale, diff, scale


def _check_shapes(got: list[np.ndarray], seqs: list[list[int]]) -> None:
    assert isinstance(got, list) and len(got) == len(seqs)
    for g, s in zip(got, seqs, strict=True):
        assert isinstance(g, np.ndarray)
        assert g.dtype == np.float32, g.dtype
        assert g.shape == (len(s), MODEL_VOCAB), (g.shape, len(s))
        assert np.all(np.isfinite(g))


def _per_seq(got, ref) -> str:
    return " ".join(
        f"len{len(r)}:{np.max(np.abs(g - r)) / np.max(np.abs(r)):.1e}"
        for g, r in zip(got, ref, strict=True)
    )


# --- per-family fixtures ------------------------------------------------------------------------


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture(scope="module")
def model_dir(family, hf_model):
    return hf_model(family)


@pytest.fixture(scope="module")
def seqs():
    return random_seqs(LOGIT_LENGTHS, seed=1)


@pytest.fixture(scope="module")
def prompts():
    return random_seqs(PROMPT_LENGTHS, seed=2)


@pytest.fixture(scope="module")
def ref_logits(model_dir, seqs):
    return hf_logits(model_dir, seqs)


@pytest.fixture(scope="module")
def llm32(model_dir):
    return jaxpp.LLM(str(model_dir), dtype="float32")


# --- the fixtures are worth something ----------------------------------------------------------


def test_fixture_exposes_bugs(family, model_dir, seqs, ref_logits):
    """Every injected bug moves the HF reference by >= 100x the float32 tolerance (HF only)."""
    weak = {}
    for mutation in mutations_for(family):
        rel, _, _ = _rel(hf_logits_mutated(model_dir, seqs, mutation), ref_logits)
        print(f"{family}: {mutation}: {rel:.2e}")
        if rel < 100 * F32_RTOL:
            weak[mutation] = rel
    assert not weak, f"{family}: fixture too weak to expose {weak}"


# --- float32 parity ------------------------------------------------------------------------------


def test_float32_logits_match_hf(family, llm32, seqs, ref_logits):
    got = llm32.logits(seqs)
    _check_shapes(got, seqs)
    rel, diff, scale = _rel(got, ref_logits)
    print(
        f"{family}: float32 max|diff|={diff:.3e} max|logit|={scale:.3f} rel={rel:.2e} "
        f"({_per_seq(got, ref_logits)})"
    )
    assert rel <= F32_RTOL, (
        f"{family}: float32 logits differ from HF: max|diff|={diff:.3e} = {rel:.2e} * "
        f"max|logit| ({_per_seq(got, ref_logits)})"
    )


@pytest.mark.parametrize("chunked_family", CHUNKED_FAMILIES)
def test_small_chunks_and_pages_match_hf(chunked_family, hf_model):
    """A token budget of 7 per tick and pages of 3 positions: prompts arrive in chunks that
    attend to a cached prefix spanning many pages, several prompts share a tick, and the
    sliding window (8) cuts across chunk and page edges (all layers windowed, or some). Logits
    and greedy tokens still match HF. (The defaults, 2048 tokens and pages of 16, are wider
    than these sequences; the other families differ from these in ways paging does not touch.
    Reads of many items per sequence: test_attention.py and test_serving.py.)"""
    model_dir = hf_model(chunked_family)
    seqs, prompts = random_seqs(LOGIT_LENGTHS, seed=1), random_seqs(PROMPT_LENGTHS, seed=2)
    ref_logits = hf_logits(model_dir, seqs)
    llm = jaxpp.LLM(
        str(model_dir), dtype="float32", max_num_batched_tokens=7, block_size=3, max_num_seqs=4
    )
    got = llm.logits(seqs)
    rel, diff, scale = _rel(got, ref_logits)
    print(f"{chunked_family}: budget 7, pages of 3: max|diff|={diff:.3e} rel={rel:.2e}")
    assert rel <= F32_RTOL, f"{chunked_family}: chunked prefill: {_per_seq(got, ref_logits)}"
    want, _ = hf_greedy_with_margins(model_dir, prompts, NEW_TOKENS)
    params = jaxpp.SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, params)] == want


def test_greedy_matches_hf(family, llm32, model_dir, prompts):
    want, margins = hf_greedy_with_margins(model_dir, prompts, NEW_TOKENS)
    params = jaxpp.SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    outs = llm32.generate(prompts, params)
    assert len(outs) == len(prompts)
    problems = []
    for i, (out, prompt, ref, m) in enumerate(zip(outs, prompts, want, margins, strict=True)):
        assert list(out.prompt_token_ids) == prompt, f"output {i} is not for prompt {i}"
        comp = out.outputs[0]
        got = list(comp.token_ids)
        assert all(isinstance(t, int) for t in got)
        if got != ref:
            pairs = enumerate(zip(got, ref, strict=False))
            k = next((j for j, (a, b) in pairs if a != b), min(len(got), len(ref)))
            problems.append(
                f"prompt {i} (len {len(prompt)}): first difference at new token {k} "
                f"(jaxpp {got[k : k + 4]} vs HF {ref[k : k + 4]}, HF top1-top2 margin there "
                f"{m[k] if k < len(m) else float('nan'):.2e}); got {len(got)} tokens"
            )
        assert comp.finish_reason == "length", (i, comp.finish_reason)
    print(f"{family}: greedy min HF margin {min(min(m) for m in margins):.2e}")
    assert not problems, f"{family}: greedy differs from HF:\n" + "\n".join(problems)


# --- bfloat16 ------------------------------------------------------------------------------------


# bfloat16 runs the same code for every family: two families that differ most (sliding window;
# q/k norm) run in CI, the rest with `pytest -m slow`.
BF16_FAMILIES = ("mistral", "qwen3")


@pytest.mark.parametrize(
    "bf16_family",
    [f if f in BF16_FAMILIES else pytest.param(f, marks=pytest.mark.slow) for f in FAMILIES],
)
def test_bfloat16_logits_close_to_float32_reference(bf16_family, hf_model):
    family, model_dir = bf16_family, hf_model(bf16_family)
    seqs = random_seqs(LOGIT_LENGTHS, seed=1)
    ref_logits = hf_logits(model_dir, seqs)
    got = jaxpp.LLM(str(model_dir), dtype="bfloat16").logits(seqs)
    _check_shapes(got, seqs)
    rel, diff, scale = _rel(got, ref_logits)
    # HF's own bf16 run, as a yardstick: weights are bf16-exact, so this is activation
    # rounding only (~1.5e-2 on these models; max over ~20k logits).
    hf_rel, _, _ = _rel(hf_logits(model_dir, seqs, dtype="bfloat16"), ref_logits)
    bound = max(BF16_RTOL, 1.5 * hf_rel)
    print(
        f"{family}: bfloat16 rel={rel:.2e} (max|diff|={diff:.3e}, max|ref|={scale:.3f}); "
        f"HF bf16 rel={hf_rel:.2e}; bound {bound:.2e}"
    )
    assert rel <= bound, (
        f"{family}: bf16 logits off by {rel:.2e} of max|logit| (HF's own bf16: {hf_rel:.2e})"
    )


# --- checkpoint variants -------------------------------------------------------------------------


def test_config_v4_schema_gives_same_logits(
    family, model_dir, seqs, ref_logits, llm32, tmp_path_factory
):
    d = copy_model_dir(model_dir, tmp_path_factory.mktemp(f"{family}_v4") / "model")
    cfg = rewrite_config_v4(d)
    assert "rope_parameters" not in cfg and "dtype" not in cfg
    assert cfg["torch_dtype"] == "float32" and "rope_theta" in cfg and "rope_scaling" in cfg
    if family == "llama3_rope":
        assert cfg["rope_scaling"]["type"] == "llama3"
    # The rewritten file still means the same model to transformers itself.
    assert _rel(hf_logits(d, seqs[-1:]), ref_logits[-1:])[0] == 0.0
    got = jaxpp.LLM(str(d), dtype="float32").logits(seqs)
    _check_shapes(got, seqs)
    rel, diff, _ = _rel(got, ref_logits)
    self_rel = _rel(got, llm32.logits(seqs))[0]
    print(f"{family}: v4 config rel={rel:.2e} vs HF, {self_rel:.2e} vs the 5.x config")
    assert rel <= F32_RTOL, f"{family}: 4.x-schema config gives different logits: {rel:.2e}"


def test_config_v4_rope_scaling_with_rope_type_key(hf_model, tmp_path_factory):
    """4.x configs also spell the scaling type "rope_type" (Llama 3.1 does)."""
    src = hf_model("llama3_rope")
    seqs = random_seqs([40, 7], seed=5)
    d = copy_model_dir(src, tmp_path_factory.mktemp("llama3_v4_rope_type") / "model")
    cfg = rewrite_config_v4(d, rope_type_key="rope_type")
    assert cfg["rope_scaling"]["rope_type"] == "llama3" and "type" not in cfg["rope_scaling"]
    rel, _, _ = _rel(jaxpp.LLM(str(d), dtype="float32").logits(seqs), hf_logits(src, seqs))
    print(f"llama3_rope, v4 config with rope_type key: rel={rel:.2e}")
    assert rel <= F32_RTOL


@pytest.mark.parametrize("sharded_family", SHARDED_FAMILIES)
def test_sharded_checkpoint_gives_same_logits(sharded_family, hf_model, tmp_path_factory):
    src = hf_model(sharded_family)
    d = write_sharded_copy(src, tmp_path_factory.mktemp(f"{sharded_family}_sharded") / "model")
    index = json.loads((d / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in d.glob("*.safetensors"))
    assert len(shards) >= 2 and "model.safetensors" not in shards
    assert set(index["weight_map"].values()) == set(shards)
    seqs = random_seqs([40, 11, 6], seed=7)
    ref = hf_logits(src, seqs)
    got = jaxpp.LLM(str(d), dtype="float32").logits(seqs)
    _check_shapes(got, seqs)
    rel, diff, _ = _rel(got, ref)
    print(f"{sharded_family}: {len(shards)} shards: rel={rel:.2e}")
    assert rel <= F32_RTOL


# --- text in, text out ---------------------------------------------------------------------------


def test_string_prompt_and_checkpoint_dtype(hf_model, seqs):
    """LLM(dir) with no dtype runs in the checkpoint's dtype (float32 here) and takes text."""
    from transformers import AutoTokenizer

    d = hf_model("llama")
    tok = AutoTokenizer.from_pretrained(str(d))
    llm = jaxpp.LLM(str(d))
    outs = llm.generate(["hello"])
    assert len(outs) == 1
    out = outs[0]
    assert out.prompt == "hello"
    assert list(out.prompt_token_ids) == tok.encode("hello")
    comp = out.outputs[0]
    assert isinstance(comp.text, str)
    assert len(comp.token_ids) >= 1 and all(isinstance(t, int) for t in comp.token_ids)
    assert all(0 <= t < MODEL_VOCAB for t in comp.token_ids)
    assert comp.finish_reason in ("stop", "length")
    assert comp.text == tok.decode(comp.token_ids, skip_special_tokens=True)

    # dtype=None means float32 here: float32-level agreement (bf16 would be ~1e-2 off).
    rel = _rel(llm.logits(seqs), hf_logits(d, seqs))[0]
    print(f"llama, dtype=None: rel={rel:.2e}")
    assert rel <= F32_RTOL
