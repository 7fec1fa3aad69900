"""The pipeline never changes the answer: pp, partition and micro-batch count give the same
logits and the same greedy tokens as pp=1; the ring's schedule and its measured bubble follow
the arithmetic; memory is split evenly. (Bubbles, dead rows and padding are inert:
test_serving.py.)"""

import jax
import numpy as np
import pytest
from hf_fixtures import build_model_dir, random_seqs

import jaxpp

NEW_TOKENS = 32
# Five prompts: never an even split into 2, 3, 4 or 8 micro-batches.
PROMPT_LENGTHS = [3, 11, 6, 17, 9]

LAYOUTS = [  # (pp, layer_partition, num_microbatches) on a 6-layer model
    (2, None, 4),  # even split, M = 2 * pp
    (3, [1, 1, 4], None),  # custom partition, M = pp
    # 6 layers do not divide by 4: auto partition [1, 2, 2, 1], M = 2 * pp (empty slots and
    # M > pp are the two layouts above too)
    pytest.param(4, None, 8, marks=pytest.mark.slow),
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_model_dir(tmp_path_factory.mktemp("pipeline"), "llama", num_hidden_layers=6)


@pytest.fixture(scope="module")
def prompts():
    return random_seqs(PROMPT_LENGTHS, seed=3)


def _run(llm, prompts):
    logits = llm.logits(prompts)
    params = jaxpp.SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    tokens = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    return logits, tokens


@pytest.fixture(scope="module")
def reference(model_dir, prompts):
    return _run(jaxpp.LLM(model_dir, dtype="float32"), prompts)


@pytest.mark.parametrize("pp,partition,microbatches", LAYOUTS)
def test_layout_gives_same_logits_and_tokens(
    model_dir, prompts, reference, pp, partition, microbatches
):
    llm = jaxpp.LLM(
        model_dir, dtype="float32", pp=pp, layer_partition=partition, num_microbatches=microbatches
    )
    logits, tokens = _run(llm, prompts)
    worst = max(float(np.abs(a - b).max()) for a, b in zip(logits, reference[0], strict=True))
    scale = max(1.0, max(float(np.abs(r).max()) for r in reference[0]))
    print(
        f"pp={pp} partition={llm.partition} M={llm.microbatches}: max|dlogit|={worst:.2e}"
        f" (max|logit| {scale:.2f})"
    )
    # Not bitwise: XLA:CPU tiles the LM head's matmul over a vocab shard [V/pp, D] differently
    # from [V, D], i.e. sums the D products in another order, which moves the last bits (seen:
    # up to 9 float32 ulp of the largest logit). Bounded at 32 ulp.
    assert worst <= 32 * np.finfo(np.float32).eps * scale
    assert tokens == reference[1]
    assert all(len(t) == NEW_TOKENS for t in tokens)
    if partition is None and 6 % pp == 0:
        _check_memory_split(llm, reference_llm_memory(model_dir))


def reference_llm_memory(model_dir):
    [single] = jaxpp.LLM(model_dir, dtype="float32").device_memory()
    return single


def _check_memory_split(llm, single):
    """Per device: params <= 1.05 x total / pp, KV cache exactly total / pp."""
    usage = llm.device_memory()
    print(f"pp={llm.pp}: {usage}")
    assert len(usage) == llm.pp
    assert max(u["params"] for u in usage) <= 1.05 * single["params"] / llm.pp
    cache_bytes = sum(a.nbytes for a in jax.tree.leaves(llm.ring.stages.cache))
    assert cache_bytes > 0
    assert all(u["kv_cache"] * llm.pp == cache_bytes for u in usage), usage


def test_run_stats_measure_the_bubble(model_dir):
    S, M = 3, 6
    llm = jaxpp.LLM(model_dir, dtype="float32", pp=S, num_microbatches=M)
    prompts6 = random_seqs([4, 5, 6, 7, 8, 9], seed=1)
    # Six prompts arriving together all ride the first tick, one per micro-batch (five of them
    # without their last token, which rides at its own micro-batch's tick 1 .. 5); then each
    # micro-batch passes the ring 8 more times to decode its request's 8 other tokens. A fresh
    # ring fills (S - 1 ticks) and the last call drains it (one round of M ticks).
    out = llm.generate(
        prompts6, jaxpp.SamplingParams(max_tokens=9, temperature=0.0, ignore_eos=True)
    )
    stats = llm.last_run_stats
    passes = M + 8 * M
    assert stats["ticks"] == passes + M
    assert stats["busy_stage_ticks"] == passes * S
    assert stats["bubble_fraction"] == pytest.approx(1 - passes / (passes + M))
    assert stats["tokens"] == 54 and stats["peak_running"] == M
    for t, row in enumerate(stats["schedule"]):
        assert row == [(t - s) % M if 0 <= t - s < passes else -1 for s in range(S)]
    assert out[0].metrics.pipeline["stages"] == S

    # Six prompts scored: they ride the first round and flow through the stages like GPipe's
    # micro-batches; the ring drains in the next call's first S - 1 ticks.
    llm.logits(prompts6)
    stats = llm.last_run_stats
    assert stats["ticks"] == 2 * M and stats["busy_stage_ticks"] == M * S
    t0 = stats["start_tick"]  # the ring keeps turning: micro-batch ids continue from here
    for t, row in enumerate(stats["schedule"]):
        assert row == [(t0 + t - s) % M if 0 <= t - s < M else -1 for s in range(S)]


def test_bad_layouts_are_rejected(model_dir):
    with pytest.raises(ValueError, match=r"num_microbatches=1.*>= pp=2"):
        jaxpp.LLM(model_dir, pp=2, num_microbatches=1)
    with pytest.raises(ValueError, match=r"only 8 are present"):
        jaxpp.LLM(model_dir, pp=3, tp=3)
    with pytest.raises(ValueError, match=r"'2,2,1'.*sums to 5"):
        jaxpp.LLM(model_dir, pp=3, layer_partition="2,2,1")


def test_the_gpu_attention_kernel_gives_the_same_answer(model_dir, prompts, reference, monkeypatch):
    """The whole engine with paged_kernel.py in place of the XLA attention (in Pallas'
    interpreter here, as the GPU runs it compiled): prompts in chunks beside decode rows, pp=2.
    A small pool: the interpreter copies the whole pool into every kernel program."""
    monkeypatch.setenv("JAXPP_ATTENTION", "pallas")
    llm = jaxpp.LLM(
        model_dir, dtype="float32", pp=2, max_num_batched_tokens=16, kv_cache_memory=1 << 20
    )
    logits, tokens = _run(llm, prompts)
    scale = max(float(np.abs(r).max()) for r in reference[0])
    worst = max(float(np.abs(a - b).max()) for a, b in zip(logits, reference[0], strict=True))
    assert worst <= 5e-6 * scale
    assert tokens == reference[1]
