"""Which eviction suits a model's routing: simulated decode throughput of LRU, LFU and predictive
eviction on a recorded routing trace and on synthetic traces whose routing sticks across tokens.

    python bench/eviction.py --out bench/results                        # the demo's trace + synthetic ones
    python -m moe_prefetch.trace --model DIR --data text.txt --out my.trace.npz
    python bench/eviction.py --trace my.trace.npz --sticky               # your model's trace alone

Eviction alone, no predictor (the default planner's prefetches ride on top of it), host compute off
and on, at each cache fraction, through the runtime's own planner. Besides the shipped policies (LRU,
LFU, predictive and auto, the default, which here, where every rule is given the same planning time,
leaves the predictive rule only for one that hits more):
`predictive (frequency only)`, the predictive rule without its learnt recency factor (what it was
before it had one), and Belady's farthest-next-use with the future known, the bound (with host
compute it also knows which host-computed misses its layer's next run will use again, and copies in
just those).
Each trace's stickiness is reported as the share of a token's experts that the previous token used in
the same layer, against k/E for routing with no memory.
Costs are a GPU's, in units of one layer's compute (attention and norms 0.8, each routed expert 0.1
at top-2): a link `--ratio` layers per expert (11.2: Mixtral int4 experts over PCIe 4.0 x16 on an
RTX 4090) and a host reading an expert `--host-over-link` times faster than the link (dual-channel
DDR5 at 60 GB/s over PCIe 4.0 at 25 GB/s, moe_prefetch/profiles); no fixed costs per copy (a GPU's
are microseconds) unless --copy-cost gives one (the CPU backend's, which bench/throughput.py fits; results
then go to eviction_copy<cost>.*). With host compute, two more columns fix predictive eviction's keep
rule (host-computed misses copied in judged on frequency, or with recency), which by default its keep
switch measures. Nothing here is a measurement: the runtime's figures are bench/throughput.py's.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from moe_prefetch.cli_common import ArgumentParser, run_main, write_report  # noqa: E402
from moe_prefetch.sim import CostModel, Policy, Trace, load_profiles, simulate, synthetic_trace  # noqa: E402

DEMO_TRACE = ROOT / "bench" / "results" / "demo.trace.npz"
EVICTIONS = [("LRU", "lru"), ("LFU", "lfu"), ("predictive (frequency only)", "predictive-frequency"),
             ("predictive", "predictive"), ("auto (the default)", "auto"), ("Belady (bound)", "belady")]
#: with host compute, predictive eviction's keep rule fixed either way (the default counts which pays)
KEEP_RULES = [("predictive, keeps on frequency", False), ("predictive, keeps with recency", True)]


def stickiness(routing: np.ndarray) -> float:
    """Share of each token's experts that the previous token used in the same layer."""
    prev, cur = routing[:-1], routing[1:]  # [N-1, L, k]
    return float((cur[..., :, None] == prev[..., None, :]).any(-1).mean())


def run(traces: dict[str, Trace], caches: list[float], ratio: float, host_over_link: float,
        copy_cost: float = 0.0) -> list[dict]:
    rows = []
    for name, trace in traces.items():
        N, L, k = trace.routing.shape
        E = int(trace.header.get("experts", trace.routing.max() + 1))
        expert_s = 0.1e-3
        layer_s = 0.8e-3 + 2 * expert_s  # the unit: one layer at top-2
        transfer_s = ratio * layer_s
        sticky = stickiness(trace.routing)
        for host in (False, True):
            cost = CostModel(attn_s=0.8e-3, expert_s=expert_s, transfer_s=transfer_s, expert_bytes=1,
                             host_s=transfer_s / host_over_link if host else None, copy_s=copy_cost * layer_s)
            for frac in caches:
                slots = max(k, round(frac * L * E))
                tps = {}
                for label, ev in EVICTIONS:
                    tps[label] = simulate(trace, cost, slots, Policy(label, eviction=ev, host_compute=host)).tokens_per_s
                for label, rule in KEEP_RULES if host else ():
                    tps[label] = simulate(trace, cost, slots, Policy(label, eviction="predictive", host_compute=True,
                                                                     keep_recency=rule)).tokens_per_s
                best = max(tps["LRU"], tps["LFU"])
                rows.append(dict(trace=name, layers=L, experts=E, top_k=k, tokens=N, stickiness=sticky, chance=k / E,
                                 host_compute=host, cache=frac, slots=slots, tokens_per_s=tps,
                                 predictive_over_best_of_lru_lfu=tps["predictive"] / best,
                                 auto_over_predictive=tps["auto (the default)"] / tps["predictive"],
                                 predictive_over_frequency_only=tps["predictive"] / tps["predictive (frequency only)"]))
                print(f"{name:22s} host={'on ' if host else 'off'} cache {frac:.2f}: "
                      + "  ".join(f"{lab} {v:.1f}" for lab, v in tps.items()), flush=True)
    return rows


