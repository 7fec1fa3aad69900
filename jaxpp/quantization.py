"""FP8 weight formats: what a checkpoint's `quantization_config` says, read into one `FP8Scheme`.

The formats in common use (their tensors and maths: docs/fp8.md):

- compressed-tensors "float-quantized" (llm-compressor): float8_e4m3fn `weight` with a
  `weight_scale` per tensor `(1,)`, per output channel `(out, 1)` or per block
  `(ceil(out/bo), ceil(in/bi))`; static activations carry an `input_scale` `(1,)`, dynamic ones
  nothing. `ignore` names modules (or `re:` regexes) left in the checkpoint's dtype.
- "fp8" (transformers' FineGrainedFP8: DeepSeek-V3, Qwen3-*-FP8): `weight_scale_inv` float32
  `(ceil(out/bo), ceil(in/bi))` for `weight_block_size` [bo, bi] (a scalar without it), dynamic
  activations; `modules_to_not_convert` (or `ignored_layers`) left unquantized.
- "fbgemm_fp8" (Meta's Llama-3.1-*-FP8): `weight_scale` per output channel `(out, 1)`, dynamic
  per-token activations whose scale is capped at `activation_scale_ub`.

Every format dequantizes by MULTIPLYING (w = q * scale, despite the `_inv` name). `LLM(
quantization="fp8")` on a float checkpoint is the "online" scheme: per-output-channel scales
computed as the weights stream from the files (loading.py). Anything else in
`quantization_config` (AWQ, GPTQ, bitsandbytes, int8 compressed-tensors, ...) is refused with
its name; so is a setting of a supported format that jaxpp cannot honour.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

QUANTIZATION_CHOICES = ("fp8",)  # LLM(quantization=...), --quantization
METHODS = ("compressed-tensors", "fp8", "fbgemm_fp8")  # quant_method values read from files


@dataclasses.dataclass(frozen=True)
class FP8Scheme:
    """How a model's linear weights are stored in FP8 (float8_e4m3fn) and how they are scaled."""

    method: str  # one of METHODS, or "online" (quantized on load)
    strategy: str  # "tensor", "channel" or "block": the shape of each weight's scale
    weight_block: tuple[int, int] | None  # (out, in) positions per scale when "block"
    scale_name: str  # "weight_scale" or "weight_scale_inv": <module>.<scale_name>
    # Activations of the FP8 x FP8 GEMM (fp8.py): "dynamic" (a scale per token), "static" (the
    # checkpoint's per-tensor input_scale) or None (a weight-only checkpoint: never quantized).
    activations: str | None
    activation_scale_ub: float | None = None  # fbgemm_fp8: cap of a token's activation scale
    targets: tuple[str, ...] = ("Linear",)  # compressed-tensors: modules quantized
    ignore: tuple[str, ...] = ()  # modules left in the checkpoint's dtype

    def quantizes(self, module: str) -> bool:
        """Whether the checkpoint stores linear module `module` (an HF name such as
        "model.layers.3.mlp.down_proj") in FP8."""
        if self.method == "online":
            return True
        if self.method == "compressed-tensors":
            return any(_ct_match(module, t) for t in self.targets) and not any(
                _ct_match(module, t) for t in self.ignore
            )
        return not any(_hf_skips(module, pattern) for pattern in self.ignore)


ONLINE = FP8Scheme(
    method="online",
    strategy="channel",
    weight_block=None,
    scale_name="",
    activations="dynamic",  # as vLLM's online fp8: per-token activation scales
)


def parse_quantization(raw: Any, source: str) -> FP8Scheme | None:
    """The FP8 scheme of a config.json `quantization_config` (None when there is none)."""
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise ValueError(f"{source}: quantization_config={raw!r} is invalid: expected an object")
    method = raw.get("quant_method")
    if method == "compressed-tensors":
        return _compressed_tensors(raw, source)
    if method == "fp8":
        return _fine_grained_fp8(raw, source)
    if method == "fbgemm_fp8":
        return _fbgemm_fp8(raw, source)
    raise ValueError(
        f"{source}: quantization_config quant_method {method!r} is not supported: jaxpp loads "
        f"FP8 checkpoints ({', '.join(METHODS)}) and quantizes float ones on load "
        "(quantization='fp8')"
    )


