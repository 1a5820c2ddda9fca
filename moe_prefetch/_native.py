"""The optional compiled extension (csrc/) and the pure-PyTorch twins of its ops.

Ops; each native op has a `_ref` twin here that writes the same bytes (tests/test_native.py compares them):
  gather_copy(dst, pieces, threads)     (element offset, CPU tensor) pieces -> one flat CPU buffer, std::threads
  make_staging_ring(device).copy(dst, pieces, stream)
                                        pageable host pieces -> a GPU buffer through a small pinned ring
                                        (on a CPU "device" it runs the same chunking with plain copies)

Where the extension comes from (first found wins):
  1. moe_prefetch._C       built by `pip install --no-build-isolation .` (setup.py)
  2. the JIT cache         built by `python -m moe_prefetch._native --build` (MOE_PREFETCH_NATIVE_DIR, or
                           ~/.cache/moe_prefetch/native/torch-<version>-py<version>); used only when it was built
                           from the current csrc/ sources for the current torch and Python
MOE_PREFETCH_NATIVE=0 turns both off. Nothing is compiled implicitly and importing never fails: a missing,
stale or broken extension means the twins run, and `python -m moe_prefetch._native` says which and why.
"""
from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch

from .errors import MoePrefetchError

NAME = "moe_prefetch_C"  # module name of a JIT build (the setup.py build is moe_prefetch._C)
CSRC = Path(__file__).resolve().parents[1] / "csrc"
STAMP = "build.json"
DEFAULT_CHUNK_BYTES = 8 << 20  # staging chunk: large enough for full-speed DMA, small enough to pipeline
DEFAULT_CHUNKS = 3  # one being staged, one on the link, one spare so staging never waits for a whole chunk


