"""Where an expert's bytes come from and how they lie in its flat buffer (data, no transformers)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TensorSource:
    """A checkpoint tensor, or row `index` of a fused [num_experts, ...] checkpoint tensor."""

    key: str
    index: int | None = None


@dataclass(frozen=True)
class ExpertPart:
    """One parameter of an expert (a matrix or a bias), stored at `offset` in the expert's flat buffer.
    Its content is the concatenation, along dim 0, of `sources`.

    dtype None: the buffer has the compute dtype, offset and sizes count elements (sources are cast on
    copy). dtype set: a byte layout (quantized experts: int8/uint8 codes, fp16 scales side by side), the
    buffer is uint8, offset counts bytes and sources are copied as they are stored."""

    name: str
    shape: tuple[int, ...]
    offset: int
    sources: tuple[TensorSource, ...]
    dtype: torch.dtype | None = None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def size(self) -> int:
        """Extent in the flat buffer: elements, or bytes in a byte layout."""
        return self.numel if self.dtype is None else self.numel * self.dtype.itemsize


@dataclass(frozen=True)
class ExpertLayout:
    """The parts of one expert (same for every expert of a model, up to the source names)."""

    parts: tuple[ExpertPart, ...]

    @property
    def numel(self) -> int:
        """Size of the flat buffer (elements, or bytes in a byte layout)."""
        return max(p.offset + p.size for p in self.parts)

    @property
    def bytewise(self) -> bool:
        return any(p.dtype is not None for p in self.parts)

    def views(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Split a flat [numel] buffer into named parameters (views, no copy)."""
        return {p.name: (flat[p.offset:p.offset + p.size] if p.dtype is None else
                         flat[p.offset:p.offset + p.size].view(p.dtype)).view(p.shape) for p in self.parts}
