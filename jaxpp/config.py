"""Model and sampling configuration.

`ModelConfig` is read from a Hugging Face `config.json` — never executed, never `trust_remote_code`.
Both schemas are accepted: transformers 4.x (`rope_theta` + `rope_scaling`, `torch_dtype`) and
5.x (`rope_parameters`, `dtype`). Every family-specific switch ends up as a plain field here so
that the decoder in model.py has one code path driven by config, not one copy per family.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from jaxpp.quantization import FP8Scheme, engine_scheme, parse_quantization

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Qwen2MoeForCausalLM": "qwen2_moe",
    "Qwen3MoeForCausalLM": "qwen3_moe",
}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    # llama3 rope scaling: (factor, low_freq_factor, high_freq_factor, original_max_positions)
    rope_llama3: tuple[float, float, float, int] | None
    # linear rope scaling factor (positions divided by it); 1.0 = none
    rope_linear_factor: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool
    # per-layer sliding window (0 = full attention)
    sliding_windows: tuple[int, ...]
    # mixture of experts (0 experts = dense model)
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0
    norm_topk_prob: bool = False
    moe_layers: tuple[bool, ...] = ()
    dtype: str = "float32"
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    quantization: FP8Scheme | None = None  # FP8 weights: the checkpoint's, or on load

    @property
    def is_moe_layer(self) -> tuple[bool, ...]:
        return self.moe_layers or (False,) * self.num_layers

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> ModelConfig:
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise ValueError(f"{path}: config.json not found; expected a Hugging Face model dir")
        raw = read_json_object(path)
        if raw is None:
            raise ValueError(f"{path}: config.json is not a JSON object")
        config = cls.from_hf_dict(raw, source=str(path))
        generation = Path(model_dir) / "generation_config.json"
        # A broken generation_config.json only loses its recommendations (generation_defaults
        # ignores it too); an eos_token_id it does state must be usable.
        eos = (read_json_object(generation, broken_ok=True) or {}).get("eos_token_id")
        if eos is not None:
            ids = _token_ids(eos, f"{generation}: eos_token_id")
            config = dataclasses.replace(
                config, eos_token_ids=tuple(dict.fromkeys(config.eos_token_ids + ids))
            )
        return config

    @classmethod
    def from_hf_dict(cls, raw: dict[str, Any], source: str = "config.json") -> ModelConfig:
        if not isinstance(raw, dict):
            raise ValueError(f"{source}: expected a JSON object, got {type(raw).__name__}")
        archs = raw.get("architectures") or [None]
        arch = archs if isinstance(archs, str) else archs[0] if isinstance(archs, list) else archs
        model_type = raw.get("model_type")
        supported = ", ".join(SUPPORTED_ARCHITECTURES)
        if arch is not None and arch not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"{source}: unsupported architecture {arch!r} (model_type {model_type!r}); "
                f"supported: {supported}"
            )
        family = SUPPORTED_ARCHITECTURES.get(arch) if arch else model_type
        if family not in SUPPORTED_ARCHITECTURES.values() or (
            model_type is not None and model_type != family
        ):
            raise ValueError(
                f"{source}: unsupported model_type {model_type!r} (architecture {arch!r}); "
                f"supported: {supported}"
            )

        def need(key: str, minimum: int = 1) -> int:
            if key not in raw or raw[key] is None:
                raise ValueError(f"{source}: required field {key!r} is missing")
            return _config_int(raw, key, source, minimum)

        def optional(key: str, default: int, minimum: int = 0) -> int:
            return _config_int(raw, key, source, minimum) if raw.get(key) else default

        hidden = need("hidden_size")
        num_heads = need("num_attention_heads")
        num_layers = need("num_hidden_layers")
        head_dim = optional("head_dim", hidden // num_heads, minimum=1)
        num_kv_heads = optional("num_key_value_heads", num_heads, minimum=1)
        if num_heads % num_kv_heads:
            raise ValueError(
                f"{source}: num_key_value_heads={num_kv_heads} does not divide "
                f"num_attention_heads={num_heads}"
            )
        theta, llama3, linear = _rope(raw, source)

        num_experts = optional("num_experts", 0) or optional("num_local_experts", 0)
        is_moe = family in ("qwen2_moe", "qwen3_moe") and num_experts > 0
        moe_layers: tuple[bool, ...] = ()
        if is_moe:
            step = optional("decoder_sparse_step", 1, minimum=1)
            dense_only = set(raw.get("mlp_only_layers") or [])
            moe_layers = tuple(
                i not in dense_only and (i + 1) % step == 0 for i in range(num_layers)
            )

        eos = raw.get("eos_token_id")
        eos_ids = () if eos is None else _token_ids(eos, f"{source}: eos_token_id")
        has_bias = bool(raw.get("attention_bias", False))
        return cls(
            model_type=family,
            vocab_size=need("vocab_size"),
            hidden_size=hidden,
            intermediate_size=optional("intermediate_size", 0),
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            rms_norm_eps=_config_float(raw, "rms_norm_eps", source, 1e-6),
            rope_theta=theta,
            rope_llama3=llama3,
            rope_linear_factor=linear,
            max_position_embeddings=optional("max_position_embeddings", 4096, minimum=1),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            # Qwen2 always carries q/k/v bias, Qwen2-MoE unless qkv_bias says otherwise;
            # Llama and Qwen3 follow attention_bias.
            qkv_bias=family == "qwen2"
            or (family == "qwen2_moe" and raw.get("qkv_bias", True))
            or has_bias,
            o_bias=has_bias and family in ("llama", "qwen3", "qwen3_moe"),
            mlp_bias=bool(raw.get("mlp_bias", False)) and family == "llama",
            qk_norm=family in ("qwen3", "qwen3_moe"),
            sliding_windows=_sliding_windows(raw, family, num_layers, source),
            num_experts=num_experts if is_moe else 0,
            num_experts_per_tok=optional("num_experts_per_tok", 0),
            moe_intermediate_size=optional("moe_intermediate_size", 0),
            shared_expert_intermediate_size=optional("shared_expert_intermediate_size", 0),
            norm_topk_prob=bool(raw.get("norm_topk_prob", False)),
            moe_layers=moe_layers,
            dtype=str(raw.get("dtype") or raw.get("torch_dtype") or "float32"),
            bos_token_id=raw.get("bos_token_id"),
            eos_token_ids=eos_ids,
            pad_token_id=raw.get("pad_token_id"),
            quantization=parse_quantization(raw.get("quantization_config"), source),
        )


def with_quantization(cfg: ModelConfig, quantization: str | None) -> ModelConfig:
    """`cfg` as an engine asked for `quantization` (None or "fp8") runs it: an FP8 checkpoint
    keeps its scheme, a float one asked for "fp8" is quantized on load (quantization.py)."""
    return dataclasses.replace(cfg, quantization=engine_scheme(cfg.quantization, quantization))


def read_json_object(path: Path, broken_ok: bool = False) -> dict[str, Any] | None:
    """The JSON object in `path`; None if the file is missing (or, with broken_ok, is not a
    JSON object). Otherwise a broken file is a ValueError that names it."""
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        if broken_ok:
            return None
        raise ValueError(f"{path}: not UTF-8 ({e.reason} at byte {e.start})") from None
    except (json.JSONDecodeError, RecursionError) as e:
        if broken_ok:
            return None
        raise ValueError(f"{path}: {path.name} is not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        if broken_ok:
            return None
        raise ValueError(f"{path}: expected a JSON object, got {type(raw).__name__}")
    return raw


def _config_int(raw: dict[str, Any], key: str, source: str, minimum: int) -> int:
    value = raw[key]
    if not _is_int(value) and not (_is_num(value) and value == int(value)):
        raise ValueError(f"{source}: {key}={value!r} is invalid: expected an integer")
    if value < minimum:
        raise ValueError(f"{source}: {key}={value!r} is invalid: expected >= {minimum}")
    return int(value)


def _config_float(raw: dict[str, Any], key: str, source: str, default: float) -> float:
    value = raw.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{source}: {key}={value!r} is invalid: expected a number")
    return float(value)


def _token_ids(value: Any, name: str) -> tuple[int, ...]:
    """An HF token-id field: one id or a list of ids."""
    ids = value if isinstance(value, list) else [value]
    if not all(_is_int(t) and t >= 0 for t in ids):
        raise ValueError(f"{name}={value!r} is invalid: expected a token id or a list of them")
    return tuple(ids)


def _rope(raw: dict[str, Any], source: str) -> tuple[float, tuple | None, float]:
    """(theta, llama3 params or None, linear factor) from either config schema."""
    params = raw.get("rope_parameters") or {}
    scaling = raw.get("rope_scaling") or {}
    for key, value in (("rope_parameters", params), ("rope_scaling", scaling)):
        if not isinstance(value, dict):
            raise ValueError(f"{source}: {key}={value!r} is invalid: expected an object")
    spec = {**scaling, **params}
    theta = _config_float(
        {"rope_theta": params.get("rope_theta") or raw.get("rope_theta") or 10000.0},
        "rope_theta",
        source,
        10000.0,
    )
    kind = spec.get("rope_type") or spec.get("type") or "default"

    def number(key: str) -> float:
        if key not in spec:
            raise ValueError(f"{source}: rope scaling {kind!r} needs {key!r}, which is missing")
        return _config_float(spec, key, source, 0.0)

    if kind == "default":
        return theta, None, 1.0
    if kind == "linear":
        return theta, None, number("factor")
    if kind == "llama3":
        orig = spec.get("original_max_position_embeddings") or raw.get("max_position_embeddings")
        if not _is_int(orig) or orig < 1:
            raise ValueError(
                f"{source}: rope scaling 'llama3' needs original_max_position_embeddings, "
                f"got {orig!r}"
            )
        return (
            theta,
            (number("factor"), number("low_freq_factor"), number("high_freq_factor"), orig),
            1.0,
        )
    raise ValueError(
        f"{source}: unsupported rope scaling type {kind!r} (supported: llama3, linear)"
    )


def _sliding_windows(
    raw: dict[str, Any], family: str, num_layers: int, source: str
) -> tuple[int, ...]:
    window = _config_int(raw, "sliding_window", source, 0) if raw.get("sliding_window") else 0
    if family == "mistral":
        return (window,) * num_layers
    if family in ("qwen2", "qwen2_moe", "qwen3", "qwen3_moe"):
        if not raw.get("use_sliding_window", False) or window == 0:
            return (0,) * num_layers
        layer_types = raw.get("layer_types")
        if layer_types:
            if not isinstance(layer_types, list) or len(layer_types) != num_layers:
                raise ValueError(
                    f"{source}: layer_types is invalid: expected a list of {num_layers} "
                    "entries (num_hidden_layers)"
                )
            return tuple(window if t == "sliding_attention" else 0 for t in layer_types)
        first = (
            _config_int(raw, "max_window_layers", source, 0)
            if "max_window_layers" in raw
            else num_layers
        )
        if family == "qwen2_moe":  # transformers' own default rule for this family
            return tuple(window if (i + 1) % 2 and i < first else 0 for i in range(num_layers))
        return tuple(window if i >= first else 0 for i in range(num_layers))
    return (0,) * num_layers


@dataclasses.dataclass(frozen=True)
class StructuredOutputsParams:
    """A constraint on a request's output, with vLLM's names (exactly one of the first five).

    `json` a JSON schema (a dict, or its text); `regex` a regular expression the whole output
    matches; `choice` one of these strings; `grammar` an EBNF (GBNF `::=`) or Lark grammar
    without recursive rules; `json_object` any JSON object (nested at most
    grammar.JSON_OBJECT_DEPTH deep). `whitespace_pattern` is the regex of the whitespace a
    schema's JSON may hold between tokens (default `[ ]?`); `disable_any_whitespace` makes it
    none. docs/structured_outputs.md says what is supported and why.
    """

    json: str | dict | None = None
    regex: str | None = None
    choice: Sequence[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    disable_any_whitespace: bool = False
    whitespace_pattern: str | None = None

    KINDS = ("json", "regex", "choice", "grammar", "json_object")

    def __post_init__(self) -> None:
        given = [k for k in self.KINDS if getattr(self, k) not in (None, False)]
        if len(given) != 1:
            raise ValueError(
                "structured_outputs needs exactly one of json, regex, choice, grammar, "
                f"json_object; got {given or 'none'}"
            )
        if isinstance(self.json, dict):  # canonical text: one cache key per schema
            object.__setattr__(self, "json", json.dumps(self.json))  # key order is output order
        checks = [
            ("json", self.json is None or isinstance(self.json, str), "a JSON schema"),
            ("regex", self.regex is None or isinstance(self.regex, str), "a string"),
            ("grammar", self.grammar is None or isinstance(self.grammar, str), "a string"),
            ("json_object", self.json_object in (None, True, False), "a bool"),
            ("disable_any_whitespace", isinstance(self.disable_any_whitespace, bool), "a bool"),
            (
                "whitespace_pattern",
                self.whitespace_pattern is None or isinstance(self.whitespace_pattern, str),
                "a string",
            ),
        ]
        if self.choice is not None:
            choice = _as_tuple(self.choice, "structured_outputs.choice", "a list of strings")
            object.__setattr__(self, "choice", choice)
            checks.append(
                ("choice", bool(choice) and all(isinstance(c, str) for c in choice),
                 "a non-empty list of strings"),
            )  # fmt: skip
        for name, ok, expected in checks:
            if not ok:
                raise ValueError(
                    f"structured_outputs.{name}={getattr(self, name)!r} is invalid: "
                    f"expected {expected}"
                )

    @property
    def kind(self) -> str:
        return next(k for k in self.KINDS if getattr(self, k) not in (None, False))


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling settings, with vLLM's names and meanings."""

    max_tokens: int = 16
    min_tokens: int = 0
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None
    stop: Sequence[str] = ()
    stop_token_ids: Sequence[int] = ()
    ignore_eos: bool = False
    logprobs: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    skip_special_tokens: bool = True
    n: int = 1  # completions of the prompt (sample j seeded seed + j when a seed is given)
    # Guided decoding: every token is drawn from those the constraint allows (grammar.py).
    structured_outputs: StructuredOutputsParams | None = None
    # The logprob of each prompt token given the ones before it (None for the first), with the
    # top-N alternatives, in RequestOutput.prompt_logprobs; with max_tokens=0 the request only
    # scores its prompt (an OpenAI `echo` scoring request: lm-eval's loglikelihood).
    prompt_logprobs: int | None = None
    # Its tokens are read as they are sampled (a server's streaming client): while it runs,
    # every ring call is one round, so each token reaches the host one round after it is
    # sampled instead of up to decode_chunk rounds later.
    stream: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.structured_outputs, dict):  # as dataclasses.asdict sends it
            object.__setattr__(
                self, "structured_outputs", StructuredOutputsParams(**self.structured_outputs)
            )
        if not isinstance(self.structured_outputs, StructuredOutputsParams | None):
            raise ValueError(
                f"SamplingParams.structured_outputs={self.structured_outputs!r} is invalid: "
                "expected a StructuredOutputsParams"
            )
        stop = (self.stop,) if isinstance(self.stop, str) else self.stop
        object.__setattr__(self, "stop", _as_tuple(stop, "stop", "a string or a list of strings"))
        object.__setattr__(
            self,
            "stop_token_ids",
            _as_tuple(self.stop_token_ids, "stop_token_ids", "a list of token ids"),
        )
        # (field, the type it must have, whether its value is fine, what a fine value is),
        # the value checked only once its type is: "max_tokens='ten'" is told it expected an
        # integer, not that it expected >= 1.
        scale = f"in [{_SCALE_RANGE[0]:g}, {_SCALE_RANGE[1]:g}]"
        checks = [
            ("max_tokens", _INT, lambda v: 0 <= v < 2**31, ">= 1 (0 with prompt_logprobs)"),
            ("min_tokens", _INT, lambda v: v >= 0, ">= 0"),
            ("temperature", _NUM, lambda v: v == 0 or _in_scale_range(v), f"0 (greedy) or {scale}"),
            ("top_k", _INT, lambda v: -1 <= v < 2**31, "-1, 0 (off) or >= 1"),
            ("top_p", _NUM, lambda v: 0 < v <= 1, "in (0, 1]"),
            ("min_p", _NUM, lambda v: 0 <= v <= 1, "in [0, 1]"),
            ("seed", _OPTIONAL_INT, lambda v: v is None or v >= 0, "None or >= 0"),
            ("stop", _ANY, lambda v: all(isinstance(s, str) and s for s in v), "non-empty strings"),
            (
                "stop_token_ids",
                _ANY,
                lambda v: all(_is_int(t) and 0 <= t < 2**31 for t in v),
                "token ids (integers in [0, 2**31))",
            ),
            ("ignore_eos", _BOOL, None, ""),
            ("logprobs", _OPTIONAL_INT, lambda v: v is None or v >= 0, "None or >= 0"),
            ("presence_penalty", _NUM, lambda v: -2 <= v <= 2, "in [-2, 2]"),
            ("frequency_penalty", _NUM, lambda v: -2 <= v <= 2, "in [-2, 2]"),
            ("repetition_penalty", _NUM, _in_scale_range, scale),
            ("skip_special_tokens", _BOOL, None, ""),
            ("n", _INT, lambda v: 1 <= v < 2**16, "an integer in [1, 65536)"),
            ("prompt_logprobs", _OPTIONAL_INT, lambda v: v is None or v >= 0, "None or >= 0"),
            ("stream", _BOOL, None, ""),
        ]
        for name, (is_kind, kind), fine, expected in checks:
            value = getattr(self, name)
            if not is_kind(value):
                raise ValueError(
                    f"SamplingParams.{name}={value!r} is invalid: expected {kind}, "
                    f"got {type(value).__name__}"
                )
            if fine is not None and not fine(value):
                raise ValueError(f"SamplingParams.{name}={value!r} is invalid: expected {expected}")
        if self.max_tokens == 0 and self.prompt_logprobs is None:
            raise ValueError(
                "SamplingParams.max_tokens=0 is invalid without prompt_logprobs: expected >= 1 "
                "(0 only scores the prompt)"
            )
        if self.min_tokens > self.max_tokens:
            raise ValueError(
                f"SamplingParams.min_tokens={self.min_tokens} is invalid: "
                f"expected <= max_tokens={self.max_tokens}"
            )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def penalized(self) -> bool:
        """Presence, frequency or repetition penalties: the device counts the row's tokens."""
        return bool(self.presence_penalty or self.frequency_penalty) or (
            self.repetition_penalty != 1.0
        )


