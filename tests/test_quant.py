"""Weight-only int8 / int4 quantization (moe_prefetch.quant): storage plan, round trip, ragged groups, odd
widths, exactness of the reference, the shipped fused CPU kernels against it, and the refusals."""
import dataclasses

import pytest
import torch

from moe_prefetch import quant
from moe_prefetch.quant import QuantSpec

SPECS = [QuantSpec("int8"), QuantSpec("int8", -1), QuantSpec("int4"), QuantSpec("int4", symmetric=True),
         QuantSpec("int4", 32), QuantSpec("int4", -1)]
EPS = {torch.float32: 2.0 ** -24, torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}  # unit roundoff


def gaussian(out, inp, seed=0, scale=0.02):
    return torch.randn(out, inp, generator=torch.Generator().manual_seed(seed)) * scale  # [out, in]


def expand(t, g, inp):
    """[out, G] -> [out, in], each group's value repeated over its columns (independent of quant._grouped)."""
    return t.repeat_interleave(g, dim=1)[:, :inp]


# ---- spec -------------------------------------------------------------------------------------------

def test_spec_defaults_and_names():
    assert QuantSpec("int8").symmetric is True and QuantSpec("int4").symmetric is False
    assert QuantSpec("int8").group_size == 128
    assert QuantSpec.from_name("int4", group_size=64) == QuantSpec("int4", 64, False)
    assert QuantSpec.from_name(" INT4-sym ") == QuantSpec("int4", 128, True)
    assert QuantSpec.from_name("int4-asym").name == "int4-asym"
    assert QuantSpec.from_name("int8").bits == 8 and QuantSpec("int4").bits == 4
    assert QuantSpec("int8", -1).group_len(4096) == 4096 and QuantSpec("int8", -1).num_groups(4096) == 1
    assert QuantSpec("int4", 128).group_len(100) == 100  # a group longer than the row is the row
    assert QuantSpec("int4", 128).num_groups(300) == 3


@pytest.mark.parametrize("make, message", [
    (lambda: QuantSpec("int3"), "kind must be one of int8, int4"),
    (lambda: QuantSpec("int4", 0), "group_size must be a positive int"),
    (lambda: QuantSpec("int4", -2), "group_size must be a positive int"),
    (lambda: QuantSpec("int4", 64.0), "group_size must be a positive int"),
    (lambda: QuantSpec("int4", True), "group_size must be a positive int"),
    (lambda: QuantSpec("int4", 128, "yes"), "symmetric must be True, False or None"),
    (lambda: QuantSpec("int8", 128, False), "int8 is symmetric only"),
    (lambda: QuantSpec.from_name("fp8"), "kind must be one of"),
    (lambda: QuantSpec.from_name("int4-foo"), "expected int8, int4, int4-sym or int4-asym"),
    (lambda: QuantSpec.from_name("int4-sym", symmetric=False), "contradicts"),
])
def test_spec_refusals(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_spec_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        QuantSpec("int8").kind = "int4"


# ---- plan / bytes -----------------------------------------------------------------------------------

def test_plan_exact_shapes_and_dtypes():
    assert quant.plan((2048, 512), QuantSpec("int8")) == {
        "q": ((2048, 512), torch.int8), "scales": ((2048, 4), torch.float16)}
    assert quant.plan((512, 1024), QuantSpec("int4")) == {
        "q": ((512, 512), torch.uint8), "scales": ((512, 8), torch.float16), "zeros": ((512, 8), torch.float16)}
    assert quant.plan((16, 33), QuantSpec("int4", 16, True)) == {  # odd in, ragged last group (1 column)
        "q": ((16, 17), torch.uint8), "scales": ((16, 3), torch.float16)}
    assert quant.plan((4, 300), QuantSpec("int8", -1)) == {
        "q": ((4, 300), torch.int8), "scales": ((4, 1), torch.float16)}
    with pytest.raises(ValueError, match="2-D shape"):
        quant.plan((4,), QuantSpec("int8"))
    with pytest.raises(ValueError, match="must be positive"):
        quant.plan((0, 8), QuantSpec("int8"))


def test_nbytes_and_compression():
    assert quant.nbytes((2048, 512), QuantSpec("int8")) == 2048 * 512 + 2048 * 4 * 2
    assert quant.nbytes((2048, 512), QuantSpec("int4")) == 2048 * 256 + 2 * 2048 * 4 * 2
    assert quant.nbytes((2048, 512), None) == 2048 * 512 * 2
    assert quant.nbytes((2048, 512), None, torch.float32) == 2048 * 512 * 4
    assert quant.compression((28672, 4096), QuantSpec("int8")) == pytest.approx(2 / (1 + 2 / 128))
    assert quant.compression((28672, 4096), QuantSpec("int4")) == pytest.approx(2 / (0.5 + 4 / 128))
    for spec in SPECS:
        parts = quant.quantize(gaussian(48, 200), spec)
        assert quant.nbytes((48, 200), spec) == sum(t.numel() * t.element_size() for t in parts.values())


# ---- quantize / dequantize --------------------------------------------------------------------------

@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.name}-g{s.group_size}")
@pytest.mark.parametrize("shape", [(32, 256), (16, 33), (8, 300), (3, 1)])
def test_quantize_produces_exactly_the_plan(spec, shape):
    parts = quant.quantize(gaussian(*shape), spec)
    assert list(parts) == list(quant.plan(shape, spec))
    for name, (size, dtype) in quant.plan(shape, spec).items():
        assert tuple(parts[name].shape) == size and parts[name].dtype == dtype and parts[name].is_contiguous()
    w_hat = quant.dequantize(parts, spec, torch.float32, shape[1])
    assert w_hat.shape == shape and w_hat.dtype == torch.float32


