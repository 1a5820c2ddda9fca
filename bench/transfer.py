"""Copy throughput of the transfer paths, native (csrc/) against the PyTorch twins, for expert-sized buffers.

    python bench/transfer.py                      # 1, 16, 64, 352 MB experts (Mixtral fp16 = 352 MB)
    python bench/transfer.py --sizes 16,94 --repeats 9 --threads 4

CPU (always): gather_copy of an expert's pieces into one flat buffer (what the CPU engine does per miss),
gather_copy_ref (torch copy_, torch's intra-op threads) against the native one (std::threads, GIL released),
from three kinds of source:
  RAM            ordinary tensors;
  mmap           a memory-mapped file whose pages are in the page cache and already mapped
                 (a checkpoint expert read before);
  mmap, fresh    the same file mapped anew for every copy, so every page faults once
                 (the first read of an expert from a page-cached checkpoint).
CUDA (when a GPU is visible): host -> device copies of the same expert from pinned memory, from pageable
memory with torch's copy_, and through the staging ring (ref and native).
Prints one Markdown table per device; GB/s are medians over --repeats runs, native and ref alternating
so both see the same machine state. Numbers mean something only next to the machine they name.
"""
from __future__ import annotations

import mmap
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from moe_prefetch.cli_common import ArgumentParser, run_main  # noqa: E402
from moe_prefetch import _native  # noqa: E402
from moe_prefetch.errors import MoePrefetchError  # noqa: E402

