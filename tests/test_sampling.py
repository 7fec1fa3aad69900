"""Sampling: validation, the sampler's distribution, seeded reproducibility under any batch and
layout, penalties, stop conditions and logprobs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hf_fixtures import build_model_dir, random_seqs

import jaxpp
from jaxpp.config import generation_defaults
from jaxpp.sampling import SamplerMode, SamplerRows, sample, sampler_rows


@pytest.mark.parametrize(
    "field,value",
    [
        ("max_tokens", 0),
        ("temperature", -0.1),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("top_k", -2),
        ("min_p", 1.5),
        ("seed", "x"),
        ("stop", [""]),
        ("stop_token_ids", [-1]),
        ("logprobs", -1),
        ("presence_penalty", 3.0),
        ("frequency_penalty", -2.5),
        ("repetition_penalty", 0.0),
        ("min_tokens", -1),
        ("ignore_eos", "yes"),
        ("temperature", float("nan")),
    ],
)
def test_invalid_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=rf"SamplingParams\.{field}="):
        jaxpp.SamplingParams(**{field: value})


def test_min_tokens_above_max_tokens():
    with pytest.raises(ValueError, match=r"min_tokens=5.*max_tokens=2"):
        jaxpp.SamplingParams(max_tokens=2, min_tokens=5)


# --- the sampler's distribution ----------------------------------------------------------------

VOCAB = 12
LOGITS = np.array([2.0, 1.5, 1.2, 1.0, 0.5, 0.3, 0.0, -0.5, -1.0, -2.0, -3.0, -4.0], np.float32)


def _expected(params: jaxpp.SamplingParams) -> np.ndarray:
    """softmax(logits / T) restricted by top_k, then top_p, then min_p, renormalised."""
    z = LOGITS / params.temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    order = np.argsort(-p, kind="stable")
    keep = np.zeros(VOCAB, bool)
    k = params.top_k if params.top_k > 0 else VOCAB
    keep[order[:k]] = True
    kept = np.where(keep, p, 0) / np.where(keep, p, 0).sum()
    mass_before = np.cumsum(kept[order]) - kept[order]
    keep[order[mass_before >= params.top_p]] = False
    kept = np.where(keep, p, 0)
    keep &= kept >= params.min_p * kept.max()
    q = np.where(keep, p, 0)
    return q / q.sum()


def _draw_many(params: jaxpp.SamplingParams, draws: int) -> np.ndarray:
    mesh = jax.sharding.Mesh(
        np.array(jax.devices()[:1]).reshape(1, 1, 1), ("data", "stage", "tensor")
    )
    rows = sampler_rows([params], [params.seed or 0], (), 1)
    rows = SamplerRows(*(np.repeat(a, draws, axis=0) for a in rows))
    generated = jnp.arange(draws, dtype=jnp.int32)  # a different token index per draw
    mode = SamplerMode.of([params])

    def body(logits, rows, generated):
        return sample(logits, rows, generated, None, None, VOCAB, mode).tokens

    run = jax.jit(
        jax.shard_map(body, mesh=mesh, in_specs=jax.P(), out_specs=jax.P(), check_vma=False)
    )
    tokens = run(jnp.broadcast_to(LOGITS, (draws, VOCAB)), rows, generated)
    return np.bincount(np.asarray(tokens), minlength=VOCAB) / draws


@pytest.mark.parametrize(
    "params",
    [
        jaxpp.SamplingParams(temperature=1.0, seed=1),
        jaxpp.SamplingParams(temperature=0.5, seed=2),
        jaxpp.SamplingParams(temperature=1.3, top_k=4, seed=3),
        jaxpp.SamplingParams(temperature=1.0, top_p=0.7, seed=4),
        jaxpp.SamplingParams(temperature=1.0, min_p=0.2, seed=5),
        jaxpp.SamplingParams(temperature=0.8, top_k=6, top_p=0.9, min_p=0.05, seed=6),
    ],
    ids=["T1", "T0.5", "topk4", "topp0.7", "minp0.2", "combined"],
)
def test_token_frequencies_match_the_distribution(params):
    draws = 20000
    freq = _draw_many(params, draws)
    expected = _expected(params)
    tv = 0.5 * np.abs(freq - expected).sum()
    print(f"{params.temperature=} {params.top_k=} {params.top_p=} {params.min_p=}: TV={tv:.4f}")
    assert tv < 0.02
    assert freq[expected == 0].sum() == 0  # filtered tokens are never drawn


# --- seeded requests through the engine ---------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_model_dir(tmp_path_factory.mktemp("sampling"), "llama")


def _tokens(outputs):
    return [o.outputs[0].token_ids for o in outputs]


def test_seeded_request_is_independent_of_batch_position_and_layout(model_dir):
    target = random_seqs([7], seed=11)[0]
    others = random_seqs([3, 12, 5, 9, 4], seed=12)
    seeded = jaxpp.SamplingParams(
        max_tokens=12, temperature=0.9, top_p=0.95, top_k=50, seed=1234, ignore_eos=True
    )
    unseeded = jaxpp.SamplingParams(max_tokens=12, temperature=1.0, ignore_eos=True)
    greedy = jaxpp.SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)

    llm = jaxpp.LLM(model_dir, dtype="float32")
    alone = _tokens(llm.generate([target], seeded))[0]
    batch = [others[0], target, others[1], others[2], others[3]]
    params = [greedy, seeded, unseeded, greedy, unseeded]
    assert _tokens(llm.generate(batch, params))[1] == alone

    split = jaxpp.LLM(model_dir, dtype="float32", pp=2, tp=2, dp=2)
    assert _tokens(split.generate(batch, params))[1] == alone
    # And it really samples: another seed gives another continuation.
    other_seed = jaxpp.SamplingParams(
        max_tokens=12, temperature=0.9, top_p=0.95, top_k=50, seed=99, ignore_eos=True
    )
    assert _tokens(llm.generate([target], other_seed))[0] != alone


def test_penalties_logprobs_and_stops(model_dir):
    llm = jaxpp.LLM(model_dir, dtype="float32")
    prompt = random_seqs([6], seed=21)[0]
    greedy = jaxpp.SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    # One batch (one sampler mode, penalties and logprobs, for all three rows): logprobs of a
    # greedy request, a strong frequency penalty, and plain greedy.
    logprobs = jaxpp.SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True, logprobs=3)
    penalised = jaxpp.SamplingParams(
        max_tokens=16, temperature=0.0, ignore_eos=True, frequency_penalty=2.0, presence_penalty=2.0
    )
    plain, pen, text_out = llm.generate([prompt] * 3, [logprobs, penalised, greedy])
    out = plain.outputs[0]
    assert out.token_ids == text_out.outputs[0].token_ids  # the mode changes no greedy token
    assert len(out.logprobs) == 16
    for token, entry in zip(out.token_ids, out.logprobs, strict=True):
        assert token in entry and entry[token].rank == 1  # greedy picks the top token
        assert len(entry) == 3 and all(lp.logprob <= 0 for lp in entry.values())
    # The penalty forbids repeating the greedy tokens.
    tokens = pen.outputs[0].token_ids
    assert len(set(tokens)) > len(set(out.token_ids)) or len(set(tokens)) == 16

    # A second batch: stop_token_ids end a request with finish_reason "stop", the stop token
    # included; min_tokens holds the stop token back until enough tokens were generated; a
    # stop string ends the text before the string, the tokens where it was completed.
    stop_at = out.token_ids[5]
    first = out.token_ids.index(stop_at)
    text = text_out.outputs[0].text
    needle = text[len(text) // 2 : len(text) // 2 + 2]
    stopped, held, cut = llm.generate(
        [prompt] * 3,
        [
            jaxpp.SamplingParams(
                max_tokens=16, temperature=0.0, ignore_eos=True, stop_token_ids=[stop_at]
            ),
            jaxpp.SamplingParams(
                max_tokens=16, min_tokens=first + 2, temperature=0.0, ignore_eos=True,
                stop_token_ids=[stop_at],
            ),
            jaxpp.SamplingParams(
                max_tokens=16, temperature=0.0, ignore_eos=True, stop=[needle or "x"]
            ),
        ],
    )  # fmt: skip
    stopped, held, cut = stopped.outputs[0], held.outputs[0], cut.outputs[0]
    assert stopped.finish_reason == "stop" and stopped.stop_reason == stop_at
    assert stopped.token_ids == out.token_ids[: first + 1]
    assert len(held.token_ids) >= first + 2
    if needle.strip():
        assert cut.finish_reason == "stop" and cut.stop_reason == needle
        assert cut.text == text[: text.find(needle)]


def test_generation_config_supplies_defaults(tmp_path):
    (tmp_path / "generation_config.json").write_text(
        '{"temperature": 0.6, "top_p": 0.9, "max_new_tokens": 40, "top_k": -7, "eos_token_id": 1}'
    )
    # top_k=-7 would be rejected by SamplingParams: ignored, the built-in default stays.
    assert generation_defaults(tmp_path) == {"temperature": 0.6, "top_p": 0.9, "max_tokens": 40}
    assert generation_defaults(tmp_path / "missing") == {}
    demo = jaxpp.LLM(jaxpp.DEMO_MODEL).default_sampling_params()
    assert (demo.temperature, demo.top_p, demo.max_tokens) == (0.7, 0.95, 64)
