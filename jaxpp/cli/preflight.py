"""Checks before loading: every flag that can only be wrong is refused against the model dir
(its config.json, tokenizer files and chat template) with exit 2, before the slow load and
before any line runs. Reads JSON files only: no weights, no tokenizer, no jax.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from jaxpp.cli.errors import RequestError, UsageError, one_line
from jaxpp.cli.limits import Limits
from jaxpp.config import ModelConfig, SamplingParams, read_json_object
from jaxpp.partition import layer_partition

# SamplingParams field -> the flag that sets it, for messages that name what to fix.
_FLAG_OF = {
    "max_tokens": "--max-tokens",
    "min_tokens": "--min-tokens",
    "temperature": "--temperature",
    "top_k": "--top-k",
    "top_p": "--top-p",
    "min_p": "--min-p",
    "stop": "--stop",
    "stop_token_ids": "--stop-token-ids",
    "logprobs": "--logprobs",
    "presence_penalty": "--presence-penalty",
    "frequency_penalty": "--frequency-penalty",
    "repetition_penalty": "--repetition-penalty",
}


def model_config(model: Path) -> ModelConfig:
    try:
        return ModelConfig.from_dir(model)
    except ValueError as e:
        raise UsageError(one_line(e)) from None


def check_flags(
    args: argparse.Namespace, model: Path, config: ModelConfig, defaults: dict, limits: Limits
) -> None:
    """Refuse what the model makes impossible: nothing here depends on an input line."""
    positions = config.max_position_embeddings
    if args.max_model_len is not None and args.max_model_len > positions:
        raise UsageError(
            f"--max-model-len {args.max_model_len} is beyond the model's {positions} positions "
            "(max_position_embeddings in config.json)"
        )
    if args.max_model_len is not None and args.max_model_len < 2:
        raise UsageError(f"--max-model-len {args.max_model_len} is invalid: expected >= 2")
    if args.logprobs is not None:
        if args.logprobs > config.vocab_size:
            raise UsageError(
                f"--logprobs {args.logprobs} is above the vocabulary size {config.vocab_size}"
            )
        if args.logprobs > limits.max_logprobs:
            raise UsageError(
                f"--logprobs {args.logprobs} is above --max-logprobs {limits.max_logprobs}"
            )
    outside = [t for t in args.stop_token_ids if not 0 <= t < config.vocab_size]
    if outside:
        raise UsageError(
            f"--stop-token-ids has {outside[0]}, outside the vocabulary [0, {config.vocab_size})"
        )
    if args.num_microbatches is not None and args.num_microbatches < args.pp:
        raise UsageError(
            f"--num-microbatches {args.num_microbatches} is below --pp {args.pp}: the decode "
            "ring needs at least one micro-batch per stage"
        )
    try:
        layer_partition(config.num_layers, args.pp, args.layer_partition)
    except ValueError as e:
        raise UsageError(f"--pp / --layer-partition: {one_line(e)}") from None
    try:
        limits.check_sampling(defaults)
        SamplingParams(**defaults)
    except (RequestError, ValueError) as e:
        raise UsageError(f"{_flag_named_in(str(e))}: {one_line(e)}") from None
    tokenizer_config = _tokenizer_config(model)
    has_tokenizer = tokenizer_config is not None or (model / "tokenizer.json").is_file()
    # `generate` has --prompt and --chat; `serve` reads token ids or text from each request.
    if getattr(args, "prompt", None) is not None and not has_tokenizer:
        raise UsageError(f"model dir {model} has no tokenizer files: --prompt needs one")
    if getattr(args, "chat", False) and not has_chat_template(model, tokenizer_config or {}):
        raise UsageError(
            f"--chat needs a chat template, and the tokenizer of {model} has none "
            "(tokenizer_config.json 'chat_template' or chat_template.jinja)"
        )


def has_chat_template(model: Path, tokenizer_config: dict) -> bool:
    """Where transformers looks for one: tokenizer_config.json, or a file of its own."""
    if tokenizer_config.get("chat_template"):
        return True
    return (model / "chat_template.jinja").is_file() or (model / "chat_template.json").is_file()


def _tokenizer_config(model: Path) -> dict | None:
    try:
        return read_json_object(model / "tokenizer_config.json")
    except ValueError as e:
        raise UsageError(one_line(e)) from None


def _flag_named_in(message: str) -> str:
    """The flag behind "SamplingParams.<field>=... is invalid", or behind a limit's message."""
    named = re.match(r"SamplingParams\.(\w+)=", message)
    if named:
        return _FLAG_OF.get(named.group(1), "bad sampling flag")
    mentioned = [
        field for field in _FLAG_OF if field.replace("_", " ") in message.replace("_", " ")
    ]
    return _FLAG_OF[max(mentioned, key=len)] if mentioned else "bad sampling flag"
