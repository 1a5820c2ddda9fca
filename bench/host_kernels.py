"""Host compute of one quantized expert: the exact path (dequantize, then mm) against the fused one
(host_kernels.PackedMatrix: PyTorch's weight-only CPU kernels on codes repacked once).

    python bench/host_kernels.py                 # Mixtral-8x7B's expert shape, 1 thread, 1 row (decode)
    python bench/host_kernels.py --hidden 128 --inter 160 --dtype fp32   # the demo model's expert

One expert applied to n token rows: gate_up [2I, H] and down [H, I], as the host executor runs it
(median of --repeats). Cells are ms per expert and the exact / fused ratio. Numbers mean something only
next to the machine they name (printed).
"""
from __future__ import annotations

import platform
import sys
from pathlib import Path

import psutil
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from moe_prefetch.cli_common import ArgumentParser, run_main  # noqa: E402
from moe_prefetch import quant  # noqa: E402
from moe_prefetch.host_kernels import PackedMatrix  # noqa: E402

sys.path.insert(0, str(ROOT / "bench"))
from quant_kernels import median_ms  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def expert(x, up, down, inter):
    h = up(x)  # [n, 2I]
    h = torch.nn.functional.silu(h[:, :inter]) * h[:, inter:]  # [n, I]
    return down(h)  # [n, H]


def main(argv=None) -> int:
    ap = ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=4096, help="H (default: Mixtral-8x7B's 4096)")
    ap.add_argument("--inter", type=int, default=14336, help="I (default: Mixtral-8x7B's 14336)")
    ap.add_argument("--dtype", default="bf16", choices=DTYPES, help="activation dtype (default bf16)")
    ap.add_argument("--rows", type=int, default=1, help="token rows n (default 1: decode)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per cell (median)")
    ap.add_argument("--formats", default="int8:128,int4:128,int4:32", help="kind:group list")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    dtype, H, I = DTYPES[args.dtype], args.hidden, args.inter
    torch.manual_seed(0)
    x = torch.randn(args.rows, H).to(dtype)  # [n, H]
    print(f"{platform.processor() or platform.machine()}, {psutil.cpu_count(logical=True)} logical CPUs, "
          f"torch {torch.__version__}, {args.threads} thread(s); expert H={H} I={I}, {args.dtype}, n={args.rows}\n")
    print("| format | bytes / expert | exact ms | fused ms | exact / fused | kernels |")
    print("|---|---|---|---|---|---|")
    for item in args.formats.split(","):
        kind, group = item.split(":")
        spec = quant.QuantSpec.from_name(kind, group_size=int(group))
        mats = {"up": torch.randn(2 * I, H) * 0.02, "down": torch.randn(H, I) * 0.02}  # [out, in]
        parts = {k: quant.quantize(w, spec) for k, w in mats.items()}
        del mats
        nbytes = sum(t.numel() * t.element_size() for p in parts.values() for t in p.values())

        def exact_mm(name):
            p, inp = parts[name], (H if name == "up" else I)
            return lambda r: torch.mm(r, quant.dequantize(p, spec, dtype, inp).T)

        packed = {k: PackedMatrix(p, spec, dtype, H if k == "up" else I) for k, p in parts.items()}
        t_exact = median_ms(lambda: expert(x, exact_mm("up"), exact_mm("down"), I), args.repeats)
        t_fused = median_ms(lambda: expert(x, packed["up"], packed["down"], I), args.repeats)
        kinds = "/".join(m.kind for m in packed.values())
        print(f"| {kind} g{group} | {nbytes / 2**20:.1f} MiB | {t_exact:.2f} | {t_fused:.2f} | "
              f"{t_exact / t_fused:.1f} | {kinds} |")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))  # failures: one line on stderr, non-zero status