@pytest.mark.parametrize("spec, bound", [(QuantSpec("int8"), 0.01), (QuantSpec("int4"), 0.12),
                                         (QuantSpec("int4", symmetric=True), 0.12)])
def test_round_trip_error_on_gaussian_weights(spec, bound):
    w = gaussian(512, 1024)
    stats = quant.error_stats(w, spec)
    assert stats["rel_fro"] < bound
    assert stats["rel_fro"] > bound / 4  # it does quantize: 4 / 8 bits cost something
    diff = quant.dequantize(quant.quantize(w, spec), spec) - w
    assert stats["max_abs"] == pytest.approx(diff.abs().max().item())
    assert stats["rel_fro"] == pytest.approx((diff.norm() / w.norm()).item())


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.name}-g{s.group_size}")
def test_every_weight_within_half_a_step(spec):
    """Round-to-nearest on a grid that covers the whole group (scales are rounded up to fp16, so nothing
    clips): |w - w_hat| <= s/2 for every weight, at normal and at subnormal-fp16 scales alike."""
    for scale in (0.02, 1e-4):  # 1e-4: every int8 and int4 scale is an fp16 subnormal
        w = gaussian(64, 300, seed=3, scale=scale)
        parts = quant.quantize(w, spec)
        s = expand(parts["scales"].float(), spec.group_len(300), 300)
        err = (quant.dequantize(parts, spec, in_features=300) - w).abs()
        assert (err <= s * (0.5 + 1e-6)).all()


def test_codes_use_the_documented_ranges():
    w = gaussian(64, 256, seed=1)
    q8 = quant.quantize(w, QuantSpec("int8"))["q"]
    assert q8.min() >= -127  # -128 is never produced
    assert (q8.abs().reshape(64, 2, 128).amax(dim=2) >= 126).all()  # each group's extreme reaches the end
    u = quant.unpack_nibbles(quant.quantize(w, QuantSpec("int4", symmetric=True))["q"], 256)
    assert u.min() == 0 and u.max() == 15  # symmetric int4 uses the whole [-8, 7] (nibble = q + 8)
    parts = quant.quantize(w, QuantSpec("int4"))
    z = parts["zeros"]
    assert torch.equal(z, z.round()) and z.min() >= 0 and z.max() <= 15  # integer zero points
    # 0.0 is exactly representable: a zero weight dequantizes to exactly 0
    w0 = w.clone()
    w0[:, 5] = 0.0
    for spec in SPECS:
        assert (quant.dequantize(quant.quantize(w0, spec), spec)[:, 5] == 0).all()


def test_int4_nibble_order_and_odd_width():
    w = gaussian(4, 5)
    spec = QuantSpec("int4", 128, True)
    parts = quant.quantize(w, spec)
    packed = parts["q"]  # [4, 3]
    u = quant.unpack_nibbles(packed, 5)
    assert torch.equal(packed[:, 0] & 15, u[:, 0]) and torch.equal(packed[:, 0] >> 4, u[:, 1])
    assert (packed[:, 2] >> 4 == 0).all()  # the pad nibble of an odd row
    w_hat = quant.dequantize(parts, spec, in_features=5)
    assert w_hat.shape == (4, 5)
    assert torch.equal(w_hat, ((u.float() - 8) * parts["scales"].float()))


