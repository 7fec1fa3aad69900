"""Broken checkpoints fail fast with a message that names the culprit (tensor, file, field).

Checkpoint problems raise jaxpp.CheckpointError (a ValueError); config problems ValueError.
Every case starts from a fresh copy of a tiny valid checkpoint and breaks one thing.
"""

import json
import pickle
import re
import struct
from pathlib import Path

import numpy as np
import pytest
from hf_fixtures import (
    copy_model_dir,
    rewrite_safetensors_with,
    rewrite_safetensors_without,
    write_sharded_copy,
)

import jaxpp

TENSOR = "model.layers.1.mlp.up_proj.weight"


@pytest.fixture(scope="module")
def base_dir(hf_model):
    return hf_model("llama")


@pytest.fixture
def model_dir(base_dir, tmp_path):
    return copy_model_dir(base_dir, tmp_path / "model")


@pytest.fixture(scope="module")
def sharded_base(base_dir, tmp_path_factory):
    return write_sharded_copy(base_dir, tmp_path_factory.mktemp("errors_sharded") / "model")


def _load(d: Path):
    return jaxpp.LLM(str(d), dtype="float32")


def _shape_re(shape) -> str:
    """Matches (64, 128) or [64, 128] or 64x128."""
    return r"[\[(]?\s*" + r"\s*[,x×]\s*".join(str(n) for n in shape) + r"\s*[\])]?"


def test_checkpoint_error_is_a_value_error():
    assert issubclass(jaxpp.CheckpointError, ValueError)


def test_valid_copy_loads(model_dir):
    """The base of every case below loads (so each failure is due to the one thing broken)."""
    _load(model_dir)


# --- tensors -------------------------------------------------------------------------------------


def test_missing_tensor_names_tensor_and_location(model_dir):
    rewrite_safetensors_without(model_dir / "model.safetensors", TENSOR)
    with pytest.raises(jaxpp.CheckpointError, match=re.escape(TENSOR)) as e:
        _load(model_dir)
    print(e.value)
    assert str(model_dir) in str(e.value), f"message does not name the directory: {e.value}"


def test_missing_tensor_in_sharded_checkpoint(sharded_base, tmp_path):
    d = copy_model_dir(sharded_base, tmp_path / "model")
    index = json.loads((d / "model.safetensors.index.json").read_text())
    shard = index["weight_map"][TENSOR]
    rewrite_safetensors_without(d / shard, TENSOR)  # the index still claims it is there
    with pytest.raises(jaxpp.CheckpointError, match=re.escape(TENSOR)) as e:
        _load(d)
    print(e.value)
    assert str(d) in str(e.value)


def test_index_naming_a_missing_shard(sharded_base, tmp_path):
    d = copy_model_dir(sharded_base, tmp_path / "model")
    index = json.loads((d / "model.safetensors.index.json").read_text())
    shard = index["weight_map"][TENSOR]
    (d / shard).unlink()
    with pytest.raises(jaxpp.CheckpointError, match=re.escape(shard)) as e:
        _load(d)
    print(e.value)


@pytest.mark.parametrize(
    "name,bad_shape,expected",
    [
        ("model.layers.2.mlp.down_proj.weight", (64, 96), (64, 128)),
        # Same element count, transposed: a loader that only reshapes would accept it.
        ("model.layers.2.mlp.down_proj.weight", (128, 64), (64, 128)),
        ("model.layers.0.self_attn.k_proj.weight", (48, 64), (32, 64)),
        ("model.embed_tokens.weight", (300, 64), (320, 64)),
        ("lm_head.weight", (320, 32), (320, 64)),
        ("model.norm.weight", (63,), (64,)),
    ],
)
def test_wrong_shape_names_tensor_expected_and_found(model_dir, name, bad_shape, expected):
    rng = np.random.default_rng(0)
    rewrite_safetensors_with(
        model_dir / "model.safetensors", name, rng.standard_normal(bad_shape).astype(np.float32)
    )
    with pytest.raises(jaxpp.CheckpointError, match=re.escape(name)) as e:
        _load(model_dir)
    msg = str(e.value)
    print(msg)
    assert "shape" in msg
    assert re.search(_shape_re(bad_shape), msg), f"found shape {bad_shape} not in: {msg}"
    assert re.search(_shape_re(expected), msg), f"expected shape {expected} not in: {msg}"


