"""Speculative decoding (speculation.py): prompt-lookup drafts verified in the ring give the
tokens the model gives without them, greedy and seeded, in every layout."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxpp
from jaxpp.config import SpeculativeConfig
from jaxpp.programs import SAMPLING
from jaxpp.sampling import SamplerRows, host_sampler_rows, sample
from jaxpp.server.metrics import Metrics
from jaxpp.speculation import propose, verify

# Verifying at any batch size (the default stops above 2 requests decoding).
NGRAM = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3,
         "prompt_lookup_min": 1, "disable_by_batch_size": None}  # fmt: skip


@pytest.fixture(scope="module")
def model_dir(hf_model):
    return hf_model("llama")


def _reference_drafts(text, start, position, k, low, high):
    """The proposal rule in plain Python: the longest n-gram in [low, high] ending at
    `position` that occurred earlier (from `start`), its latest occurrence, the k after it
    (the text since repeating when it is shorter)."""
    for n in range(high, low - 1, -1):
        if position - n + 1 < start:
            continue
        suffix = text[position - n + 1 : position + 1]
        for end in range(position - 1, start + n - 2, -1):
            if text[end - n + 1 : end + 1] == suffix:
                since = text[end + 1 : position + 1]  # recurs with period position - end
                return [since[j % len(since)] for j in range(k)]
    return []


def test_proposals_are_the_latest_occurrence_of_the_longest_ngram():
    rng = np.random.default_rng(0)
    rows, L, k = 12, 40, 4
    text = rng.integers(0, 3, size=(rows, L)).astype(np.int32)  # 3 ids: many repeats
    position = rng.integers(8, L, size=rows).astype(np.int32)
    limit = rng.integers(0, k + 1, size=rows).astype(np.int32)
    got = propose(jnp.asarray(text), jnp.asarray(position), jnp.asarray(limit), k, 2, 3)
    for r in range(rows):
        want = _reference_drafts(text[r].tolist(), 0, position[r], k, 2, 3)
        want = want[: limit[r]]
        assert got[r].tolist() == want + [-1] * (k - len(want)), r


def test_verify_keeps_drafts_up_to_the_first_difference_and_stops_at_a_stop():
    drawn = jnp.array([[5, 6, 7, 8], [5, 6, 7, 8], [5, 6, 7, 8], [5, 6, 7, 8]])
    drafts = jnp.array([[5, 6, 9], [5, 6, 7], [-1, -1, -1], [5, 6, 7]])
    stop = jnp.zeros((4, 4), bool).at[3, 1].set(True)
    v = verify(drawn, drafts, stop, jnp.zeros((4, 4), bool))
    assert v.accepted.tolist() == [2, 3, 0, 1]  # row 3: cut at the stop drawn at position 1
    assert v.finished.tolist() == [False, False, False, True]
    assert v.proposed.tolist() == [3, 3, 0, 3]


def test_rejection_rule_keeps_the_target_distribution():
    """Leviathan et al.'s rule with a one-hot draft x: accept x with probability p(x), else
    draw from p without x. Over 20,000 seeds of one distribution p over 6 ids, the draw at a
    drafted position is accepted with frequency p(x), and a rejected position emits each other
    id with frequency p(y) / (1 - p(x)). Tolerance: 5 standard errors of a binomial frequency
    (sqrt(f (1 - f) / N) <= 0.0036 at N = 20,000), so a correct rule fails about once in 3
    million runs while a rule off by 0.02 in any probability fails."""
    n, vocab, x = 20000, 6, 2
    logits = jnp.log(jnp.array([0.1, 0.05, 0.3, 0.25, 0.2, 0.1]))
    host = host_sampler_rows(n)
    host["temperature"][:] = 1.0
    host["seed"][:] = np.arange(n)
    host["max_tokens"][:] = 100
    rows = SamplerRows(**host)
    mesh = jax.sharding.Mesh(
        np.array(jax.devices()[:1]).reshape(1, 1, 1), ("data", "stage", "tensor")
    )

    def body(logits, rows):
        return sample(logits, rows, jnp.zeros(n, jnp.int32), None, None, vocab, SAMPLING)

    draw = jax.shard_map(body, mesh=mesh, in_specs=jax.P(), out_specs=jax.P(), check_vma=False)
    got = jax.jit(draw)(jnp.tile(logits, (n, 1)), rows)
    drawn = jnp.stack([got.tokens, got.tokens], axis=1)  # the bonus position is unused here
    none = jnp.zeros((n, 2), bool)
    v = verify(drawn, jnp.full((n, 1), x), none, none)
    p = np.exp(np.asarray(logits))
    accepted = np.asarray(v.accepted) == 1
    bound = 5 * np.sqrt(p * (1 - p) / n)
    assert abs(accepted.mean() - p[x]) < bound[x]
    emitted = np.asarray(drawn[:, 0])[~accepted]
    q = np.where(np.arange(vocab) == x, 0, p) / (1 - p[x])
    freq = np.bincount(emitted, minlength=vocab) / len(emitted)
    assert np.all(np.abs(freq - q) < 5 * np.sqrt(q * (1 - q) / len(emitted)) + 1e-9), freq


def _requests():
    """Prompts that repeat themselves (so that lookups find drafts) and random ones; greedy and
    seeded; a stop id, min_tokens, lengths that end inside a verified chunk."""
    rng = np.random.default_rng(3)
    loop = list(range(5, 30)) * 3
    prompts = [loop, loop[7:60], rng.integers(3, 300, 40).tolist(), loop[:33], loop * 2]
    params = [
        jaxpp.SamplingParams(max_tokens=37, temperature=0.0, ignore_eos=True),
        jaxpp.SamplingParams(max_tokens=29, temperature=0.8, seed=11, ignore_eos=True),
        jaxpp.SamplingParams(max_tokens=23, temperature=0.0, ignore_eos=True),
        jaxpp.SamplingParams(
            max_tokens=41, temperature=0.0, stop_token_ids=[254], min_tokens=3
        ),  # fmt: skip
        jaxpp.SamplingParams(max_tokens=31, temperature=1.0, top_k=8, seed=5, ignore_eos=True),
    ]
    return prompts, params


def _answers(llm, prompts, params):
    return [(o.outputs[0].token_ids, o.outputs[0].finish_reason)
            for o in llm.generate(prompts, params)]  # fmt: skip


@pytest.fixture(scope="module")
def reference(model_dir):
    prompts, params = _requests()
    off = jaxpp.LLM(str(model_dir), dtype="float32", max_num_seqs=8, max_model_len=256)
    return _answers(off, prompts, params)


@pytest.mark.parametrize(
    "layout",
    [
        dict(pp=1),
        # a small budget and pool: prompts in pieces, preemptions, prefix-cache hits
        dict(pp=2, max_num_batched_tokens=16, block_size=4, kv_bytes=64),
        pytest.param(dict(pp=4), marks=pytest.mark.slow),  # pp2 covers stages > 1
        # pp2 covers verifying across stages; tensor parallelism's exactness: test_parallel and
        # test_serving's dp2-pp2-tp2 layout
        pytest.param(dict(pp=2, tp=2), marks=pytest.mark.slow),
    ],
    ids=["pp1", "pp2-small-budget-preempting", "pp4", "pp2-tp2"],
)
def test_outputs_equal_speculation_off(model_dir, reference, layout):
    layout = dict(layout)
    pages = layout.pop("kv_bytes", None)
    prompts, params = _requests()
    llm = jaxpp.LLM(str(model_dir), dtype="float32", max_num_seqs=8, max_model_len=256,
                    speculative_config=NGRAM, **layout)  # fmt: skip
    if pages is not None:  # rebuild with a pool of `pages` pages of this layout
        llm = jaxpp.LLM(str(model_dir), dtype="float32", max_num_seqs=8, max_model_len=256,
                        speculative_config=NGRAM, kv_cache_memory=pages * llm.kv_bytes_per_page(),
                        **layout)  # fmt: skip
        prompts, params = prompts + prompts[:2], params + params[:2]  # cached prefixes
    got = _answers(llm, prompts, params)
    assert got[: len(reference)] == reference
    assert got[len(reference) :] == reference[: len(got) - len(reference)]
    spec = llm.last_run_stats["spec_decode"]
    assert spec["num_accepted_tokens"] > 0, spec
    stats = llm.last_run_stats
    if pages is None:  # every output token counted once (a preempted request's are recomputed)
        assert stats["tokens"] == sum(len(t) for t, _ in got)
    else:
        assert stats["preemptions"] > 0 and stats["prefix_cache_hit_tokens"] > 0, stats


def test_requests_that_cannot_speculate_and_large_batches_verify_nothing(model_dir, reference):
    """A logprobs request turns drafts off while it runs (as in vLLM), and so does a batch
    larger than disable_by_batch_size; the answers stay the same."""
    prompts, params = _requests()
    config = {**NGRAM, "disable_by_batch_size": 1}
    llm = jaxpp.LLM(str(model_dir), dtype="float32", max_num_seqs=8, max_model_len=256,
                    speculative_config=config)  # fmt: skip
    assert _answers(llm, prompts[:3], params[:3]) == reference[:3]
    drafted_alone = llm.last_run_stats["spec_decode"]  # the last one left runs alone
    assert _answers(llm, prompts[:1], params[:1]) == reference[:1]
    assert llm.last_run_stats["spec_decode"]["num_drafts"] > 0
    wants_logprobs = jaxpp.SamplingParams(max_tokens=37, temperature=0.0, ignore_eos=True,
                                          logprobs=2)  # fmt: skip
    out = llm.generate([prompts[0]], wants_logprobs)[0].outputs[0]
    assert out.token_ids == reference[0][0] and len(out.logprobs) == 37
    assert llm.last_run_stats["spec_decode"] is None
    assert drafted_alone is None or drafted_alone["num_drafts"] > 0


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"method": "eagle", "num_speculative_tokens": 2}, "method='eagle' is not supported"),
        ({"method": "draft_model", "num_speculative_tokens": 2}, "needs model"),
        (
            {"model": "d", "num_speculative_tokens": 2, "prompt_lookup_max": 3},
            "prompt_lookup_max is prompt lookup's",
        ),  # fmt: skip
        ({**NGRAM, "model": "d"}, "a draft model is method 'draft_model'"),
        ({"model": "d", "num_speculative_tokens": 2, "draft_window": 0}, "draft_window=0"),
        ({"method": "ngram"}, "needs num_speculative_tokens"),
        ({**NGRAM, "prompt_lookup_min": 4}, "prompt_lookup_min=4 is more than"),
        ({**NGRAM, "lookahead": 2}, "unknown keys ['lookahead']"),
        ("{not json", "not valid JSON"),
    ],
)
def test_bad_speculative_configs_are_named(raw, message):
    with pytest.raises(ValueError) as e:
        SpeculativeConfig.of(raw)
    assert message in str(e.value)


def test_lookup_sizes_default_as_vllm():
    default = SpeculativeConfig.of({"num_speculative_tokens": 2})
    assert (default.prompt_lookup_max, default.disable_by_batch_size) == (5, 2)
    one = SpeculativeConfig.of({"model": "ngram", "num_speculative_tokens": 2,
                                "prompt_lookup_max": 3})  # fmt: skip
    assert (one.prompt_lookup_min, one.prompt_lookup_max) == (3, 3)
    draft = SpeculativeConfig.of({"model": "some/dir", "num_speculative_tokens": 2})
    assert (draft.method, draft.model, draft.draft_window) == ("draft_model", "some/dir", 32)


def test_a_cached_prefix_brings_its_tokens_and_metrics_count_drafts(model_dir, reference):
    """The tokens that prompt lookup searches live beside the KV pages, so a prompt found in
    the prefix cache is searched as well: the second run of a prompt, all its pages but the
    last cached, still accepts drafts (and answers the same). /metrics carries vLLM's
    spec_decode counters."""
    prompts, params = _requests()
    llm = jaxpp.LLM(str(model_dir), dtype="float32", max_num_seqs=8, max_model_len=256,
                    speculative_config=NGRAM)  # fmt: skip
    assert _answers(llm, prompts[:1], params[:1]) == reference[:1]
    first = llm.last_run_stats["spec_decode"]
    assert _answers(llm, prompts[:1], params[:1]) == reference[:1]
    stats = llm.last_run_stats
    assert stats["prefix_cache_hit_tokens"] >= len(prompts[0]) - 16, stats
    # The same drafts found as when the whole prompt rode: the cached prefix was searched.
    for key in ("num_draft_tokens", "num_accepted_tokens"):
        assert stats["spec_decode"][key] == first[key] > 0, (stats["spec_decode"], first)
    metrics = Metrics(llm, "m").text().decode()
    spec = llm.scheduler.stats.spec_decode()
    for name in ("num_drafts", "num_draft_tokens", "num_accepted_tokens"):
        line = f'vllm:spec_decode_{name}_total{{engine="0",model_name="m"}} {float(spec[name])}'
        assert line in metrics, (line, metrics)
    per_position = 'vllm:spec_decode_num_accepted_tokens_per_pos_total{engine="0",model_name="m",'
    assert per_position in metrics


def test_bench_flags_and_workloads_that_repeat_their_input():
    """`jaxpp bench --speculative-config JSON --workload retype`: the flag reaches EngineConfig,
    and a retype prompt ends with the renamed def line of a function it shows."""
    import argparse

    from jaxpp.bench import _add_arguments
    from jaxpp.bench.workloads import code_requests
    from jaxpp.cli.flags import engine_config
    from jaxpp.engine import load_tokenizer

    parser = argparse.ArgumentParser()
    _add_arguments(parser)
    args = parser.parse_args(["--preset", "x", "--workload", "retype",
                              "--speculative-config", '{"num_speculative_tokens": 4}'])  # fmt: skip
    config = engine_config(args).speculative_config
    assert (config.num_speculative_tokens, config.prompt_lookup_max) == (4, 5)
    tokenizer = load_tokenizer(jaxpp.DEMO_MODEL)
    for retype in (False, True):
        requests = code_requests(3, 256, 8, tokenizer, seed=1, retype=retype)
        assert len(requests) == 3 and all(0 < len(r.prompt) <= 256 for r in requests)
    text = tokenizer.decode(requests[0].prompt)
    name = text.rsplit("# The same function as ", 1)[1].split(":", 1)[0]
    assert text.rstrip().splitlines()[-1].startswith(f"def {name}(")


# --- a draft model proposing (draft.py) ---------------------------------------------------------


@pytest.fixture(scope="module")
def sliding_draft(hf_model):
    """A 1-layer draft of another family (Mistral: a sliding window) with the same vocabulary."""
    return hf_model("mistral", name="draft-mistral-1", num_hidden_layers=1, seed=7)


def _draft_config(model, window=32):
    return {"model": str(model), "num_speculative_tokens": 3, "draft_window": window,
            "disable_by_batch_size": None}  # fmt: skip


# pp2 is slow: the Mistral draft's proposals at pp2 are checked against transformers by
# test_draft_proposals_are_the_draft_models_greedy_tokens[2], and verifying across stages by
# test_outputs_equal_speculation_off[pp2-small-budget-preempting]
@pytest.mark.parametrize("pp", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_draft_model_outputs_equal_speculation_off(model_dir, sliding_draft, reference, pp):
    """Greedy and seeded outputs with a draft model proposing are the ones without drafts. At
    pp1 the model drafts for itself (over a 64-token window: it agrees with itself often, so
    drafts are accepted); at pp2 (its vocabulary split over the stages, its layer on both) a
    random 1-layer Mistral drafts. (Warm-up with a draft: test_serving.py.)"""
    draft = model_dir if pp == 1 else sliding_draft
    prompts, params = _requests()
    llm = jaxpp.LLM(str(model_dir), dtype="float32", max_num_seqs=8, max_model_len=256, pp=pp,
                    speculative_config=_draft_config(draft, 64 if pp == 1 else 32))  # fmt: skip
    assert _answers(llm, prompts, params) == reference
    spec = llm.last_run_stats["spec_decode"]
    assert spec["num_draft_tokens"] > 0, spec
    if pp == 1:
        assert spec["num_accepted_tokens"] > 0, spec


def test_a_draft_model_needs_the_models_vocabulary(model_dir, hf_model):
    other = hf_model("llama", name="draft-vocab-400", num_hidden_layers=1, vocab_size=400)
    with pytest.raises(ValueError) as e:
        jaxpp.LLM(str(model_dir), dtype="float32", max_num_seqs=4,
                  speculative_config=_draft_config(other))  # fmt: skip
    assert "vocab_size=400 but the model has vocab_size=320" in str(e.value)


def _hf_greedy_window(model, text, position, window, k):
    """The plain loop: the draft model (transformers, eager) over the row's last `window`
    tokens at their real positions, k greedy tokens one at a time."""
    import torch

    first = max(position - window + 1, 0)
    tokens = list(text[first : position + 1])
    out = []
    with torch.no_grad():
        for _ in range(k):
            ids = torch.tensor([tokens])
            at = torch.arange(first, first + len(tokens))[None]
            logits = model(input_ids=ids, position_ids=at).logits[0, -1]
            out.append(int(torch.argmax(logits)))
            tokens.append(out[-1])
    return out


@pytest.mark.parametrize("pp", [1, 2])
def test_draft_proposals_are_the_draft_models_greedy_tokens(model_dir, sliding_draft, pp):
    """DraftModel.propose gives, per row, the draft model's greedy continuation of the row's
    last W tokens (transformers, one token at a time, at the real positions), cut at its
    limit; rows past the cap (`disable_by_batch_size` rows) and rows with no slots get none.
    Window 12 > the Mistral's sliding window 8 (both masks apply); pp2 splits its vocabulary."""
    from hf_fixtures import _load_hf

    from jaxpp.config import EngineConfig, ModelConfig
    from jaxpp.draft import load_draft
    from jaxpp.layout import make_layout
    from jaxpp.sharding import make_mesh

    k, W, R, L = 3, 12, 6, 48
    mesh = make_mesh(1, pp, 1)
    layout = make_layout(ModelConfig.from_dir(model_dir), EngineConfig(dtype="float32", pp=pp),
                         "cpu")  # fmt: skip
    config = SpeculativeConfig.of({**_draft_config(sliding_draft, W), "disable_by_batch_size": 4})
    draft, state = load_draft(config, layout, mesh)
    rng = np.random.default_rng(1)
    text = rng.integers(3, 300, size=(R, L)).astype(np.int32)
    position = np.array([40, 5, 20, 47, 30, 0], np.int32)  # row 1 and 5: fewer than W tokens
    limit = np.array([3, 2, 0, 1, 3, 3], np.int32)  # row 2 drafts nothing; row 5 is past the cap

    def body(state, text, position, limit):
        return draft.propose(state, text, position, limit, k=k)

    specs = (draft.specs, jax.P(), jax.P(), jax.P())
    run = jax.shard_map(body, mesh=mesh, in_specs=specs, out_specs=jax.P(), check_vma=False)
    with jax.default_matmul_precision("highest"):
        got = np.asarray(jax.jit(run)(state, text, position, limit))
    model = _load_hf(str(sliding_draft))
    for r in range(R):
        wanted = 0 < limit[r] and r < 5  # the cap: the first 4 rows that want drafts
        want = _hf_greedy_window(model, text[r].tolist(), position[r], W, k) if wanted else []
        want = want[: limit[r]]
        assert got[r].tolist() == want + [-1] * (k - len(want)), r
