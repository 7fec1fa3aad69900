"""The offline throughput benchmark runs end to end on a tiny random preset and reports sane,
machine-readable figures: positive rates, exact token counts, no compilation in the timed part."""

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
# 6 prompts in batches of 4: two batches of different row counts (and, with range-ratio 0.5,
# possibly different length buckets), so the timed run spans more than one shape bucket.
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


def _check_common(r: dict):
    requests = bench.random_requests(6, 12, 8, 0.5, TINY["vocab_size"], seed=3)
    assert r["num_prompts"] == 6 and r["batch_size"] == 4
    assert r["input_tokens"] == sum(len(q.prompt) for q in requests)
    assert r["output_tokens"] == sum(q.output_len for q in requests)  # ignore_eos: exact
    for key in (
        "requests_per_s",
        "input_tokens_per_s",
        "output_tokens_per_s",
        "total_tokens_per_s",
        "duration_s",
    ):
        assert r[key] > 0, key
    for key in ("ttft_s", "tpot_s"):
        assert 0 < r[key]["p50"] <= r[key]["p99"], (key, r[key])
    assert 1 <= r["shape_buckets"] <= 2
    assert r["warmup_compilations"] >= 2  # a prefill and a decode program at least
    assert r["compilations_timed"] <= r["shape_buckets"]
    # The warm-up compiled the prefill and decode programs of every bucket: all the timed part
    # may still compile is the KV-cache allocator, when consecutive waves change cache shape.
    assert set(r["compiled_timed"]) <= {"jit(<lambda>)"}
    p = r["pipeline"]
    assert p["prefill_ticks"] >= 1 and p["decode_ticks"] >= 7
    assert p["prefill_busy_stage_ticks"] == p["prefill_ticks"]  # pp=1: no bubble
    assert p["decode_bubble_fraction"] == pytest.approx(0.0)
    assert len(r["device_memory"]) == 1
    assert r["device_memory"][0]["params"] > 0 and r["device_memory"][0]["kv_cache"] > 0
    assert r["decode_bandwidth"]["bytes_per_s_per_device"] > 0
    assert r["prefill"]["flops_per_s"] > 0


def test_bench_json(preset, capsys):
    r = _run(preset + ARGS, capsys)
    _check_common(r)
    assert "hf" not in r and "ratio_output_tokens_per_s" not in r


def test_bench_compare_hf(preset, capsys):
    r = _run(preset + ARGS + ["--compare-hf", "--torch-threads", "1"], capsys)
    _check_common(r)
    hf = r["hf"]
    assert hf["attn_implementation"] == "eager" and hf["dtype"] == "float32"
    assert hf["output_tokens_per_s"] > 0
    assert r["ratio_output_tokens_per_s"] == pytest.approx(
        r["output_tokens_per_s"] / hf["output_tokens_per_s"]
    )
    # Same model, same prompts, greedy, float32: the two engines mostly agree token for token
    # (random weights make near-ties, so not necessarily every request).
    assert 0.5 <= hf["same_tokens_fraction"] <= 1.0


def test_timed_compilations_do_not_grow_with_waves(preset, capsys):
    # Two timed passes over batches [4, 2]: four cache-shape changes for two buckets.
    r = _run(preset + ARGS + ["--repeats", "2"], capsys)
    assert r["compilations_timed"] <= r["shape_buckets"]


def test_add_parser_registers_bench():
    parser = argparse.ArgumentParser(prog="jaxpp")
    bench.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["bench", "--preset", "llama-32m", "--batch-size", "8"])
    assert args.func is bench.run and args.batch_size == 8 and args.compare_hf is False
