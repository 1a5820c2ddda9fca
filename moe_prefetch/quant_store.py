"""Quantized (or down-cast) experts, built once per model and reloaded from a cache directory.

`--expert-dtype int8|int4` quantizes every expert matrix group-wise (quant.py) the first time a model is
loaded, with a progress bar, and writes the result as safetensors files (one per MoE layer) plus a
`meta.json` under the cache directory (MOE_PREFETCH_CACHE, else $XDG_CACHE_HOME/moe_prefetch, else
~/.cache/moe_prefetch). `bf16|fp16` keep the experts in that dtype the same way. Later loads reuse the
files when meta.json matches: the format version, the quantization spec, the model's MoE layers and
expert shapes, and the identity of the source checkpoint (each safetensors file's name, size and
modification time, and a digest of its header). Anything else (a rewritten checkpoint, another spec,
a half-written store) is rebuilt, never used: a store is built in a temporary directory and moved in
place only when complete.

The stored experts are served like any checkpoint (checkpoint.Checkpoint over the cache directory),
through a byte layout (families.layout): each expert is one uint8 buffer holding its codes, scales
and zeros (and biases, unquantized), so a slot holds a quantized expert and one copy moves it. The
compute path turns a slot's parts back into weights just before use (`Dequantizer`), exactly as
quant.dequantize does, so the output equals the unmodified model with its expert weights replaced
by the dequantized ones, token for token.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from . import quant
from .checkpoint import Checkpoint
from .errors import MoePrefetchError
from .families import ExpertLayout, ExpertPart, TensorSource
from .progress import progress_bar as tqdm

FORMAT = "moe_prefetch.experts.v2"  # v2: quant.py rounds scales up (nothing clipped), int4-sym uses [-8, 7]
EXPERT_DTYPES = ("auto", "bf16", "fp16", "int8", "int4")
_CASTS = {"bf16": torch.bfloat16, "fp16": torch.float16}
_ALIGN = 16  # bytes: every part starts on a 16-byte boundary of its expert's buffer
log = logging.getLogger("moe_prefetch")


def cache_root() -> Path:
    if os.environ.get("MOE_PREFETCH_CACHE"):
        return Path(os.environ["MOE_PREFETCH_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "moe_prefetch"


@dataclass(frozen=True)
class ExpertFormat:
    """How experts are kept: a quantization spec, or a plain dtype (bf16/fp16 down-casts)."""

    name: str                      # int8 | int4 | bf16 | fp16
    spec: quant.QuantSpec | None = None
    dtype: torch.dtype | None = None

    @classmethod
    def of(cls, name: str, group_size: int = 128) -> "ExpertFormat":
        if name in _CASTS:
            return cls(name, dtype=_CASTS[name])
        if name in quant.KINDS:
            try:
                return cls(name, spec=quant.QuantSpec.from_name(name, group_size=group_size))
            except ValueError as e:
                raise MoePrefetchError(f"--expert-group-size {group_size}: {e}") from None
        raise MoePrefetchError(f"unknown expert dtype {name!r}: use one of {', '.join(EXPERT_DTYPES)}")

    @property
    def tag(self) -> str:
        if self.spec is None:
            return self.name
        return f"{self.spec.name}-g{self.spec.group_size}"

    def parts(self, shape_out_in: tuple[int, int]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        if self.spec is None:
            return {"w": (shape_out_in, self.dtype)}
        return quant.plan(shape_out_in, self.spec)

    def encode(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        """w [out, in] -> its stored parts."""
        if self.spec is None:
            return {"w": w.to(self.dtype).contiguous()}
        return quant.quantize(w, self.spec)

    def decode(self, parts: dict[str, torch.Tensor], out_dtype: torch.dtype, in_features: int) -> torch.Tensor:
        """The stored parts -> w [out, in] in out_dtype (quant.dequantize: exact, deterministic)."""
        if self.spec is None:
            return parts["w"].to(out_dtype)
        return quant.dequantize(parts, self.spec, out_dtype, in_features)


def _matrix(shape: tuple[int, ...], transposed: bool) -> tuple[int, int] | None:
    """The [out, in] a 2-D expert parameter is quantized as (groups run along the input dimension)."""
    if len(shape) != 2:
        return None
    return (shape[1], shape[0]) if transposed else (shape[0], shape[1])


class QuantizedExperts:
    """The experts of `adapter`'s model in `fmt`, as ExpertStore reads them (moe_layers, num_experts,
    expert_layout), from the stored files."""

    def __init__(self, adapter, fmt: ExpertFormat, source_dtypes: dict[str, torch.dtype]):
        self.adapter = adapter
        self.fmt = fmt
        self.num_experts = adapter.num_experts
        self.transposed = adapter.flags["is_transposed"]
        self._parts: list[tuple[str, str, tuple[int, ...], torch.dtype, int]] = []  # (param, part, shape, dtype, offset)
        offset = 0
        for name, shape in adapter.params:
            mat = _matrix(shape, self.transposed)
            parts = fmt.parts(mat).items() if mat else [("raw", (shape, source_dtypes[name]))]
            for part, (pshape, dtype) in parts:
                self._parts.append((name, part, tuple(pshape), dtype, offset))
                offset += -(-(_numel(pshape) * dtype.itemsize) // _ALIGN) * _ALIGN
        self.expert_nbytes = offset

    def moe_layers(self) -> list[int]:
        return self.adapter.moe_layers()

    @staticmethod
    def key(layer: int, expert: int, name: str, part: str) -> str:
        return f"{layer}.{expert}.{name}.{part}"

    def expert_layout(self, checkpoint, layer: int, expert: int) -> ExpertLayout:
        return ExpertLayout(tuple(ExpertPart(f"{n}.{p}", shape, off, (TensorSource(self.key(layer, expert, n, p)),), dtype)
                                  for n, p, shape, dtype, off in self._parts))

    def meta(self) -> dict:
        return dict(format=self.fmt.tag, parts=[[n, p, list(s), str(d), o] for n, p, s, d, o in self._parts],
                    layers=self.moe_layers(), experts=self.num_experts)

    def dequantizer(self, compute_dtype: torch.dtype) -> "Dequantizer":
        return Dequantizer(self, compute_dtype)


class Dequantizer:
    """A slot's parts (views named "param.part") -> the expert's weights by parameter name, in the
    compute dtype, as the unquantized experts module would hold them (transposed ones transposed back)."""

    def __init__(self, experts: QuantizedExperts, compute_dtype: torch.dtype):
        self.fmt = experts.fmt
        self.dtype = compute_dtype
        self.transposed = experts.transposed
        self.params = [(name, _matrix(shape, experts.transposed), shape) for name, shape in experts.adapter.params]

    def __call__(self, views: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {}
        for name, mat, _shape in self.params:
            if mat is None:
                out[name] = views[f"{name}.raw"].to(self.dtype)
                continue
            parts = {k.rsplit(".", 1)[1]: v for k, v in views.items() if k.rsplit(".", 1)[0] == name}
            w = self.fmt.decode(parts, self.dtype, mat[1])  # [out, in]
            out[name] = w.t().contiguous() if self.transposed else w
        return out


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def source_identity(checkpoint: Checkpoint) -> str:
    """What a stored copy is tied to: every safetensors file of the checkpoint by name, size, modification
    time and header digest (a checkpoint rewritten in place changes at least the time)."""
    h = hashlib.sha256()
    for path in sorted({info.file for info in checkpoint.tensors.values()}):
        st = path.stat()  # ctime cannot be set back (cp -p / rsync -a / touch -r keep mtime, not ctime)
        h.update(f"{path.name}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}:{st.st_ino}:".encode())
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            h.update(f.read(min(n, 1 << 26)))
    return h.hexdigest()[:32]


def store_dir(checkpoint: Checkpoint, fmt: ExpertFormat) -> Path:
    where = hashlib.sha256(str(checkpoint.directory.resolve()).encode()).hexdigest()[:16]
    return cache_root() / "experts" / f"{checkpoint.directory.resolve().name}-{where}-{fmt.tag}"


def _expert_matrix(adapter, checkpoint: Checkpoint, layout: ExpertLayout, name: str) -> torch.Tensor:
    part = next(p for p in layout.parts if p.name == name)
    pieces = []
    for s in part.sources:
        t = checkpoint.tensor(s.key)
        pieces.append(t[s.index] if s.index is not None else t)
    return torch.cat([p.reshape(-1) for p in pieces]).view(part.shape) if len(pieces) > 1 else pieces[0].reshape(part.shape)


def ensure(adapter, checkpoint: Checkpoint, fmt: ExpertFormat, progress: bool = True) -> tuple[Checkpoint, QuantizedExperts]:
    """The stored experts of `checkpoint` in `fmt`: reused when meta.json matches, else (re)built. Processes
    building the same store take turns (a lock file beside it); file-system errors become one line."""
    import fcntl

    directory = store_dir(checkpoint, fmt)
    try:
        directory.parent.mkdir(parents=True, exist_ok=True)
        with open(directory.parent / f"{directory.name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            return _ensure(adapter, checkpoint, fmt, progress)
    except OSError as e:
        raise MoePrefetchError(f"cannot store {fmt.tag} experts under {directory.parent} ({type(e).__name__}: "
                               f"{e.strerror or e}); set MOE_PREFETCH_CACHE to a writable directory with room") from None


def describe(adapter, checkpoint: Checkpoint, fmt: ExpertFormat) -> QuantizedExperts:
    """The stored experts' layout and size, before anything is built (the memory plan needs them)."""
    first = adapter.expert_layout(checkpoint, adapter.moe_layers()[0], 0)
    source_dtypes = {p.name: checkpoint.info(p.sources[0].key).dtype for p in first.parts}
    return QuantizedExperts(adapter, fmt, source_dtypes)


