"""Host compute of int8/int4 experts through PyTorch's weight-only CPU kernels (host_kernel="fused"):
each packed matrix against the exact dequantize-then-mm path, which kernel each shape gets, and whole
models (grouped Mixtral, transposed biased GPT-OSS) against the dequantized reference."""
from __future__ import annotations

import pytest
import torch

import moe_prefetch as mp
from conftest import make_mixtral, save_tokenizer
from moe_prefetch import quant
from moe_prefetch.host_kernels import HostPacks, PackedMatrix
from moe_prefetch.quant_store import ExpertFormat
from test_quant_store import NEW, PROMPT, dequantized_reference


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MOE_PREFETCH_CACHE", str(tmp_path / "cache"))


@pytest.mark.parametrize("kind,group,shape,expect", [
    ("int4", 32, (64, 128), "fused"),       # tinygemm int4
    ("int4", 128, (320, 256), "fused"),
    ("int8", -1, (48, 64), "fused"),        # one scale per row: _weight_int8pack_mm directly
    ("int8", 32, (48, 128), "int8_groups"),  # one _weight_int8pack_mm per group of columns
    ("int4", 128, (64, 160), "dequant"),    # ragged last group: no kernel fits, the exact path
    ("int4", 32, (40, 64), "dequant"),      # out % 16 != 0
    ("int8", 24, (32, 96), "dequant"),      # group not a multiple of 16
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_matrix_matches_exact_path(kind, group, shape, expect, dtype):
    torch.manual_seed(0)
    spec = quant.QuantSpec.from_name(kind, group_size=group)
    w = torch.randn(shape) * 0.05  # [out, in]
    parts = quant.quantize(w, spec)
    m = PackedMatrix(parts, spec, dtype, shape[1])
    assert m.kind == expect
    for n in (1, 3):
        x = torch.randn(n, shape[1]).to(dtype)  # [n, in]
        exact = torch.mm(x, quant.dequantize(parts, spec, dtype, shape[1]).T)  # [n, out]
        got = m(x)
        assert got.shape == (n, shape[0]) and got.dtype == dtype
        tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
        assert torch.allclose(got.float(), exact.float(), rtol=tol, atol=tol * exact.abs().max().item()), \
            (got - exact).abs().max()
        if expect == "dequant":
            assert torch.equal(got, exact)  # the fallback is the exact path itself


def test_packed_matrix_keeps_no_dequantized_copy():
    spec = quant.QuantSpec.from_name("int4", group_size=32)
    parts = quant.quantize(torch.randn(256, 512), spec)
    m = PackedMatrix(parts, spec, torch.float32, 512)
    stored = sum(t.numel() * t.element_size() for t in parts.values())
    assert m.kind == "fused" and m.nbytes <= 2 * stored < 256 * 512 * 4 / 2  # codes + scales, not float weights


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_mixtral(tmp_path_factory.mktemp("hk") / "m", layers=2, experts=4, top_k=2, hidden=64, inter=128, seed=5)


def _run(path, group=32, **cfg):
    model, _ = mp.load_model(str(path), mp.OffloadConfig(device="cpu", show_progress=False, expert_group_size=group,
                                                          host_compute="on", link_bandwidth=2e6, host_bandwidth=5e6,
                                                          **cfg))
    try:
        with torch.inference_mode():
            out = model.generate(PROMPT, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)
            logits = model(out).logits  # [1, T, V]
        packs = model.moe_runtime.offloader.host.packs
        return out, logits, mp.stats(model), packs
    finally:
        model.moe_runtime.close()


@pytest.mark.parametrize("kind,group", [("int8", 32), ("int4", 32), ("int8", 128)])
def test_fused_host_compute_against_dequantized_reference(ckpt, kind, group):
    """Lossy by design, by a few units in the last place: the greedy tokens of this decisive model equal the
    dequantized reference's and the logits are within float32 rounding of the exact host path's."""
    ref = dequantized_reference(ckpt, ExpertFormat.of(kind, group))
    exact, exact_logits, st_exact, packs_exact = _run(ckpt, group, expert_cache=2, expert_dtype=kind,
                                                      host_kernel="exact")
    assert torch.equal(exact, ref) and packs_exact is None and st_exact["host_kernel"] == "exact"
    for slots in (2, 5):
        # group 128 >= every matrix's width: one group per row, torch._weight_int8pack_mm straight on the codes of
        # experts gathered into the host's reused buffer (the packed copy must not alias it)
        out, logits, st, packs = _run(ckpt, group, expert_cache=slots, expert_dtype=kind, host_kernel="fused")
        assert st["host_kernel"] == "fused" and st["host_computed"] > 0
        assert isinstance(packs, HostPacks) and packs.fused_matrices > 0 and packs.exact_matrices == 0
        assert torch.equal(out, ref), f"{kind} slots={slots}"
        if slots == 2:
            assert torch.allclose(logits, exact_logits, rtol=1e-4, atol=1e-4)


def test_auto_is_exact_on_the_cpu_backend(ckpt):
    _, _, st, packs = _run(ckpt, expert_cache=2, expert_dtype="int4")
    assert packs is None and st["host_kernel"] == "exact"


def test_fused_transposed_biased_experts(tmp_path):
    """GPT-OSS stores experts [in, out] with biases: the packed matrices compute rows @ W.T whatever the layout."""
    from moe_families import make_family

    path = tmp_path / "gpt_oss"
    make_family("gpt_oss", path)
    save_tokenizer(path, 128)
    for kind in ("int8", "int4"):
        out, _, st, packs = _run(path, expert_cache=4, expert_dtype=kind, host_kernel="fused", predictor="none")
        assert st["host_computed"] > 0
        assert torch.equal(out, dequantized_reference(path, ExpertFormat.of(kind, 32))), kind


def test_bad_host_kernel_is_one_line(tmp_path):
    with pytest.raises(mp.MoePrefetchError, match="unknown host_kernel"):
        mp.OffloadConfig(host_kernel="fast")
