"""Simulated decode throughput of every policy on GPU profiles, from a recorded routing trace.

    python -m moe_prefetch.trace --model demo --data moe_prefetch/demo_model/heldout.txt \
        --predictor-path bench/results/demo.m2r2.safetensors --out demo.trace.npz
    python bench/simulate.py --trace demo.trace.npz --shape mixtral-8x7b --dtype fp16 int4 \
        --hardware rtx4090-pcie4 rtx3060-pcie3 --host-compute --md out.md --json out.json

Every policy runs through the runtime's own planner (moe_prefetch/planner.py) with a cost model from
the profiles (moe_prefetch/profiles/*.json, sources inside): hardware for the GPU and its link, hosts
for the CPU memory that host compute reads, models for the shape. The cache holds what fits in the
GPU's memory after the dense weights and a 2 GiB reserve, unless --cache gives fractions of all
experts. When the trace comes from another model than the shape (the demo model standing in for
Mixtral), every table says so. Nothing here is a measurement.
"""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moe_prefetch.cli_common import ArgumentParser, run_main  # noqa: E402
from moe_prefetch.sim import (BYTES_PER_PARAM, CostModel, Trace, load_profiles, physical_bound,  # noqa: E402
                              simulate, standard_policies)

RESERVE = 2 * 2**30


def cache_fraction(hw: dict, shape: dict, dtype: str) -> float:
    """Share of all experts that fit in device memory next to the dense weights and the reserve."""
    dense = (shape["moe_layers"] * shape["dense_params_per_layer"] + shape["other_dense_params"]) * 2
    expert = shape["expert_params"] * BYTES_PER_PARAM[dtype]
    room = hw["memory_gib"] * 2**30 - dense - RESERVE
    return max(0.0, min(1.0, room / expert / (shape["moe_layers"] * shape["experts"])))