def _ensure(adapter, checkpoint: Checkpoint, fmt: ExpertFormat, progress: bool) -> tuple[Checkpoint, QuantizedExperts]:
    experts = describe(adapter, checkpoint, fmt)
    directory = store_dir(checkpoint, fmt)
    expected = dict(store=FORMAT, source=source_identity(checkpoint), **experts.meta())
    meta_path = directory / "meta.json"
    if meta_path.is_file():
        try:
            found = json.loads(meta_path.read_text())
        except (OSError, json.JSONDecodeError):
            found = None
        if found == expected:
            try:
                return Checkpoint(directory), experts
            except MoePrefetchError as e:
                log.warning("stored %s experts in %s are unreadable (%s); rebuilding them", fmt.tag, directory, e)
        else:
            why = "another checkpoint or a changed one" if found and found.get("source") != expected["source"] else \
                "another format or model shape"
            log.warning("stored %s experts in %s were made from %s; rebuilding them", fmt.tag, directory, why)
    _build(adapter, checkpoint, experts, directory, expected, progress)
    return Checkpoint(directory), experts


def _build(adapter, checkpoint: Checkpoint, experts: QuantizedExperts, directory: Path, meta: dict, progress: bool) -> None:
    from safetensors.torch import save_file

    tmp = Path(tempfile.mkdtemp(prefix=directory.name + ".", dir=directory.parent))
    try:
        for layer in tqdm(adapter.moe_layers(), desc=f"storing experts as {experts.fmt.tag}", unit="layer",
                          disable=not progress):
            tensors = {}
            for e in range(adapter.num_experts):
                layout = adapter.expert_layout(checkpoint, layer, e)
                for name, shape in adapter.params:
                    w = _expert_matrix(adapter, checkpoint, layout, name)  # as stored: [out, in] or [in, out]
                    mat = _matrix(shape, experts.transposed)
                    if mat is None:
                        tensors[experts.key(layer, e, name, "raw")] = w.contiguous()
                        continue
                    w = w.t() if experts.transposed else w
                    for part, t in experts.fmt.encode(w.float()).items():
                        tensors[experts.key(layer, e, name, part)] = t.contiguous()
            save_file(tensors, str(tmp / f"layer-{layer:05d}.safetensors"))
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        if directory.exists():
            shutil.rmtree(directory)
        tmp.rename(directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # nothing half-written is left behind (Ctrl-C included)
        raise
