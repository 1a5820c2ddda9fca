"""Host compute of quantized experts with PyTorch's weight-only CPU kernels: no dequantized copy.

The exact host path (HostExecutor without packs) dequantizes an expert's every matrix into the compute
dtype and multiplies it, as the device does: token-identical, but on a CPU the dequantization costs 5-14x
the matmul (bench/quant_kernels.py). Here each quantized matrix is repacked once, the first time the host
computes that expert, into the layout of a kernel PyTorch ships, and every later host use multiplies the
packed codes directly (the codes are decoded in registers, never written out as a weight matrix):
  int4, groups of 32/64/128/256 dividing `in`, out % 16 == 0: aten._weight_int4pack_mm_for_cpu
  int8, one group per row (group size -1):                    torch._weight_int8pack_mm
  int8 group-wise, g % 16 == 0 dividing `in`:                 one _weight_int8pack_mm per group of columns
                                                              (per-row scales within a group), summed in float32
A matrix no kernel fits (a ragged last group, out % 16 != 0) keeps the exact dequantize-then-mm path.
The kernels round differently from dequantize-then-matmul (a few units in the last place), so this is
lossy against the dequantized reference: `host_kernel="fused"` opts in on the CPU backend; on CUDA,
where host arithmetic differs from the GPU's anyway, it is what `auto` picks.

Memory: the packed copies are about the size of the quantized experts themselves (the same codes in
another order, scales in the compute dtype); they are made lazily, for the experts the host computes,
and at most once each. runtime.load_model charges them to host RAM up front.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from . import quant


class PackedMatrix:
    """One quantized [out, in] matrix in a CPU kernel's layout: __call__(x [n, in]) -> [n, out] in x.dtype."""

    def __init__(self, parts: dict[str, torch.Tensor], spec: quant.QuantSpec, dtype: torch.dtype, in_features: int):
        out, inp = quant.shape_of(parts, spec, in_features)
        # the parts may be views of a reused host buffer (experts gathered from the memory-mapped store),
        # and packing can return tensors that share their storage: the packed copy must own its bytes
        parts = {k: v.clone() for k, v in parts.items()}
        self.shape, self.dtype = (out, inp), dtype
        self.kind, self.parts, self.spec = "dequant", None, spec
        self.packed = None
        self.groups = None  # int8 group-wise: ([G, N, g] int8 codes, [G, N] scales)
        if quant.fused_unsupported((out, inp), spec, "cpu", dtype) is None:
            self.kind, self.packed = "fused", quant.pack_for_kernel(parts, spec, "cpu", dtype, inp)
        elif spec.kind == "int8" and self._per_group_ok(inp, dtype):
            g, G = spec.group_len(inp), spec.num_groups(inp)
            q = parts["q"].reshape(out, G, g).transpose(0, 1).contiguous()  # [G, N, g]
            s = parts["scales"].t().to(dtype).contiguous()  # [G, N]
            self.kind, self.groups = "int8_groups", (q, s)
        else:
            self.parts = parts  # the exact path, per call
        self.nbytes = sum(t.numel() * t.element_size() for t in self._tensors())

    def _per_group_ok(self, inp: int, dtype: torch.dtype) -> bool:
        g = self.spec.group_len(inp)
        return inp % g == 0 and g % 16 == 0 and dtype in quant.FLOAT_DTYPES

    def _tensors(self):
        if self.packed is not None:
            return [self.packed.weight, self.packed.scales]
        if self.groups is not None:
            return list(self.groups)
        return list(self.parts.values())

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """[n, in] -> [n, out] in x's dtype (computed in the dtype the matrix was packed for)."""
        return self._mm(x.to(self.dtype).contiguous()).to(x.dtype)

    def _mm(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "fused":
            return quant.fused_mm(x, self.packed)  # [n, out]
        if self.kind == "int8_groups":
            q, s = self.groups
            G, _, g = q.shape
            xg = x.reshape(x.shape[0], G, g).transpose(0, 1).contiguous()  # [G, n, g]
            y = torch.zeros(x.shape[0], self.shape[0], dtype=torch.float32)  # [n, out]
            for i in range(G):
                y += torch._weight_int8pack_mm(xg[i], q[i], s[i]).float()
            return y.to(self.dtype)
        return torch.mm(x, quant.dequantize(self.parts, self.spec, self.dtype, self.shape[1]).T)


class PackedExpert(dict):
    """One expert's weights by parameter name as the host computes them: quantized matrices as
    PackedMatrix, the rest as tensors. Its type tells expert_mlp not to dequantize."""


class HostPacks:
    """Packed experts for the host executor (used from its one worker thread), made on first use. get()
    returns what expert_mlp reads: each quantized matrix as a PackedMatrix (it computes rows @ W.T
    itself, whatever the family's layout), biases and other parameters in the compute dtype."""

    def __init__(self, dequantizer, dtype: torch.dtype):
        self.dequantizer = dequantizer  # quant_store.Dequantizer: which parameters are matrices, and how
        self.dtype = dtype
        self._experts: dict[tuple[int, int], PackedExpert] = {}
        self.nbytes = 0
        self.fused_matrices = 0
        self.exact_matrices = 0

    def get(self, layer: int, expert: int, views: Callable[[], dict[str, torch.Tensor]]) -> PackedExpert:
        """The packed expert; on first use packs it from the store views that `views()` returns."""
        key = (layer, expert)
        packed = self._experts.get(key)
        if packed is None:
            packed = self._experts[key] = self._pack(views())
            self.nbytes += sum(v.nbytes if isinstance(v, PackedMatrix) else v.numel() * v.element_size()
                               for v in packed.values())
        return packed

    def _pack(self, views: dict[str, torch.Tensor]) -> PackedExpert:
        d = self.dequantizer
        out = PackedExpert()
        for name, mat, _shape in d.params:
            if mat is None:  # a bias or other small parameter, kept unquantized
                out[name] = views[f"{name}.raw"].to(self.dtype).clone()
                continue
            parts = {k.rsplit(".", 1)[1]: v for k, v in views.items() if k.rsplit(".", 1)[0] == name}
            m = PackedMatrix(parts, d.fmt.spec, self.dtype, mat[1])
            if m.kind == "dequant":
                self.exact_matrices += 1
            else:
                self.fused_matrices += 1
            out[name] = m
        return out

