"""The serving benchmark runs end to end on a tiny random preset and reports sane,
machine-readable figures: positive rates, exact token counts, no compilation in the timed part;
traces are read strictly and their arrival times kept."""

import argparse
import json

import pytest

from jaxpp import bench

TINY = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 256,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "float32",
    "bos_token_id": 1,
    "eos_token_id": 2,
}
# 6 requests through 4 slots in chunks of 8: slots are refilled, prompts span chunks.
ARGS = [
    "--input-len",
    "12",
    "--output-len",
    "8",
    "--num-prompts",
    "6",
    "--batch-size",
    "4",
    "--range-ratio",
    "0.5",
    "--seed",
    "3",
    "--dtype",
    "float32",
    "--max-num-batched-tokens",
    "16",
    "--block-size",
    "4",
    "--json",
]


@pytest.fixture(scope="module")
def preset(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    path = root / "tiny-llama.json"
    path.write_text(json.dumps(TINY))
    return ["--preset", str(path), "--cache-dir", str(root / "cache")]


def _run(argv, capsys) -> dict:
    assert bench.main(argv) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1, out  # --json: one object, nothing else on stdout
    return json.loads(out[0])


def _check_common(r: dict, requests: list):
    assert r["num_prompts"] == len(requests) and r["layout"]["max_num_seqs"] == 4
    assert r["input_tokens"] == sum(len(q.prompt) for q in requests)
    assert r["output_tokens"] == sum(q.output_len for q in requests)  # ignore_eos: exact
    for key in (
        "requests_per_s",
        "input_tokens_per_s",
        "output_tokens_per_s",
        "total_tokens_per_s",
        "duration_s",
        "tick_s",
    ):
        assert r[key] > 0, key
    for key in ("ttft_s", "tpot_s", "e2e_s"):
        assert 0 < r[key]["p50"] <= r[key]["p99"], (key, r[key])
    assert r["ttft_s"]["p99"] <= r["e2e_s"]["p99"]
    # The warm-up serves the same requests: the timed passes compile nothing.
    assert r["step_programs"] >= 2
    if r["args"]["trace"] is None:  # all at once: the same schedule as the warm-up's
        assert r["compilations_timed"] == 0, r["compiled_timed"]
    p = r["pipeline"]
    assert p["tokens"] == r["output_tokens"]
    assert p["prompt_tokens"] == r["input_tokens"]
    assert 0 < p["kv_blocks_peak"] <= p["kv_blocks_total"] and p["preemptions"] == 0
    assert 0 < p["peak_running"] <= 4 and p["tokens_per_busy_stage_tick"] > 0
    assert p["busy_stage_ticks"] <= p["ticks"]
    assert 0 < r["occupancy"] <= 1
    assert 0 <= r["device_idle_fraction"] < 1
    assert r["intervals"] and r["intervals"][-1]["step"] == p["calls"]
    assert len(r["device_memory"]) == 1
    assert r["device_memory"][0]["params"] > 0 and r["device_memory"][0]["kv_cache"] > 0
    assert r["decode_bandwidth"]["bytes_per_s_per_device"] > 0
    assert r["prefill"]["flops_per_s"] > 0


def _requests():
    return bench.random_requests(6, 12, 8, 0.5, TINY["vocab_size"], seed=3)


def test_bench_json(preset, capsys):
    r = _run(preset + ARGS, capsys)
    _check_common(r, _requests())
    assert "hf" not in r and "ratio_output_tokens_per_s" not in r


def test_bench_compare_hf(preset, capsys):
    r = _run(preset + ARGS + ["--compare-hf", "--torch-threads", "1"], capsys)
    _check_common(r, _requests())
    hf = r["hf"]
    assert hf["attn_implementation"] == "sdpa" and hf["dtype"] == "float32"
    assert hf["output_tokens_per_s"] > 0 and hf["batch_size"] == 4
    assert r["ratio_output_tokens_per_s"] == pytest.approx(
        r["output_tokens_per_s"] / hf["output_tokens_per_s"]
    )
    # Same model, same prompts, greedy, float32: the two engines mostly agree token for token
    # (random weights make near-ties, so not necessarily every request).
    assert 0.5 <= hf["same_tokens_fraction"] <= 1.0


def test_trace_requests_arrive_on_time(preset, capsys, tmp_path):
    trace = tmp_path / "trace.jsonl"
    lines = [
        {"input_toks": 5, "output_toks": 3, "arrival_time_ns": 0},
        {"input_toks": 17, "output_toks": 6, "arrival_time_ns": 300_000_000},
        {"input_toks": 9, "output_toks": 2, "arrival_time_ns": 150_000_000},
        {"input_toks": 3, "output_toks": 4, "arrival_time_ns": 0, "input_tok_ids": [5, 6, 7]},
    ]
    trace.write_text("".join(json.dumps(x) + "\n" for x in lines))
    args = [a for a in ARGS if a not in ("--num-prompts", "6")]
    r = _run(preset + args + ["--trace", str(trace), "--log-interval", "0.1"], capsys)
    requests = bench.read_trace(trace, TINY["vocab_size"], seed=3)
    assert [q.arrival for q in requests] == [0.0, 0.0, 0.15, 0.3]  # sorted by arrival
    assert requests[1].prompt == [5, 6, 7]
    assert r["num_prompts"] == 4 and r["output_tokens"] == 15
    assert r["duration_s"] >= 0.3  # the last request arrived 0.3 s in
    assert len(r["intervals"]) >= 2


@pytest.mark.parametrize(
    "line,message",
    [
        ('{"input_toks": 5, "output_toks": 3}', "line 1: missing 'arrival_time_ns'"),
        ('{"input_toks": 5.5, "output_toks": 3, "arrival_time_ns": 0}', "input_toks=5.5 is not"),
        ('{"input_toks": 5, "output_toks": 3, "arrival_time_ns": -1}', "arrival_time_ns=-1 is"),
        ('{"input_toks": 5, "output_toks": 0, "arrival_time_ns": 0}', "output_toks=0 is out"),
        ("[1, 2]", "line 1: expected a JSON object"),
        ("{oops", "line 1: invalid JSON"),
        (
            '{"input_toks": 2, "output_toks": 1, "arrival_time_ns": 0, "input_tok_ids": [1]}',
            "input_tok_ids must be 2 token ids",
        ),
    ],
)
def test_bad_trace_lines_are_refused(preset, capsys, tmp_path, line, message):
    trace = tmp_path / "bad.jsonl"
    trace.write_text(line + "\n")
    assert bench.main(preset + ["--trace", str(trace), "--json"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


def test_poisson_arrivals():
    requests = bench.random_requests(400, 8, 4, 0.0, 100, seed=1, request_rate=50.0)
    arrivals = [q.arrival for q in requests]
    assert arrivals == sorted(arrivals) and arrivals[0] > 0
    assert 400 / arrivals[-1] == pytest.approx(50.0, rel=0.15)
    with pytest.raises(ValueError, match="--request-rate=0.0 is invalid"):
        bench.random_requests(4, 8, 4, 0.0, 100, request_rate=0.0)


def test_add_parser_registers_bench():
    parser = argparse.ArgumentParser(prog="jaxpp")
    bench.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["bench", "--preset", "llama-32m", "--batch-size", "8"])
    assert args.func is bench.run and args.batch_size == 8 and args.compare_hf is False
    assert args.hf_attn == "sdpa" and args.max_num_batched_tokens is None
