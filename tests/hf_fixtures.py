"""Tiny random Hugging Face checkpoints and float32 reference outputs, built offline.

Everything here is deterministic (seeded) and small enough to build in well under a second per
model on a CPU.  The weights are deliberately *not* the transformers default init (std 0.02,
norm weights 1, biases 0): that init gives nearly flat logits that hide transposed weights,
wrong norm formulas, missing biases, wrong GQA mapping and so on.  Here every RMSNorm weight
(including Qwen3's q_norm/k_norm) and every bias is randomised (see "Scale" below).

Public helpers:
    FAMILIES                      all families below, in a stable order
    build_tokenizer_dir(root)     shared tiny byte-level BPE tokenizer (cached per root)
    build_model_dir(root, family, name=None, seed=0, **config_overrides) -> Path
    rewrite_config_v4(model_dir, rope_type_key="type", keep_layer_types=None)
    copy_model_dir(src, dst), write_sharded_copy(src_dir, dst_dir, max_shard_size="200KB")
    rewrite_safetensors_without / rewrite_safetensors_with   (break a checkpoint on purpose)
    hf_logits(model_dir, seqs, dtype="float32")   eager reference logits, one sequence at a time
    hf_greedy(model_dir, prompts, max_new_tokens)   greedy continuation (generate), eos ignored
    hf_greedy_with_margins(...)   same plus the top-1/top-2 logit gap at every step
    MUTATIONS, mutations_for(family), hf_logits_mutated(model_dir, seqs, mutation)
                                  the reference with one known implementation bug injected
    random_seqs(lengths, seed), rel_err(got, ref)

Scale: initializer_range 0.1 (not 0.5-1.0).  Measured with transformers 5.23: at 0.5 HF's own
float32 logits differ from float64 by up to 7e-5 of max|logit| (too close to a 1e-4 parity
tolerance) and a bf16 run differs by 0.2-0.7 (chaotic); at 0.1 float32 vs float64 is <= 1e-6,
bf16 ~1.5e-2, and every bug in MUTATIONS still moves the logits by >= 0.1 of max|logit|.
All weights are rounded to bf16-representable values (stored as float32), so a bf16 run loses
nothing to weight rounding.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np  # noqa: E402

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
TOKENIZER_VOCAB = 300
MODEL_VOCAB = 320  # >= tokenizer size, deliberately not a power of two

FAMILIES = (
    "llama",
    "llama3_rope",
    "llama_bias",
    "llama_tied",
    "mistral",
    "qwen2",
    "qwen2_layer_types",
    "qwen3",
)

# Sliding window used by the windowed families; test sequences go well past it.
SLIDING_WINDOW = 8

_CORPUS = [
    "hello world, hello there! the quick brown fox jumps over the lazy dog.",
    "Pipeline parallel inference splits the layers of a model into stages.",
    "Each stage runs on its own device; micro-batches flow from stage to stage.",
    "A key-value cache stores attention keys and values for every past token.",
    "Tensor parallelism splits each matrix across devices along heads or columns.",
    "Sampling: greedy decoding picks the most likely token at every step.",
    "Numbers 0 1 2 3 4 5 6 7 8 9 10 11 12 42 100 1024 and symbols + - * / = ( ) [ ] { }",
    "def forward(x):\n    return x @ W.T + b\n",
    "Les modèles de langage prédisent le prochain mot. Übermäßig große Modelle.",
    "The rain in Spain stays mainly in the plain. She sells sea shells by the sea shore.",
    "hello hello hello world world world the the the and and and of of of",
]


# --------------------------------------------------------------------------------------------
# tokenizer


def _train_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB,
        special_tokens=[BOS, EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    return tok


def build_tokenizer_dir(root: str | os.PathLike) -> Path:
    """Train (once per root) and save the shared tokenizer under root/_tokenizer."""
    out = Path(root) / "_tokenizer"
    if (out / "tokenizer_config.json").exists():
        return out
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=_train_tokenizer(), bos_token=BOS, eos_token=EOS, pad_token=PAD
    )
    tmp = out.with_name("_tokenizer.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    fast.save_pretrained(tmp)
    cfg_path = tmp / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    # 5.x writes "TokenizersBackend", which 4.x cannot load; this class loads in both.
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg_path.write_text(json.dumps(cfg, indent=2))
    tmp.rename(out)
    return out


def tokenizer_special_ids(tok_dir: str | os.PathLike) -> dict[str, int]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    return {
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
        "len": len(tok),
    }


# --------------------------------------------------------------------------------------------
# models

_COMMON = dict(
    vocab_size=MODEL_VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
    initializer_range=0.1,
    tie_word_embeddings=False,
)


def family_spec(family: str) -> tuple[str, dict]:
    """(model_type, config kwargs) for a family."""
    if family == "llama":
        return "llama", dict(rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    if family == "llama3_rope":
        return "llama", dict(
            max_position_embeddings=8192,
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        )
    if family == "llama_bias":
        return "llama", dict(
            attention_bias=True,
            mlp_bias=True,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        )
    if family == "llama_tied":
        return "llama", dict(
            tie_word_embeddings=True,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        )
    if family == "mistral":
        return "mistral", dict(
            head_dim=24,  # != hidden / heads = 16
            sliding_window=SLIDING_WINDOW,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        )
    if family == "qwen2":
        # layers 0..2 full attention, 3..5 sliding
        return "qwen2", dict(
            num_hidden_layers=6,
            use_sliding_window=True,
            sliding_window=SLIDING_WINDOW,
            max_window_layers=3,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        )
    if family == "qwen2_layer_types":
        # an explicit, irregular list that contradicts max_window_layers (which would give
        # F F S S S S): a loader that ignores layer_types gets layers 0 and 4 wrong
        return "qwen2", dict(
            num_hidden_layers=6,
            use_sliding_window=True,
            sliding_window=SLIDING_WINDOW,
            max_window_layers=2,
            layer_types=[
                "sliding_attention",
                "full_attention",
                "sliding_attention",
                "sliding_attention",
                "full_attention",
                "sliding_attention",
            ],
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        )
    if family == "qwen3":
        return "qwen3", dict(
            head_dim=32,  # != hidden / heads = 16
            attention_bias=False,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        )
    raise KeyError(f"unknown family {family!r}; known: {FAMILIES}")


_CLASSES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
}


def _randomise(
    model, seed: int, norm_spread: float = 0.5, bias_std: float = 0.3, bf16_exact: bool = True
) -> None:
    """Randomise every norm weight and every bias (the default init leaves 1s and 0s)."""
    import torch

    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # input/post_attention layernorm, final norm, q_norm, k_norm
                p.copy_(1.0 + norm_spread * (2 * torch.rand(p.shape, generator=g) - 1))
            elif name.endswith(".bias"):
                p.copy_(bias_std * torch.randn(p.shape, generator=g))
        if bf16_exact:
            # Make every weight exactly representable in bfloat16, so that casting the
            # checkpoint to bf16 loses nothing and a bf16 run differs from the float32
            # reference only by activation rounding (otherwise weight rounding alone costs
            # ~1e-2 relative on these models, the same for any correct engine).
            for p in model.parameters():
                p.copy_(p.to(torch.bfloat16).to(torch.float32))


def make_hf_model(family: str, seed: int = 0, **overrides):
    """Instantiate (not save) a seeded random float32 HF model for a family."""
    import torch
    import transformers

    model_type, kw = family_spec(family)
    cfg_cls, model_cls = (getattr(transformers, n) for n in _CLASSES[model_type])
    kwargs = {**_COMMON, **kw, **overrides}
    cfg = cfg_cls(**kwargs)
    torch.manual_seed(seed)
    model = model_cls(cfg).to(torch.float32).eval()
    _randomise(model, seed)
    return model


def build_model_dir(
    root: str | os.PathLike, family: str, *, seed: int = 0, name: str | None = None, **overrides
) -> Path:
    """Build (once per root/name) a tiny random checkpoint dir: config.json, model.safetensors,
    generation_config.json and the shared tokenizer files.  Returns the directory."""
    root = Path(root)
    out = root / (name or family)
    if (out / "config.json").exists():
        return out
    tok_dir = build_tokenizer_dir(root)
    ids = tokenizer_special_ids(tok_dir)
    assert ids["len"] <= MODEL_VOCAB, ids
    overrides = {
        "bos_token_id": ids["bos_token_id"],
        "eos_token_id": ids["eos_token_id"],
        "pad_token_id": ids["pad_token_id"],
        **overrides,
    }
    with torch_single_thread():
        model = make_hf_model(family, seed=seed, **overrides)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    for f in tok_dir.iterdir():
        shutil.copy(f, tmp / f.name)
    tmp.rename(out)
    return out


# --------------------------------------------------------------------------------------------
# checkpoint variants


def rewrite_config_v4(
    model_dir: str | os.PathLike,
    rope_type_key: str = "type",
    keep_layer_types: bool | None = None,
) -> dict:
    """Rewrite config.json in place into the transformers 4.x schema:
    top-level rope_theta + rope_scaling (type key `rope_type_key`, null for default rope),
    torch_dtype instead of dtype.  layer_types is dropped (4.x before 4.53 never wrote it)
    unless the family relied on an explicit list (keep_layer_types=None: keep it iff it is not
    what max_window_layers would imply).  Returns the new config dict."""
    path = Path(model_dir) / "config.json"
    cfg = json.loads(path.read_text())
    rp = dict(cfg.pop("rope_parameters", None) or {})
    theta = rp.pop("rope_theta", 10000.0)
    rope_type = rp.pop("rope_type", rp.pop("type", "default"))
    new = {}
    for k, v in cfg.items():
        if k == "dtype":
            new["torch_dtype"] = v
        else:
            new[k] = v
    new["rope_theta"] = theta
    if rope_type == "default":
        new["rope_scaling"] = None
    else:
        new["rope_scaling"] = {rope_type_key: rope_type, **rp}
    if "layer_types" in new:
        lt = new["layer_types"]
        if keep_layer_types is None:
            implied = None
            if new.get("model_type") == "qwen2":
                n, mwl = new["num_hidden_layers"], new.get("max_window_layers", 28)
                slide = new.get("use_sliding_window", False) and new.get("sliding_window")
                implied = [
                    "sliding_attention" if slide and i >= mwl else "full_attention"
                    for i in range(n)
                ]
            elif all(t == "full_attention" for t in lt) or (
                new.get("sliding_window") and all(t == "sliding_attention" for t in lt)
            ):
                implied = lt
            keep_layer_types = lt != implied
        if not keep_layer_types:
            del new["layer_types"]
    new["transformers_version"] = "4.46.0"
    path.write_text(json.dumps(new, indent=2))
    return new


def copy_model_dir(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    dst = Path(dst)
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    return dst


def write_sharded_copy(
    src_dir: str | os.PathLike, dst_dir: str | os.PathLike, max_shard_size: str = "200KB"
) -> Path:
    """Copy a checkpoint dir, re-saving the weights as model-0000k-of-0000N.safetensors plus
    model.safetensors.index.json (several shards)."""
    import torch
    from transformers import AutoModelForCausalLM

    src, dst = Path(src_dir), Path(dst_dir)
    if (dst / "model.safetensors.index.json").exists():
        return dst
    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32)
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, max_shard_size=max_shard_size)
    shards = sorted(tmp.glob("model-*-of-*.safetensors"))
    assert (tmp / "model.safetensors.index.json").exists() and len(shards) >= 2, shards
    assert not (tmp / "model.safetensors").exists()
    for f in src.iterdir():  # tokenizer files, generation_config; keep the original config.json
        if f.is_file() and not f.name.endswith(".safetensors") and "index" not in f.name:
            shutil.copy(f, tmp / f.name)
    tmp.rename(dst)
    return dst


# --------------------------------------------------------------------------------------------
# safetensors surgery (for loader error tests)


def rewrite_safetensors_without(path: str | os.PathLike, drop: str) -> None:
    """Rewrite one .safetensors file in place without tensor `drop`."""
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(path))
    assert drop in tensors, sorted(tensors)
    del tensors[drop]
    save_file(tensors, str(path), metadata={"format": "pt"})


def rewrite_safetensors_with(path: str | os.PathLike, name: str, array: np.ndarray) -> None:
    """Rewrite one .safetensors file in place, replacing (or adding) tensor `name`."""
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(path))
    tensors[name] = np.ascontiguousarray(array)
    save_file(tensors, str(path), metadata={"format": "pt"})


# --------------------------------------------------------------------------------------------
# references


@contextlib.contextmanager
def torch_single_thread():
    """Tiny models run ~5x faster on one torch thread than on a contended multi-core pool."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@functools.lru_cache(maxsize=4)