def test_ragged_groups_are_independent_short_groups():
    """in=300, g=128: groups [0,128) [128,256) [256,300); each is quantized on its own columns only."""
    w = gaussian(8, 300, seed=2)
    for spec in (QuantSpec("int8"), QuantSpec("int4"), QuantSpec("int4", symmetric=True)):
        parts = quant.quantize(w, spec)
        assert parts["scales"].shape == (8, 3)
        for k, (a, b) in enumerate([(0, 128), (128, 256), (256, 300)]):
            alone = quant.quantize(w[:, a:b], QuantSpec(spec.kind, b - a, spec.symmetric))
            assert torch.equal(parts["scales"][:, k:k + 1], alone["scales"])
            codes = parts["q"][:, a:b] if spec.kind == "int8" else quant.unpack_nibbles(parts["q"], 300)[:, a:b]
            alone_codes = alone["q"] if spec.kind == "int8" else quant.unpack_nibbles(alone["q"], b - a)
            assert torch.equal(codes, alone_codes)
        # the last scale comes from the 44 tail columns, not from zero padding or earlier columns
        if spec.kind == "int8":
            exact = w[:, 256:].abs().amax(dim=1) / 127
            s = parts["scales"][:, 2]
            below = torch.nextafter(s, torch.zeros_like(s))
            assert (s.float() >= exact).all() and (below.float() < exact).all()  # the fp16 just above


def test_transposed_and_low_precision_inputs():
    w_in_out = gaussian(256, 64)  # an expert stored [in, out]
    spec = QuantSpec("int4")
    a = quant.quantize(w_in_out.T, spec)  # non-contiguous [out, in] view
    b = quant.quantize(w_in_out.T.contiguous(), spec)
    assert all(torch.equal(a[k], b[k]) and a[k].is_contiguous() for k in a)
    for dtype in (torch.bfloat16, torch.float16):
        wd = gaussian(32, 256).to(dtype)
        err = quant.error_stats(wd, QuantSpec("int8"))["rel_fro"]
        assert err < 0.01


def test_zero_and_tiny_groups():
    w = torch.zeros(4, 256)
    w[1] = 1e-9  # far below fp16's smallest subnormal scale
    w[2, :128] = torch.linspace(-1e-5, 1e-5, 128)
    for spec in SPECS:
        parts = quant.quantize(w, spec)
        assert (parts["scales"] > 0).all() and torch.isfinite(parts["scales"]).all()
        w_hat = quant.dequantize(parts, spec)
        assert torch.equal(w_hat[0], torch.zeros(256)) and torch.equal(w_hat[3], torch.zeros(256))
        assert (w_hat - w).abs().max() < 2.0 ** -20


# ---- exactness / determinism ------------------------------------------------------------------------

@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.name}-g{s.group_size}")
def test_dequantize_is_deterministic_and_float32_then_cast(spec):
    w = gaussian(96, 300, seed=4)
    parts = quant.quantize(w, spec)
    again = quant.quantize(w, spec)
    assert all(torch.equal(parts[k], again[k]) for k in parts)
    ref32 = quant.dequantize(parts, spec, torch.float32, 300)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        a = quant.dequantize(parts, spec, dtype, 300)
        b = quant.dequantize({k: v.clone() for k, v in parts.items()}, spec, dtype, 300)
        assert a.dtype == dtype and torch.equal(a.view(torch.uint8), b.view(torch.uint8))  # bit-identical
        assert torch.equal(a, ref32.to(dtype))  # exactly "compute in float32, cast once"
    # an independent formula for the same float32 numbers: one multiply per weight after exact integer work
    g = spec.group_len(300)
    s = expand(parts["scales"].float(), g, 300)
    if spec.kind == "int8":
        direct = parts["q"].float() * s
    elif spec.symmetric:
        direct = (quant.unpack_nibbles(parts["q"], 300).float() - 8) * s
    else:
        direct = (quant.unpack_nibbles(parts["q"], 300).float() - expand(parts["zeros"].float(), g, 300)) * s
    assert torch.equal(ref32, direct)


def test_dequantize_independent_of_thread_count():
    spec = QuantSpec("int4")
    parts = quant.quantize(gaussian(512, 512), spec)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = quant.dequantize(parts, spec, torch.bfloat16)
        torch.set_num_threads(2)
        two = quant.dequantize(parts, spec, torch.bfloat16)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one.view(torch.int16), two.view(torch.int16))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_dequantize_bit_identical_on_cuda():
    for spec in SPECS:
        parts = quant.quantize(gaussian(64, 300), spec)
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            cpu = quant.dequantize(parts, spec, dtype, 300)
            gpu = quant.dequantize({k: v.cuda() for k, v in parts.items()}, spec, dtype, 300).cpu()
            assert torch.equal(cpu, gpu)


