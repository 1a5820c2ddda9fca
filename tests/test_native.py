"""The native extension against its PyTorch twins, byte for byte; build and run-time switches; the CUDA
sources compile with nvcc. The CPU extension is compiled just in time, once per session, into a tmp dir."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

from moe_prefetch import _native
from moe_prefetch.checkpoint import Checkpoint
from moe_prefetch.errors import MoePrefetchError

ROOT = Path(__file__).resolve().parents[1]
_BUILT: dict = {}  # test_transfer.py imports native_ext too: build once per session, not once per module


def _cxx() -> str | None:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _nvcc() -> str | None:
    from torch.utils.cpp_extension import CUDA_HOME

    found = shutil.which("nvcc")
    if found is None and CUDA_HOME and (Path(CUDA_HOME) / "bin" / "nvcc").is_file():
        found = str(Path(CUDA_HOME) / "bin" / "nvcc")
    return found


@pytest.fixture(scope="session")
def native_ext(tmp_path_factory):
    """The extension built from csrc/ (CUDA ring included where it can be built), not activated."""
    if "ext" not in _BUILT:
        if _cxx() is None:
            pytest.skip("no C++ compiler (c++, g++ or clang++) on PATH: the native extension cannot be built")
        directory = tmp_path_factory.mktemp("native")
        previous = _native.extension()
        _BUILT["ext"] = _native.build(directory)  # build() activates it ...
        _BUILT["dir"] = directory
        _native.use(previous)  # ... and each test chooses for itself
    return _BUILT["ext"]


@pytest.fixture
def active(native_ext):
    """The built extension as the active one for one test."""
    previous = _native.use(native_ext)
    yield native_ext
    _native.use(previous)


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8)


def _pieces(dtype, count: int, total: int, seed: int):
    """`count` random pieces (varied shapes) laid out with gaps in a buffer of `total` elements."""
    g = torch.Generator().manual_seed(seed)
    sizes = torch.randint(1, max(2, total // (2 * count)), (count,), generator=g).tolist()
    pieces, offset = [], 0
    for i, n in enumerate(sizes):
        offset += int(torch.randint(0, 5, (1,), generator=g))  # gap: untouched bytes must survive
        shape = (n,) if i % 2 else (1, n)
        src = (torch.randn(shape, generator=g) * 100).to(dtype)
        pieces.append((offset, src))
        offset += n
    assert offset <= total
    order = torch.randperm(count, generator=g).tolist()  # pieces need not arrive in offset order
    return [pieces[i] for i in order]


DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.int8, torch.float64]


# ---- gather_copy --------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("count", [1, 3, 8])
@pytest.mark.parametrize("threads", [1, 2, 5])
def test_gather_copy_matches_ref_byte_for_byte(native_ext, dtype, count, threads):
    total = 3_000_000 // torch.empty((), dtype=dtype).element_size()  # ~3 MB: several threads really split it
    pieces = _pieces(dtype, count, total, seed=count * 31 + threads)
    a = torch.full((total,), 7, dtype=dtype)
    b = a.clone()
    native_ext.gather_copy(a, pieces, threads)
    _native.gather_copy_ref(b, pieces)
    assert torch.equal(_bytes(a), _bytes(b))


def test_gather_copy_from_memory_mapped_checkpoint(native_ext, tmp_path):
    from safetensors.torch import save_file

    tensors = {f"w{i}": torch.randn(300 + i, 257) for i in range(3)}
    save_file(tensors, tmp_path / "model.safetensors")
    ckpt = Checkpoint(tmp_path)
    pieces, offset = [], 0
    for name in ("w2", "w0", "w1"):
        t = ckpt.tensor(name)  # a view of the memory map, not pinned, not copied
        pieces.append((offset, t))
        offset += t.numel()
    a, b = torch.zeros(offset), torch.ones(offset)
    native_ext.gather_copy(a, pieces, 3)
    _native.gather_copy_ref(b, pieces)
    assert torch.equal(_bytes(a), _bytes(b))
    assert torch.equal(a[:tensors["w2"].numel()], tensors["w2"].reshape(-1))


def test_dispatcher_sends_conversions_and_strides_to_the_twin(native_ext):
    dst_a, dst_b = torch.zeros(100), torch.zeros(100)
    pieces = [(0, torch.arange(10, dtype=torch.float32)),            # native
              (10, torch.arange(12, dtype=torch.bfloat16)),          # dtype conversion: twin
              (30, torch.arange(20.0).view(4, 5).t()),               # strided: twin
              (60, torch.arange(30, dtype=torch.float32))]           # native
    _native.gather_copy(dst_a, pieces, 2, ext=native_ext)
    _native.gather_copy_ref(dst_b, pieces)
    assert torch.equal(dst_a, dst_b)


@pytest.mark.parametrize("pieces, message", [
    ([(95, torch.ones(10))], "piece 0 (10 elements at offset 95) does not fit a destination of 100 elements"),
    ([(-1, torch.ones(3))], "piece 0 (3 elements at offset -1) does not fit"),
    ([(0, torch.ones(3)), (200, torch.ones(1))], "piece 1 (1 elements at offset 200) does not fit"),
    ([(0, torch.ones(10)), (5, torch.ones(10))], "pieces 0 and 1 overlap at element 5"),
])
def test_bounds_errors_raise_the_same_message_natively_and_in_the_twin(native_ext, pieces, message):
    for copy in (lambda d, p: native_ext.gather_copy(d, p, 2), _native.gather_copy_ref,
                 lambda d, p: native_ext.HostStagingRing(64, 2).copy(d, p, 2),
                 lambda d, p: _native.StagingRingRef("cpu", 64, 2).copy(d, p)):
        dst = torch.zeros(100)
        with pytest.raises(RuntimeError, match=message.replace("(", r"\(").replace(")", r"\)")):
            copy(dst, pieces)
        assert not dst.any()  # checked before anything is written


@pytest.mark.parametrize("dst, pieces, message", [
    (torch.zeros(10), [(0, torch.ones(2, dtype=torch.float64))], "piece 0 has dtype Double but the destination has Float"),
    (torch.zeros(10), [(0, torch.ones(3, 3).t())], "piece 0 is not contiguous"),
    (torch.zeros(10, 2).t(), [(0, torch.ones(2))], "the destination must be contiguous"),
])
def test_native_refuses_what_only_the_twin_handles(native_ext, dst, pieces, message):
    with pytest.raises(RuntimeError, match=message):
        native_ext.gather_copy(dst, pieces, 1)


def test_empty_and_zero_sized_pieces(native_ext):
    a, b = torch.zeros(4), torch.zeros(4)
    for dst in (a, b):
        _native.gather_copy(dst, [], 2, ext=native_ext if dst is a else None)
    native_ext.gather_copy(a, [(4, torch.ones(0)), (0, torch.ones(4))], 2)
    _native.gather_copy_ref(b, [(4, torch.ones(0)), (0, torch.ones(4))])
    assert torch.equal(a, b)


# ---- the staging ring (host "device": checks the chunking that the CUDA ring shares) ---------------------
@pytest.mark.parametrize("chunk_bytes, n_chunks", [(7, 2), (4096, 3), (1 << 20, 2), (1 << 24, 4)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int8], ids=str)
def test_staging_ring_native_and_ref_match_gather_copy(native_ext, chunk_bytes, n_chunks, dtype):
    total = 600_000 if chunk_bytes > 7 else 3000  # byte-sized chunks: keep the per-chunk Python loop short
    pieces = _pieces(dtype, 5, total, seed=chunk_bytes % 97)
    expected = torch.full((total,), 3, dtype=dtype)
    _native.gather_copy_ref(expected, pieces)
    native, ref = expected.clone().fill_(3), expected.clone().fill_(3)
    native_ext.HostStagingRing(chunk_bytes, n_chunks).copy(native, pieces, 3)
    _native.StagingRingRef("cpu", chunk_bytes, n_chunks).copy(ref, pieces)
    assert torch.equal(_bytes(native), _bytes(expected))
    assert torch.equal(_bytes(ref), _bytes(expected))


def test_staging_ring_converts_dtypes_on_the_host(native_ext, active):
    pieces = [(0, torch.arange(10, dtype=torch.bfloat16)), (10, torch.arange(6.0).view(2, 3).t())]
    expected = torch.zeros(16)
    _native.gather_copy_ref(expected, pieces)
    for native in (True, False):
        ring = _native.make_staging_ring("cpu", chunk_bytes=12, n_chunks=2, native=native)
        assert ring.name == ("native" if native else "ref")
        out = torch.zeros(16)
        ring.copy(out, pieces)
        assert torch.equal(out, expected)


def test_staging_ring_shape_is_validated(native_ext):
    with pytest.raises(ValueError, match="at least 2 chunks"):
        native_ext.HostStagingRing(1024, 1)
    with pytest.raises(ValueError, match="at least 2 chunks"):
        _native.StagingRingRef("cpu", 1024, 1)


# ---- finding, switching and building -------------------------------------------------------------------
def test_backend_names_the_active_choice(native_ext):
    previous = _native.use(native_ext)
    try:
        assert _native.backend() == ("cuda" if native_ext.has_cuda() and torch.cuda.is_available() else "cpu")
        _native.use(None)
        assert _native.backend() == "ref"
    finally:
        _native.use(previous)


def test_jit_cache_is_found_and_stale_or_disabled_builds_are_not(native_ext, tmp_path, monkeypatch):
    built = _BUILT["dir"]
    previous = _native.use(None)
    try:
        monkeypatch.setenv("MOE_PREFETCH_NATIVE_DIR", str(built))
        assert _native.refresh() is not None and _native.backend() in ("cpu", "cuda")
        assert "JIT build" in _native.origin()

        monkeypatch.setenv("MOE_PREFETCH_NATIVE", "0")
        assert _native.refresh() is None and "MOE_PREFETCH_NATIVE=0" in _native.origin()
        monkeypatch.delenv("MOE_PREFETCH_NATIVE")

        stale = tmp_path / "stale"
        shutil.copytree(built, stale)
        stamp = json.loads((stale / _native.STAMP).read_text())
        (stale / _native.STAMP).write_text(json.dumps(dict(stamp, sources="0" * 64)))
        monkeypatch.setenv("MOE_PREFETCH_NATIVE_DIR", str(stale))
        assert _native.refresh() is None and "stale (sources changed)" in _native.origin()

        monkeypatch.setenv("MOE_PREFETCH_NATIVE_DIR", str(tmp_path / "empty"))
        assert _native.refresh() is None and "--build" in _native.origin()
    finally:
        _native.use(previous)


def test_cli_prints_backend_and_import_never_loads_or_compiles(native_ext, tmp_path):
    env = dict(os.environ, MOE_PREFETCH_NATIVE_DIR=str(_BUILT["dir"]), PYTHONPATH=str(ROOT))
    code = ("import sys, moe_prefetch; assert 'moe_prefetch._native' not in sys.modules; "
            "from moe_prefetch import _native; print(_native._state.probed)")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr
    out = subprocess.run([sys.executable, "-m", "moe_prefetch._native"], env=env, capture_output=True, text=True,
                         cwd=tmp_path)
    assert out.returncode == 0 and out.stdout.strip() in ("cpu", "cuda"), out.stderr
    out = subprocess.run([sys.executable, "-m", "moe_prefetch._native"], env=dict(env, MOE_PREFETCH_NATIVE="0"),
                         capture_output=True, text=True, cwd=tmp_path)
    assert out.stdout.strip() == "ref" and "MOE_PREFETCH_NATIVE=0" in out.stderr
    assert "RuntimeWarning" not in out.stderr


def test_build_failure_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(_native, "CSRC", tmp_path / "nowhere")
    with pytest.raises(MoePrefetchError, match="native sources are not at"):
        _native.build(tmp_path / "out")


# ---- CUDA: compile everywhere nvcc exists, run where a GPU exists ----------------------------------------
def _torch_includes() -> list[str]:
    from torch.utils.cpp_extension import include_paths

    return [f"-I{p}" for p in include_paths()] + [f"-I{sysconfig.get_paths()['include']}", f"-I{ROOT / 'csrc'}"]


@pytest.mark.parametrize("source", sorted(p.name for p in (ROOT / "csrc").glob("*.cu")))
def test_cuda_sources_compile_with_nvcc(source, tmp_path):
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (PATH or CUDA_HOME): the CUDA sources cannot be compiled here")
    cmd = [nvcc, "-c", str(ROOT / "csrc" / source), "-o", str(tmp_path / "out.o"), "-std=c++17",
           "-Xcompiler", "-fPIC,-Wall", *_torch_includes()]
    out = subprocess.run(cmd, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert (tmp_path / "out.o").stat().st_size > 0


def test_cuda_binding_compiles_against_torch_headers():
    """bindings.cpp as a CUDA build compiles it (the CUDA ring's class and methods), with this torch's headers."""
    cxx = _cxx()
    if cxx is None:
        pytest.skip("no C++ compiler on PATH")
    cmd = [cxx, "-std=c++20", "-fsyntax-only", "-DMOE_PREFETCH_WITH_CUDA", "-DTORCH_EXTENSION_NAME=_C",
           str(ROOT / "csrc" / "bindings.cpp"), *_torch_includes()]
    out = subprocess.run(cmd, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]


needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@needs_gpu
@pytest.mark.parametrize("native", [False, True], ids=["ref", "native"])
def test_cuda_staging_ring_matches_gather_copy(native_ext, native):
    if native and not native_ext.has_cuda():
        pytest.skip("the extension was built without the CUDA ring (no CUDA toolkit or CPU torch)")
    previous = _native.use(native_ext)
    try:
        ring = _native.make_staging_ring(torch.device("cuda"), chunk_bytes=1 << 16, n_chunks=3, threads=2, native=native)
    finally:
        _native.use(previous)
    pieces = _pieces(torch.bfloat16, 6, 400_000, seed=5)
    expected = torch.zeros(400_000, dtype=torch.bfloat16)
    _native.gather_copy_ref(expected, pieces)
    dst = torch.zeros(400_000, dtype=torch.bfloat16, device="cuda")
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        ring.copy(dst, pieces, stream)
        done = torch.cuda.Event()
        done.record(stream)
    torch.cuda.current_stream().wait_event(done)
    assert torch.equal(_bytes(dst.cpu()), _bytes(expected))
    for _ in range(3):  # ring slots are reused: later copies must not corrupt earlier data
        ring.copy(dst, pieces, stream)
    stream.synchronize()
    assert torch.equal(_bytes(dst.cpu()), _bytes(expected))
