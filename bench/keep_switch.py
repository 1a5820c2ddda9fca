"""Does the keep ledger find the keep rule that pays? With host compute, predictive eviction's default
(KeepLedger: counted) against its two fixed rules, keeps judged on frequency and with recency.

    python bench/keep_switch.py --out bench/results      # ~5 min on 2 cores

A keep copies a host-computed miss into the cache behind its layer when it is likelier to be used at
its layer's next run than the expert it evicts. Judged with the recency line, that pays where routing
sticks across tokens and costs copies where it does not; the ledger counts which, on the uses where the
two rules' keeps differ. Time is modelled
(moe_prefetch.sim replays each trace through the runtime's planner from a cold cache, no predictor): a
layer computes in 1 unit, an expert crosses the link in --ratio units, the host computes one in
ratio / 2.4 (dual-channel DDR5 over PCIe 4.0), and each copy costs the compute thread 0 units (a GPU's
DMA engine) or --copy-cost units (the CPU backend's hand-offs; bench/throughput.py fits it on a run).
Two sets of traces: `tuning`, the demo's trace and synthetic ones of 8 layers at stickiness 0, 0.3,
0.6 and 16 layers at 0.6, on which the settings of the epoch-timing switch it replaced were chosen;
`held-out`, synthetic ones of 12 layers at 0.45, 24 at 0.6, 8 at 0.15 and 6 at 0.8 with other seeds,
which were not looked at until those settings were fixed. Stickiness: the share of a token's experts kept from the previous token.
"""
from __future__ import annotations

import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from moe_prefetch.cli_common import ArgumentParser, run_main, write_report  # noqa: E402
from moe_prefetch.sim import CostModel, Policy, Trace, simulate, synthetic_trace  # noqa: E402

DEMO_TRACE = ROOT / "bench" / "results" / "demo.trace.npz"
RULES = {"frequency": False, "recency": True, "ledger": None}  # Policy.keep_recency; None: the KeepLedger


def trace_sets(demo: Trace, tokens: int) -> dict[str, list[tuple[str, Trace]]]:
    tuning = [("demo trace", demo)]
    tuning += [(f"8 layers, sticky {s:g}", synthetic_trace(8, 8, 2, tokens, seed=8, repeat=s)) for s in (0.0, 0.3, 0.6)]
    tuning += [("16 layers, sticky 0.6", synthetic_trace(16, 8, 2, tokens, seed=16, repeat=0.6))]
    held = [(f"{L} layers, sticky {s:g}", synthetic_trace(L, 8, 2, tokens + 100, seed=100 + L, repeat=s))
            for L, s in ((12, 0.45), (24, 0.6), (8, 0.15), (6, 0.8))]
    return {"tuning": tuning, "held-out": held}


def run(sets, ratios, caches, copy_costs) -> list[dict]:
    rows = []
    for kind, traces in sets.items():
        for name, trace in traces:
            _, L, k = trace.routing.shape
            E = int(trace.header.get("experts", trace.routing.max() + 1))
            for copy in copy_costs:
                for ratio in ratios:
                    cost = CostModel(1e-3 - k * 1e-4, 1e-4, ratio * 1e-3, 1000, host_s=ratio * 1e-3 / 2.4,
                                     copy_s=copy * 1e-3)
                    for frac in caches:
                        slots = max(k, int(L * E * frac))
                        tps = {rule: simulate(trace, cost, slots, Policy(rule, eviction="predictive", host_compute=True,
                                                                         keep_recency=keep)).tokens_per_s
                               for rule, keep in RULES.items()}
                        rows.append(dict(set=kind, trace=name, copy_cost=copy, ratio=ratio, cache=frac, tokens_per_s=tps,
                                         ledger_over_best=tps["ledger"] / max(tps["frequency"], tps["recency"]),
                                         ledger_over_frequency=tps["ledger"] / tps["frequency"]))
                print(f"{kind}: {name}, copy cost {copy:g}: done", flush=True)
    return rows


def markdown(rows: list[dict]) -> list[str]:
    lines = ["Simulated, no predictor, predictive eviction, host compute: the keep ledger against the better of "
             "the two fixed keep rules, and against keeps on frequency (the rule before it chose).", "",
             "| traces | copy cost (layers) | configurations | ledger / better rule, mean | worst | "
             "ledger / frequency, min | max |", "|---|---|---|---|---|---|---|"]
    for kind in dict.fromkeys(r["set"] for r in rows):
        for copy in dict.fromkeys(r["copy_cost"] for r in rows):
            sel = [r for r in rows if r["set"] == kind and r["copy_cost"] == copy]
            best = [r["ledger_over_best"] for r in sel]
            freq = [r["ledger_over_frequency"] for r in sel]
            lines.append(f"| {kind} | {copy:g} | {len(sel)} | {statistics.mean(best):.3f} | {min(best):.3f} | "
                         f"{min(freq):.2f} | {max(freq):.2f} |")
    lines += ["", "| traces | trace | copy cost | link | cache | frequency | recency | ledger | ledger / better |",
              "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['set']} | {r['trace']} | {r['copy_cost']:g} | {r['ratio']:g} | {r['cache']:.0%} | "
              f"{r['tokens_per_s']['frequency']:.1f} | {r['tokens_per_s']['recency']:.1f} | "
              f"{r['tokens_per_s']['ledger']:.1f} | {r['ledger_over_best']:.3f} |" for r in rows]
    return lines


def main(argv=None) -> int:
    ap = ArgumentParser(description=__doc__.splitlines()[0])  # a bad flag: one line
    ap.add_argument("--trace", default=str(DEMO_TRACE), help="recorded trace for the tuning set's first row "
                    "(default: the demo model's)")
    ap.add_argument("--tokens", type=int, default=300, help="tokens per synthetic trace (held-out ones: 100 more; default 300)")
    ap.add_argument("--ratios", type=float, nargs="+", default=[11.2, 1.0], help="link time per expert / a layer's "
                    "compute (default: 11.2 1)")
    ap.add_argument("--caches", type=float, nargs="+", default=[0.25, 0.5, 0.75], help="cache fractions (default: 0.25 0.5 0.75)")
    ap.add_argument("--copy-costs", type=float, nargs="+", default=[0.0, 0.5, 2.0],
                    help="compute-thread time per copy, in layers (default: 0 0.5 2; the CPU backend's is 0.5-2 "
                    "depending on how fast the machine computes a layer)")
    ap.add_argument("--out", default=None, help="folder for keep_switch.md and .json")
    args = ap.parse_args(argv)
    if args.tokens < 2 or any(r <= 0 for r in args.ratios) or any(c < 0 for c in args.copy_costs) \
            or not all(0 < c <= 1 for c in args.caches):
        ap.error("--tokens must be at least 2, --ratios positive, --copy-costs at least 0 and --caches in (0, 1]")
    demo = Trace.load(args.trace)  # a missing or unreadable file: one line (run_main)
    demo = demo.head(min(400, demo.routing.shape[0]))
    rows = run(trace_sets(demo, args.tokens), args.ratios, args.caches, args.copy_costs)
    lines = markdown(rows)
    print("\n".join(lines[:2 + 2 + 2 * len(args.copy_costs)]))
    if args.out:
        write_report(args.out, "keep_switch", lines, dict(rows=rows))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))  # failures: one line on stderr, non-zero status