def default_threads() -> int:
    """Copy threads that leave the other half of the cores to the compute thread's own work."""
    return max(1, min(4, (os.cpu_count() or 2) // 2))


# ---- finding and loading the extension --------------------------------------------------------------
@dataclass
class _State:
    module: ModuleType | None = None
    origin: str = ""  # where it was loaded from, or why there is none
    probed: bool = False


_state = _State()
_state_lock = threading.Lock()


def cache_dir() -> Path:
    """Where `--build` puts the JIT extension for this torch and Python."""
    env = os.environ.get("MOE_PREFETCH_NATIVE_DIR")
    if env:
        return Path(env)
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "moe_prefetch" / "native" / f"torch-{torch.__version__}-py{sys.version_info[0]}{sys.version_info[1]}"


def _sources_digest() -> str | None:
    if not CSRC.is_dir():
        return None
    h = hashlib.sha256()
    for f in sorted(CSRC.iterdir()):
        if f.suffix in (".h", ".cpp", ".cu"):
            h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def _stamp(cuda: bool) -> dict:
    return {"sources": _sources_digest(), "torch": torch.__version__, "python": list(sys.version_info[:2]), "cuda": cuda}


def _load_jit(directory: Path) -> tuple[ModuleType | None, str]:
    stamp_file = directory / STAMP
    libs = sorted(directory.glob(f"{NAME}*.so")) + sorted(directory.glob(f"{NAME}*.pyd"))
    if not stamp_file.is_file() or not libs:
        return None, f"no JIT build in {directory} (run: python -m moe_prefetch._native --build)"
    try:
        stamp = json.loads(stamp_file.read_text())
    except (OSError, json.JSONDecodeError):
        return None, f"unreadable {stamp_file}: rebuild with python -m moe_prefetch._native --build"
    want = _stamp(bool(stamp.get("cuda")))
    if want["sources"] is None:  # installed without csrc/: nothing to compare the sources against
        want["sources"] = stamp.get("sources")
    stale = [k for k in ("sources", "torch", "python") if stamp.get(k) != want[k]]
    if stale:
        return None, f"the JIT build in {directory} is stale ({', '.join(stale)} changed): rebuild with --build"
    return _import_file(libs[0]), f"JIT build {libs[0]}"


def _import_file(path: Path) -> ModuleType:
    loader = importlib.machinery.ExtensionFileLoader(NAME, str(path))
    spec = importlib.util.spec_from_file_location(NAME, path, loader=loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def _probe() -> None:
    _state.probed = True
    if os.environ.get("MOE_PREFETCH_NATIVE", "1") == "0":
        _state.module, _state.origin = None, "disabled by MOE_PREFETCH_NATIVE=0"
        return
    broken = ""
    if importlib.util.find_spec(f"{__package__}._C") is not None:
        try:
            from . import _C  # type: ignore[attr-defined]

            _state.module, _state.origin = _C, f"installed extension {_C.__file__}"
            return
        except ImportError as e:  # e.g. built against another torch: undefined symbols
            broken = f"; the installed moe_prefetch._C does not load ({e})"
            warnings.warn(f"moe_prefetch._C does not load ({e}); trying the JIT build, else the PyTorch twins")
    try:
        _state.module, _state.origin = _load_jit(cache_dir())
    except (ImportError, OSError) as e:
        _state.module, _state.origin = None, f"cannot load the JIT build in {cache_dir()}: {e}"
    _state.origin += "" if _state.module is not None else broken


def extension() -> ModuleType | None:
    """The loaded native module, or None (the reference twins run). Looks on first use only."""
    with _state_lock:  # two engines built from two threads must not both load it
        if not _state.probed:
            _probe()
    return _state.module


def refresh() -> ModuleType | None:
    """Forget the loaded extension and look again (after changing MOE_PREFETCH_NATIVE or the cache dir)."""
    _state.module, _state.origin, _state.probed = None, "", False
    return extension()


def origin() -> str:
    """Where the active extension was loaded from, or why the twins run."""
    extension()
    return _state.origin


def use(module: ModuleType | None, where: str = "set by _native.use()") -> ModuleType | None:
    """Make `module` (None: the twins) the active extension; returns the previous one. For tests and benches."""
    previous = extension()
    _state.module, _state.probed = module, True
    _state.origin = where if module is not None else "the PyTorch twins were chosen by _native.use(None)"
    return previous


def backend() -> str:
    """'cuda' (extension with the CUDA ring, and a GPU), 'cpu' (extension, host ops only) or 'ref' (twins only)."""
    ext = extension()
    if ext is None:
        return "ref"
    return "cuda" if ext.has_cuda() and torch.cuda.is_available() else "cpu"


# ---- building it just in time -------------------------------------------------------------------------
_BUILD_SCRIPT = r"""
import json, sys
from setuptools import Distribution
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
spec = json.loads(sys.argv[1])
make = CUDAExtension if spec["cuda"] else CppExtension
ext = make(spec["name"], spec["sources"], include_dirs=[spec["include"]], extra_compile_args=spec["flags"])
dist = Distribution({"name": spec["name"], "ext_modules": [ext], "cmdclass": {"build_ext": BuildExtension}})
cmd = dist.get_command_obj("build_ext")
cmd.build_lib, cmd.build_temp = spec["out"], spec["tmp"]
cmd.ensure_finalized()
cmd.run()
"""


def cuda_buildable() -> bool:
    """True when the CUDA ring can be compiled here: a CUDA build of torch and a CUDA toolkit (nvcc)."""
    if torch.version.cuda is None:
        return False
    from torch.utils.cpp_extension import CUDA_HOME

    return CUDA_HOME is not None


def compile_flags(cuda: bool) -> dict[str, list[str]]:
    """Compiler flags shared by setup.py and the JIT build."""
    cxx = ["-O3", "-fvisibility=hidden"] + (["-DMOE_PREFETCH_WITH_CUDA"] if cuda else [])
    return {"cxx": cxx, "nvcc": ["-O3", "-Xcompiler", "-fvisibility=hidden"]}


def build(directory: str | os.PathLike | None = None, cuda: bool | None = None, verbose: bool = False) -> ModuleType:
    """Compile csrc/ into `directory` (default cache_dir()), load it and make it the active extension.

    Uses torch.utils.cpp_extension's BuildExtension in a child process (ninja when present, which
    cpp_extension.load() would insist on; plain setuptools otherwise), so only a C++ compiler is needed.
    Raises MoePrefetchError with the compiler's last lines when it fails."""
    if _sources_digest() is None:
        raise MoePrefetchError(f"the native sources are not at {CSRC}: build from a source checkout of moe_prefetch")
    cuda = cuda_buildable() if cuda is None else cuda
    out = Path(directory) if directory is not None else cache_dir()
    out.mkdir(parents=True, exist_ok=True)
    (out / STAMP).unlink(missing_ok=True)
    for old in out.glob(f"{NAME}*.so"):
        old.unlink()
    sources = [str(f) for f in sorted(CSRC.glob("*.cpp"))] + ([str(f) for f in sorted(CSRC.glob("*.cu"))] if cuda else [])
    spec = dict(name=NAME, sources=sources, include=str(CSRC), flags=compile_flags(cuda), cuda=cuda,
                out=str(out), tmp=str(out / "tmp"))
    proc = subprocess.run([sys.executable, "-c", _BUILD_SCRIPT, json.dumps(spec)], cwd=out,
                          capture_output=not verbose, text=True)
    if proc.returncode != 0:
        tail = "\n".join(((proc.stdout or "") + (proc.stderr or "")).strip().splitlines()[-25:])
        raise MoePrefetchError(f"building the native extension failed (exit {proc.returncode}); last lines:\n{tail}")
    (out / STAMP).write_text(json.dumps(_stamp(cuda)))
    shutil.rmtree(out / "tmp", ignore_errors=True)
    module, where = _load_jit(out)
    if module is None:
        raise MoePrefetchError(f"the native extension was built but cannot be loaded: {where}")
    use(module, where)
    return module


# ---- gather_copy ------------------------------------------------------------------------------------------
def check_pieces(op: str, dst_numel: int, pieces) -> None:
    """The native ops' input checks, with the same messages (RuntimeError, as TORCH_CHECK raises)."""
    spans = []
    for i, (offset, src) in enumerate(pieces):
        n = src.numel()
        if offset < 0 or offset > dst_numel or n > dst_numel - offset:
            raise RuntimeError(f"{op}: piece {i} ({n} elements at offset {offset}) does not fit a destination "
                               f"of {dst_numel} elements")
        if n:
            spans.append((offset, i, n))
    spans.sort()
    for (o0, i0, n0), (o1, i1, _) in zip(spans, spans[1:]):
        if o0 + n0 > o1:  # pieces are copied concurrently natively: an overlap would be a race
            raise RuntimeError(f"{op}: pieces {i0} and {i1} overlap at element {o1}")


def gather_copy_ref(dst: torch.Tensor, pieces, threads: int = 1) -> None:
    """Twin of the native gather_copy: one torch copy_ per piece (converts dtypes, follows strides).
    `threads` is ignored: torch's own intra-op threads do the copy."""
    check_pieces("gather_copy", dst.numel(), pieces)
    flat = dst.view(-1)  # [numel]
    for offset, src in pieces:
        flat[offset:offset + src.numel()].view(src.shape).copy_(src)


def _native_ok(src: torch.Tensor, dst: torch.Tensor) -> bool:
    return src.device.type == "cpu" and src.dtype == dst.dtype and src.is_contiguous()


def gather_copy(dst: torch.Tensor, pieces, threads: int = 1, ext: ModuleType | None = None) -> None:
    """Copy `pieces` into `dst` natively where possible: same-dtype contiguous CPU pieces go to the
    extension (`ext`, default the active one); pieces that need a conversion or have strides take the
    twin's copy_. Without an extension this is gather_copy_ref."""
    ext = ext or extension()
    if ext is None or dst.device.type != "cpu" or not dst.is_contiguous():
        return gather_copy_ref(dst, pieces, threads)
    fast = [(o, s) for o, s in pieces if _native_ok(s, dst)]
    if len(fast) == len(pieces):
        return ext.gather_copy(dst, fast, threads)
    check_pieces("gather_copy", dst.numel(), pieces)  # the whole set, so mixed calls are checked alike
    if fast:
        ext.gather_copy(dst, fast, threads)
    gather_copy_ref(dst, [(o, s) for o, s in pieces if not _native_ok(s, dst)])


# ---- the staging ring -------------------------------------------------------------------------------------
def _plain_pieces(dst: torch.Tensor, pieces) -> list[tuple[int, torch.Tensor]]:
    """Pieces as same-dtype contiguous host tensors (converted on the host when they are not)."""
    return [(o, s if _native_ok(s, dst) else s.to(device="cpu", dtype=dst.dtype).contiguous()) for o, s in pieces]


class StagingRingRef:
    """Twin of the native staging ring with torch ops: `n_chunks` staging buffers (pinned for a CUDA
    destination), host copy_ into the free chunk, copy_(non_blocking=True) chunk -> device on the current
    (or given) stream, one torch.cuda.Event per chunk so a chunk is refilled only after its transfer.
    With a CPU destination the same chunking runs with synchronous copies (what the CPU tests check)."""

    name = "ref"

    def __init__(self, device: torch.device, chunk_bytes: int = DEFAULT_CHUNK_BYTES, n_chunks: int = DEFAULT_CHUNKS,
                 threads: int = 1):
        if chunk_bytes < 1 or n_chunks < 2:
            raise ValueError(f"staging ring needs chunk_bytes >= 1 and at least 2 chunks (got {chunk_bytes} bytes x {n_chunks})")
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.chunk_bytes = chunk_bytes
        self.chunks = [torch.empty(chunk_bytes, dtype=torch.uint8, pin_memory=self.cuda) for _ in range(n_chunks)]  # [chunk_bytes] each
        self.free: list = [None] * n_chunks  # torch.cuda.Event recorded after the transfers out of the chunk

    def copy(self, dst: torch.Tensor, pieces, stream=None) -> None:
        """Issue the copies of `pieces` into `dst`; on CUDA they are ordered on `stream` (default: current)."""
        check_pieces("staged_copy", dst.numel(), pieces)
        if self.cuda:
            stream = stream or torch.cuda.current_stream(dst.device)
            with torch.cuda.stream(stream):
                self._run(dst, pieces, stream)
        else:
            self._run(dst, pieces, None)

    def _run(self, dst: torch.Tensor, pieces, stream) -> None:
        out = dst.view(-1).view(torch.uint8)  # [dst bytes]
        esize = dst.element_size()
        cap, k, used = self.chunk_bytes, 0, 0
        runs: list[tuple[int, int, int]] = []  # (chunk offset, dst byte offset, bytes) of the chunk being filled

        def send(slot: int) -> None:
            chunk = self.chunks[slot]
            for c, d, n in runs:
                out[d:d + n].copy_(chunk[c:c + n], non_blocking=self.cuda)
            if self.cuda:
                self.free[slot] = torch.cuda.Event(blocking=True)  # a waiting host thread sleeps
                self.free[slot].record(stream)
            runs.clear()

        for offset, src in _plain_pieces(dst, pieces):
            data = src.reshape(-1).view(torch.uint8)  # [bytes]
            pos, d0 = 0, offset * esize
            while pos < data.numel():
                slot = k % len(self.chunks)
                if used == 0 and self.free[slot] is not None:
                    self.free[slot].synchronize()  # that chunk's previous transfer must be done
                take = min(cap - used, data.numel() - pos)
                self.chunks[slot][used:used + take].copy_(data[pos:pos + take])  # stage
                if runs and runs[-1][1] + runs[-1][2] == d0 + pos:
                    c, d, n = runs[-1]
                    runs[-1] = (c, d, n + take)
                else:
                    runs.append((used, d0 + pos, take))
                used += take
                pos += take
                if used == cap:
                    send(slot)
                    k, used = k + 1, 0
        if used:
            send(k % len(self.chunks))

    def synchronize(self) -> None:
        for e in self.free:
            if e is not None:
                e.synchronize()


class _NativeRing:
    """The extension's ring behind the twin's interface (dtype conversion done here, on the host)."""

    name = "native"

    def __init__(self, ext: ModuleType, device: torch.device, chunk_bytes: int, n_chunks: int, threads: int):
        self.device, self.threads = torch.device(device), threads
        if self.device.type == "cuda":
            index = self.device.index if self.device.index is not None else torch.cuda.current_device()
            self._ring = ext.CudaStagingRing(chunk_bytes, n_chunks, index)
        else:
            self._ring = ext.HostStagingRing(chunk_bytes, n_chunks)
        self.chunk_bytes = chunk_bytes

    def copy(self, dst: torch.Tensor, pieces, stream=None) -> None:
        pieces = _plain_pieces(dst, pieces)
        if self.device.type == "cuda":
            stream = stream or torch.cuda.current_stream(dst.device)
            self._ring.copy(dst, pieces, stream.cuda_stream, self.threads)
        else:
            self._ring.copy(dst, pieces, self.threads)

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            self._ring.synchronize()


def make_staging_ring(device: torch.device, chunk_bytes: int = DEFAULT_CHUNK_BYTES, n_chunks: int = DEFAULT_CHUNKS,
                      threads: int | None = None, native: bool | None = None):
    """A staging ring for copies into `device`: the native one when the extension has it (native=None or
    True), else StagingRingRef. Both have .copy(dst, pieces, stream=None), .synchronize() and .name."""
    device = torch.device(device)
    threads = threads or default_threads()
    ext = extension() if native is not False else None
    has = ext is not None and (device.type != "cuda" or ext.has_cuda())
    if native and not has:
        raise MoePrefetchError(f"no native staging ring for {device}: {origin()}")
    if has:
        return _NativeRing(ext, device, chunk_bytes, n_chunks, threads)
    return StagingRingRef(device, chunk_bytes, n_chunks, threads)


# ---- python -m moe_prefetch._native ------------------------------------------------------------------
def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m moe_prefetch._native",
                                description="Show which copy backend is active, or build the native extension.")
    p.add_argument("--build", action="store_true", help="compile csrc/ just in time into the cache directory and load it")
    p.add_argument("--build-dir", help=f"where --build writes and later runs look (default: MOE_PREFETCH_NATIVE_DIR or {cache_dir()})")
    p.add_argument("--cpu-only", action="store_true", help="with --build: skip the CUDA ring even where it could be built")
    p.add_argument("--verbose", action="store_true", help="with --build: show the compiler's output")
    args = p.parse_args(argv)
    if args.build_dir:
        os.environ["MOE_PREFETCH_NATIVE_DIR"] = args.build_dir
    if args.build:
        try:
            build(args.build_dir, cuda=False if args.cpu_only else None, verbose=args.verbose)
        except MoePrefetchError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    print(backend())
    print(f"  {origin()}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    from moe_prefetch import _native as _package_copy  # one module state, whichever way we were started

    sys.exit(_package_copy.main())