MB = 1_000_000


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def split(nbytes: int, parts: int) -> list[int]:
    """Byte counts of `parts` nearly equal pieces (4-byte aligned: the pieces are float32 views)."""
    base = (nbytes // parts) & ~3
    return [base] * (parts - 1) + [nbytes - base * (parts - 1)]


def views(buf, sizes: list[int]) -> list[tuple[int, torch.Tensor]]:
    """(element offset, float32 view) pieces over `buf` (bytes-like), back to back."""
    pieces, offset = [], 0
    for n in sizes:
        pieces.append((offset // 4, torch.frombuffer(buf, dtype=torch.float32, count=n // 4, offset=offset)))
        offset += n
    return pieces


def timed(fn, sync=None) -> float:
    t0 = time.perf_counter()
    fn()
    if sync is not None:
        sync()
    return time.perf_counter() - t0


def median_gbps(nbytes: int, seconds: list[float]) -> float:
    return nbytes / statistics.median(seconds) / 1e9


# ---- CPU -----------------------------------------------------------------------------------------------------
def bench_cpu(size: int, path: Path, args, ext) -> list[tuple[str, float, float]]:
    """Rows (source, ref GB/s, native GB/s) for one expert of `size` bytes."""
    sizes = split(size, args.pieces)
    dst = torch.zeros(size // 4)  # [elements]: written once so no page is first-touched while timing
    ram = torch.randint(0, 255, (size,), dtype=torch.uint8)
    rows = []
    with open(path, "rb") as f:
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        warm = views(mapped, sizes)
        sources = {
            "RAM": lambda: views(ram.numpy(), sizes),
            "mmap": lambda: warm,
            "mmap, fresh": lambda: views(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY), sizes),
        }
        for name, make in sources.items():
            times = {"ref": [], "native": []}
            for r in range(args.repeats + 1):  # run 0 warms up
                order = ("ref", "native") if r % 2 else ("native", "ref")
                for kind in order:
                    if kind == "native" and ext is None:
                        continue
                    pieces = make()
                    if kind == "ref":
                        t = timed(lambda: _native.gather_copy_ref(dst, pieces))
                    else:
                        t = timed(lambda: ext.gather_copy(dst, pieces, args.threads))
                    if r:
                        times[kind].append(t)
            rows.append((name, median_gbps(size, times["ref"]),
                         median_gbps(size, times["native"]) if times["native"] else float("nan")))
    return rows  # the maps close when their last view is gone


# ---- CUDA ----------------------------------------------------------------------------------------------------
def bench_cuda(size: int, path: Path, args, ext) -> list[tuple[str, float, float, float, float]]:
    """Rows (source, pinned, pageable copy_, staged ref, staged native) in GB/s for one expert."""
    dev = torch.device("cuda")
    sizes = split(size, args.pieces)
    dst = torch.empty(size // 4, device=dev)
    stream = torch.cuda.Stream()
    sync = stream.synchronize
    pinned = torch.randint(0, 255, (size,), dtype=torch.uint8).pin_memory()
    pinned_pieces = views(pinned.numpy(), sizes)
    ring_ref = _native.StagingRingRef(dev, args.chunk_mb * MB, args.chunks)
    ring_nat = (_native.make_staging_ring(dev, args.chunk_mb * MB, args.chunks, args.threads, native=True)
                if ext is not None and ext.has_cuda() else None)
    ram = torch.randint(0, 255, (size,), dtype=torch.uint8)
    rows = []
    with open(path, "rb") as f:
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        for name, pieces in (("RAM", views(ram.numpy(), sizes)), ("mmap", views(mapped, sizes))):
            def plain(src_pieces):
                def run():
                    with torch.cuda.stream(stream):
                        for o, s in src_pieces:
                            dst[o:o + s.numel()].copy_(s, non_blocking=True)
                return run

            cases = {"pinned": plain(pinned_pieces), "pageable": plain(pieces),
                     "staged ref": lambda: ring_ref.copy(dst, pieces, stream)}
            if ring_nat is not None:
                cases["staged native"] = lambda: ring_nat.copy(dst, pieces, stream)
            times = {k: [] for k in cases}
            for r in range(args.repeats + 1):
                for k, fn in cases.items():
                    t = timed(fn, sync)
                    if r:
                        times[k].append(t)
            get = lambda k: median_gbps(size, times[k]) if times.get(k) else float("nan")  # noqa: E731
            rows.append((name, get("pinned"), get("pageable"), get("staged ref"), get("staged native")))
    return rows


def main(argv=None) -> int:
    p = ArgumentParser(description="Copy throughput: native (csrc/) vs PyTorch twins, CPU and CUDA.")
    p.add_argument("--sizes", default="1,16,64,352", help="expert sizes in MB (10^6 bytes), comma-separated (default: %(default)s)")
    p.add_argument("--pieces", type=int, default=3, help="pieces per expert, like w1/w2/w3 (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per case after one warm-up; the median is reported (default: %(default)s)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="native copy threads (default: all cores, %(default)s)")
    p.add_argument("--ref-threads", type=int, default=torch.get_num_threads(),
                   help="torch intra-op threads for the ref copies, torch.set_num_threads (default: %(default)s)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="cpu only, cuda only, or both when a GPU is visible (default: auto)")
    p.add_argument("--chunk-mb", type=int, default=8, help="staging-ring chunk size in MB for the CUDA staged copies (default: %(default)s)")
    p.add_argument("--chunks", type=int, default=3, help="staging-ring chunks (default: %(default)s)")
    p.add_argument("--no-build", action="store_true", help="do not compile the extension if it is missing; measure the twins only")
    p.add_argument("--build-dir", help="where to compile the extension if it is missing (default: moe_prefetch's JIT cache)")
    p.add_argument("--out", help="also write the tables to this Markdown file")
    args = p.parse_args(argv)
    torch.set_num_threads(args.ref_threads)
    sizes = [int(float(s) * MB) & ~3 for s in args.sizes.split(",") if s.strip()]
    if not sizes or min(sizes) < 4 * args.pieces:
        p.error("--sizes must list positive sizes of at least a few bytes per piece")

    ext = _native.extension()
    if ext is None and not args.no_build:
        print(f"native extension not loaded ({_native.origin()}); compiling it ...", file=sys.stderr)
        try:
            ext = _native.build(args.build_dir)
        except MoePrefetchError as e:
            print(f"warning: {e}\nmeasuring the PyTorch twins only", file=sys.stderr)
    lines = [f"native: {_native.origin() if ext is not None else 'not available'}", ""]

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "experts.bin"
        torch.randint(0, 255, (max(sizes),), dtype=torch.uint8).numpy().tofile(path)  # now in the page cache
        if args.device in ("auto", "cpu"):
            lines += [f"### CPU: {cpu_name()}, {os.cpu_count()} logical cores; gather_copy of {args.pieces} pieces; "
                      f"native {args.threads} threads, ref = torch copy_ with {torch.get_num_threads()} intra-op threads",
                      "", "| expert MB | source | ref GB/s | native GB/s | native/ref |", "|---:|---|---:|---:|---:|"]
            for size in sizes:
                for name, ref, nat in bench_cpu(size, path, args, ext):
                    lines.append(f"| {size / MB:g} | {name} | {ref:.2f} | {nat:.2f} | {nat / ref:.2f}x |")
                print(f"  cpu {size / MB:g} MB done", file=sys.stderr)
            lines.append("")
        if args.device in ("auto", "cuda"):
            if not torch.cuda.is_available():
                lines.append("### CUDA: no GPU visible, skipped")
            else:
                lines += [f"### CUDA: {torch.cuda.get_device_name()}; host {cpu_name()}; host -> device GB/s; "
                          f"staging ring {args.chunks} x {args.chunk_mb} MB, native {args.threads} threads", "",
                          "| expert MB | source | pinned | pageable copy_ | staged ref | staged native |",
                          "|---:|---|---:|---:|---:|---:|"]
                for size in sizes:
                    for name, pin, pageable, sref, snat in bench_cuda(size, path, args, ext):
                        lines.append(f"| {size / MB:g} | {name} | {pin:.2f} | {pageable:.2f} | {sref:.2f} | {snat:.2f} |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))  # failures: one line on stderr, non-zero status
