"""Simulated decode throughput of every policy on GPU profiles, from a recorded routing trace.

    python -m moe_prefetch.trace --model demo --data moe_prefetch/demo_model/heldout.txt \
        --predictor-path demo.m2r2 --out demo.trace.npz
    python bench/simulate.py --trace demo.trace.npz --shape mixtral-8x7b --dtype fp16 int4

Hardware profiles and model shapes are data (moe_prefetch/profiles/*.json, sources inside). The
cache holds what fits in the GPU's memory after the dense weights and a 2 GiB reserve, unless
--cache gives fractions of all experts. When the trace comes from another model than the shape
(the demo model standing in for Mixtral), every table says so.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moe_prefetch.sim import (BYTES_PER_PARAM, CostModel, Trace, load_profiles, physical_bound,  # noqa: E402
                              simulate, standard_policies)

RESERVE = 2 * 2**30


def cache_fraction(hw: dict, shape: dict, dtype: str) -> float:
    dense = (shape["moe_layers"] * shape["dense_params_per_layer"] + shape["other_dense_params"]) * 2
    expert = shape["expert_params"] * BYTES_PER_PARAM[dtype]
    room = hw["memory_gib"] * 2**30 - dense - RESERVE
    return max(0.0, min(1.0, room / expert / (shape["moe_layers"] * shape["experts"])))


def main(argv=None) -> int:
    hw_all, shapes = load_profiles("hardware"), load_profiles("models")
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trace", required=True, help="trace file from python -m moe_prefetch.trace")
    p.add_argument("--shape", default="mixtral-8x7b", choices=sorted(shapes), help="model shape for the costs (default: mixtral-8x7b)")
    p.add_argument("--hardware", nargs="+", default=sorted(hw_all), choices=sorted(hw_all), help="GPU profiles (default: all)")
    p.add_argument("--dtype", nargs="+", default=["fp16"], choices=sorted(BYTES_PER_PARAM), help="expert precision(s) (default: fp16)")
    p.add_argument("--cache", nargs="+", type=float, help="cache sizes as fractions of all experts (default: what fits in memory)")
    p.add_argument("--max-lookahead", type=int, default=4, help="ours: K = 1..N (default: 4)")
    p.add_argument("--json", help="also write all rows to this JSON file")
    args = p.parse_args(argv)

    trace = Trace.load(args.trace)
    N, L, k = trace.shape
    E = trace.header["experts"]
    shape = shapes[args.shape]
    if (E, k) != (shape["experts"], shape["top_k"]):
        p.error(f"trace has {E} experts top-{k} but {args.shape} has {shape['experts']} top-{shape['top_k']}: "
                "record a trace with the same routing shape")
    stand_in = trace.header.get("model", "?")
    predictors = [x for x in ("next-gate", "history", "m2r2") if x in trace.scores]
    policies = standard_policies(predictors, min(args.max_lookahead, trace.header.get("lookahead", 1)))
    rows = []
    for hw_name in args.hardware:
        hw = hw_all[hw_name]
        for dtype in args.dtype:
            cost = CostModel.for_gpu(hw, shape, dtype, L)
            fractions = args.cache or [cache_fraction(hw, shape, dtype)]
            for frac in fractions:
                slots = max(k, round(frac * L * E))
                print(f"\n### {hw['name']}, {shape['name']} {dtype} experts, cache {frac:.0%} of experts "
                      f"({slots} of {L * E} slots in the trace)\n")
                print(f"Simulated: routing trace of `{stand_in}` ({N} tokens, {L} MoE layers) standing in for "
                      f"{shape['name']} ({shape['moe_layers']} MoE layers); costs from the profiles. Not a measurement.\n")
                print("| policy | tokens/s | x on-demand | hit rate | stall | MB moved/token |")
                print("|---|---|---|---|---|---|")
                results = [simulate(trace, cost, slots, pol) for pol in policies]
                results.append(physical_bound(trace, cost, slots))
                base = results[0].tokens_per_s
                for r in results:
                    row = r.row()
                    print(f"| {r.policy} | {row['tokens_per_s']:.2f} | {row['tokens_per_s'] / base:.2f} | {row['hit_rate']:.1%} "
                          f"| {row['stall_fraction']:.0%} | {row['mb_per_token']:.0f} |")
                    rows.append(dict(row, hardware=hw_name, dtype=dtype, cache_fraction=frac, shape=args.shape,
                                     trace_model=stand_in))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