def markdown(rows: list[dict], ratio: float, host_over_link: float, copy_cost: float = 0.0) -> list[str]:
    labels = [lab for lab, _ in EVICTIONS] + [lab for lab, _ in KEEP_RULES]
    fixed = f"{copy_cost:g} layer per copy on the compute thread" if copy_cost else "no fixed costs"
    lines = [f"Simulated tok/s (a GPU's costs in units of a layer's compute: link {ratio:g} layers per expert, host "
             f"{host_over_link:g}x faster than the link, {fixed}), eviction alone, no predictor. With host compute, "
             "`predictive` judges keeps as its keep ledger counts pays; the last two columns fix that rule.", "",
             "| trace | stickiness (chance) | host compute | cache | " + " | ".join(labels)
             + " | predictive / best of LRU, LFU | predictive / frequency only | auto / predictive |",
             "|---|---|---|---|" + "---|" * len(labels) + "---|---|---|"]
    for r in rows:
        cells = [f"{r['tokens_per_s'][lab]:.1f}" if lab in r["tokens_per_s"] else "-" for lab in labels]
        lines.append(f"| {r['trace']} | {r['stickiness']:.2f} ({r['chance']:.2f}) | {'on' if r['host_compute'] else 'off'} "
                     f"| {r['cache']:.0%} | " + " | ".join(cells)
                     + f" | {r['predictive_over_best_of_lru_lfu']:.2f} | {r['predictive_over_frequency_only']:.2f} "
                     f"| {r['auto_over_predictive']:.3f} |")
    return lines


def main(argv=None) -> int:
    ap = ArgumentParser(description=__doc__.splitlines()[0])  # a bad flag: one line
    ap.add_argument("--trace", default=None, help="a routing trace from `python -m moe_prefetch.trace` "
                    "(default: the demo model's, bench/results/demo.trace.npz)")
    ap.add_argument("--sticky", type=float, nargs="*", default=[0.0, 0.3, 0.6],
                    help="synthetic traces (8 layers x 8 experts, top-2, Zipf popularity per layer), each "
                    "with this share of a token's experts kept from the previous token; none: --sticky alone")
    ap.add_argument("--tokens", type=int, default=600, help="tokens of each synthetic trace (default: 600)")
    ap.add_argument("--caches", type=float, nargs="+", default=[0.25, 0.5, 0.75],
                    help="cache sizes as fractions of all experts (default: 0.25 0.5 0.75)")
    ap.add_argument("--ratio", type=float, default=11.2, help="link time per expert / a layer's compute (default: 11.2)")
    ap.add_argument("--host-over-link", type=float, default=None,
                    help="host expert read rate / link rate (default: dual-channel DDR5 over PCIe 4.0 x16, from the profiles)")
    ap.add_argument("--copy-cost", type=float, default=0.0,
                    help="compute-thread time each copy costs, in layers (default 0, a GPU's DMA; the CPU backend's "
                    "fitted cost is about 0.5: bench/throughput.py prints it)")
    ap.add_argument("--out", default=None, help="folder for eviction.md and eviction.json")
    args = ap.parse_args(argv)
    if args.ratio <= 0 or args.tokens < 2 or not all(0 < c <= 1 for c in args.caches) or args.copy_cost < 0:
        ap.error("--ratio must be positive, --tokens at least 2, --copy-cost at least 0 and each --caches value in (0, 1]")
    if any(not 0 <= s < 1 for s in args.sticky):
        ap.error("each --sticky value must be in [0, 1)")
    host_over_link = args.host_over_link
    if host_over_link is None:
        host_over_link = load_profiles("hosts")["ddr5-2ch"]["read_gbps"] / load_profiles("hardware")["rtx4090-pcie4"]["h2d_gbps"]
    if host_over_link <= 0:
        ap.error("--host-over-link must be positive")
    path = Path(args.trace) if args.trace else DEMO_TRACE
    trace = Trace.load(path)  # a missing or unreadable file: one line (run_main)
    traces = {("demo trace" if args.trace is None else path.name): trace}
    for s in args.sticky:
        traces[f"synthetic, sticky {s:g}"] = synthetic_trace(8, 8, 2, args.tokens, repeat=s)
    rows = run(traces, args.caches, args.ratio, host_over_link, args.copy_cost)
    lines = markdown(rows, args.ratio, host_over_link, args.copy_cost)
    print("\n".join(lines))
    if args.out:
        name = "eviction" if not args.copy_cost else f"eviction_copy{args.copy_cost:g}"
        write_report(args.out, name, lines, dict(ratio=args.ratio, host_over_link=host_over_link,
                                                 copy_cost=args.copy_cost, rows=rows))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))  # failures: one line on stderr, non-zero status