# --- files ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("cut", [1, 4096, "header"])
def test_truncated_file_names_the_file(model_dir, cut):
    f = model_dir / "model.safetensors"
    data = f.read_bytes()
    if cut == "header":  # cut inside the JSON header
        (header_len,) = struct.unpack("<Q", data[:8])
        data = data[: 8 + header_len // 2]
    else:
        data = data[:-cut]
    f.write_bytes(data)
    with pytest.raises(jaxpp.CheckpointError, match=re.escape(str(f))) as e:
        _load(model_dir)
    print(e.value)


def test_truncated_shard_names_the_shard(sharded_base, tmp_path):
    d = copy_model_dir(sharded_base, tmp_path / "model")
    shard = sorted(d.glob("model-*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(jaxpp.CheckpointError, match=re.escape(shard.name)) as e:
        _load(d)
    print(e.value)


@pytest.mark.parametrize("where", ["length", "json", "tiny"])
def test_corrupt_header_names_the_file(model_dir, where):
    f = model_dir / "model.safetensors"
    data = bytearray(f.read_bytes())
    if where == "length":  # garbage in the 8-byte header length
        data[:8] = b"\xde\xad\xbe\xef\xde\xad\xbe\xef"
    elif where == "json":  # right length, garbage JSON
        data[8:40] = bytes(range(200, 232))
    else:  # a few garbage bytes and nothing else
        data = bytearray(b"garbage")
    f.write_bytes(bytes(data))
    with pytest.raises(jaxpp.CheckpointError, match=re.escape(str(f))) as e:
        _load(model_dir)
    print(e.value)


class _Boom:
    """Unpickling this creates a marker file: proof that someone unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickle_bin_weights_are_refused_and_never_unpickled(model_dir):
    for f in model_dir.glob("*.safetensors"):
        f.unlink()
    marker = model_dir.parent / "UNPICKLED"
    (model_dir / "pytorch_model.bin").write_bytes(pickle.dumps(_Boom(marker)))
    with pytest.raises(jaxpp.CheckpointError, match=r"(?i)pickle|\.bin") as e:
        _load(model_dir)
    msg = str(e.value)
    print(msg)
    assert "safetensors" in msg, f"message should say safetensors are needed: {msg}"
    assert "pytorch_model.bin" in msg or str(model_dir) in msg
    assert not marker.exists(), "the loader unpickled pytorch_model.bin"


def test_no_weights_at_all(model_dir):
    for f in model_dir.glob("*.safetensors"):
        f.unlink()
    with pytest.raises(jaxpp.CheckpointError, match=r"safetensors") as e:
        _load(model_dir)
    print(e.value)
    assert str(model_dir) in str(e.value)


def test_missing_model_dir(tmp_path):
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "nope"))):
        _load(tmp_path / "nope")


# --- config --------------------------------------------------------------------------------------


def test_missing_config_json(model_dir):
    (model_dir / "config.json").unlink()
    with pytest.raises(ValueError, match=r"config\.json") as e:
        _load(model_dir)
    print(e.value)


def test_config_json_not_json(model_dir):
    (model_dir / "config.json").write_text("{ not json")
    with pytest.raises(ValueError, match=r"config\.json") as e:
        _load(model_dir)
    print(e.value)


@pytest.mark.parametrize(
    "arch,model_type,named",
    [
        (["GPT2LMHeadModel"], "gpt2", "GPT2LMHeadModel"),
        (None, "gpt2", "gpt2"),  # no architectures field: judged by model_type
        (["GPT2LMHeadModel"], "llama", "GPT2LMHeadModel"),
    ],
)
def test_unsupported_architecture_lists_supported(model_dir, arch, model_type, named):
    path = model_dir / "config.json"
    cfg = json.loads(path.read_text())
    if arch is None:
        cfg.pop("architectures", None)
    else:
        cfg["architectures"] = arch
    cfg["model_type"] = model_type
    path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=re.escape(named)) as e:
        _load(model_dir)
    msg = str(e.value)
    print(msg)
    for supported in (
        "LlamaForCausalLM",
        "MistralForCausalLM",
        "Qwen2ForCausalLM",
        "Qwen3ForCausalLM",
    ):
        assert supported in msg, f"message should list the supported architectures: {msg}"