def engine_scheme(scheme: FP8Scheme | None, quantization: str | None) -> FP8Scheme | None:
    """The scheme an engine runs: the checkpoint's, or ONLINE for quantization="fp8" on a float
    checkpoint (an FP8 checkpoint asked for "fp8" keeps its own scales)."""
    if quantization is None:
        return scheme
    if quantization not in QUANTIZATION_CHOICES:
        raise ValueError(
            f"quantization={quantization!r} is invalid: expected None or one of "
            f"{list(QUANTIZATION_CHOICES)}"
        )
    return scheme or ONLINE


# --- the formats ------------------------------------------------------------------------------


def _refuse(source: str, what: str) -> ValueError:
    return ValueError(f"{source}: quantization_config {what}: jaxpp does not support it")


def _compressed_tensors(raw: dict, source: str) -> FP8Scheme:
    groups = raw.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise _refuse(source, "(compressed-tensors) has no config_groups")
    schemes, targets = set(), []
    for name, group in groups.items():
        if not isinstance(group, dict):
            raise _refuse(source, f"config_groups.{name}={group!r}")
        fmt = group.get("format") or raw.get("format")
        if fmt != "float-quantized":
            raise _refuse(
                source,
                f"format {fmt!r} (compressed-tensors); jaxpp reads FP8 'float-quantized' weights",
            )
        if group.get("output_activations") is not None:
            raise _refuse(source, f"config_groups.{name}.output_activations (quantized outputs)")
        schemes.add(_ct_group(group, f"config_groups.{name}", source))
        found = group.get("targets") or []
        found = [found] if isinstance(found, str) else found
        targets += _names(found, f"config_groups.{name}.targets", source, prefix="re:")
    if len(schemes) > 1:
        raise _refuse(source, "config_groups with different schemes for different modules")
    [(strategy, block, activations)] = schemes
    return FP8Scheme(
        method="compressed-tensors",
        strategy=strategy,
        weight_block=block,
        scale_name="weight_scale",
        activations=activations,
        targets=tuple(targets),
        ignore=tuple(_names(raw.get("ignore"), "ignore", source, prefix="re:")),
    )


def _ct_group(group: dict, where: str, source: str) -> tuple:
    """(weight strategy, block, activations) of one compressed-tensors config group."""
    weights = group.get("weights")
    if not isinstance(weights, dict):
        raise _refuse(source, f"{where} without weights")
    _check_fp8_args(weights, f"{where}.weights", source)
    strategy = weights.get("strategy", "tensor")
    if strategy not in ("tensor", "channel", "block"):
        raise _refuse(source, f"{where}.weights.strategy {strategy!r}")
    if weights.get("dynamic", False):
        raise _refuse(source, f"{where}.weights.dynamic=true")
    block = _block(weights.get("block_structure"), f"{where}.weights", source)
    if (strategy == "block") != (block is not None):
        raise _refuse(source, f"{where}.weights strategy {strategy!r} with block {block}")
    inputs = group.get("input_activations")
    if inputs is None:
        return strategy, block, None
    if not isinstance(inputs, dict):
        raise _refuse(source, f"{where}.input_activations={inputs!r}")
    _check_fp8_args(inputs, f"{where}.input_activations", source)
    if inputs.get("dynamic", False):
        # Per token: a per-tensor or per-group dynamic scale is coarser, and a per-tensor one
        # would make a request's answer depend on the batch it rides with (docs/fp8.md).
        return strategy, block, "dynamic"
    if inputs.get("strategy", "tensor") != "tensor":
        raise _refuse(source, f"static {where}.input_activations of strategy "
                      f"{inputs.get('strategy')!r}")  # fmt: skip
    return strategy, block, "static"