def test_storage_parts_survive_safetensors(tmp_path):
    from safetensors.torch import load_file, save_file
    spec = QuantSpec("int4")
    parts = quant.quantize(gaussian(32, 256), spec)
    save_file(parts, str(tmp_path / "e.safetensors"))
    loaded = load_file(str(tmp_path / "e.safetensors"))
    assert torch.equal(quant.dequantize(loaded, spec), quant.dequantize(parts, spec))


# ---- fused kernels ----------------------------------------------------------------------------------

# Tolerance of fused against the dequant reference, relative to max|x @ w_hat.T| (computed in float64):
# both paths round the output to the activation dtype once and accumulate in float32, and the bf16/fp16
# fused kernels also round the scales (and tinygemm's float zeros) to that dtype. Measured worst cases
# over 48 cases per kernel and dtype (shapes [256,512] [2048,512] [512,1024], n in 1/5/8/33, int8
# per-channel, int4 g32/128/256 asym and g128 sym): fp32 1.6e-6, fp16 9.6e-4 (1.97 eps), bf16 7.7e-3
# (1.98 eps), with eps the unit roundoff; the fused result alone stays within 1.6 eps of the float64
# product (fp32: 27 eps = 1.6e-6, accumulation over K~1e3). So: 3 eps for 16-bit dtypes and 1e-5 for fp32,
# and 2 eps (fp32: 1e-5) against float64.
TOL = {torch.float32: 1e-5, torch.float16: 3 * EPS[torch.float16], torch.bfloat16: 3 * EPS[torch.bfloat16]}
FUSED = [QuantSpec("int8", -1), QuantSpec("int4", 128), QuantSpec("int4", 32, True), QuantSpec("int4", 256)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("spec", FUSED, ids=lambda s: f"{s.name}-g{s.group_size}")
def test_fused_cpu_kernel_matches_dequant_reference(spec, dtype):
    for (out, inp), n in [((256, 512), 1), ((64, 1024), 5), ((48, 256), 33)]:
        w = gaussian(out, inp, seed=out + n)
        parts = quant.quantize(w, spec)
        x = torch.randn(n, inp, generator=torch.Generator().manual_seed(n)).to(dtype)  # [n, in]
        packed = quant.pack_for_kernel(parts, spec, "cpu", dtype)
        fused = quant.linear(x, parts, spec, "fused", packed)
        ref = quant.linear(x, parts, spec, "dequant")
        truth = x.double() @ quant.dequantize(parts, spec, torch.float64).T  # [n, out]
        assert fused.shape == (n, out) and fused.dtype == dtype
        assert torch.equal(ref, torch.mm(x, quant.dequantize(parts, spec, dtype).T))
        scale = truth.abs().max()
        assert (fused.double() - ref.double()).abs().max() <= TOL[dtype] * scale
        assert (fused.double() - truth).abs().max() <= max(2 * EPS[dtype], 1e-5) * scale
        assert torch.equal(quant.linear(x, parts, spec, "fused"), fused)  # packing on the fly: same bytes


def test_tinygemm_zero_mapping_reproduces_our_dequantization():
    """(u - z) * s == (u - 8) * s + (8 - z) * s, the form the int4 kernels take, up to float32 rounding."""
    spec = QuantSpec("int4")
    parts = quant.quantize(gaussian(32, 256), spec)
    sz = quant._tinygemm_scales_and_zeros(parts, spec, torch.float32)  # [G, N, 2]
    assert sz.shape == (2, 32, 2)
    u = quant.unpack_nibbles(parts["q"], 256).float()
    s, zt = expand(sz[..., 0].T, 128, 256), expand(sz[..., 1].T, 128, 256)
    torch.testing.assert_close((u - 8) * s + zt, quant.dequantize(parts, spec), rtol=0, atol=1e-7)


def test_cpu_int4_packing_in_row_slices_matches_one_call(monkeypatch):
    spec = QuantSpec("int4", 64)
    parts = quant.quantize(gaussian(208, 128), spec)  # 3 x 64 rows + a 16-row tail
    whole = quant.pack_for_kernel(parts, spec, "cpu", torch.float32).weight
    monkeypatch.setattr(quant, "_PACK_ROWS", 64)
    sliced = quant.pack_for_kernel(parts, spec, "cpu", torch.float32).weight
    codes = quant.unpack_nibbles(parts["q"], 128).to(torch.int32)
    assert torch.equal(whole, torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1))
    assert torch.equal(sliced, whole)


