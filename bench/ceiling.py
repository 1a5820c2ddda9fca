"""How much could prediction gain at a given link ratio? The planner with no predictor, with the real
predictors, with an oracle, and with an oracle plus Belady's eviction, on a recorded routing trace.

    python bench/ceiling.py                      # link 11.2 layer-computes per expert, 600 tokens
    python bench/ceiling.py --ratio 1 --tokens 1000 --slots 24

Time is modelled, not measured (moe_prefetch.sim replays the trace through the runtime's planner): a
layer computes in 1 unit (0.8 attention + 2 x 0.1 experts), one expert crosses the link in --ratio
units and the host computes one in ratio / --host-over-link. No predictor cost is charged, so the rows
are what each prediction could give at best on this routing.
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from moe_prefetch.cli_common import ArgumentParser, run_main  # noqa: E402
from moe_prefetch.sim import CostModel, Policy, Trace, simulate  # noqa: E402


def main(argv=None) -> int:
    ap = ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trace", default=str(ROOT / "bench/results/demo.trace.npz"), help="trace from moe_prefetch.trace --data")
    ap.add_argument("--ratio", type=float, default=11.2, help="expert transfer time / layer compute time (default 11.2)")
    ap.add_argument("--host-over-link", type=float, default=2.4, help="host expert rate / link rate (default 2.4: DDR5-2ch / PCIe 4)")
    ap.add_argument("--slots", type=int, help="cache slots (default: half the experts)")
    ap.add_argument("--tokens", type=int, default=600, help="tokens of the trace to replay (default 600)")
    ap.add_argument("--lookahead", type=int, default=None,
                    help="K for the predictor rows (default: 4, or the trace's recorded lookahead if less)")
    args = ap.parse_args(argv)
    tr = Trace.load(args.trace)
    n = min(args.tokens, tr.routing.shape[0])
    tr = tr.head(n)
    _, L, k = tr.routing.shape
    E = int(tr.header.get("experts", tr.routing.max() + 1))
    slots = args.slots or L * E // 2
    layer, expert = 1e-3, 0.1e-3
    transfer = args.ratio * layer
    recorded = min((s.shape[2] for s in tr.scores.values()), default=4)  # [N, L, K, E] per predictor
    K = args.lookahead if args.lookahead is not None else min(4, recorded)
    if K < 1:
        ap.error(f"--lookahead must be at least 1, got {K}")
    if tr.scores and K > recorded:  # before any row is printed
        ap.error(f"the trace has predictor scores for a lookahead of at most {recorded}, --lookahead asks {K} "
                 "(record it with a larger --lookahead, or ask for less)")
    print(f"{args.trace}: {n} tokens, {L} layers x {E} experts (top-{k}), {slots} slots; link {args.ratio} "
          f"layer-computes per expert, host {args.host_over_link}x the link\n")
    print("| policy | host compute | tokens per 1000 layer-computes | x no predictor | hit rate | prefetches issued |")
    print("|---|---|---|---|---|---|")
    for host in (False, True):
        cost = CostModel(layer - k * expert, expert, transfer, 1000,
                         host_s=transfer / args.host_over_link if host else None)
        rows = [("no predictor, predictive eviction", Policy("none", eviction="predictive", host_compute=host))]
        rows += [(f"{p} K={K}", Policy(p, p, K, eviction="predictive", host_compute=host))
                 for p in sorted(tr.scores)]
        rows += [(f"oracle K={K}", Policy("oracle", "oracle", K, eviction="predictive", host_compute=host)),
                 (f"oracle K={K} + Belady eviction", Policy("belady", "oracle", K, eviction="belady",
                                                             host_compute=host, adaptive=False))]
        base = None
        for name, pol in rows:
            r = simulate(tr, cost, slots, pol)
            tps = r.tokens_per_s * layer * 1000  # tokens per 1000 layer-computes
            base = base or tps
            print(f"| {name} | {'on' if host else 'off'} | {tps:.2f} | {tps / base:.2f} | {r.hit_rate:.1%} | "
                  f"{r.prefetch_issued} |")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))  # failures: one line on stderr, non-zero status