def _load_hf(model_dir: str, dtype: str = "float32"):
    import torch
    from transformers import AutoModelForCausalLM

    # experts_implementation matters for the MoE families only (harmless for dense ones).
    model = AutoModelForCausalLM.from_pretrained(
        model_dir,
        attn_implementation="eager",
        experts_implementation="eager",
        dtype=getattr(torch, dtype),
    )
    return model.eval()


def hf_logits(
    model_dir: str | os.PathLike, seqs: list[list[int]], dtype: str = "float32"
) -> list[np.ndarray]:
    """Eager reference logits, each sequence run alone (no padding): float32 [len, vocab]."""
    import torch

    model = _load_hf(str(model_dir), dtype)
    out = []
    with torch.no_grad(), torch_single_thread():
        for s in seqs:
            ids = torch.tensor([list(s)], dtype=torch.long)
            pos = torch.arange(len(s), dtype=torch.long)[None]
            logits = model(input_ids=ids, position_ids=pos, use_cache=False).logits[0]
            out.append(logits.float().numpy().copy())
    return out


def hf_greedy_with_margins(
    model_dir: str | os.PathLike, prompts: list[list[int]], max_new_tokens: int
) -> tuple[list[list[int]], list[list[float]]]:
    """Greedy continuation of each prompt alone via model.generate (KV cache, eos ignored: the
    eos token may be generated and generation goes on, exactly max_new_tokens come back), plus
    the top-1 minus top-2 logit gap at every step (to tell a real mismatch from a near-tie)."""
    import torch
    from transformers import GenerationConfig

    model = _load_hf(str(model_dir))
    # generate() merges the model's own generation_config (which carries eos_token_id) into the
    # one passed here, where None means "unset": clear it on the model too.
    model.generation_config.eos_token_id = None
    gc = GenerationConfig(
        do_sample=False,
        max_new_tokens=max_new_tokens,
        min_new_tokens=0,
        eos_token_id=None,  # never stop early; eos is NOT masked (that would change the argmax)
        pad_token_id=model.config.pad_token_id,
        bos_token_id=model.config.bos_token_id,
        output_scores=True,
        return_dict_in_generate=True,
    )
    toks, margins = [], []
    with torch.no_grad(), torch_single_thread():
        for p in prompts:
            ids = torch.tensor([list(p)], dtype=torch.long)
            res = model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=gc
            )
            new = res.sequences[0, len(p) :].tolist()
            assert len(new) == max_new_tokens, (len(new), max_new_tokens)
            m = []
            for sc in res.scores:
                top2 = torch.topk(sc[0].float(), 2).values
                m.append(float(top2[0] - top2[1]))
            toks.append(new)
            margins.append(m)
    return toks, margins