@pytest.mark.parametrize("shape, spec, dtype, reason", [
    ((64, 256), QuantSpec("int8"), torch.bfloat16, "one scale per output row"),
    ((64, 40), QuantSpec("int8", -1), torch.bfloat16, r"in % 16 == 0"),
    ((64, 256), QuantSpec("int4", 16), torch.float32, "group of 32/64/128/256"),
    ((64, 300), QuantSpec("int4", 128), torch.float32, "ragged last group"),
    ((40, 256), QuantSpec("int4", 128), torch.float32, r"out % 16 == 0"),
    ((64, 256), QuantSpec("int4", 128), torch.float64, "bf16/fp16/fp32 activations"),
])
def test_fused_refusals_name_the_constraint(shape, spec, dtype, reason):
    assert reason.replace("\\", "") in quant.fused_unsupported(shape, spec, "cpu", dtype)
    parts = quant.quantize(gaussian(*shape), spec)
    x = torch.randn(2, shape[1], dtype=dtype)
    with pytest.raises(ValueError, match=reason):
        quant.linear(x, parts, spec, "fused")
    ref = quant.linear(x, parts, spec, "dequant")
    assert torch.equal(quant.linear(x, parts, spec, "auto"), ref)  # auto falls back to the exact path


def test_cuda_constraints_are_checked_without_a_gpu():
    assert quant.fused_unsupported((64, 256), QuantSpec("int4"), "cuda", torch.bfloat16) is None
    assert "bf16 activations only" in quant.fused_unsupported((64, 256), QuantSpec("int4"), "cuda", torch.float16)
    assert r"out % 8 == 0" in quant.fused_unsupported((44, 256), QuantSpec("int4"), "cuda", torch.bfloat16)
    assert "device type 'mps'" in quant.fused_unsupported((64, 256), QuantSpec("int4"), "mps", torch.bfloat16)


def test_auto_picks_fused_only_where_measured_faster():
    spec = QuantSpec("int4")
    parts = quant.quantize(gaussian(64, 256), spec)
    packed = quant.pack_for_kernel(parts, spec, "cpu", torch.bfloat16)
    limit = quant.AUTO_MAX_ROWS[("int4", "cpu", torch.bfloat16)]
    for n in (1, limit, limit + 1):
        x = torch.randn(n, 256).to(torch.bfloat16)
        fused = quant.linear(x, parts, spec, "fused", packed)
        ref = quant.linear(x, parts, spec, "dequant")
        assert not torch.equal(fused, ref)  # the two paths are told apart by their rounding
        expected = fused if n <= limit else ref
        assert torch.equal(quant.linear(x, parts, spec, "auto", packed), expected)
    x = torch.randn(1, 256).to(torch.bfloat16)
    assert torch.equal(quant.linear(x, parts, spec, "auto"), quant.linear(x, parts, spec, "dequant"))  # no packed
    x16 = torch.randn(1, 256).to(torch.float16)  # fp16 fused is slower on CPU: dequant even with packed weights
    p16 = quant.pack_for_kernel(parts, spec, "cpu", torch.float16)
    assert torch.equal(quant.linear(x16, parts, spec, "auto", p16), quant.linear(x16, parts, spec, "dequant"))


# ---- input refusals ---------------------------------------------------------------------------------

def test_input_refusals():
    spec = QuantSpec("int4")
    with pytest.raises(ValueError, match="2-D"):
        quant.quantize(torch.randn(8), spec)
    with pytest.raises(ValueError, match="floating-point"):
        quant.quantize(torch.ones(4, 8, dtype=torch.int32), spec)
    bad = gaussian(4, 64)
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        quant.quantize(bad, spec)
    with pytest.raises(ValueError, match="exceeds the fp16 maximum"):
        quant.quantize(torch.full((2, 64), 1e7), QuantSpec("int4", symmetric=True))
    parts = quant.quantize(gaussian(16, 64), spec)
    with pytest.raises(ValueError, match=r"parts must be \['q', 'scales', 'zeros'\]"):
        quant.dequantize({"q": parts["q"], "scales": parts["scales"]}, spec)
    with pytest.raises(ValueError, match="part 'scales'.*must be torch.float16"):
        quant.dequantize({**parts, "scales": parts["scales"].float()}, spec)
    x = torch.randn(2, 64).to(torch.bfloat16)
    with pytest.raises(ValueError, match="kernel must be one of"):
        quant.linear(x, parts, spec, "fast")
    with pytest.raises(ValueError, match="part 'q'"):
        quant.linear(torch.randn(2, 32), parts, spec)  # wrong width
    packed = quant.pack_for_kernel(parts, spec, "cpu", torch.float32)
    with pytest.raises(ValueError, match="packed for torch.float32 activations"):
        quant.linear(x, parts, spec, "fused", packed)
