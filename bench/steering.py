"""What predictions are worth to eviction (simulated): predictive eviction with no predictor, with a
predictor acting through prefetches only (the planner before predictions steered eviction), and with
the same predictor also steering eviction (the planner now).

    python bench/steering.py --out bench/results      # ~2 min on 2 cores

On a link many layer-computes per expert, a prefetch cannot hide a copy; what a prediction can do
there is keep the experts that will be needed and evict the ones that will not. Time is modelled
(moe_prefetch.sim replays each trace through the runtime's planner from a cold cache, host compute
off): a layer computes in 1 unit, an expert crosses the link in --ratio units, and each predicted
layer costs the predictor --predict-costs units (0: a GPU, where the predictor is a few small matmuls
among a layer's work; 0.5: about what it costs the CPU backend on the demo model, whose layers are
tiny). Predictors: the trace's own (next-gate at the default lookahead 2, m2r2 at 3, and a whole
token ahead where its maps were trained into the next token, history a whole token ahead), the
oracle a whole token ahead, and the oracle made noisy (each distance's true top-k scored 1 with
probability q, every expert given uniform noise: top-k recall well below the oracle's),
so the figures span predictor quality, not only the demo model's predictors. Traces: the demo model's
and a synthetic one (8 layers x 8 experts, a third of each token's experts kept from the last).

--host-compute runs the same rows with host compute on (the host computes an expert in ratio / 2.4
units: dual-channel DDR5 over PCIe 4.0, as bench/switch.py), where predictions act through prefetches
only (the planner steers eviction only where misses are copied in), so its two predictor columns are
one run; it writes steering_host.*.
"""
from __future__ import annotations

import statistics
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from moe_prefetch import planner as planner_mod  # noqa: E402
from moe_prefetch.cli_common import ArgumentParser, run_main, write_report  # noqa: E402
from moe_prefetch.sim import CostModel, Policy, Trace, _oracle_scores, simulate, synthetic_trace  # noqa: E402

DEMO_TRACE = ROOT / "bench" / "results" / "demo.trace.npz"
MODES = ("none", "prefetch only", "steering")


def noisy_oracle(trace: Trace, K: int, q: float, seed: int) -> np.ndarray:
    """Oracle scores [N, L, K, E] where each true expert keeps its 1 with probability q, plus uniform noise
    in [0, 0.5) on every expert, normalised per distance."""
    routing = trace.routing
    E = int(trace.header.get("experts", routing.max() + 1))
    truth = _oracle_scores(routing, E, K)
    rng = np.random.default_rng(seed)
    keep = rng.random(truth.shape) < q
    scores = np.where(np.isnan(truth), np.nan, truth * keep + 0.5 * rng.random(truth.shape)).astype(np.float32)
    return scores / np.nansum(scores, -1, keepdims=True)


def reaches_next_token(trace: Trace, name: str) -> bool:
    """Whether the trace's `name` scores reach a whole token ahead: the last layer's distance 1 (the next
    token's first layer) is recorded and every distance up to the number of layers is there."""
    s, L = trace.scores.get(name), trace.routing.shape[1]
    return (s is not None and s.shape[2] >= L and not np.isnan(s[:, L - 1, 0]).all()
            and not np.isnan(s[:, 0, L - 1]).all())  # and the farthest: layer 0 to the next token's layer 0


def predictors(trace: Trace, demo: bool) -> list[tuple[str, str, int]]:
    """(label, score name, lookahead); noisy oracles are added to the trace's scores."""
    L = trace.routing.shape[1]
    out = []
    if demo:  # a recorded trace: m2r2's scores where it was recorded with a trained predictor
        out += [("next-gate K=2 (the default's)", "next-gate", 2)]
        out += [("m2r2 K=3", "m2r2", 3)] if "m2r2" in trace.scores else []
        if reaches_next_token(trace, "m2r2"):  # recorded with maps trained by calibrate --next-token
            out += [(f"m2r2 K={L} (a token)", "m2r2", L)]
    else:
        out += [("next-gate-like K=2", "next-gate", 2)]
    out += [(f"history K={L} (a token)", "history", L)]
    for q in (0.5, 0.8):
        name = f"oracle-q{q:g}"
        trace.scores[name] = noisy_oracle(trace, L, q, seed=int(q * 10))
        out.append((f"noisy oracle q={q:g}, K={L}", name, L))
    out.append((f"oracle K={L}", "oracle", L))
    return out


def simulate_mode(trace, cost, slots, predictor, K, mode, host=False):
    if mode == "none":
        return simulate(trace, cost, slots, Policy("none", eviction="predictive", host_compute=host))
    steers = planner_mod.Planner.steers_eviction
    try:
        if mode == "prefetch only":
            planner_mod.Planner.steers_eviction = lambda self: False
        return simulate(trace, cost, slots, Policy(mode, predictor, K, eviction="predictive", host_compute=host))
    finally:
        planner_mod.Planner.steers_eviction = steers


