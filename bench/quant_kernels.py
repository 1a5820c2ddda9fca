"""CPU matmul time of quantized experts against the dense one, per path of moe_prefetch.quant.linear.

    python bench/quant_kernels.py                        # 1 thread, rows 1 and 8, small + Mixtral width
    python bench/quant_kernels.py --threads 2 --rows 1,8,64,256 --no-big

For each matrix [out, in], activation dtype and row count n, the median over --repeats of:
  dense        torch.mm(x, w.T) with w in the activation dtype
  int8 deq     int8 group-wise (g = --group) dequantize + mm (the exact path)
  int8 fused   torch._weight_int8pack_mm on per-channel int8 (group_size=-1; its only layout)
  int4 deq     int4 asymmetric group-wise dequantize + mm
  int4 fused   aten._weight_int4pack_mm_for_cpu, weights pre-packed by pack_for_kernel
Cells are `ms (time / dense)`. The quantization error of each storage format on the same Gaussian
weights is printed below the table (g-1: one group per output row). Numbers mean something only next
to the machine they name.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import psutil
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from moe_prefetch.cli_common import ArgumentParser, run_main  # noqa: E402
from moe_prefetch import quant  # noqa: E402

SMALL = [(2 * 1024, 512), (512, 1024)]  # Mixtral's gate_up [2I, H] and down [H, I], scaled down
BIG = (28672, 4096)  # Mixtral-8x7B gate_up_proj [2 * 14336, 4096]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def median_ms(fn, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def bench_shape(shape: tuple[int, int], rows: list[int], dtypes: list[str], group: int, repeats: int):
    """Rows of the table for one matrix shape, plus the quantization error of each format."""
    out, inp = shape
    w = torch.randn(out, inp) * 0.02  # [out, in], float32 master copy
    specs = {
        "int8 deq": quant.QuantSpec("int8", group),
        "int8 fused": quant.QuantSpec("int8", -1),
        "int4 deq": quant.QuantSpec("int4", group),
        "int4 fused": quant.QuantSpec("int4", group),
    }
    by_spec = {spec: quant.quantize(w, spec) for spec in set(specs.values())}
    parts = {name: by_spec[spec] for name, spec in specs.items()}
    errors = {}
    for spec, p in by_spec.items():
        diff = quant.dequantize(p, spec, torch.float32) - w
        errors[f"{spec.name}-g{spec.group_size}"] = (diff.norm() / w.norm()).item()
        del diff
    table = []
    for dname in dtypes:
        dtype = DTYPES[dname]
        wd = w.to(dtype)  # [out, in]
        packed = {}
        for name in ("int8 fused", "int4 fused"):
            why = quant.fused_unsupported(shape, specs[name], "cpu", dtype)
            packed[name] = None if why else quant.pack_for_kernel(parts[name], specs[name], "cpu", dtype)
        for n in rows:
            x = torch.randn(n, inp).to(dtype)  # [n, in]
            cells = {"dense": median_ms(lambda x=x, wd=wd: torch.mm(x, wd.T), repeats)}
            for name, spec in specs.items():
                fused = name.endswith("fused")
                if fused and packed[name] is None:
                    cells[name] = None
                    continue
                kernel, kw = ("fused", packed[name]) if fused else ("dequant", None)
                cells[name] = median_ms(lambda x=x, p=parts[name], s=spec, k=kernel, kw=kw:
                                        quant.linear(x, p, s, k, kw), repeats)
            table.append((shape, n, dname, cells))
    return table, errors


def fmt(ms: float | None, dense: float) -> str:
    if ms is None:
        return "n/a"
    return f"{ms:.3f} ({ms / dense:.2f}x)"


def main(argv: list[str] | None = None) -> None:
    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    ap.add_argument("--rows", default="1,8", help="comma-separated row counts n of x [n, in]")
    ap.add_argument("--dtypes", default="bf16,fp32", help=f"activation dtypes among {','.join(DTYPES)}")
    ap.add_argument("--group", type=int, default=128, help="group size of the group-wise formats")
    ap.add_argument("--repeats", type=int, default=20, help="timed runs per cell (median)")
    ap.add_argument("--big-repeats", type=int, default=5, help="timed runs per cell at Mixtral width")
    ap.add_argument("--no-big", action="store_true", help=f"skip the {list(BIG)} matrix")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = [int(r) for r in args.rows.split(",")]
    dtypes = [d.strip() for d in args.dtypes.split(",")]
    for d in dtypes:
        if d not in DTYPES:
            ap.error(f"unknown dtype {d!r}: expected {', '.join(DTYPES)}")

    shapes = [(s, args.repeats) for s in SMALL]
    # fp32 master + dense copy + float32 dequant temporary + codes: ~4 fp32 copies of the matrix
    big_need = 4 * BIG[0] * BIG[1] * 4
    if not args.no_big:
        if psutil.virtual_memory().available > 1.5 * big_need:
            shapes.append((BIG, args.big_repeats))
        else:
            print(f"skipping {list(BIG)}: needs ~{big_need / 1e9:.1f} GB free\n")

    print(f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"{torch.get_num_threads()} torch thread(s), torch {torch.__version__}, "
          f"ISA {torch.backends.cpu.get_cpu_capability()}\n")
    cols = ["int8 deq", "int8 fused", "int4 deq", "int4 fused"]
    print(f"| matrix [out, in] | n | dtype | dense ms | int8-g{args.group} deq+mm | int8-per-channel fused "
          f"| int4-g{args.group} deq+mm | int4-g{args.group} fused |")
    print("|---|---:|---|---:|---:|---:|---:|---:|")
    all_errors = {}
    for shape, repeats in shapes:
        table, errors = bench_shape(shape, rows, dtypes, args.group, repeats)
        all_errors[shape] = errors
        for (out, inp), n, dname, cells in table:
            dense = cells["dense"]
            print(f"| [{out}, {inp}] | {n} | {dname} | {dense:.3f} | "
                  + " | ".join(fmt(cells[c], dense) for c in cols) + " |", flush=True)
    print("\nquantization error ||w - w_hat||_F / ||w||_F on Gaussian weights:")
    for (out, inp), errors in all_errors.items():
        print(f"  [{out}, {inp}]: " + ", ".join(f"{k} {100 * v:.3f}%" for k, v in errors.items()))


if __name__ == "__main__":
    sys.exit(run_main(main))  # failures: one line on stderr, non-zero status
