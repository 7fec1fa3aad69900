"""`jaxpp plan`: its bytes are the engine's, byte for byte; its replay runs the engine's own
schedule; its speed model, hardware profiles, search and CLI behave."""

import json
import re
import time

import pytest
from fp8_fixtures import write_fp8_checkpoint
from hf_fixtures import build_model_dir, random_seqs
from test_parallel import _build_moe

import jaxpp
from jaxpp import planner
from jaxpp.bench import Request as BenchRequest
from jaxpp.cli import main
from jaxpp.hardware import load_hardware, read_cluster_config


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("plan")
    return {
        "dense": build_model_dir(root, "qwen2", num_hidden_layers=4),  # test_parallel's
        "moe": _build_moe(root, "qwen2_moe"),
        "llama6": build_model_dir(root, "llama", num_hidden_layers=6),  # test_pipeline's
        "mistral": build_model_dir(root, "mistral"),
        # block-wise FP8 with layer 1's down_proj left in floats: at pp=2 its slot keeps it so
        "fp8": write_fp8_checkpoint(
            build_model_dir(root, "llama", name="llama6", num_hidden_layers=6),
            root,
            "llama6-fp8",
            method="compressed-tensors",
            strategy="block",
            block=(32, 48),
            ignore=("lm_head", "model.layers.1.mlp.down_proj"),
            keep_float=lambda m: m in ("lm_head", "model.layers.1.mlp.down_proj"),
        )[0],
    }


# One layout of each kind the CPU tests load (test_parallel, test_pipeline, test_sampling,
# test_hf_parity), as (model, LLM kwargs): each kind reaches a different rule of the layout.
ENGINE_LAYOUTS = [
    ("dense", {}),  # one device
    ("dense", dict(dp=2, pp=2, tp=2)),  # every mesh axis split
    ("dense", dict(dp=2, tp=4)),  # 2 KV heads stored 4 times for tp=4
    ("moe", dict(pp=4, tp=2)),  # routed experts and the shared expert over stages and tensor
    ("llama6", dict(pp=4, num_microbatches=8)),  # 6 layers over 4: [1, 2, 2, 1], empty slots
    ("llama6", dict(pp=3, layer_partition=[1, 1, 4])),  # a custom partition
    ("mistral", dict(dtype="bfloat16")),  # 2-byte weights and cache, a sliding window
    ("mistral", dict(block_size=7, max_num_seqs=4)),  # rows asked for; pages of 7
    ("dense", dict(quantization="fp8", dp=2, pp=2, tp=2)),  # FP8 weights and scales, on load
    ("fp8", dict(pp=2, tp=2)),  # an FP8 checkpoint: block scales split over tensor ranks
]


@pytest.mark.parametrize("model,kwargs", ENGINE_LAYOUTS)
def test_plan_bytes_equal_the_engines(models, model, kwargs):
    kwargs = {"dtype": "float32", **kwargs}
    llm = jaxpp.LLM(models[model], **kwargs)
    plan = jaxpp.plan(models[model], hardware="this-cpu", **kwargs)
    engine = llm.device_memory()
    print(f"{model} {kwargs}: engine {engine[0]}, plan {plan.device_memory()[0]}")
    assert plan.device_memory() == engine
    assert plan.max_num_seqs == llm.max_num_seqs
    assert plan.shape == llm.shape


