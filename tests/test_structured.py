"""Structured outputs: constraints -> token automata (host), their walk on the device (the
sampler's mask and state advance, against the host's), and through the engine: every finished
output of a schema request validates (jsonschema), a cut one is a prefix the automaton allows,
rows without a constraint get the tokens they get alone, the layout changes no token, and the
grammar programs keep the ring free of host round trips."""

import dataclasses
import json
import re

import jax
import jax.numpy as jnp
import jsonschema
import numpy as np
import pytest
from transformers import AutoTokenizer

import jaxpp
from jaxpp.bench import CompileCounter
from jaxpp.config import StructuredOutputsParams as SO
from jaxpp.ebnf import grammar_regex
from jaxpp.grammar import (
    TABLE_SPECS,
    Compiler,
    GrammarPool,
    GrammarTables,
    VocabLayout,
    int_range_regex,
)
from jaxpp.model import VOCAB_AXES
from jaxpp.sampling import grammar_advance, grammar_allowed

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "size": {"type": "integer", "minimum": -5, "maximum": 120},
        "kind": {"enum": ["a", "bb", "ccc"]},
        "tags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3},
    },
    "required": ["name", "size", "kind"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def demo_tokenizer():
    return AutoTokenizer.from_pretrained(str(jaxpp.DEMO_MODEL))


def _walk(automaton, layout, ids):
    """The state after `ids`, asserting that each token was allowed; None if one was not."""
    state = 0
    for t in ids:
        if not automaton.allowed(state, layout)[t]:
            return None
        state = automaton.next_state(state, t)
    return state


def _accepts(compiler, tokenizer, so, text) -> bool:
    automaton = compiler.compile(so)
    state = _walk(automaton, compiler.layout, tokenizer.encode(text, add_special_tokens=False))
    return state is not None and bool(automaton.accepting[state])


# --- constraints -> automata (host) ---------------------------------------------------------


@pytest.mark.parametrize(
    "so,good,bad",
    [
        (
            SO(json=SCHEMA),
            [
                '{"name": "x", "size": -5, "kind": "bb"}',
                '{"name":"","size":120,"kind":"a","tags":[true,false]}',
            ],
            [
                '{"name": "x", "size": 121, "kind": "a"}',
                '{"name": "x", "kind": "a"}',
                '{"name": "123456789", "size": 1, "kind": "a"}',
            ],
        ),
        (SO(choice=["yes", "no", "a+b"]), ["yes", "a+b"], ["maybe", "a"]),
        (SO(regex=r"[a-c]{2}-[0-9]+"), ["ab-12"], ["ab-", "abc-1"]),
        (
            SO(json_object=True),
            ['{"a": {"b": 1}, "c": [1, null, "x"], "d": 2.5e+3}', "{}"],
            ["[1]", '{"a": {"b": [1]}}'],
        ),
        (
            SO(grammar='root ::= "(" item ("," item){0,3} ")"\nitem ::= [0-9]+ | "x" # note'),
            ["(1,x,23)", "(x)"],
            ["()", "(1,2,3,4,5)"],
        ),
        (
            SO(grammar='start: "go" [" " dir] ("!"~2)\ndir: "north" | "south" | /w[a-z]st/'),
            ["go!!", "go west!!", "go north!!"],
            ["go!", "go up!!"],
        ),
    ],  # fmt: skip
    ids=["json", "choice", "regex", "json_object", "gbnf", "lark"],
)
def test_constraints_accept_their_language(demo_tokenizer, so, good, bad):
    compiler = Compiler(demo_tokenizer, VocabLayout(4096, 1, 4096))
    for text in good:
        assert _accepts(compiler, demo_tokenizer, so, text), text
    for text in bad:
        assert not _accepts(compiler, demo_tokenizer, so, text), text


def test_identical_constraints_share_one_automaton(demo_tokenizer):
    compiler = Compiler(demo_tokenizer, VocabLayout(4096, 1, 4096))
    assert compiler.compile(SO(json=SCHEMA)) is compiler.compile(SO(json=json.dumps(SCHEMA)))


@pytest.mark.parametrize(
    "so,message",
    [
        (
            SO(grammar='root ::= "[" value "]"\nvalue ::= "1" | root'),
            r"rule 'root' is recursive \(root -> value -> root\)",
        ),
        (SO(grammar="root ::= item\n"), r"rule 'item' is used but not defined"),
        (SO(grammar='start: "a"\n%import common.WS'), r"directive '%import' is not supported"),
        (SO(json={"type": "integer", "multipleOf": 3}), r"keyword 'multipleOf' at \$"),
        (
            SO(json={"type": "object", "properties": {"x": {"type": "number", "maximum": 2}}}),
            r"'maximum' at \$\.properties\.x is supported on integers only",
        ),
        (SO(regex="("), "cannot compile the constraint"),
        (SO(json="{not json"), "is not valid JSON"),
    ],  # fmt: skip
)
def test_unsupported_constraints_are_refused_by_name(demo_tokenizer, so, message):
    compiler = Compiler(demo_tokenizer, VocabLayout(4096, 1, 4096))
    with pytest.raises(ValueError, match=message):
        compiler.compile(so)


def test_integer_ranges():
    for low, high in [(1, 9), (0, 0), (5, 123), (-50, 7), (None, -3), (7, None), (None, None)]:
        pattern = re.compile(int_range_regex(low, high))
        for v in range(-300, 600):
            inside = (low is None or v >= low) and (high is None or v <= high)
            assert bool(pattern.fullmatch(str(v))) == inside, (low, high, v)
        assert not pattern.fullmatch("-0") and not pattern.fullmatch("007")


def test_grammar_regex_is_the_rules_inlined():
    assert grammar_regex('root ::= a a\na ::= "x" | [0-2]') == r"((x|[\x{30}-\x{32}]))" * 2


def test_params_validate_and_travel_as_dicts():
    with pytest.raises(ValueError, match="exactly one of json, regex"):
        SO(regex="a", choice=["b"])
    with pytest.raises(ValueError, match=r"structured_outputs\.choice"):
        SO(choice=[1])
    p = jaxpp.SamplingParams(structured_outputs=SO(json={"type": "boolean"}))
    assert jaxpp.SamplingParams(**dataclasses.asdict(p)) == p  # the server's wire format


# --- the device walk (sampling.py) against the host's ---------------------------------------


def test_device_mask_and_advance_equal_the_host(demo_tokenizer):
    """Two automata placed in one pool, split over 8 vocab shards of 500 ids (not a multiple
    of 32): every state's allowed tokens on the device are the host's, stop tokens only where
    the state accepts; the next state of sampled (state, token) pairs is the host's."""
    mesh = jax.sharding.Mesh(
        np.array(jax.devices()[:8]).reshape(1, 2, 4), ("data", "stage", "tensor")
    )
    layout = VocabLayout(4000, 8, 500)
    compiler = Compiler(demo_tokenizer, layout)
    pool = GrammarPool(mesh, layout, states=512, exceptions=1 << 15)
    automata = [compiler.compile(SO(choice=["yes", "no"])), compiler.compile(SO(json=SCHEMA))]
    bases = [pool.acquire(a) for a in automata]
    stop = 1  # the demo model's EOS
    states = np.concatenate(
        [b + np.arange(a.states) for a, b in zip(automata, bases, strict=True)] + [[-1]]
    )
    stop_ids = np.full((len(states), 1), stop, np.int32)

    def body(states, tables, stop_ids):
        ids = jax.lax.axis_index(VOCAB_AXES) * layout.width + jnp.arange(layout.width)
        is_stop = (ids[None, :, None] == stop_ids[:, None, :]).any(-1)
        return grammar_allowed(states, tables, is_stop)

    run = jax.jit(jax.shard_map(
        body, mesh=mesh, in_specs=(jax.P(), TABLE_SPECS, jax.P()),
        out_specs=jax.P(None, VOCAB_AXES), check_vma=False,
    ))  # fmt: skip
    allowed = np.asarray(run(jnp.asarray(states), pool.tables, jnp.asarray(stop_ids)))
    row = 0
    for a in automata:
        for s in range(a.states):
            want = a.allowed(s, layout).copy()
            want[stop] = a.accepting[s]
            np.testing.assert_array_equal(allowed[row, :4000], want)
            assert not allowed[row, 4000:].any()
            row += 1
    assert allowed[row].all()  # no automaton: everything

    rng = np.random.default_rng(0)
    pairs = []
    for a, base in zip(automata, bases, strict=True):
        for s in range(a.states):
            ok = np.nonzero(a.allowed(s, layout))[0]
            for t in rng.choice(ok, min(len(ok), 20), replace=False) if len(ok) else []:
                pairs.append((base + s, int(t), base + a.next_state(s, int(t))))
    pairs.append((-1, 5, -1))
    got = jax.jit(grammar_advance)(
        jnp.array([p[0] for p in pairs]), jnp.array([p[1] for p in pairs]), pool.tables
    )
    np.testing.assert_array_equal(np.asarray(got), [p[2] for p in pairs])


def test_pool_capacity_sharing_and_eviction(demo_tokenizer):
    mesh = jax.sharding.Mesh(
        np.array(jax.devices()[:1]).reshape(1, 1, 1), ("data", "stage", "tensor")
    )
    layout = VocabLayout(4096, 1, 4096)
    compiler = Compiler(demo_tokenizer, layout)
    yes_no, abc = compiler.compile(SO(choice=["yes", "no"])), compiler.compile(SO(regex="abc"))
    pool = GrammarPool(mesh, layout, states=yes_no.states + abc.states, exceptions=64)
    first = pool.acquire(yes_no)
    assert pool.acquire(yes_no) == first  # shared, two users
    second = pool.acquire(abc)
    with pytest.raises(ValueError, match=r"the device pool is full \(\d+ of \d+ states held"):
        pool.acquire(compiler.compile(SO(regex="xyz")))
    pool.release(abc.key)
    assert pool.acquire(compiler.compile(SO(regex="xyz"))) == second  # the idle one made room
    with pytest.raises(ValueError, match=r"has \d+ states .* the device pool holds"):
        pool.acquire(compiler.compile(SO(json=SCHEMA)))


# --- through the engine ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def llm():
    """Warmed up (3 token buckets: 8, 16 and 32 slots), as a server is. The engine of
    test_tools.py's and test_serve.py's servers: its programs may be in the persistent
    compilation cache already."""
    engine = jaxpp.LLM(
        jaxpp.DEMO_MODEL, max_num_seqs=8, kv_cache_memory=32 << 20, max_num_batched_tokens=32
    )
    # Every forward bucket, and greedy and sampling each with and without a grammar; the demo
    # model's generation_config.json sets repetition_penalty 1.1, so also the penalties mode
    # with and without a grammar, and its prompt-count program per bucket.
    buckets = len(engine.scheduler.buckets.sizes)
    assert engine.warmup() == buckets + 4 + 2 + buckets
    return engine


def test_schema_outputs_validate_and_others_are_undisturbed(llm):
    """24 seeded samples at temperature 1 under a schema beside an unconstrained greedy request:
    each finished output validates, each one cut by max_tokens is a prefix the automaton
    allows; the greedy request's tokens are those it gets alone."""
    plain = jaxpp.SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    [alone] = llm.generate(["def main():"], plain)
    params = [
        jaxpp.SamplingParams(
            max_tokens=48, temperature=1.0, seed=i, structured_outputs=SO(json=SCHEMA)
        )
        for i in range(24)
    ]
    outs = llm.generate(["import os\n"] * 24 + ["def main():"], params + [plain])
    assert outs[-1].outputs[0].token_ids == alone.outputs[0].token_ids
    automaton = llm.grammar_compiler.compile(SO(json=SCHEMA))
    finished = 0
    for out in outs[:-1]:
        c = out.outputs[0]
        if c.finish_reason == "stop":
            jsonschema.validate(json.loads(c.text), SCHEMA)
            finished += 1
        else:
            assert c.finish_reason == "length" and len(c.token_ids) == 48
        assert _walk(automaton, llm.vocab_layout, c.token_ids) is not None
    print(f"{finished} of 24 finished within 48 tokens, all valid")
    assert finished >= 8
    # Nothing stays resident for requests that are done: the pool's users are back to 0.
    assert all(r.users == 0 for r in llm.grammar_pool._resident.values())


def test_layout_changes_no_constrained_token(hf_model):
    """A seeded constrained request gives the same tokens on one device and on pp=2 x tp=2 (the
    vocab split into 4 shards of 80 ids, not a multiple of 32)."""
    model = hf_model("llama")
    params = [
        jaxpp.SamplingParams(max_tokens=24, temperature=1.0, seed=s, structured_outputs=so)
        for s, so in enumerate([SO(json=SCHEMA), SO(regex="[a-z ]{2,12}!"), SO(json_object=True)])
    ]
    one = jaxpp.LLM(model, dtype="float32", max_num_seqs=4, kv_cache_memory=1 << 20)
    split = jaxpp.LLM(model, dtype="float32", pp=2, tp=2, max_num_seqs=4, kv_cache_memory=1 << 20)
    prompts = [[5, 6, 7], [9, 10], [11]]
    want = [o.outputs[0].token_ids for o in one.generate(prompts, params)]
    assert [o.outputs[0].token_ids for o in split.generate(prompts, params)] == want
    assert re.fullmatch("[a-z ]{2,12}!", one.detokenize(want[1], params[1]))


def test_constraints_compile_nothing_after_warmup(llm):
    """Constrained rows (greedy and seeded, two constraints) beside unconstrained ones, and then
    unconstrained ones alone: after warmup() no program compiles, so the greedy and sampling
    programs never change when constraints come and go, and no constrained request waits for
    a compilation. (The automata are placed in the pool by whole-table uploads: no program
    per automaton size either.)"""
    llm.grammar_compiler.compile(SO(regex="[a-z]{3,9}"))  # host-side, outside the count
    plain = jaxpp.SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    mixed = [
        plain,
        jaxpp.SamplingParams(max_tokens=12, temperature=0.0, structured_outputs=SO(json=SCHEMA)),
        jaxpp.SamplingParams(
            max_tokens=12, temperature=1.0, seed=3, structured_outputs=SO(regex="[a-z]{3,9}")
        ),
        dataclasses.replace(plain, temperature=1.0, seed=4),
    ]
    with CompileCounter() as counter:
        llm.generate(["import os\n"] * 4, mixed)
        llm.generate(["import os\n"] * 2, [plain, mixed[3]])
    assert counter.count == 0, counter.names


def test_grammar_programs_have_no_host_round_trips(llm):
    """The grammar sample programs (compiled by warmup and run above): no conditional and no
    loop of unknown trip count (test_serving checks every program the same way)."""
    grammar = [(p, args) for p, args in llm.programs.lowered() if _takes_tables(args)]
    # greedy, sampling and the penalties mode (the demo model's defaults penalise)
    assert len(grammar) == 3
    for program, args in grammar:
        text = program.lower(*args).compile().as_text()
        assert not re.search(r"\bconditional\(", text)
        whiles = [line for line in text.splitlines() if re.search(r"\bwhile\(", line)]
        assert all("known_trip_count" in line for line in whiles), whiles


def _takes_tables(args) -> bool:
    return any(isinstance(a, GrammarTables) for a in args)


def test_a_constraint_that_does_not_fit_fails_alone(hf_model):
    small = jaxpp.LLM(hf_model("llama"), dtype="float32", max_num_seqs=4,
                      kv_cache_memory=1 << 20, grammar_states=16)  # fmt: skip
    with pytest.raises(ValueError, match="the device pool holds 16"):
        small.add_request([5, 6], jaxpp.SamplingParams(structured_outputs=SO(json_object=True)))
    [out] = small.generate([[5, 6]], jaxpp.SamplingParams(max_tokens=4, temperature=0.0))
    assert len(out.outputs[0].token_ids) == 4


def test_preempted_constrained_requests_resume_their_automaton(hf_model):
    """A pool of 17 pages of 4 positions for four constrained requests of ~45 positions: the
    newest are preempted and recomputed from prompt + tokens, their automaton state from the
    tokens they had; each still gets the tokens it gets alone."""
    model = hf_model("llama")
    params = [
        jaxpp.SamplingParams(max_tokens=48, temperature=1.0, seed=s,
                             structured_outputs=SO(regex="[a-z ]{40}!"))
        for s in range(4)
    ]  # fmt: skip
    prompts = [[5, 6, 7], [9, 10], [11, 12, 13, 14], [8]]
    roomy = jaxpp.LLM(model, dtype="float32", max_num_seqs=4, kv_cache_memory=1 << 20)
    want = [o.outputs[0].token_ids for o in roomy.generate(prompts, params)]
    per_page = roomy.kv_bytes_per_page() // 4
    tight = jaxpp.LLM(model, dtype="float32", block_size=4, max_num_seqs=4,
                      kv_cache_memory=17 * per_page)  # fmt: skip
    outs = tight.generate(prompts, params)
    assert [o.outputs[0].token_ids for o in outs] == want
    assert tight.last_run_stats["preemptions"] > 0
    for out in outs:
        assert out.outputs[0].finish_reason == "stop"
        assert re.fullmatch("[a-z ]{40}!", out.outputs[0].text)
