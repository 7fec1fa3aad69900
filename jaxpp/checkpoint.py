"""Read a Hugging Face safetensors checkpoint: tensors by name, as memory-mapped views.

Nothing is ever unpickled: only `*.safetensors` files are read, through a small reader of our own
(an 8-byte header length, a JSON header, raw little-endian data) that memory-maps the file. Every
header is validated before any weight moves, so a missing tensor, a wrong shape or a truncated
file fails fast with the file and tensor named.

A view costs nothing until a block of it is copied out (`Checkpoint.copy`), which counts the
bytes: a process that loads only its own shards reads only those (see loading.py).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn,  # FP8 weights (quantization.py)
    "F8_E5M2": ml_dtypes.float8_e5m2,  # read only to be refused by name
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


class CheckpointError(ValueError):
    """A checkpoint directory or file that cannot be loaded; the message names the culprit."""


class SafetensorsFile:
    """Validated header + lazy memory-mapped access to one .safetensors file."""

    def __init__(self, path: Path):
        self.path = path
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes)")
            (header_len,) = struct.unpack("<Q", head)
            if header_len > size - 8:
                raise CheckpointError(
                    f"{path}: corrupt or truncated safetensors header "
                    f"(header says {header_len} bytes, file has {size})"
                )
            try:
                header = json.loads(f.read(header_len))
                assert isinstance(header, dict)
            except (ValueError, AssertionError):
                raise CheckpointError(f"{path}: corrupt safetensors header (not JSON)") from None
        self.data_start = 8 + header_len
        self.tensors: dict[str, tuple[np.dtype, tuple[int, ...], int]] = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            try:
                dtype = np.dtype(_DTYPES[info["dtype"]])
                shape = tuple(int(d) for d in info["shape"])
                begin, end = (int(o) for o in info["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise CheckpointError(f"{path}: corrupt header entry for tensor {name!r}") from None
            needed = int(np.prod(shape)) * dtype.itemsize
            if end - begin != needed:
                raise CheckpointError(
                    f"{path}: tensor {name!r} has {end - begin} bytes, "
                    f"but shape {shape} {info['dtype']} needs {needed}"
                )
            if self.data_start + end > size:
                raise CheckpointError(
                    f"{path}: truncated file: tensor {name!r} ends at byte "
                    f"{self.data_start + end} but the file has {size} bytes"
                )
            self.tensors[name] = (dtype, shape, self.data_start + begin)

    def view(self, name: str) -> np.ndarray:
        dtype, shape, offset = self.tensors[name]
        if int(np.prod(shape)) == 0:
            return np.zeros(shape, dtype)
        return np.memmap(self.path, dtype=dtype, mode="r", offset=offset, shape=shape)


class Checkpoint:
    """All tensors of a HF model directory, by name."""

    def __init__(self, model_dir: str | Path):
        self.dir = Path(model_dir)
        if not self.dir.is_dir():
            raise CheckpointError(f"{self.dir}: model directory not found")
        self.weight_map: dict[str, str] = {}  # tensor -> shard file, from the index if any
        files = self._weight_files()
        self.where: dict[str, SafetensorsFile] = {}
        self.bytes_read = 0  # tensor bytes copied out of the files so far
        self.total_bytes = sum(path.stat().st_size for path in files)
        for path in files:
            st = SafetensorsFile(path)
            for name in st.tensors:
                self.where[name] = st

    def _weight_files(self) -> list[Path]:
        index = self.dir / "model.safetensors.index.json"
        if index.is_file():
            try:
                self.weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError):
                raise CheckpointError(f"{index}: corrupt index (no weight_map)") from None
            files = [self.dir / f for f in sorted(set(self.weight_map.values()))]
            for f in files:
                if not f.is_file():
                    raise CheckpointError(
                        f"{index} lists {f.name}, which is missing from {self.dir}"
                    )
            return files
        files = sorted(self.dir.glob("*.safetensors"))
        if files:
            return files
        pickles = sorted(p.name for p in self.dir.glob("*.bin")) + sorted(
            p.name for p in self.dir.glob("*.pt*")
        )
        if pickles:
            raise CheckpointError(
                f"{self.dir}: holds only pickle weights ({', '.join(pickles)}); jaxpp never "
                "unpickles (it can run code). Convert them to .safetensors first."
            )
        raise CheckpointError(f"{self.dir}: no *.safetensors weight files found")

    def has(self, name: str) -> bool:
        return name in self.where

    def view(self, name: str) -> np.ndarray:
        """Tensor `name` as a read-only memory map: nothing is read until it is copied."""
        self.require(name)
        return self.where[name].view(name)

    def copy(self, block: np.ndarray) -> np.ndarray:
        """A block of a tensor's view, copied out of the file (and counted)."""
        out = np.array(block)
        self.bytes_read += out.nbytes
        return out

    def path_of(self, name: str) -> Path:
        return self.where[name].path

    def require(self, name: str) -> None:
        if name not in self.where:
            if name in self.weight_map:
                raise CheckpointError(
                    f"{self.dir / self.weight_map[name]}: tensor {name!r} is missing, although "
                    "model.safetensors.index.json lists it in this file"
                )
            raise CheckpointError(f"{self.dir}: tensor {name!r} is missing from the checkpoint")
