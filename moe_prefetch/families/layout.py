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
    """One parameter of an expert (a matrix or a bias), stored at `offset` (elements) in the expert's
    flat buffer. Its content is the concatenation, along dim 0, of `sources`."""

    name: str
    shape: tuple[int, ...]
    offset: int
    sources: tuple[TensorSource, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class ExpertLayout:
    """The parts of one expert (same for every expert of a model, up to the source names)."""

    parts: tuple[ExpertPart, ...]

    @property
    def numel(self) -> int:
        return sum(p.numel for p in self.parts)

    def views(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Split a flat [numel] buffer into named parameters (views, no copy)."""
        return {p.name: flat[p.offset:p.offset + p.numel].view(p.shape) for p in self.parts}
