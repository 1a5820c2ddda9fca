"""Checkpoint: zero-copy, validated access to the tensors of a (possibly sharded) safetensors checkpoint.

Tensors are views into read-only-in-practice memory maps (copy-on-write mappings, never written), so
reading an expert costs one copy from the page cache into its destination and nothing is held twice.
Headers are checked up front, so a truncated or corrupt file fails at load with a clear message
instead of crashing half-way through a generation.
"""
from __future__ import annotations

import json
import math
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import MoePrefetchError

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
_MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    nbytes: int


def _read_header(path: Path) -> dict[str, TensorInfo]:
    def corrupt(why: str) -> MoePrefetchError:
        return MoePrefetchError(f"corrupt or truncated safetensors file {path}: {why}")

    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise corrupt("file is shorter than its 8-byte header length")
        (hlen,) = struct.unpack("<Q", raw)
        if hlen > _MAX_HEADER or 8 + hlen > size:
            raise corrupt(f"header length {hlen} does not fit in a {size}-byte file")
        try:
            header = json.loads(f.read(hlen))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise corrupt(f"header is not valid JSON ({e.__class__.__name__})") from None
    if not isinstance(header, dict):
        raise corrupt("header is not a JSON object")
    base = 8 + hlen
    out: dict[str, TensorInfo] = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = _DTYPES[meta["dtype"]]
            shape = tuple(int(s) for s in meta["shape"])
            begin, end = (int(x) for x in meta["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise corrupt(f"bad entry for tensor {name!r}") from None
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if end - begin != nbytes or begin < 0:
            raise corrupt(f"tensor {name!r} has {end - begin} bytes of data for shape {list(shape)}")
        if base + end > size:
            raise corrupt(f"tensor {name!r} ends at byte {base + end} but the file has {size} bytes")
        out[name] = TensorInfo(path, dtype, shape, base + begin, nbytes)
    return out


class Checkpoint:
    """All tensors of a checkpoint directory (model.safetensors, or shards listed in an index)."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        files = self._shard_files()
        self.tensors: dict[str, TensorInfo] = {}
        for path in files:
            self.tensors.update(_read_header(path))
        self._maps: dict[Path, mmap.mmap] = {}

    def _shard_files(self) -> list[Path]:
        d = self.directory
        index = d / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise MoePrefetchError(f"corrupt safetensors index {index}") from None
            files = sorted({d / f for f in weight_map.values()})
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise MoePrefetchError(f"checkpoint {d} is incomplete: missing shard(s) {', '.join(missing[:3])}")
            return files
        single = d / "model.safetensors"
        if single.is_file():
            return [single]
        others = sorted(d.glob("*.safetensors"))
        if others:
            return others
        raise MoePrefetchError(
            f"no safetensors weights in {d} (expected model.safetensors or model.safetensors.index.json); "
            "PyTorch .bin checkpoints are not supported")

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def keys(self):
        return self.tensors.keys()

    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise MoePrefetchError(f"checkpoint {self.directory} has no tensor {name!r}") from None

    def mapped(self, name: str) -> bool:
        """Whether tensor(name) is a view of the mapped file (False: an unaligned payload, copied)."""
        info = self.info(name)
        return info.start % torch.empty((), dtype=info.dtype).element_size() == 0

    def tensor(self, name: str) -> torch.Tensor:
        """A CPU view of tensor `name` backed by the memory-mapped file (no copy)."""
        info = self.info(name)
        mm = self._maps.get(info.file)
        if mm is None:
            with open(info.file, "rb") as f:
                mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
            self._maps[info.file] = mm
        count = math.prod(info.shape)
        if count == 0:
            return torch.empty(info.shape, dtype=info.dtype)
        itemsize = torch.empty((), dtype=info.dtype).element_size()
        if info.start % itemsize:  # unaligned payload: fall back to one copy
            raw = torch.frombuffer(mm, dtype=torch.uint8, count=info.nbytes, offset=info.start).clone()
            return raw.view(info.dtype).view(info.shape)
        return torch.frombuffer(mm, dtype=info.dtype, count=count, offset=info.start).view(info.shape)