def run(traces, ratios, caches, predict_costs, host=False) -> list[dict]:
    rows = []
    for name, trace, demo in traces:
        _, L, k = trace.routing.shape
        E = int(trace.header.get("experts", trace.routing.max() + 1))
        preds = predictors(trace, demo)
        for ratio in ratios:
            for pc in predict_costs:
                cost = CostModel(1e-3 - k * 1e-4, 1e-4, ratio * 1e-3, 1000, predict_s=pc * 1e-3,
                                 host_s=ratio / 2.4 * 1e-3 if host else None)
                for frac in caches:
                    slots = max(k, int(L * E * frac))
                    base = simulate_mode(trace, cost, slots, None, 0, "none", host)
                    for label, pname, K in preds:
                        res = {m: simulate_mode(trace, cost, slots, pname, K, m, host) for m in MODES[1:2 if host else 3]}
                        res.setdefault("steering", res["prefetch only"])  # host compute: nothing steers
                        rows.append(dict(trace=name, ratio=ratio, predict_cost=pc, cache=frac, predictor=label,
                                         tokens_per_s={"none": base.tokens_per_s,
                                                       **{m: r.tokens_per_s for m, r in res.items()}},
                                         hit_rate={"none": base.hit_rate, **{m: r.hit_rate for m, r in res.items()}},
                                         mb_moved={"none": base.bytes_moved / 1e6,
                                                   **{m: r.bytes_moved / 1e6 for m, r in res.items()}},
                                         steering_over_none=res["steering"].tokens_per_s / base.tokens_per_s,
                                         prefetch_only_over_none=res["prefetch only"].tokens_per_s / base.tokens_per_s))
            print(f"{name}, ratio {ratio:g}: done", flush=True)
    return rows


def markdown(rows: list[dict], host: bool = False) -> list[str]:
    mode = ("host compute on (the host 2.4x the link's rate), where nothing steers eviction: the two predictor "
            "columns are one run" if host else "host compute off")
    lines = [f"Simulated tok/s ratios over predictive eviction with no predictor ({mode}, cold cache): "
             "each predictor through prefetches only (the planner before) and also steering eviction (now). "
             "Per trace, link ratio and predictor cost (layers per predicted layer): the mean and range over "
             "25/50/75% cache.", "",
             "| trace | link | predictor cost | predictor | prefetch only / none | steering / none | steering / prefetch only |",
             "|---|---|---|---|---|---|---|"]
    keys = dict.fromkeys((r["trace"], r["ratio"], r["predict_cost"], r["predictor"]) for r in rows)
    for trace, ratio, pc, pred in keys:
        sel = [r for r in rows if (r["trace"], r["ratio"], r["predict_cost"], r["predictor"]) == (trace, ratio, pc, pred)]
        po = [r["prefetch_only_over_none"] for r in sel]
        st = [r["steering_over_none"] for r in sel]
        rel = [r["tokens_per_s"]["steering"] / r["tokens_per_s"]["prefetch only"] for r in sel]
        fmt = lambda xs: f"{statistics.mean(xs):.3f} ({min(xs):.3f}-{max(xs):.3f})"  # noqa: E731
        lines.append(f"| {trace} | {ratio:g} | {pc:g} | {pred} | {fmt(po)} | {fmt(st)} | {fmt(rel)} |")
    lines += ["", "| trace | link | predictor cost | cache | predictor | none | prefetch only | steering | "
              "hit rate none / prefetch only / steering | MB moved none / prefetch only / steering |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        t, h, m = r["tokens_per_s"], r["hit_rate"], r["mb_moved"]
        lines.append(f"| {r['trace']} | {r['ratio']:g} | {r['predict_cost']:g} | {r['cache']:.0%} | {r['predictor']} | "
                     f"{t['none']:.1f} | {t['prefetch only']:.1f} | {t['steering']:.1f} | "
                     f"{h['none']:.3f} / {h['prefetch only']:.3f} / {h['steering']:.3f} | "
                     f"{m['none']:.2f} / {m['prefetch only']:.2f} / {m['steering']:.2f} |")
    return lines


def main(argv=None) -> int:
    ap = ArgumentParser(description=__doc__.splitlines()[0])  # a bad flag: one line
    ap.add_argument("--trace", default=str(DEMO_TRACE), help="recorded trace with predictor scores (default: the demo model's)")
    ap.add_argument("--tokens", type=int, default=400, help="decode steps per trace (default 400)")
    ap.add_argument("--ratios", type=float, nargs="+", default=[11.2, 1.0], help="link time per expert / a layer's "
                    "compute (default: 11.2 1)")
    ap.add_argument("--caches", type=float, nargs="+", default=[0.25, 0.5, 0.75], help="cache fractions (default: 0.25 0.5 0.75)")
    ap.add_argument("--predict-costs", type=float, nargs="+", default=[0.0, 0.5],
                    help="predictor time per predicted layer, in layers (default: 0 0.5)")
    ap.add_argument("--host-compute", action="store_true", help="host compute on (steering_host.*)")
    ap.add_argument("--out", default=None, help="folder for steering.md and .json (steering_host.* with --host-compute)")
    args = ap.parse_args(argv)
    if args.tokens < 2 or any(r <= 0 for r in args.ratios) or any(c < 0 for c in args.predict_costs) \
            or not all(0 < c <= 1 for c in args.caches):
        ap.error("--tokens must be at least 2, --ratios positive, --predict-costs at least 0 and --caches in (0, 1]")
    demo = Trace.load(args.trace)  # a missing or unreadable file: one line (run_main)
    demo = demo.head(min(args.tokens, demo.routing.shape[0]))
    label = "demo trace" if Path(args.trace).resolve() == DEMO_TRACE.resolve() else Path(args.trace).name
    traces = [(label, demo, True),
              ("synthetic, 8 layers, sticky 0.3", synthetic_trace(8, 8, 2, args.tokens, seed=8, repeat=0.3), False)]
    rows = run(traces, args.ratios, args.caches, args.predict_costs, args.host_compute)
    lines = markdown(rows, args.host_compute)
    n = len(dict.fromkeys((r["trace"], r["ratio"], r["predict_cost"], r["predictor"]) for r in rows))
    print("\n".join(lines[:4 + n]))
    if args.out:
        write_report(args.out, "steering_host" if args.host_compute else "steering", lines,
                     dict(rows=rows, host_compute=args.host_compute))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))  # failures: one line on stderr, non-zero status