def table(results: list, base: float, bounds: list[float]) -> list[str]:
    """Markdown rows: one per result, speeds relative to the first policy and to the row's bound."""
    lines = ["| policy | tokens/s | x on-demand | of bound | hit rate | on host | stall | MB moved/token "
             "| prefetches/token issued (gated) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r, bound in zip(results, bounds):
        row = r.row()
        pf = f"{r.prefetch_issued / r.tokens:.2f} ({r.prefetch_gated / r.tokens:.2f})" if r.prefetch_issued or r.prefetch_gated else "-"
        lines.append(f"| {r.policy} | {row['tokens_per_s']:.2f} | {row['tokens_per_s'] / base:.2f} "
                     f"| {row['tokens_per_s'] / bound:.0%} | {row['hit_rate']:.1%} | {row['host_fraction']:.0%} "
                     f"| {row['stall_fraction']:.0%} | {row['mb_per_token']:.0f} | {pf} |")
    return lines


def planner_blob() -> str:
    """Git's blob id of planner.py, so a table can be matched with the planner that produced it."""
    data = (Path(__file__).resolve().parents[1] / "moe_prefetch" / "planner.py").read_bytes()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def main(argv=None) -> int:
    hw_all, shapes, hosts = load_profiles("hardware"), load_profiles("models"), load_profiles("hosts")
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trace", required=True, help="trace file from python -m moe_prefetch.trace")
    p.add_argument("--shape", default="mixtral-8x7b", choices=sorted(shapes), help="model shape for the costs (default: mixtral-8x7b)")
    p.add_argument("--hardware", nargs="+", default=sorted(hw_all), choices=sorted(hw_all), help="GPU profiles (default: all)")
    p.add_argument("--dtype", nargs="+", default=["fp16"], choices=sorted(BYTES_PER_PARAM), help="expert precision(s) (default: fp16)")
    p.add_argument("--cache", nargs="+", type=float, help="cache sizes as fractions of all experts (default: what fits in memory)")
    p.add_argument("--max-lookahead", type=int, default=4, help="ours: K = 1..N (default: 4)")
    p.add_argument("--host", nargs="+", default=["ddr5-2ch"], choices=sorted(hosts),
                   help="host memory profile(s) for the host-compute rows (default: ddr5-2ch)")
    p.add_argument("--host-compute", action="store_true",
                   help="add the rows that may compute missed experts on the host, and the bound with host compute")
    p.add_argument("--md", help="also write the tables to this Markdown file")
    p.add_argument("--json", help="also write all rows to this JSON file")
    args = p.parse_args(argv)
    bad = [c for c in args.cache or [] if not 0.0 < c <= 1.0]
    if bad:
        p.error(f"--cache takes fractions of all experts in (0, 1], got {bad[0]:g}")
    if args.max_lookahead < 1:
        p.error(f"--max-lookahead must be at least 1, got {args.max_lookahead}")

    trace = Trace.load(args.trace)
    N, L, k = trace.shape
    E = trace.header["experts"]
    shape = shapes[args.shape]
    if (E, k) != (shape["experts"], shape["top_k"]):
        p.error(f"trace has {E} experts top-{k} but {args.shape} has {shape['experts']} top-{shape['top_k']}: "
                "record a trace with the same routing shape")
    stand_in = trace.header.get("model", "?")
    predictors = [x for x in ("next-gate", "history", "m2r2") if x in trace.scores]
    K = min(args.max_lookahead, trace.header.get("lookahead", 1))
    copy_policies = standard_policies(predictors, K)
    host_policies = [pol for pol in standard_policies(predictors, K, host_compute=True) if pol.host_compute]
    blob = planner_blob()[:12]
    md = [f"# Simulated decode throughput, {shape['name']} shape, batch 1\n",
          f"Simulated, not measured: the routing trace of the `{stand_in}` model ({N} tokens, {L} MoE layers, "
          f"{E} experts top-{k}) stands in for {shape['name']} ({shape['moe_layers']} MoE layers); per-layer "
          "costs come from the profiles in moe_prefetch/profiles (bytes / bandwidth, memory-bound batch-1 "
          "decode), and time is scaled by real layers / trace layers. Every policy runs through the runtime's "
          "planner (moe_prefetch/planner.py). Host compute assumes the host reads an expert at the profile's "
          "practical memory rate, an optimistic rate for a CPU kernel. "
          f"Planner: moe_prefetch/planner.py blob {blob}.\n",
          "`of bound` compares with the physical bound of the row's kind: copy only, the fewest copies any "
          "policy needs (Belady's MIN) against the device's own compute, each resource serial; with host "
          "compute, the best split of misses between the link and the host. `hit rate` counts experts served from a slot without a "
          "demand copy (a prefetch still in flight included); `on host`, experts computed on the host.\n"]
    rows = []
    for hw_name in args.hardware:
        hw = hw_all[hw_name]
        for dtype in args.dtype:
            cost = CostModel.for_gpu(hw, shape, dtype, L)
            for frac in args.cache or [cache_fraction(hw, shape, dtype)]:
                slots = max(k, round(frac * L * E))
                head = [f"\n## {hw['name']}, {shape['name']} {dtype} experts, cache {frac:.0%} of experts "
                        f"({slots} of {L * E} slots in the trace)\n",
                        f"Simulated: routing trace of `{stand_in}` ({N} tokens, {L} MoE layers) standing in for "
                        f"{shape['name']} ({shape['moe_layers']} MoE layers); costs from the profiles. Not a measurement. "
                        f"Per expert: device {cost.expert_s * 1e3:.2f} ms, link {cost.transfer_s * 1e3:.2f} ms; "
                        f"resident work per layer {cost.attn_s * 1e3:.2f} ms.\n"]
                results = [simulate(trace, cost, slots, pol) for pol in copy_policies]
                bound = physical_bound(trace, cost, slots)
                results.append(bound)
                labelled = [(r, None) for r in results]
                if args.host_compute:
                    for host_name in args.host:
                        hcost = CostModel.for_gpu(hw, shape, dtype, L, hosts[host_name])
                        head.append(f"Host compute on {hosts[host_name]['name']} (`{host_name}`): "
                                    f"{hcost.host_s * 1e3:.2f} ms per expert.\n")
                        suffix = f" [{host_name}]" if len(args.host) > 1 else ""
                        for pol in host_policies:
                            r = simulate(trace, hcost, slots, pol)
                            r.policy += suffix
                            labelled.append((r, host_name))
                        hb = physical_bound(trace, hcost, slots, host_compute=True)
                        hb.policy += suffix
                        labelled.append((hb, host_name))
                bound_of = {h: r.tokens_per_s for r, h in labelled if r.policy.startswith("physical bound")}
                lines = head + table([r for r, _ in labelled], results[0].tokens_per_s, [bound_of[h] for _, h in labelled])
                print("\n".join(lines))
                md.extend(lines)
                for r, host_name in labelled:
                    rows.append(dict(r.row(), hardware=hw_name, dtype=dtype, cache_fraction=frac, shape=args.shape,
                                     host=host_name, trace_model=stand_in, simulated=True,
                                     planner_blob=blob))
    if args.md:
        Path(args.md).write_text("\n".join(md) + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))  # failures: one line on stderr, non-zero status