def _check_fp8_args(args: dict, where: str, source: str) -> None:
    if args.get("type") != "float" or args.get("num_bits") != 8:
        raise _refuse(
            source,
            f"{where}: type {args.get('type')!r} with num_bits {args.get('num_bits')!r}; jaxpp "
            "reads 8-bit float (FP8) weights",
        )
    if not args.get("symmetric", True):
        raise _refuse(source, f"{where}.symmetric=false")


def _fine_grained_fp8(raw: dict, source: str) -> FP8Scheme:
    if raw.get("fmt", "e4m3") != "e4m3":
        raise _refuse(source, f"fmt {raw.get('fmt')!r}; jaxpp reads e4m3 FP8")
    if raw.get("scale_fmt", "float") != "float":
        raise _refuse(source, f"scale_fmt {raw.get('scale_fmt')!r}; jaxpp reads float scales")
    scheme = raw.get("activation_scheme", "dynamic")
    if scheme != "dynamic":
        raise _refuse(source, f"activation_scheme {scheme!r} (fp8)")
    block = _block(raw.get("weight_block_size"), "weight_block_size", source)
    skipped = raw.get("modules_to_not_convert") or raw.get("ignored_layers")
    return FP8Scheme(
        method="fp8",
        strategy="tensor" if block is None else "block",
        weight_block=block,
        scale_name="weight_scale_inv",
        activations="dynamic",
        ignore=tuple(_names(skipped, "modules_to_not_convert", source, prefix="")),
    )


def _fbgemm_fp8(raw: dict, source: str) -> FP8Scheme:
    ub = raw.get("activation_scale_ub")
    if ub is not None and (isinstance(ub, bool) or not isinstance(ub, int | float) or ub <= 0):
        raise ValueError(f"{source}: activation_scale_ub={ub!r} is invalid: expected > 0")
    return FP8Scheme(
        method="fbgemm_fp8",
        strategy="channel",
        weight_block=None,
        scale_name="weight_scale",
        activations="dynamic",
        activation_scale_ub=None if ub is None else float(ub),
        ignore=tuple(
            _names(raw.get("modules_to_not_convert"), "modules_to_not_convert", source, prefix="")
        ),
    )


def _block(value: Any, where: str, source: str) -> tuple[int, int] | None:
    if value is None:
        return None
    if (
        not isinstance(value, list | tuple)
        or len(value) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
    ):
        raise ValueError(f"{source}: {where}={value!r} is invalid: expected [rows, columns]")
    return int(value[0]), int(value[1])


def _names(value: Any, where: str, source: str, prefix: str) -> list[str]:
    """A list of module names; those starting with `prefix` are regexes (every one when it is
    ""), checked here so that a bad one is named before any weight is read."""
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{source}: quantization_config {where}={value!r} is invalid: "
                         "expected a list of module names")  # fmt: skip
    for name in value:
        if name.startswith(prefix):
            try:
                re.compile(name[len(prefix) :])
            except re.error as e:
                raise ValueError(
                    f"{source}: quantization_config {where} entry {name!r} is not a valid "
                    f"regular expression ({e})"
                ) from None
    return value


# --- which modules a list names -----------------------------------------------------------------


def _ct_match(module: str, target: str) -> bool:
    """compressed-tensors' rule: "Linear" (every linear module), a name, or a `re:` regex."""
    if target == "Linear":
        return True
    if target.startswith("re:"):
        return re.match(target[3:], module) is not None
    return module == target


def _hf_skips(module: str, pattern: str) -> bool:
    """transformers' rule for modules_to_not_convert (quantizers_utils.should_convert_module):
    a match from the start up to a module boundary, as a regex, or a suffix."""
    boundary = r"(?:(?<=\.)|(?=\.|$))"
    return bool(re.match(rf"(?:{pattern}){boundary}", module)) or module.endswith(pattern)
