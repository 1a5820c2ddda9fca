"""ExpertStore: where experts live when they are not in the device cache.

Each expert is described by its family's ExpertLayout: one contiguous buffer holding all of its
matrices, so moving an expert is one copy (CUDA) or a few page-cache reads (CPU).
  pinned=True   (CUDA) every expert is packed once, at load, into page-locked host memory (one
                exact-size block per layer, see hostmem.PinnedBlocks); hostmem.plan_host decides
                beforehand whether the host can afford it;
  pinned=False  experts are served straight from the memory-mapped safetensors files (on CUDA
                through the transfer engine's pinned staging ring).
"""
from __future__ import annotations

import torch

from .checkpoint import Checkpoint
from .errors import MoePrefetchError
from .families import ExpertLayout, FamilyAdapter
from .hostmem import PinnedBlocks
from .progress import progress_bar as tqdm  # plain lines when stderr is not a terminal


class ExpertStore:
    def __init__(self, checkpoint: Checkpoint, adapter: FamilyAdapter, dtype: torch.dtype,
                 pinned: bool = False, progress: bool = False, blocks: PinnedBlocks | None = None):
        self.checkpoint = checkpoint
        self.adapter = adapter
        self.dtype = dtype
        self.layers = adapter.moe_layers()
        self.num_experts = adapter.num_experts
        self._layouts: dict[tuple[int, int], ExpertLayout] = {}
        for layer in self.layers:
            for e in range(self.num_experts):
                layout = adapter.expert_layout(checkpoint, layer, e)
                self._check(layout, layer, e)
                self._layouts[layer, e] = layout
        self.layout = self._layouts[self.layers[0], 0]  # names, shapes and offsets are shared
        self.compute_dtype = dtype
        if self.layout.bytewise:  # quantized experts: one uint8 buffer holding codes and scales
            dtype = self.dtype = torch.uint8
        self.numel = self.layout.numel
        self.expert_nbytes = self.numel * torch.empty((), dtype=dtype).element_size()
        self.pinned = pinned
        self._host: dict[tuple[int, int], torch.Tensor] = {}
        # memory-mapped pieces by expert, made once (views of the files: no RAM beyond the page cache)
        self._mapped: dict[tuple[int, int], list[tuple[int, torch.Tensor]]] = {}
        self.blocks: PinnedBlocks | None = None
        if pinned:
            self.blocks = blocks or PinnedBlocks()
            try:
                for layer in tqdm(self.layers, desc="pinning experts", unit="layer", disable=not progress):
                    block = self.blocks.allocate(self.num_experts * self.numel, dtype)  # [E * numel]
                    for e in range(self.num_experts):
                        buf = block[e * self.numel:(e + 1) * self.numel]
                        for offset, src in self._mapped_pieces(layer, e):
                            buf[offset:offset + src.numel()].view(src.shape).copy_(src)
                        self._host[layer, e] = buf
            except BaseException:
                self._host.clear()
                self.blocks.release()  # nothing stays pinned after a failed load (Ctrl-C included)
                raise

    @property
    def store_bytes(self) -> int:
        """All experts at the store dtype: what pinning the whole store takes."""
        return self.total_experts * self.expert_nbytes

    def _check(self, layout: ExpertLayout, layer: int, expert: int) -> None:
        ref = self._layouts.get((self.layers[0], 0), layout)  # every expert must match the first one
        for part, ref_part in zip(layout.parts, ref.parts):
            rows = 0
            for s in part.sources:
                shape = self.checkpoint.info(s.key).shape
                if s.index is not None:
                    if not shape or s.index >= shape[0]:
                        raise MoePrefetchError(f"checkpoint tensor {s.key} has no expert {s.index}")
                    shape = shape[1:]
                if tuple(shape[1:]) != tuple(part.shape[1:]):
                    raise MoePrefetchError(
                        f"checkpoint tensor {s.key} has shape {list(shape)}, expected [*, {', '.join(map(str, part.shape[1:]))}] "
                        f"for expert {expert} of layer {layer}: config.json does not match the weights")
                rows += shape[0]
            if rows != part.shape[0] or part.shape != ref_part.shape:
                raise MoePrefetchError(
                    f"expert {expert} of layer {layer}: {part.name} has {rows} rows in the checkpoint, "
                    f"config.json implies {part.shape[0]}")

    def _mapped_pieces(self, layer: int, expert: int) -> list[tuple[int, torch.Tensor]]:
        pieces = self._mapped.get((layer, expert))
        if pieces is not None:
            return pieces
        pieces, views = [], True
        for part in self._layouts[layer, expert].parts:
            offset = part.offset
            for s in part.sources:
                t = self.checkpoint.tensor(s.key)
                views = views and self.checkpoint.mapped(s.key)
                if s.index is not None:
                    t = t[s.index]
                if part.dtype is not None:  # byte layout: the stored bytes as they are
                    if t.dtype != part.dtype:
                        raise MoePrefetchError(f"checkpoint tensor {s.key} is {t.dtype}, expected {part.dtype}")
                    views = views and t.is_contiguous()  # else a copy is made: not kept
                    t = t.contiguous().reshape(-1).view(torch.uint8)
                pieces.append((offset, t))
                offset += t.numel()
        if views and not self.pinned:
            self._mapped[layer, expert] = pieces
        return pieces

    def pieces(self, layer: int, expert: int) -> list[tuple[int, torch.Tensor]]:
        """(element offset, source tensor) pairs that fill one expert's flat buffer."""
        if self.pinned:
            return [(0, self._host[layer, expert])]
        return self._mapped_pieces(layer, expert)

    @property
    def total_experts(self) -> int:
        return len(self._layouts)
