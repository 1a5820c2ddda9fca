"""Does the prediction switch find prediction where it pays? The adaptive planner against never and
always predicting, simulated, on the demo trace and on sticky synthetic traces of 8, 16 and 32 layers.

    python bench/switch.py --out bench/results      # ~4 min on 2 cores

Time is modelled (moe_prefetch.sim replays each trace through the runtime's planner from a cold
cache): a layer computes in 1 unit, an expert crosses the link in --ratio units, the host computes one
in ratio / 2.4, the predictor costs 0.05 units a layer. The synthetic traces carry `history` scores for
every distance up to L (this sequence's counts blended with the last token's experts, as the history
predictor computes them), so the next token's layers can be predicted a whole token ahead.
"""
from __future__ import annotations

import statistics
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from moe_prefetch.cli_common import ArgumentParser, run_main, write_report  # noqa: E402
from moe_prefetch.sim import CostModel, Policy, Trace, simulate, synthetic_trace  # noqa: E402


def history_scores(routing: np.ndarray, E: int, K: int) -> np.ndarray:
    """[N, L, K, E]: the history predictor's scores at each (token, layer) for distances 1..K."""
    N, L, _ = routing.shape
    out = np.full((N, L, K, E), np.nan, np.float32)
    counts, last = np.zeros((L, E)), np.zeros((L, E))
    for t in range(N):
        for i in range(L):
            counts[i, routing[t, i]] += 1
            last[i] = 0.0
            last[i, routing[t, i]] = 1.0
            for d in range(1, K + 1):
                j = (i + d) % L
                total = counts[j].sum()
                freq = counts[j] / total if total > 0 else np.full(E, 1.0 / E)
                out[t, i, d - 1] = 0.5 * last[j] + 0.5 * freq
    return out


def main(argv=None) -> int:
    ap = ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trace", default=str(ROOT / "bench/results/demo.trace.npz"), help="recorded trace (moe_prefetch.trace --data)")
    ap.add_argument("--tokens", type=int, default=300, help="tokens per synthetic trace (default 300)")
    ap.add_argument("--out", default=None, help="folder for switch.md and .json")
    args = ap.parse_args(argv)
    tr = Trace.load(args.trace)
    n = min(400, tr.routing.shape[0])
    demo = Trace(tr.routing[:n], [n], {k: v[:n] for k, v in tr.scores.items()}, tr.header)
    sets = [("demo trace", demo, [(p, 2) for p in ("m2r2",) if p in demo.scores] + [("oracle", 4)])]
    for L, rep in ((8, 0.6), (16, 0.6), (16, 0.3), (32, 0.6)):
        t = synthetic_trace(L, 8, 2, args.tokens, seed=L, repeat=rep)
        t.scores["history"] = history_scores(t.routing, 8, L)
        sets.append((f"{L} layers, sticky {rep}", t, [("history", L), ("next-gate", 2), ("oracle", L // 2)]))
    rows = []
    for name, t, preds in sets:
        _, L, k = t.routing.shape
        E = int(t.header.get("experts", t.routing.max() + 1))
        for ratio in (11.2, 1.0):
            for host in (False, True):
                cost = CostModel(1e-3 - k * 1e-4, 1e-4, ratio * 1e-3, 1000,
                                 host_s=ratio * 1e-3 / 2.4 if host else None, predict_s=0.05e-3)
                for frac in (0.25, 0.5, 0.75):
                    slots = int(L * E * frac)
                    none = simulate(t, cost, slots, Policy("none", eviction="predictive", host_compute=host)).tokens_per_s
                    for p, K in preds:
                        always = simulate(t, cost, slots, Policy("always", p, K, eviction="predictive",
                                                                 host_compute=host, adaptive=False)).tokens_per_s
                        adaptive = simulate(t, cost, slots, Policy("adaptive", p, K, eviction="predictive",
                                                                   host_compute=host)).tokens_per_s
                        rows.append(dict(trace=name, ratio=ratio, host_compute=host, cache_fraction=frac,
                                         predictor=f"{p} K={K}", none=none, always=always, adaptive=adaptive))
            print(f"{name}, link {ratio}: done", flush=True)
    vs_best = [r["adaptive"] / max(r["none"], r["always"]) for r in rows]
    vs_none = [r["adaptive"] / r["none"] for r in rows]
    lines = [f"{len(rows)} simulated configurations. Adaptive / better of never and always predicting: mean "
             f"{statistics.mean(vs_best):.3f}, worst {min(vs_best):.3f}; adaptive / never: worst {min(vs_none):.3f}.", "",
             "Where always predicting gains 10% or more:", "",
             "| trace | link | host compute | cache | predictor | always / never | adaptive / never |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['trace']} | {r['ratio']} | {'on' if r['host_compute'] else 'off'} | {r['cache_fraction']:.0%} | "
              f"{r['predictor']} | {r['always'] / r['none']:.2f} | {r['adaptive'] / r['none']:.2f} |"
              for r in rows if r["always"] >= 1.1 * r["none"]]
    print("\n".join(lines))
    if args.out:
        write_report(args.out, "switch", lines, dict(rows=rows))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))  # failures: one line on stderr, non-zero status
