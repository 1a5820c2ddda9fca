"""What scoring the next K layers costs the compute thread, per predicted layer, on the demo model.

    python bench/predictor_cost.py --predictor-path bench/results/demo.m2r2.safetensors --out bench/results

For next-gate and m2r2 at K = 1, 2, 3 and one decode row: the prefetcher's device work for one layer
(the predictor's scores for every distance, then the [D, 2, E] summary read back with the routing),
computed layer by layer through the family's own norm and router modules (Predictor.predict_stacked
of the base class, what the prefetcher did before predictors/stacked.py) and batched (the
predictors' own predict_stacked). Interleaved repeats in one process; the table gives the median
microseconds per call and the ratio. At decode every op is launch overhead, so the count of ops is
what this measures; the absolute figures are for the machine named in the output only.
"""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import moe_prefetch as mp  # noqa: E402
from moe_prefetch.cli_common import ArgumentParser, run_main, write_report  # noqa: E402
from moe_prefetch.predictors import ModelView, Predictor, make_predictor  # noqa: E402
from moe_prefetch.prefetch import summarise  # noqa: E402
from transfer import cpu_name  # noqa: E402  (bench/transfer.py: the CPU's model name)


def per_call_us(fn, calls: int) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls * 1e6


@torch.inference_mode()
def main(argv=None) -> int:
    ap = ArgumentParser(description=__doc__.splitlines()[0])  # a bad flag: one line
    ap.add_argument("--model", default="demo")
    ap.add_argument("--predictor-path", default=None, help="m2r2 file for --model (omit: next-gate only)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--calls", type=int, default=500)
    ap.add_argument("--out", default=None, help="folder for predictor_cost.md and .json")
    args = ap.parse_args(argv)
    if args.predictor_path and not Path(args.predictor_path).is_file():
        ap.error(f"--predictor-path {args.predictor_path} does not exist (train one with python -m moe_prefetch.calibrate)")
    if args.repeats < 1 or args.calls < 1:
        ap.error("--repeats and --calls must be at least 1")
    torch.set_num_threads(1)
    model, _ = mp.load_model(args.model, mp.OffloadConfig(device="cpu", predictor="none", show_progress=False))
    view = ModelView.of(model, model.moe_runtime.adapter)
    predictors = [make_predictor("next-gate", view)]
    if args.predictor_path:
        predictors.append(make_predictor("m2r2", view, args.predictor_path))
    h = torch.randn(1, view.hidden_size, generator=torch.Generator().manual_seed(0)).to(next(model.parameters()).dtype)
    rows = []
    for p in predictors:
        for K in (1, 2, 3):
            ds = list(range(1, K + 1))
            if K > p.max_lookahead()[0]:
                continue
            ways = {"layer by layer": lambda p=p, ds=ds: summarise(Predictor.predict_stacked(p, 0, h, ds)[1], view.top_k),
                    "batched": lambda p=p, ds=ds: summarise(p.predict_stacked(0, h, ds)[1], view.top_k)}
            times = {w: [] for w in ways}
            for _ in range(args.repeats):
                for w, fn in ways.items():
                    times[w].append(per_call_us(fn, args.calls))
            old, new = (statistics.median(times[w]) for w in ways)
            rows.append(dict(predictor=p.name, lookahead=K, layer_by_layer_us=old, batched_us=new, ratio=old / new,
                             fused=view.stacked.fused(tuple(range(1, K + 1)))))
    model.moe_runtime.close()
    where = f"{cpu_name()}, 1 thread, torch {torch.__version__}"
    lines = [f"Prefetcher device work per predicted layer, {args.model}, one decode row, {where}; median of "
             f"{args.repeats} interleaved repeats of {args.calls} calls.", "",
             "| predictor | K | layer by layer (us) | batched (us) | speed-up |", "|---|---|---|---|---|"]
    lines += [f"| {r['predictor']} | {r['lookahead']} | {r['layer_by_layer_us']:.0f} | {r['batched_us']:.0f} | "
              f"{r['ratio']:.2f}x |" for r in rows]
    print("\n".join(lines))
    if args.out:
        write_report(args.out, "predictor_cost", lines, dict(machine=where, rows=rows))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))  # failures: one line on stderr, non-zero status
