"""What the planner costs the host per token on real model shapes, with the eviction policies' fast victim
search against their plain scans (victim_ref), side by side in one run.

    python bench/planner_cost.py --out bench/results

The planner is pure Python and runs on the compute thread once per MoE layer, so its cost per token
grows with the layers, the experts routed per token and, for a scan, the cache's size: thousands of
slots on a 64- or 128-expert model. Each row replays one synthetic routing trace of the model's shape
(per layer a Zipf-skewed expert popularity, a share of each token's experts repeated from the previous
token, next-gate-like scores) through the simulator at 50% cache, the simulator driving the same
planner as the runtime, and times the whole replay per token; `scan` swaps every policy's victim() for
its victim_ref() over a copied set of the evictable experts (the code before the heaps). Both variants must make the same decisions (checked: the simulated results are
equal). The history row predicts a whole token ahead (K = the MoE layers) on every layer, the most
predictions a layer's plan is offered; its time includes computing history's scores, which is host
work in the runtime too (the next-gate row's router matmuls are device work and are not in it).
The absolute figures are for the machine named in the output only.
"""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from moe_prefetch.cli_common import ArgumentParser, run_main, write_report  # noqa: E402
from moe_prefetch.sim import CostModel, Policy, load_profiles, simulate, synthetic_trace  # noqa: E402
import moe_prefetch.sim as sim  # noqa: E402
from transfer import cpu_name  # noqa: E402  (bench/transfer.py: the CPU's model name)

EXTRA = {"qwen3-30b-a3b": dict(name="Qwen3-30B-A3B", moe_layers=48, experts=128, top_k=8,
                               source="Qwen/Qwen3-30B-A3B config.json: 48 layers, 128 experts, 8 per token")}


def timed(trace, cost, slots, policy, scan: bool):
    """Seconds to replay `trace`, and the result; scan: every victim is found as before the heaps, by the
    policy's victim_ref() over a copied set of the evictable experts (and then compared, as victim()
    compares its own, with the choice without steering)."""
    original = sim.make_planner

    def with_scan(*a, **kw):
        planner = original(*a, **kw)
        policy, cache = planner.policy, planner.cache
        if hasattr(policy, "victim_ref"):
            observe = getattr(policy, "_observe_victim", None)  # the comparisons its victim() also notes

            def victim(candidates):
                key = policy.victim_ref(candidates)
                if observe is not None:
                    observe(key, candidates)
                return key
            policy.victim = victim
        view = cache.evictable
        cache.evictable = lambda protected=(): set(view(protected))
        return planner

    sim.make_planner = with_scan if scan else original
    try:
        t0 = time.perf_counter()
        result = simulate(trace, cost, slots, policy)
        return time.perf_counter() - t0, result
    finally:
        sim.make_planner = original


def main(argv=None) -> int:
    ap = ArgumentParser(description=__doc__.splitlines()[0])  # a bad flag: one line
    ap.add_argument("--shapes", nargs="+", default=["mixtral-8x7b", "deepseek-v2-lite", "qwen3-30b-a3b"],
                    help="model shapes (moe_prefetch/profiles/models.json, or qwen3-30b-a3b)")
    ap.add_argument("--tokens", type=int, default=64, help="tokens per replay (default: 64)")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved repeats; the median is reported")
    ap.add_argument("--out", default=None, help="folder for planner_cost.md and .json")
    args = ap.parse_args(argv)
    shapes = {**load_profiles("models"), **EXTRA}
    unknown = [s for s in args.shapes if s not in shapes]
    if unknown:
        ap.error(f"unknown shape {unknown[0]!r}: use one of {', '.join(sorted(shapes))}")
    if args.tokens < 2 or args.repeats < 1:
        ap.error("--tokens must be at least 2 and --repeats at least 1")
    # costs only decide what the planner does (a link 11x a layer, as on a 24 GB GPU), not how long it takes
    cost = CostModel(attn_s=1e-3, expert_s=1e-4, transfer_s=12e-3, expert_bytes=1)
    rows = []
    for name in args.shapes:
        shape = shapes[name]
        L, E, k = shape["moe_layers"], shape["experts"], shape["top_k"]
        trace = synthetic_trace(L, E, k, args.tokens)
        slots = L * E // 2
        policies = [Policy("LRU, no prefetch", eviction="lru"), Policy("LFU, no prefetch", eviction="lfu"),
                    Policy("predictive eviction, no prefetch", eviction="predictive"),
                    Policy("next-gate K=2 (the default's predictor), predictive eviction, gated", "next-gate", 2, eviction="predictive"),
                    # a whole token ahead, on every layer: the most predictions a layer's plan can get
                    Policy(f"history K=L={L}, predictive, gated, always predicting", "history", L,
                           eviction="predictive", adaptive=False)]
        for policy in policies:
            times = {False: [], True: []}
            results = {}
            for _ in range(args.repeats):
                for scan in (False, True):
                    seconds, results[scan] = timed(trace, cost, slots, policy, scan)
                    times[scan].append(seconds / args.tokens)
            if results[False] != results[True]:
                raise RuntimeError(f"{name}, {policy.name}: the fast victim search decided differently from the scan")
            fast, scan = statistics.median(times[False]), statistics.median(times[True])
            rows.append(dict(shape=shape["name"], layers=L, experts=E, top_k=k, slots=slots, policy=policy.name,
                             fast_ms=fast * 1e3, scan_ms=scan * 1e3, ratio=scan / fast))
            print(f"{shape['name']:18s} {policy.name:44s} {fast * 1e3:8.2f} ms/token (scan {scan * 1e3:8.2f}, "
                  f"{scan / fast:.1f}x)", flush=True)
    where = f"{cpu_name()}, Python {sys.version.split()[0]}"
    lines = [f"Planner + replay time per token at 50% cache, synthetic routing of each model's shape, {args.tokens} "
             f"tokens, median of {args.repeats} interleaved repeats; {where}. `scan`: every victim found by a pass "
             "over a copied set of the evictable experts (victim_ref); both made the same decisions.", "",
             "| model shape | layers x experts (top-k) | slots | policy | ms/token | scan ms/token | scan / fast |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['shape']} | {r['layers']} x {r['experts']} ({r['top_k']}) | {r['slots']} | {r['policy']} | "
              f"{r['fast_ms']:.2f} | {r['scan_ms']:.2f} | {r['ratio']:.1f}x |" for r in rows]
    print("\n".join(lines))
    if args.out:
        write_report(args.out, "planner_cost", lines, dict(machine=where, tokens=args.tokens, rows=rows))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))  # failures: one line on stderr, non-zero status
