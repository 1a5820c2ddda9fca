"""Weight-only int8 / int4 quantization of expert matrices: storage format, exact reference, fast paths.

Storage format (portable, what is saved to safetensors and moved into device slots): for one matrix
w [out, in] the named parts of `plan(...)`:
  int8 (symmetric)   q int8 [out, in]            scales fp16 [out, G]
  int4 symmetric     q uint8 [out, ceil(in/2)]   scales fp16 [out, G]
  int4 asymmetric    q uint8 [out, ceil(in/2)]   scales fp16 [out, G]   zeros fp16 [out, G]
G = ceil(in / g) groups along the input dimension (g = spec.group_size, or in for group_size=-1).
When g does not divide `in`, the last group is shorter (in - (G-1)*g columns): nothing is padded and
no byte is stored for columns that do not exist.

Codes (every scale is rounded UP to fp16, so a group's extremes are never clipped and |w - w_hat| <= s/2):
  int8 symmetric   q in [-127, 127], scale = max|w| / 127, w ~ q * s
  int4 symmetric   nibble u = q + 8 with q in [-8, 7], scale = max(max(w)/7, -min(w)/8) (the smallest
                   scale that reaches both ends of the group), w ~ (u - 8) * s
  int4 asymmetric  nibble u in [0, 15], integer zero point z in [0, 15] (stored fp16, exact),
                   range [min(w, 0), max(w, 0)] so 0.0 is exactly representable, w ~ (u - z) * s
int4 packing: column 2k in the low nibble and 2k+1 in the high nibble of byte k of its row; for odd
`in` the high nibble of each row's last byte is 0 and ignored (dequantize needs `in_features` then).
int8 asymmetric is refused: symmetric int8-g128 already measures 0.65% relative error on Gaussian weights
(int4-asym-g128 10.1%, int4-sym-g128 11.1%), so a zero point would add bytes and a subtraction for little.

Exactness: `dequantize` is elementwise float32 arithmetic in a fixed order (int -> float32 is exact,
(u - z) and (u - 8) are exact small-integer differences, then one float32 multiply by the scale, then
one round-to-nearest-even cast to out_dtype). Every step is a single correctly rounded IEEE operation,
so the same parts give bit-identical weights on CPU and CUDA.

Fast paths (`linear(..., kernel="fused")`) use kernels PyTorch ships; they need a kernel-specific layout
made by `pack_for_kernel`, kept apart from the storage format. Constraints found on torch 2.13:
  CPU int4  aten._weight_int4pack_mm_for_cpu(x, w, g, sz) with w from
            aten._convert_weight_to_int4pack_for_cpu(codes int32 [N, K], innerKTiles) (innerKTiles is
            ignored on CPU; the layout is blocked by 64 rows): g in {32, 64, 128, 256}, K % g == 0, N % 16 == 0; x 2-D
            contiguous bf16 / fp16 / fp32 and sz [K/g, N, 2] of the same dtype; it computes with
            w = (u - 8) * s + z, so our (u - z) * s becomes s and z' = (8 - z) * s.
  int8      torch._weight_int8pack_mm(x, q int8 [N, K], scales [N]): one scale per output row only,
            x contiguous bf16 / fp16 / fp32, scales of x's dtype, any N. On CPU (AVX512 build tested)
            K % 16 != 0 segfaults with bf16 and returns garbage with fp32 (fp16 was right), so fused int8
            is gated on K % 16 == 0 for every dtype.
  CUDA int4 aten._weight_int4pack_mm(x, w, g, sz) with w from aten._convert_weight_to_int4pack(
            uint8 [N, K/2] (even column in the HIGH nibble), innerKTiles in {2, 4, 8}); x bf16 only,
            sz [K/g, N, 2] bf16, N % 8 == 0, K % (innerKTiles*16) == 0, sm80+. Written from the PyTorch
            source, NOT run here (no GPU on the development machine).
Biases are not quantized: they are tiny and stay in the model dtype beside the parts.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

KINDS = ("int8", "int4")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
TINYGEMM_GROUPS = (32, 64, 128, 256)
KERNELS = ("auto", "dequant", "fused")
_PACK_ROWS = 4096  # a multiple of the CPU int4 layout's 64-row blocks
_CPU_SLICE = 1 << 16  # weights per slice of CPU dequantize (256 KiB of float32)

# "auto" uses the fused kernel for x [n, in] with n <= AUTO_MAX_ROWS[(kind, device type, x dtype)]; absent:
# never. Measured with bench/quant_kernels.py on a 2-core AVX512 Xeon VM, 1 thread, on [2048, 512],
# [512, 1024] and [28672, 4096], fused vs dequant+mm:
#   bf16 n=1    int8 0.06 / 0.82, 9.9 / 190 ms; int4 0.06 / 1.7, 8.7 / 279 ms (fused also beats dense bf16)
#   bf16        int8 wins through n=32 (ties at worst), loses at 64 (0.82 / 0.59 ms); int4 wins through
#               n=64 (0.80 / 1.03, 195 / 300 ms) and loses at 128 (1.56 / 1.03, 392 / 327 ms)
#   fp32 n=1    int8 0.33 / 0.41, 98 / 289 ms; int4 0.87 / 0.86, 203 / 379 ms; from n=8 fused is 3-16x slower
#   fp16        fused is slower already at n=1 (int4 1.4 / 0.8 ms on [512, 1024])
# CUDA is unmeasured, so auto stays on dequant+mm there (PyTorch's CUDA _weight_int8pack_mm is a
# one-thread-per-output kernel; tinygemm int4 needs a measurement before it is picked automatically).
AUTO_MAX_ROWS: dict[tuple[str, str, torch.dtype], int] = {
    ("int8", "cpu", torch.bfloat16): 32,
    ("int4", "cpu", torch.bfloat16): 64,
    ("int8", "cpu", torch.float32): 1,
    ("int4", "cpu", torch.float32): 1,
}


@dataclass(frozen=True)
class QuantSpec:
    """How one expert matrix is quantized: kind, group length along `in` (-1: one group per output row,
    i.e. per-channel), symmetric or not (None: int8 symmetric, int4 asymmetric)."""
    kind: str  # "int8" | "int4"
    group_size: int = 128
    symmetric: bool | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"quantization kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        g = self.group_size
        if isinstance(g, bool) or not isinstance(g, int) or (g < 1 and g != -1):
            raise ValueError(f"group_size must be a positive int (or -1 for one group per output row), "
                             f"got {g!r}")
        if self.symmetric is None:
            object.__setattr__(self, "symmetric", self.kind == "int8")
        elif not isinstance(self.symmetric, bool):
            raise ValueError(f"symmetric must be True, False or None, got {self.symmetric!r}")
        if self.kind == "int8" and not self.symmetric:
            raise ValueError("int8 is symmetric only (q in [-127, 127], no zero point); "
                             "use symmetric=None/True, or kind='int4' for asymmetric")

    @classmethod
    def from_name(cls, name: str, group_size: int = 128, symmetric: bool | None = None) -> QuantSpec:
        """'int8' | 'int4' (also 'int4-sym' / 'int4-asym') -> QuantSpec."""
        base, _, variant = str(name).strip().lower().partition("-")
        if variant not in ("", "sym", "asym"):
            raise ValueError(f"unknown quantization {name!r}: expected int8, int4, int4-sym or int4-asym")
        if variant:
            if symmetric is not None and symmetric != (variant == "sym"):
                raise ValueError(f"{name!r} contradicts symmetric={symmetric}")
            symmetric = variant == "sym"
        return cls(base, group_size, symmetric)

    @property
    def name(self) -> str:
        if self.kind == "int8":
            return "int8"
        return "int4-sym" if self.symmetric else "int4-asym"

    @property
    def bits(self) -> int:
        return 8 if self.kind == "int8" else 4

    def group_len(self, in_features: int) -> int:
        """Columns per group for a matrix with `in_features` inputs (the last group may be shorter)."""
        return in_features if self.group_size == -1 else min(self.group_size, in_features)

    def num_groups(self, in_features: int) -> int:
        return -(-in_features // self.group_len(in_features))


def _check_shape(shape_out_in) -> tuple[int, int]:
    try:
        out, inp = (int(d) for d in shape_out_in)
    except (TypeError, ValueError):
        raise ValueError(f"expected a 2-D shape (out, in), got {shape_out_in!r}") from None
    if out < 1 or inp < 1:
        raise ValueError(f"shape (out, in) must be positive, got {shape_out_in!r}")
    return out, inp


def plan(shape_out_in: tuple[int, int], spec: QuantSpec) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Named parts of one quantized [out, in] matrix: name -> (shape, dtype), in storage order."""
    out, inp = _check_shape(shape_out_in)
    groups = spec.num_groups(inp)
    if spec.kind == "int8":
        parts = {"q": ((out, inp), torch.int8)}
    else:
        parts = {"q": ((out, -(-inp // 2)), torch.uint8)}
    parts["scales"] = ((out, groups), torch.float16)
    if not spec.symmetric:
        parts["zeros"] = ((out, groups), torch.float16)
    return parts


def nbytes(shape_out_in: tuple[int, int], spec: QuantSpec | None, dense_dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes of one matrix in storage format (spec None: dense in `dense_dtype`). No alignment padding."""
    if spec is None:
        out, inp = _check_shape(shape_out_in)
        return out * inp * torch.empty((), dtype=dense_dtype).element_size()
    return sum(math.prod(shape) * torch.empty((), dtype=dt).element_size()
               for shape, dt in plan(shape_out_in, spec).values())


def compression(shape_out_in: tuple[int, int], spec: QuantSpec, dense_dtype: torch.dtype = torch.bfloat16) -> float:
    """Dense bytes / quantized bytes (e.g. ~1.97 for int8-g128 and ~3.76 for int4-asym-g128 against bf16)."""
    return nbytes(shape_out_in, None, dense_dtype) / nbytes(shape_out_in, spec)


def _grouped(t: torch.Tensor, g: int, groups: int) -> torch.Tensor:
    """[out, in] -> [out, groups, g], zero-padding the short last group (a view when g divides in)."""
    pad = groups * g - t.shape[1]
    if pad:
        t = torch.nn.functional.pad(t, (0, pad))
    return t.reshape(t.shape[0], groups, g)


def _fp16_scales(scale: torch.Tensor, what: str) -> torch.Tensor:
    """float32 scales [out, G] -> fp16 as stored, rounded UP to the next fp16 value so the grid still
    reaches the group's extremes (no clipping, so |w - w_hat| <= s/2 for every weight, even where the scale
    is an fp16 subnormal: int8 groups with max|w| < 127 * 2^-14 ~ 7.8e-3). An all-zero group gets the
    smallest subnormal (its codes are then 0 and it dequantizes to exactly 0). Overflow is refused."""
    s16 = scale.to(torch.float16)
    if torch.isinf(s16).any():
        raise ValueError(f"{what}: a group's scale {scale.max().item():.3g} (max|w| / qmax) exceeds the fp16 "
                         "maximum 65504; rescale the weights first")
    up = torch.nextafter(s16, torch.full_like(s16, float("inf")))
    s16 = torch.where(s16.float() < scale, up, s16)
    return torch.where(s16 > 0, s16, up)


def quantize(w: torch.Tensor, spec: QuantSpec) -> dict[str, torch.Tensor]:
    """w [out, in] (any float dtype, any layout; pass w.T for weights stored [in, out]) -> the `plan`
    parts, contiguous, on w's device. Round-to-nearest-even on the stored (fp16) scales."""
    if w.dim() != 2:
        raise ValueError(f"quantize expects a 2-D [out, in] weight, got shape {tuple(w.shape)}")
    if not w.is_floating_point():
        raise ValueError(f"quantize expects a floating-point weight, got {w.dtype}")
    if not torch.isfinite(w).all():
        raise ValueError("quantize: weight has NaN or inf entries")
    out, inp = _check_shape(w.shape)
    g, groups = spec.group_len(inp), spec.num_groups(inp)
    wg = _grouped(w.to(torch.float32), g, groups)  # [out, G, g], zero-padded tail
    if spec.kind == "int8":
        s16 = _fp16_scales(wg.abs().amax(dim=2) / 127, spec.name)  # [out, G]
        q = torch.clamp(torch.round(wg / s16.float()[..., None]), -127, 127)  # [out, G, g]
        zeros = None
    elif spec.symmetric:
        # the smallest scale that reaches both ends: max(w) <= 7 s and min(w) >= -8 s
        scale = torch.maximum(wg.amax(dim=2).clamp(min=0.0) / 7, -wg.amin(dim=2).clamp(max=0.0) / 8)
        s16 = _fp16_scales(scale, spec.name)
        q = torch.clamp(torch.round(wg / s16.float()[..., None]), -8, 7) + 8  # nibble u = q + 8
        zeros = None
    else:
        lo = wg.amin(dim=2).clamp(max=0.0)  # [out, G] range always holds 0.0
        hi = wg.amax(dim=2).clamp(min=0.0)
        s16 = _fp16_scales((hi - lo) / 15, spec.name)
        s = s16.float()
        z = torch.clamp(torch.round(-lo / s), 0, 15)  # [out, G]
        q = torch.clamp(torch.round(wg / s[..., None]) + z[..., None], 0, 15)
        zeros = z.to(torch.float16)
    q = q.reshape(out, groups * g)[:, :inp]  # [out, in]
    if spec.kind == "int8":
        parts = {"q": q.to(torch.int8).contiguous()}
    else:
        parts = {"q": _pack_nibbles(q.to(torch.uint8))}
    parts["scales"] = s16.contiguous()
    if zeros is not None:
        parts["zeros"] = zeros.contiguous()
    return parts


def _pack_nibbles(u: torch.Tensor) -> torch.Tensor:
    """uint8 codes [out, in] in [0, 15] -> [out, ceil(in/2)]: column 2k low nibble, 2k+1 high nibble."""
    if u.shape[1] % 2:
        u = torch.nn.functional.pad(u, (0, 1))
    return (u[:, 0::2] | (u[:, 1::2] << 4)).contiguous()


def unpack_nibbles(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    """uint8 [out, ceil(in/2)] -> codes uint8 [out, in] in [0, 15]."""
    both = torch.stack((packed & 15, packed >> 4), dim=-1)  # [out, cols, 2]
    return both.reshape(packed.shape[0], -1)[:, :in_features]


def shape_of(parts: dict[str, torch.Tensor], spec: QuantSpec, in_features: int | None = None) -> tuple[int, int]:
    """(out, in) of a quantized matrix, checking every part against `plan`. int4 with odd `in` cannot be
    told from its parts: pass in_features (default 2 * packed columns)."""
    q = parts.get("q")
    if q is None or q.dim() != 2:
        raise ValueError("quantized parts need a 2-D 'q' tensor")
    out = q.shape[0]
    if in_features is None:
        in_features = q.shape[1] if spec.kind == "int8" else 2 * q.shape[1]
    expected = plan((out, in_features), spec)
    if set(parts) != set(expected):
        raise ValueError(f"{spec.name} parts must be {sorted(expected)}, got {sorted(parts)}")
    for name, (shape, dtype) in expected.items():
        t = parts[name]
        if tuple(t.shape) != shape or t.dtype != dtype:
            raise ValueError(f"part {name!r} of a {spec.name} g{spec.group_size} [{out}, {in_features}] matrix "
                             f"must be {dtype} {list(shape)}, got {t.dtype} {list(t.shape)}")
    return out, in_features


def dequantize(parts: dict[str, torch.Tensor], spec: QuantSpec, out_dtype: torch.dtype = torch.float32,
               in_features: int | None = None) -> torch.Tensor:
    """The exact reference: parts -> w [out, in] in out_dtype, computed in float32 then cast once.
    On CPU it works in slices of rows (about _CPU_SLICE weights each) written into one output tensor:
    the same elementwise ops on fewer bytes at a time, so the float32 intermediates stay in cache instead
    of being fresh [out, in] allocations (the bits are the same either way; CUDA does one slice)."""
    out, inp = shape_of(parts, spec, in_features)
    rows = out if parts["q"].device.type != "cpu" else max(1, _CPU_SLICE // inp)
    if rows >= out:
        return _dequantize_rows(parts, spec, inp).to(out_dtype)
    w = torch.empty(out, inp, dtype=out_dtype)
    for r in range(0, out, rows):
        w[r:r + rows] = _dequantize_rows({k: v[r:r + rows] for k, v in parts.items()}, spec, inp)  # one cast
    return w


def _dequantize_rows(parts: dict[str, torch.Tensor], spec: QuantSpec, inp: int) -> torch.Tensor:
    """float32 [rows, in] of a slice of rows of the parts."""
    out = parts["q"].shape[0]
    g, groups = spec.group_len(inp), spec.num_groups(inp)
    s = parts["scales"].float()[..., None]  # [rows, G, 1]
    if spec.kind == "int8":
        codes = parts["q"]  # int8 [rows, in]
    else:
        codes = unpack_nibbles(parts["q"], inp)  # uint8 [rows, in]
        if spec.symmetric:
            codes = codes.to(torch.int8) - 8
    cg = _grouped(codes, g, groups)  # [rows, G, g]
    if spec.kind == "int4" and not spec.symmetric:
        w = (cg - parts["zeros"].float()[..., None]).mul_(s)  # float32: exact difference, one rounding
    else:
        w = cg * s  # int -> float32 promotion is exact, one rounding
    w = w.reshape(out, groups * g)
    return w[:, :inp] if groups * g != inp else w


def error_stats(w: torch.Tensor, spec: QuantSpec) -> dict[str, float]:
    """Quantize w and report rel_fro (||w - w_hat||_F / ||w||_F), max_abs, and bytes against bf16."""
    ref = w.detach().to(torch.float32)
    diff = dequantize(quantize(w, spec), spec, torch.float32, w.shape[1]) - ref
    norm = ref.norm().item()
    return {
        "rel_fro": diff.norm().item() / norm if norm > 0 else 0.0,
        "max_abs": diff.abs().max().item(),
        "bytes": nbytes(tuple(w.shape), spec),
        "ratio_vs_bf16": compression(tuple(w.shape), spec),
    }


# ---- fused kernels -------------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class KernelWeights:
    """One matrix in a fused kernel's layout (made by pack_for_kernel; not a storage format)."""
    kernel: str  # "int4_cpu" | "int4_cuda" | "int8"
    # int4_cpu: uint8 [N, K/2] (64-row blocks); int4_cuda: int32 [N/8, K/(16*tiles), 32, tiles/2]; int8: int8 [N, K]
    weight: torch.Tensor
    scales: torch.Tensor  # int4: scales_and_zeros [K/g, N, 2]; int8: [N]; in `dtype`
    group_size: int  # columns per group (int8: K)
    shape: tuple[int, int]  # (out, in)
    dtype: torch.dtype  # the activation dtype the kernel was packed for


def fused_unsupported(shape_out_in: tuple[int, int], spec: QuantSpec, device: torch.device | str,
                      dtype: torch.dtype) -> str | None:
    """Why no shipped kernel can run this matrix on `device` with activations in `dtype` (None: one can)."""
    out, inp = _check_shape(shape_out_in)
    dev = torch.device(device).type
    g = spec.group_len(inp)
    if dev not in ("cpu", "cuda"):
        return f"no fused kernel for device type {dev!r}"
    if spec.kind == "int8":
        if spec.num_groups(inp) != 1:
            return (f"_weight_int8pack_mm takes one scale per output row; this spec has "
                    f"{spec.num_groups(inp)} groups per row (use group_size=-1 for per-channel int8)")
        if dtype not in FLOAT_DTYPES:
            return f"_weight_int8pack_mm needs bf16/fp16/fp32 activations, got {dtype}"
        if dev == "cpu" and inp % 16:
            return (f"_weight_int8pack_mm (CPU) needs in % 16 == 0, got in={inp} (with bf16 it crashes and "
                    "with fp32 it returns wrong values otherwise)")
        return None
    if g not in TINYGEMM_GROUPS or inp % g:
        return (f"int4 kernels need a group of 32/64/128/256 columns dividing in={inp}, got {g}"
                + (" (ragged last group)" if inp % g else ""))
    if dev == "cpu":
        if out % 16:
            return f"_weight_int4pack_mm_for_cpu needs out % 16 == 0, got out={out}"
        if dtype not in FLOAT_DTYPES:
            return f"_weight_int4pack_mm_for_cpu needs bf16/fp16/fp32 activations, got {dtype}"
        return None
    if out % 8:
        return f"_weight_int4pack_mm (CUDA) needs out % 8 == 0, got out={out}"
    if dtype != torch.bfloat16:
        return f"_weight_int4pack_mm (CUDA) takes bf16 activations only, got {dtype}"
    return None


def _tinygemm_scales_and_zeros(parts: dict[str, torch.Tensor], spec: QuantSpec, dtype: torch.dtype) -> torch.Tensor:
    """Our (u - z) * s as tinygemm's (u - 8) * s + zt: zt = (8 - z) * s (0 when symmetric). -> [G, N, 2]."""
    s = parts["scales"].float()  # [N, G]
    zt = torch.zeros_like(s) if spec.symmetric else (8.0 - parts["zeros"].float()) * s
    return torch.stack((s, zt), dim=-1).transpose(0, 1).contiguous().to(dtype)  # [G, N, 2]


def pack_for_kernel(parts: dict[str, torch.Tensor], spec: QuantSpec, device: torch.device | str,
                    dtype: torch.dtype = torch.bfloat16, in_features: int | None = None) -> KernelWeights:
    """Storage parts -> the layout the fused kernel for (spec, device, activation dtype) consumes.
    Raises ValueError (with the reason) where no shipped kernel fits. The CUDA int4 branch is written
    from PyTorch's source and has not been run (no GPU where this was developed)."""
    shape = shape_of(parts, spec, in_features)
    device = torch.device(device)
    reason = fused_unsupported(shape, spec, device, dtype)
    if reason is not None:
        raise ValueError(f"no fused kernel for {spec.name} g{spec.group_size} {list(shape)} on "
                         f"{device.type} with {dtype}: {reason}")
    out, inp = shape
    if spec.kind == "int8":
        scales = parts["scales"].reshape(out).to(device=device, dtype=dtype).contiguous()  # [N]
        return KernelWeights("int8", parts["q"].to(device).contiguous(), scales, inp, shape, dtype)
    g = spec.group_len(inp)
    sz = _tinygemm_scales_and_zeros({k: v.to(device) for k, v in parts.items()}, spec, dtype)  # [G, N, 2]
    codes = unpack_nibbles(parts["q"].to(device), inp)  # uint8 [N, K]
    if device.type == "cpu":
        # the CPU layout is blocked by 64 rows, so packing 4096-row slices gives the same bytes while the
        # int32 copy the converter needs stays at 4096 * in * 4 bytes
        weight = torch.cat([torch.ops.aten._convert_weight_to_int4pack_for_cpu(
            codes[r:r + _PACK_ROWS].to(torch.int32).contiguous(), 1) for r in range(0, out, _PACK_ROWS)])
        return KernelWeights("int4_cpu", weight, sz, g, shape, dtype)
    tiles = 8 if inp % 128 == 0 else 4 if inp % 64 == 0 else 2  # K % (tiles * 16) == 0; g >= 32 divides K
    high_even = ((codes[:, 0::2] << 4) | codes[:, 1::2]).contiguous()  # uint8 [N, K/2], even column high
    weight = torch.ops.aten._convert_weight_to_int4pack(high_even, tiles)
    return KernelWeights("int4_cuda", weight, sz, g, shape, dtype)


def fused_mm(x: torch.Tensor, kw: KernelWeights) -> torch.Tensor:
    """x [n, in] @ W.T through the shipped kernel `kw` was packed for -> [n, out] in x.dtype."""
    if x.dtype != kw.dtype:
        raise ValueError(f"kernel weights were packed for {kw.dtype} activations, got {x.dtype}; "
                         "pack_for_kernel(..., dtype=x.dtype)")
    if x.device != kw.weight.device:
        raise ValueError(f"x is on {x.device}, kernel weights on {kw.weight.device}")
    x = x.contiguous()
    if kw.kernel == "int8":
        y = torch._weight_int8pack_mm(x, kw.weight, kw.scales)
    elif kw.kernel == "int4_cpu":
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, kw.weight, kw.group_size, kw.scales)
    else:
        y = torch.ops.aten._weight_int4pack_mm(x, kw.weight, kw.group_size, kw.scales)
    return y.to(x.dtype)  # a no-op on CPU; guards the unverified CUDA kernels' output dtype


def linear(x: torch.Tensor, parts: dict[str, torch.Tensor], spec: QuantSpec, kernel: str = "auto",
           packed: KernelWeights | None = None) -> torch.Tensor:
    """x [n, in] @ w.T -> [n, out] in x.dtype.

    kernel="dequant": torch.mm(x, dequantize(parts, spec, x.dtype).T), the exact path.
    kernel="fused":   the shipped kernel; uses `packed` (from pack_for_kernel) or packs on the fly
                      (slow: for one-off calls and tests); ValueError where no kernel fits.
    kernel="auto":    fused when `packed` is given, matches x and AUTO_MAX_ROWS allows n rows on this
                      device; otherwise dequant. Never packs on the fly.
    """
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {', '.join(KERNELS)}, got {kernel!r}")
    if x.dim() != 2:
        raise ValueError(f"linear expects x [n, in], got shape {tuple(x.shape)}")
    inp = x.shape[1]
    shape = shape_of(parts, spec, inp)  # the parts must describe an [out, x.shape[1]] matrix
    if packed is not None and packed.shape != shape:
        raise ValueError(f"packed kernel weights are {list(packed.shape)}, the parts {list(shape)}")
    if kernel == "auto":
        limit = AUTO_MAX_ROWS.get((spec.kind, x.device.type, x.dtype), 0)
        usable = (packed is not None and packed.dtype == x.dtype and packed.weight.device == x.device
                  and x.shape[0] <= limit)
        kernel = "fused" if usable else "dequant"
    if kernel == "dequant":
        return torch.mm(x, dequantize(parts, spec, x.dtype, inp).T)
    if packed is None:
        packed = pack_for_kernel(parts, spec, x.device, x.dtype, inp)
    return fused_mm(x, packed)
