"""Does the prediction switch find prediction where it pays? The adaptive planner against never and
always predicting, simulated, on the demo trace and on sticky synthetic traces of 8, 16 and 32 layers.

    python bench/switch.py --out bench/results      # ~4 min on 2 cores

Time is modelled (moe_prefetch.sim replays each trace through the runtime's planner from a cold
cache): a layer computes in 1 unit, an expert crosses the link in --ratio units, the host computes one
in ratio / 2.4, the predictor costs --predict-cost units a predicted layer (default 0.05: a GPU's small
kernels; the CPU backend's Python predictors cost about 0.4 of its layer compute). `history` is replayed at a lookahead of L (the
simulator computes its scores from the routing, as the runtime's history predictor does), so the next
token's layers are predicted a whole token ahead. Host-computed misses are kept on frequency in every
arm, so that the rows measure the prediction switch alone (bench/keep_switch.py measures the keep ledger).
"""
from __future__ import annotations

import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from moe_prefetch.cli_common import ArgumentParser, run_main, write_report  # noqa: E402
from moe_prefetch.sim import CostModel, Policy, Trace, simulate, synthetic_trace  # noqa: E402

DEMO_TRACE = ROOT / "bench/results/demo.trace.npz"


def noisy_clock(sigma: float, seed: int = 0) -> None:
    """Every PredictionSwitch sees each token last its modelled time times a lognormal factor (sigma): the
    machine's noise on a wall clock, which the simulator's modelled time lacks (its only noise is the
    tokens' routing). The same seed for every simulated run, so variants meet the same noise."""
    import random

    from moe_prefetch.switch import PredictionSwitch

    plain = PredictionSwitch.token

    def token(self, now: float, decode: bool, warm: bool = True) -> None:
        state = self.__dict__.setdefault("_noise", [None, 0.0, random.Random(seed)])  # last real, noisy, rng
        last, noisy, rng = state
        if last is not None:
            noisy += (now - last) * rng.lognormvariate(0.0, sigma)
        state[0], state[1] = now, noisy
        plain(self, noisy, decode, warm)

    PredictionSwitch.token = token


def main(argv=None) -> int:
    ap = ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trace", default=str(DEMO_TRACE), help="recorded trace (moe_prefetch.trace --data)")
    ap.add_argument("--tokens", type=int, default=300, help="tokens per synthetic trace (default 300)")
    ap.add_argument("--predict-cost", type=float, default=0.05,
                    help="the predictor's cost per predicted layer, in layer computes (default 0.05)")
    ap.add_argument("--clock-noise", type=float, default=0.0,
                    help="sigma of a lognormal factor on each token's time as the prediction switch sees it "
                         "(default 0: the modelled time; 0.2 is about a shared CPU VM's wall clock)")
    ap.add_argument("--out", default=None, help="folder for switch.md and .json (switch_predictN.* with a cost "
                    "other than the default)")
    args = ap.parse_args(argv)
    if args.tokens < 2:
        ap.error("--tokens must be at least 2")
    if args.predict_cost < 0:
        ap.error(f"--predict-cost must be at least 0, got {args.predict_cost}")
    if args.clock_noise < 0:
        ap.error(f"--clock-noise must be at least 0, got {args.clock_noise}")
    if args.clock_noise:
        noisy_clock(args.clock_noise)
    tr = Trace.load(args.trace)  # a missing or unreadable file: one line (run_main)
    n = min(400, tr.routing.shape[0])
    demo = tr.head(n)
    label = "demo trace" if Path(args.trace).resolve() == DEMO_TRACE.resolve() else Path(args.trace).name
    sets = [(label, demo, [(p, 2) for p in ("m2r2",) if p in demo.scores]
             + [("history", demo.routing.shape[1]), ("oracle", 4)])]
    for L, rep in ((8, 0.6), (16, 0.6), (16, 0.3), (32, 0.6)):
        t = synthetic_trace(L, 8, 2, args.tokens, seed=L, repeat=rep)
        sets.append((f"{L} layers, sticky {rep}", t, [("history", L), ("next-gate", 2), ("oracle", L // 2)]))
    rows = []
    for name, t, preds in sets:
        _, L, k = t.routing.shape
        E = int(t.header.get("experts", t.routing.max() + 1))
        for ratio in (11.2, 1.0):
            for host in (False, True):
                cost = CostModel(1e-3 - k * 1e-4, 1e-4, ratio * 1e-3, 1000,
                                 host_s=ratio * 1e-3 / 2.4 if host else None, predict_s=args.predict_cost * 1e-3)
                for frac in (0.25, 0.5, 0.75):
                    slots = int(L * E * frac)
                    # keeps on frequency in all three: the keep ledger is bench/keep_switch.py's subject
                    none = simulate(t, cost, slots, Policy("none", eviction="predictive", host_compute=host,
                                                           keep_recency=False)).tokens_per_s
                    for p, K in preds:
                        always = simulate(t, cost, slots, Policy("always", p, K, eviction="predictive",
                                                                 host_compute=host, adaptive=False,
                                                                 keep_recency=False)).tokens_per_s
                        adaptive = simulate(t, cost, slots, Policy("adaptive", p, K, eviction="predictive",
                                                                   host_compute=host, keep_recency=False)).tokens_per_s
                        rows.append(dict(trace=name, ratio=ratio, host_compute=host, cache_fraction=frac,
                                         predictor=f"{p} K={K}", none=none, always=always, adaptive=adaptive))
            print(f"{name}, link {ratio}: done", flush=True)
    vs_best = [r["adaptive"] / max(r["none"], r["always"]) for r in rows]
    vs_none = [r["adaptive"] / r["none"] for r in rows]
    noise = f", each token's time seen by the switch x lognormal(0, {args.clock_noise:g})" if args.clock_noise else ""
    lines = [f"{len(rows)} simulated configurations, the predictor at {args.predict_cost} layer computes per predicted "
             f"layer{noise}. Adaptive / better of never and always predicting: mean "
             f"{statistics.mean(vs_best):.3f}, worst {min(vs_best):.3f}; adaptive / never: worst {min(vs_none):.3f}.", "",
             "Where always predicting gains 10% or more:", "",
             "| trace | link | host compute | cache | predictor | always / never | adaptive / never |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['trace']} | {r['ratio']} | {'on' if r['host_compute'] else 'off'} | {r['cache_fraction']:.0%} | "
              f"{r['predictor']} | {r['always'] / r['none']:.2f} | {r['adaptive'] / r['none']:.2f} |"
              for r in rows if r["always"] >= 1.1 * r["none"]]
    print("\n".join(lines))
    if args.out:
        stem = "switch" if args.predict_cost == 0.05 else f"switch_predict{args.predict_cost:g}"
        stem += f"_noise{args.clock_noise:g}" if args.clock_noise else ""
        write_report(args.out, stem, lines, dict(predict_cost=args.predict_cost, rows=rows))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))  # failures: one line on stderr, non-zero status