@dataclasses.dataclass(frozen=True)
class SpeculativeConfig:
    """Speculative decoding (speculation.py), with vLLM's `--speculative-config` names.

    method "ngram" (prompt lookup) proposes the `num_speculative_tokens` tokens that followed
    the latest earlier occurrence of the sequence's last n-gram (the longest n in
    [prompt_lookup_min, prompt_lookup_max] that occurs); method "draft_model" (given by
    `model`, a small model dir with the target's vocabulary) proposes the draft model's greedy
    continuation of the sequence's last `draft_window` tokens (draft.py). Either way the ring
    verifies them in one trip."""

    num_speculative_tokens: int
    method: str | None = None  # None: "draft_model" when `model` is given, else "ngram"
    model: str | None = None  # the draft model's dir (method "draft_model")
    prompt_lookup_max: int | None = None  # both unset: 5 and 5; one set: the other copies it
    prompt_lookup_min: int | None = None
    # Tokens of its text the draft model reads each tick (jaxpp's own key; draft.py measures it).
    draft_window: int = 32
    # A call verifies drafts only while this many requests or fewer decode (None: always).
    # Default 2, measured (docs/performance.md, demo model on this CPU, retype workload):
    # on/off 1.18x at batch 1 (1.70x at pp=2) but 0.73x at 4, 0.82x at 8, 0.69x at 32: each
    # draft is a decode query of its own that reads its row's pages again.
    disable_by_batch_size: int | None = 2

    def __post_init__(self) -> None:
        method = self.method or ("draft_model" if self.model is not None else "ngram")
        object.__setattr__(self, "method", method)
        if method not in ("ngram", "draft_model"):
            raise ValueError(
                f"speculative_config method={self.method!r} is not supported: jaxpp proposes "
                "with prompt lookup ('ngram') or a draft model ('draft_model', with 'model')"
            )
        _check_positive("num_speculative_tokens", self.num_speculative_tokens)
        if self.disable_by_batch_size is not None:
            _check_positive("disable_by_batch_size", self.disable_by_batch_size)
        if method == "draft_model":
            self._check_draft_model()
            return
        if self.model is not None:
            raise ValueError(
                f"speculative_config model={self.model!r} with method 'ngram': a draft model "
                "is method 'draft_model'"
            )
        high = self.prompt_lookup_max or self.prompt_lookup_min or 5
        low = self.prompt_lookup_min or self.prompt_lookup_max or 5
        for name, value in (("prompt_lookup_max", high), ("prompt_lookup_min", low)):
            _check_positive(name, value)
        if low > high:
            raise ValueError(
                f"speculative_config prompt_lookup_min={low} is more than prompt_lookup_max={high}"
            )
        object.__setattr__(self, "prompt_lookup_max", high)
        object.__setattr__(self, "prompt_lookup_min", low)

    def _check_draft_model(self) -> None:
        if not isinstance(self.model, str) or not self.model:
            raise ValueError(
                "speculative_config method 'draft_model' needs model: the draft model's directory"
            )
        for name in ("prompt_lookup_max", "prompt_lookup_min"):
            if getattr(self, name) is not None:
                raise ValueError(f"speculative_config {name} is prompt lookup's ('ngram'), not "
                                 "the draft model's")  # fmt: skip
        _check_positive("draft_window", self.draft_window)

    @staticmethod
    def of(raw: SpeculativeConfig | dict | str | None) -> SpeculativeConfig | None:
        """From a dict or its JSON text (vLLM's keys; "model": "ngram" means the method)."""
        if raw is None or isinstance(raw, SpeculativeConfig):
            return raw
        if isinstance(raw, str):
            try:
                raw = json.loads(raw)
            except json.JSONDecodeError as e:
                raise ValueError(f"speculative_config is not valid JSON: {e}") from None
        if not isinstance(raw, dict):
            raise ValueError(f"speculative_config must be a JSON object, got {raw!r}")
        raw = dict(raw)
        if raw.get("model") == "ngram":
            raw.pop("model")
            raw.setdefault("method", "ngram")
        known = {f.name for f in dataclasses.fields(SpeculativeConfig)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"speculative_config: unknown keys {unknown} (known: {sorted(known)})")
        if "num_speculative_tokens" not in raw:
            raise ValueError("speculative_config needs num_speculative_tokens")
        return SpeculativeConfig(**raw)


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """An engine's serving and layout settings, validated once: what `LLM`, `jaxpp.plan`, the
    CLI's flags and `jaxpp bench` read (the model-dependent checks, such as a partition's sum
    or max_model_len against the model's positions, are the layout's: layout.make_layout)."""

    dtype: str | None = None  # None: the checkpoint's
    pp: int = 1
    tp: int = 1
    dp: int = 1
    layer_partition: str | Sequence[int] | None = None  # "10,10,12", or $JAXPP_PP_LAYER_...
    num_microbatches: int | None = None  # None: pp
    max_model_len: int | None = None  # None: the model's max positions
    seed: int = 0  # draws the seeds of requests that give none
    max_num_seqs: int | None = None  # None: 256 (rounded up to a multiple of dp x M)
    max_num_batched_tokens: int | None = None  # None: 2048 on a CPU, 8192 on accelerators
    block_size: int = 16  # positions per KV page
    decode_chunk: int = 16  # ring rounds of a call while nothing waits
    kv_cache_memory: int | None = None  # bytes per device; None: 90% of what is free
    enable_prefix_caching: bool = True
    quantization: str | None = None  # "fp8": a float checkpoint's linear weights, on load
    grammar_states: int = 4096  # structured outputs' device pool of automaton states (grammar.py)
    speculative_config: SpeculativeConfig | None = None  # or its dict / JSON text (vLLM's keys)

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "speculative_config", SpeculativeConfig.of(self.speculative_config)
        )
        if isinstance(self.layer_partition, list):
            object.__setattr__(self, "layer_partition", tuple(self.layer_partition))
        for name in ("pp", "tp", "dp", "block_size", "decode_chunk", "grammar_states"):
            _check_positive(name, getattr(self, name))
        for name in ("num_microbatches", "max_model_len", "max_num_seqs",
                     "max_num_batched_tokens", "kv_cache_memory"):  # fmt: skip
            if getattr(self, name) is not None:  # None: the engine decides
                _check_positive(name, getattr(self, name))
        if not isinstance(self.enable_prefix_caching, bool):
            raise ValueError(
                f"enable_prefix_caching={self.enable_prefix_caching!r} is invalid: expected "
                "True or False"
            )
        if not _is_int(self.seed) or self.seed < 0:
            raise ValueError(f"seed={self.seed!r} is invalid: expected an integer >= 0")

    @property
    def devices(self) -> int:
        return self.dp * self.pp * self.tp

    def layout_fields(self) -> tuple:
        """What decides the model's placement over the devices."""
        return (self.dtype, self.pp, self.tp, self.dp, self.layer_partition,
                self.num_microbatches, self.max_model_len, self.quantization)  # fmt: skip