def hf_greedy(
    model_dir: str | os.PathLike, prompts: list[list[int]], max_new_tokens: int
) -> list[list[int]]:
    return hf_greedy_with_margins(model_dir, prompts, max_new_tokens)[0]


def hf_greedy_no_cache(
    model_dir: str | os.PathLike, prompt: list[int], max_new_tokens: int
) -> list[int]:
    """Slow cross-check of hf_greedy: full forward pass per step, argmax, no KV cache."""
    seq = list(prompt)
    for _ in range(max_new_tokens):
        seq.append(int(np.argmax(hf_logits(model_dir, [seq])[0][-1])))
    return seq[len(prompt) :]


# --------------------------------------------------------------------------------------------
# inputs


def random_seqs(lengths: list[int], seed: int = 0, vocab: int = MODEL_VOCAB) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, size=n).tolist() for n in lengths]


def rel_err(got: np.ndarray, ref: np.ndarray) -> float:
    """max|got - ref| / max|ref|"""
    got = np.asarray(got, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    return float(np.max(np.abs(got - ref)) / np.max(np.abs(ref)))


# --------------------------------------------------------------------------------------------
# fixture sensitivity: the same reference with one well-known implementation bug injected.
# A parity test is only worth something if each of these moves the logits far more than the
# tolerance; test_hf_parity checks that.

MUTATIONS = {
    # every family
    "gqa_modulo": "query head j uses KV head j % n_kv instead of j // (n_heads / n_kv)",
    "rope_interleaved": "rotate pairs (2i, 2i+1) instead of (i, i + hd/2)",
    "norm_one_plus_w": "RMSNorm multiplies by (1 + w) instead of w",
    "no_final_norm": "final model.norm skipped",
    # family specific
    "no_sliding_window": "sliding window ignored (full causal attention everywhere)",
    "window_off_by_one": "window sees W+1 keys instead of W",
    "rope_scaling_ignored": "llama3 rope scaling ignored (plain rope with the same theta)",
    "layer_types_ignored": "explicit layer_types ignored; max_window_layers rule used instead",
    "no_o_bias": "o_proj bias dropped",
    "no_mlp_bias": "MLP biases dropped",
    "no_qk_norm": "q_norm / k_norm skipped",
    "head_dim_from_hidden": "softmax scale uses hidden/heads instead of head_dim",
}


def mutations_for(family: str) -> list[str]:
    muts = ["gqa_modulo", "rope_interleaved", "norm_one_plus_w", "no_final_norm"]
    if family in ("mistral", "qwen2", "qwen2_layer_types"):
        muts += ["no_sliding_window", "window_off_by_one"]
    if family == "llama3_rope":
        muts.append("rope_scaling_ignored")
    if family == "qwen2_layer_types":
        muts.append("layer_types_ignored")
    if family == "llama_bias":
        muts += ["no_o_bias", "no_mlp_bias"]
    if family == "qwen3":
        muts += ["no_qk_norm", "head_dim_from_hidden"]
    if family == "mistral":
        muts.append("head_dim_from_hidden")
    return muts


def hf_logits_mutated(
    model_dir: str | os.PathLike, seqs: list[list[int]], mutation: str
) -> list[np.ndarray]:
    """Reference logits of the model with one bug injected (see MUTATIONS)."""
    import importlib

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    model_dir = str(model_dir)
    cfg = AutoConfig.from_pretrained(model_dir)
    mod = importlib.import_module(f"transformers.models.{cfg.model_type}.modeling_{cfg.model_type}")
    patches: list[tuple[object, str, object]] = []
    cfg_kw: dict = {}

    if mutation == "gqa_modulo":

        def repeat_kv(x, n_rep):
            return x if n_rep == 1 else x.repeat(1, n_rep, 1, 1)

        patches.append((mod, "repeat_kv", repeat_kv))
    elif mutation == "rope_interleaved":

        def rotate_half(x):
            x1, x2 = x[..., 0::2], x[..., 1::2]
            return torch.stack((-x2, x1), dim=-1).flatten(-2)

        patches.append((mod, "rotate_half", rotate_half))
    elif mutation == "no_sliding_window":
        cfg_kw = dict(sliding_window=None)
        if cfg.model_type == "qwen2":
            cfg_kw["layer_types"] = ["full_attention"] * cfg.num_hidden_layers
    elif mutation == "window_off_by_one":
        cfg_kw = dict(sliding_window=cfg.sliding_window + 1)
    elif mutation == "rope_scaling_ignored":
        theta = cfg.rope_parameters["rope_theta"]
        cfg_kw = dict(rope_parameters={"rope_type": "default", "rope_theta": theta})
    elif mutation == "layer_types_ignored":
        n, mwl = cfg.num_hidden_layers, cfg.max_window_layers
        cfg_kw = dict(
            layer_types=["sliding_attention" if i >= mwl else "full_attention" for i in range(n)]
        )
    elif mutation == "head_dim_from_hidden":
        pass  # applied after load
    elif mutation not in MUTATIONS:
        raise KeyError(mutation)

    if cfg_kw:
        for k, v in cfg_kw.items():
            setattr(cfg, k, v)
    model = AutoModelForCausalLM.from_pretrained(
        model_dir,
        config=cfg,
        attn_implementation="eager",
        experts_implementation="eager",
        dtype=torch.float32,
    ).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if mutation == "norm_one_plus_w" and "norm" in name:
                p.add_(1.0)
            if mutation == "no_o_bias" and name.endswith("o_proj.bias"):
                p.zero_()
            if mutation == "no_mlp_bias" and name.endswith("_proj.bias") and ".mlp." in name:
                p.zero_()
    if mutation == "no_final_norm":
        model.model.norm = torch.nn.Identity()
    if mutation == "no_qk_norm":
        for layer in model.model.layers:
            layer.self_attn.q_norm = torch.nn.Identity()
            layer.self_attn.k_norm = torch.nn.Identity()
    if mutation == "head_dim_from_hidden":
        for layer in model.model.layers:
            layer.self_attn.scaling = (cfg.hidden_size // cfg.num_attention_heads) ** -0.5

    with contextlib.ExitStack() as stack:
        for obj, attr, new in patches:
            old = getattr(obj, attr)
            setattr(obj, attr, new)
            stack.callback(setattr, obj, attr, old)
        out = []
        with torch.no_grad(), torch_single_thread():
            for s in seqs:
                ids = torch.tensor([list(s)], dtype=torch.long)
                out.append(model(input_ids=ids, use_cache=False).logits[0].float().numpy().copy())
    return out