def test_replay_runs_the_engines_schedule(models):
    """The ring model answers each call as the device does: the same calls, ticks, busy
    stage-ticks, tokens, peak and tick-by-tick schedule as a real run, chunked prompts, pages
    and preemption included."""
    prompts = random_seqs([4, 9, 150, 7, 5, 6, 12], seed=2)
    outputs = [3, 9, 2, 5, 1, 8, 4]
    kwargs = dict(
        dtype="float32", pp=3, num_microbatches=4, max_num_seqs=8, max_num_batched_tokens=24,
        block_size=4, max_model_len=192, decode_chunk=2,
    )  # fmt: skip
    sizing = jaxpp.plan(models["llama6"], hardware="this-cpu", **kwargs)
    kwargs["kv_cache_memory"] = 41 * (sizing.kv_bytes // sizing.pages)  # the 150-token one needs 38
    llm = jaxpp.LLM(models["llama6"], **kwargs)
    params = [jaxpp.SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in outputs]
    llm.generate(prompts, params)
    real = llm.last_run_stats
    plan = jaxpp.plan(models["llama6"], hardware="this-cpu", **kwargs)
    requests = [BenchRequest(p, n) for p, n in zip(prompts, outputs, strict=True)]
    modelled = plan.serve(requests).stats
    for key in (
        "calls", "ticks", "busy_stage_ticks", "tokens", "peak_running", "kv_blocks_peak",
        "preemptions",
    ):  # fmt: skip
        assert modelled[key] == real[key], key
    assert real["preemptions"] >= 1  # recomputed prompts: more prompt tokens
    assert modelled["prompt_tokens"] == real["prompt_tokens"] > sum(map(len, prompts))
    assert modelled["schedule"] == real["schedule"]


def test_large_models_plan_fast_without_weights():
    for preset, layout in (
        ("llama-3.1-405b", dict(pp=16, tp=8)),
        ("qwen3-235b-a22b", dict(pp=4, tp=4)),
    ):
        start = time.perf_counter()
        plan = jaxpp.plan(preset, dtype="bfloat16", hardware="h100-sxm", **layout)
        rows = plan.speed([1, plan.max_num_seqs], 512, 128)
        seconds = time.perf_counter() - start
        print(f"{preset}: {seconds:.1f} s, {plan.params_bytes / 1e9:.2f} GB params per device")
        assert seconds < 10
        assert not plan.overflow_bytes
        assert rows[1]["output_tokens_per_s"] > rows[0]["output_tokens_per_s"]
    # 126 layers of 405B in bfloat16 over 128 devices: about 811 GB / 128.
    plan = jaxpp.plan("llama-3.1-405b", pp=16, tp=8, hardware="h100-sxm")
    assert 6.3e9 < plan.params_bytes < 6.5e9


def test_fp8_weights_open_layouts_and_halve_the_bytes_a_decode_tick_reads():
    """Llama-3.1-70B fits one H200 in FP8, not in bfloat16; 405B four, not eight; a fixed
    layout gains KV pages; a batch-1 decode tick reads about half the bytes."""
    for preset, tp in (("llama-3.1-70b", 1), ("llama-3.1-405b", 4)):
        fp8 = jaxpp.plan(preset, tp=tp, quantization="fp8", hardware="h200", max_num_seqs=1)
        assert not fp8.overflow_bytes and fp8.unquantized.overflow_bytes
        assert 0.5 < fp8.params_bytes / fp8.unquantized.params_bytes < 0.53
    wide = jaxpp.plan("llama-3.1-70b", tp=2, quantization="fp8", hardware="h200", max_num_seqs=1)
    assert wide.pages > 1.3 * wide.unquantized.pages
    [fp8_row] = wide.speed([1], 128, 64)
    [float_row] = wide.unquantized.speed([1], 128, 64)
    ratio = fp8_row["tpot_s"]["mean"] / float_row["tpot_s"]["mean"]
    print(f"70B tp=2 on H200: {wide.unquantized.pages} -> {wide.pages} pages, TPOT x{ratio:.2f}")
    assert 0.5 < ratio < 0.56


def test_cli_plans_fp8_beside_the_float_weights(capsys):
    argv = ["plan", "--preset", "llama-3.1-70b", "--quantization", "fp8", "--tp", "2"]
    assert main([*argv, "--hardware", "h200", "--batch-sizes", "1", "--max-model-len", "4096"]) == 0
    out = capsys.readouterr().out
    print(out)
    fp8 = r"FP8 weights \(online\): params 36\.\d+ GB per device against 70\.\d+ GB"
    assert re.search(fp8, out)
    assert re.search(r"where the bfloat16 weights hold [\d,]+ \(\+[\d,]+\)", out)


def test_a_decode_tick_at_batch_1_reads_the_weights_once():
    """The roofline at its simplest: one row, one device, memory-bound, so a tick reads every
    parameter but the embedding table (a lookup reads one row of it) once, plus a little KV."""
    plan = jaxpp.plan("llama-3.1-8b", dtype="bfloat16", hardware="h200", max_num_seqs=1)
    [row] = plan.speed([1], 128, 64)
    embed = plan.layout.config.vocab_size * plan.layout.config.hidden_size * 2
    bound = (plan.params_bytes - embed) / plan.hardware.memory_bandwidth
    assert bound < row["tpot_s"]["mean"] < 1.05 * bound


def test_a_layout_that_does_not_fit_is_flagged_with_its_overflow():
    plan = jaxpp.plan("llama-3.1-405b", pp=8, dtype="bfloat16", hardware="h100-sxm")
    # Each of 8 devices holds 16 layer slots of 1/8 of the model: about 103 GB of weights.
    assert plan.overflow_bytes == plan.params_bytes + plan.kv_bytes - plan.usable_bytes
    assert plan.overflow_bytes > 40e9


def test_links_across_nodes_cost_more_than_within():
    within = jaxpp.plan("llama-3.1-70b", pp=8, hardware="h100-sxm").cost_model()
    across = jaxpp.plan("llama-3.1-70b", pp=8, tp=2, hardware="h100-sxm").cost_model()
    tick = (16, 8 * 100, 0, 8)  # 16 slots, 8 decode rows of 100 keys, 8 rows sampled
    assert within.tick(*tick).transfer < across.tick(*tick).transfer


def _cluster_config(tmp_path):
    """A cluster config in LLMServingSim's format (the shape of its single-node examples)."""
    config = {
        "num_nodes": 1,
        "link_bw": 16,
        "link_latency": 20000,
        "nodes": [
            {
                "num_instances": 1,
                "cpu_mem": {"mem_size": 512, "mem_bw": 256, "mem_latency": 0},
                "instances": [
                    {
                        "model_name": "meta-llama/Llama-3.1-8B",
                        "hardware": "RTXPRO6000",
                        "npu_mem": {"mem_size": 96, "mem_bw": 1597, "mem_latency": 0},
                        "num_npus": 4,
                        "tp_size": 2,
                        "pp_size": 2,
                        "pd_type": None,
                    }
                ],
            }
        ],
    }
    path = tmp_path / "cluster.json"
    path.write_text(json.dumps(config))
    return path


def test_cluster_config_is_read_as_llmservingsim_writes_it(tmp_path):
    hw, layout = read_cluster_config(_cluster_config(tmp_path))
    assert layout == {"num_npus": 4, "tp_size": 2, "pp_size": 2}
    assert hw.memory_bytes == 96e9 and hw.memory_bandwidth == 1597e9
    assert hw.intra_node.bandwidth == 16e9 and hw.intra_node.latency == pytest.approx(20e-6)
    assert hw.peak_flops == load_hardware("rtx-pro-6000").peak_flops


def test_search_ranks_layouts_and_says_why():
    found = planner.search(
        "llama-3.1-8b",
        4,
        hardware="l4",
        input_len=256,
        output_len=32,
        dtype="bfloat16",
        max_model_len=2048,
        max_tpot=0.05,
    )
    assert found and all(not c.plan.overflow_bytes for c in found)
    assert all(c.plan.layout.devices == 4 for c in found)
    met = [c for c in found if c.meets_bound]
    assert met and found[: len(met)] == met  # layouts within the bound rank first ...
    speeds = [c.throughput for c in met]
    assert speeds == sorted(speeds, reverse=True)  # ... by modelled throughput
    assert all(c.result["tpot_s"]["mean"] <= 0.05 for c in met)
    reason = planner.why_first(found[0], found[-1])
    assert reason.split(":")[0] in ("memory", "bubble", "transfer", "compute")


def test_cli_plans_and_replays_a_trace(tmp_path, capsys):
    trace = tmp_path / "trace.jsonl"
    trace.write_text(
        "\n".join(
            json.dumps({"input_toks": 40 + 7 * i, "output_toks": 9, "arrival_time_ns": i * 10**7})
            for i in range(12)
        )
    )
    code = main(
        ["plan", "--preset", "llama-32m", "--cluster-config", str(_cluster_config(tmp_path))]
        + ["--max-num-seqs", "8", "--trace", str(trace), "--log-interval", "0.01"]
    )
    out = capsys.readouterr().out
    print(out)
    assert code == 0
    assert "layout: dp=1 pp=2 tp=2" in out and "RTXPRO6000 (cluster.json)" in out
    assert "params" in out and "KV cache" in out and "fits on every device" in out
    assert "trace replay (12 requests" in out
    assert "step=" in out and "prompt_t=" in out and "decode_t=" in out and "npu_mem=" in out
    assert "TTFT ms mean/p50/p99" in out


def test_cli_searches_layouts_and_names_the_reason(capsys):
    argv = ["plan", "--preset", "llama-32m", "--search", "--devices", "4"]
    argv += ["--hardware", "a100-80gb", "--max-model-len", "512", "--max-num-seqs", "8"]
    assert main(argv + ["--input-len", "32", "--output-len", "8", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert {(r["dp"], r["pp"], r["tp"]) for r in report["layouts"]} >= {(4, 1, 1), (1, 4, 1)}
    assert report["why"].split(":")[0] in ("memory", "bubble", "transfer", "compute")


def test_cli_refuses_bad_layouts_with_the_reason(capsys):
    assert main(["plan", "--preset", "llama-32m", "--tp", "3"]) == 2
    assert "num_attention_heads=8" in capsys.readouterr().err
    assert main(["plan", "--preset", "nope"]) == 2