def _check_positive(name: str, value: Any) -> None:
    if not _is_int(value) or value < 1:
        raise ValueError(f"{name}={value!r} is invalid: expected a positive integer")


# generation_config.json key -> SamplingParams field (vLLM's --generation-config auto).
GENERATION_CONFIG_FIELDS = {
    "max_new_tokens": "max_tokens",
    "temperature": "temperature",
    "top_k": "top_k",
    "top_p": "top_p",
    "min_p": "min_p",
    "repetition_penalty": "repetition_penalty",
}


def generation_defaults(model_dir: str | Path) -> dict[str, Any]:
    """Sampling defaults the model's generation_config.json recommends (empty if none).

    Like vLLM, these replace the built-in defaults for requests that do not set the field.
    A value SamplingParams would reject is ignored rather than failing every request.
    """
    raw = read_json_object(Path(model_dir) / "generation_config.json", broken_ok=True) or {}
    found = {
        ours: raw[theirs] for theirs, ours in GENERATION_CONFIG_FIELDS.items() if theirs in raw
    }
    valid = {}
    for name, value in found.items():
        try:
            SamplingParams(**{name: value})
        except (ValueError, TypeError):
            continue
        valid[name] = value
    return valid


def _as_tuple(value: Any, name: str, expected: str) -> tuple:
    """A SamplingParams sequence field as a tuple (None: empty); anything else names the field."""
    if value is None:
        return ()
    if not isinstance(value, str | bytes | dict):
        try:
            return tuple(value)
        except TypeError:
            pass
    raise ValueError(f"SamplingParams.{name}={value!r} is invalid: expected {expected}")


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


# Temperature and repetition penalty divide float32 logits (|logit| < ~100): within this range
# the quotient stays finite; 1e-40 would make it inf and the softmax NaN.
_SCALE_RANGE = (1e-6, 1e6)


def _in_scale_range(x: float) -> bool:
    return _SCALE_RANGE[0] <= x <= _SCALE_RANGE[1]


def _is_num(x: Any) -> bool:
    return _is_int(x) or (isinstance(x, float) and math.isfinite(x))


# The types SamplingParams' fields take: (test, name in messages).
_INT = (_is_int, "an integer")
_OPTIONAL_INT = (lambda x: x is None or _is_int(x), "an integer or None")
_NUM = (_is_num, "a finite number")
_BOOL = (lambda x: isinstance(x, bool), "a bool")
_ANY = (lambda x: True, "")  # sequences: made tuples (or refused) before the checks
