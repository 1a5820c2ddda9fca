"""Is the default ever slower than the best configuration without prediction? Paired rounds, with noise.

    python bench/paired.py --out bench/results                       # the demo, host compute off and on
    python bench/paired.py --model DIR --data text.txt --rounds 8 --caches 0.5

Runs the default configuration (no flags; with `--host-compute on` only, in the host rows) and every
configuration without prediction of the same mode (LRU, LFU, predictive and auto eviction; with host
compute also predictive eviction with keeps judged on frequency) through the real runtime on the CPU,
link and host throttled as in bench/throughput.py, in --rounds interleaved rounds (each round starts a
further 1/rounds of the way down the list). Per mode and cache it reports:
- each row's median round and every round's tokens/s;
- the default over each row, round by round: the mean of the paired ratios and its 95% interval
  (Student's t), and whether the default is slower beyond noise (the interval's top below 1);
- the default over the best row without prediction, chosen without the selection's luck: the best row
  is picked on the odd rounds and the ratio measured on the even ones, then the other way round, and the
  two averaged (picking and measuring on the same rounds favours whichever row was luckiest).
A row's rounds on a shared VM spread by several percent, so a gap of 2-3% needs six or more rounds.
Writes paired<tag>.md and paired<tag>.json to --out.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as bench/throughput.py: before torch loads

import math  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from moe_prefetch.cli_common import ArgumentParser, run_main, write_report  # noqa: E402
from moe_prefetch.hub import DEMO_DIR  # noqa: E402
from moe_prefetch.sim import load_profiles  # noqa: E402
import throughput as T  # noqa: E402

# two-sided 95% Student t quantiles by degrees of freedom (1-30); above that, the normal's
T95 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
       2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def interval(ratios: list[float]) -> tuple[float, float, float]:
    """(mean, low, high): the paired ratios' mean and its 95% interval (nan bounds with one round)."""
    m = statistics.mean(ratios)
    if len(ratios) < 2:
        return m, math.nan, math.nan
    t = T95[len(ratios) - 2] if len(ratios) - 1 <= len(T95) else 1.96
    half = t * statistics.stdev(ratios) / math.sqrt(len(ratios))
    return m, m - half, m + half


def split_half(rounds: dict[str, list[float]], default: str) -> dict | None:
    """The default over the best other row, that row picked on one half of the rounds and the ratio
    measured on the other half, both ways, averaged; None with fewer than 2 rounds."""
    n = len(rounds[default])
    if n < 2:
        return None
    halves = (list(range(0, n, 2)), list(range(1, n, 2)))
    picks = []
    for pick, judge in (halves, halves[::-1]):
        med = {name: statistics.median([v[i] for i in pick]) for name, v in rounds.items() if name != default}
        best = max(med, key=med.get)
        ratio = statistics.median([rounds[default][i] for i in judge]) / statistics.median([rounds[best][i] for i in judge])
        picks.append(dict(best=best, ratio=ratio))
    return dict(ratio=statistics.mean(p["ratio"] for p in picks), halves=picks)


def rows(host: dict | None) -> list[tuple[str, dict]]:
    """(name, loading kwargs): the default first, then every configuration without prediction of its mode."""
    none = dict(predictor="none")
    if host is None:
        return [("default (no flags)", {}), ("LRU, no prefetch", none | dict(eviction="lru")),
                ("LFU, no prefetch", none | dict(eviction="lfu")),
                ("predictive eviction, no prefetch", none | dict(eviction="predictive")),
                ("auto eviction, no prefetch", none | dict(eviction="auto"))]
    return [("default, host compute on", dict(host)), ("LRU, no prefetch", none | dict(eviction="lru") | host),
            ("LFU, no prefetch", none | dict(eviction="lfu") | host),
            ("predictive eviction, no prefetch", none | dict(eviction="predictive") | host),
            ("auto eviction, no prefetch", none | dict(eviction="auto") | host),
            ("predictive eviction, no prefetch, keeps on frequency",
             none | dict(eviction="predictive", keep_rule="frequency") | host)]


def main(argv=None) -> int:
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="demo", help="model (default: demo)")
    p.add_argument("--data", default=str(DEMO_DIR / "heldout.txt"), help="text to decode (default: demo held-out text)")
    p.add_argument("--rounds", type=int, default=6, help="interleaved rounds of every row (default: 6)")
    p.add_argument("--caches", type=float, nargs="+", default=[0.25, 0.5, 0.75], help="cache fractions (default: 0.25 0.5 0.75)")
    p.add_argument("--host-compute", choices=("off", "on", "both"), default="both",
                   help="modes to compare, each against its own rows (default: both)")
    p.add_argument("--sequences", type=int, default=3, help="sequences to decode per run (default: 3)")
    p.add_argument("--seq-len", type=int, default=64, help="tokens per sequence (default: 64)")
    p.add_argument("--profile", default="rtx4090-pcie4:mixtral-8x7b:int4",
                   help="HARDWARE:SHAPE:DTYPE whose transfer/compute ratio the link reproduces (default: %(default)s)")
    p.add_argument("--ratio", type=float, help="override: expert transfer time / layer compute time")
    p.add_argument("--host", default="ddr5-2ch", help="host profile whose expert read rate over the GPU profile's link "
                   "sets the emulated host speed (default: %(default)s)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the emulated device (default: 1)")
    p.add_argument("--out", default="bench/results", help="output folder (default: bench/results)")
    p.add_argument("--tag", default="", help="suffix for the output file names (default: none)")
    args = p.parse_args(argv)
    if args.rounds < 1 or args.sequences < 1 or args.seq_len < 2:
        p.error("--rounds and --sequences must be at least 1 and --seq-len at least 2")
    if not all(0 < c <= 1 for c in args.caches):
        p.error(f"--caches are fractions of all experts, in (0, 1]; got {args.caches}")
    if args.ratio is not None and args.ratio <= 0:
        p.error(f"--ratio must be positive, got {args.ratio}")
    if not Path(args.data).is_file():
        p.error(f"--data {args.data} does not exist")
    hw, shape, dtype = (args.profile.split(":") + ["", "", ""])[:3]
    if hw not in load_profiles("hardware") or args.host not in load_profiles("hosts"):
        p.error(f"unknown --profile hardware {hw!r} or --host {args.host!r} (see moe_prefetch/profiles)")
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)

    probe, tok = T.load(args.model, predictor="none")
    rt = probe.moe_runtime
    L, E, k = len(rt.adapter.moe_layers()), rt.adapter.num_experts, rt.adapter.top_k
    expert_bytes = rt.store.expert_nbytes
    rt.close()
    seqs = T.sequences(tok, Path(args.data), args.sequences, args.seq_len)
    ratio = args.ratio or T.gpu_ratio(hw, shape, dtype)
    layer_s, link_bw, host_over_link = T.emulated_speeds(args.model, seqs, k, L * E, expert_bytes, ratio, hw, args.host)
    host_bw = link_bw * host_over_link
    print(f"{args.model}: {L} MoE layers x {E} experts (top-{k}); layer {layer_s * 1e3:.3f} ms; link "
          f"{T.rate(link_bw)} ({ratio:.1f} layer-computes per expert); host {T.rate(host_bw)}")
    modes = {"off": [None], "on": [dict(host_bandwidth=host_bw, host_compute="on")]}
    modes["both"] = modes["off"] + modes["on"]

    results, lines = [], []
    for host in modes[args.host_compute]:
        plan = rows(host)
        for frac in args.caches:
            slots = max(k, round(frac * L * E))
            rounds: dict[str, list[float]] = {name: [] for name, _ in plan}
            rules: dict[str, list] = {name: [] for name, _ in plan}  # eviction auto: epochs under each rule
            for r in range(args.rounds):
                start = r * len(plan) // args.rounds
                for i in [*range(start, len(plan)), *range(start)]:
                    name, kw = plan[i]
                    res = T.run_policy(args.model, seqs, expert_cache=slots, link_bandwidth=link_bw, **kw)
                    rounds[name].append(res["tokens_per_s"])
                    if (ev := res["eviction_epochs"]) is not None:
                        rules[name].append({r: ev[r] for r in ("predictive", "lfu", "lru")})
                print(f"  host compute {'on' if host else 'off'}, cache {frac:.0%}, round {r + 1}: "
                      + "  ".join(f"{rounds[n][-1]:.1f}" for n, _ in plan), flush=True)
            default = plan[0][0]
            against = {}
            for name, _ in plan[1:]:
                m, lo, hi = interval([d / x for d, x in zip(rounds[default], rounds[name])])
                against[name] = dict(mean=m, low=lo, high=hi, slower_beyond_noise=bool(hi < 1.0))
            results.append(dict(host_compute=host is not None, cache=frac, slots=slots, rounds=rounds,
                                eviction_epochs={n: v for n, v in rules.items() if v},
                                medians={n: statistics.median(v) for n, v in rounds.items()},
                                default_over=against, default_over_best=split_half(rounds, default)))
    lines.append(f"The default against every configuration without prediction of its mode, {args.model} "
                 f"({L} MoE layers x {E} experts), CPU, link {ratio:.1f} layer-computes per expert, host "
                 f"{args.host}; {args.rounds} interleaved rounds of {args.sequences} x {args.seq_len} tokens. "
                 "Per row: its tokens/s, and the default over it round by round (mean [95% interval]); last "
                 "of each cache: the default over the best row, picked on half the rounds and measured on the "
                 "other half, both ways, averaged.")
    lines += ["", "| host compute | cache | row | tokens/s (median; rounds) | default over it: mean [95% interval] |",
              "|---|---|---|---|---|"]
    for res in results:
        mode, cache = "on" if res["host_compute"] else "off", f"{res['cache']:.0%}"
        for name, tps in res["rounds"].items():
            a = res["default_over"].get(name)
            over = "-" if a is None else (f"{a['mean']:.3f} [{a['low']:.3f}, {a['high']:.3f}]"
                                          + (" slower beyond noise" if a["slower_beyond_noise"] else ""))
            lines.append(f"| {mode} | {cache} | {name} | {res['medians'][name]:.1f}; "
                         + " ".join(f"{x:.1f}" for x in tps) + f" | {over} |")
        best = res["default_over_best"]
        if best is not None:
            lines.append(f"| {mode} | {cache} | the default over the best row, split halves (picked: "
                         + ", ".join(h["best"] for h in best["halves"]) + f") | - | {best['ratio']:.3f} |")
        for name, runs in res.get("eviction_epochs", {}).items():  # which rules eviction auto ran
            lines.append(f"| {mode} | {cache} | {name}: eviction auto's epochs, predictive / LFU's / LRU's rule, "
                         "per round | " + " ".join(f"{e['predictive']}/{e['lfu']}/{e['lru']}" for e in runs) + " | - |")
    print("\n".join(lines))
    write_report(args.out, f"paired{args.tag}", lines,
                 dict(model=args.model, layers=L, experts=E, ratio=ratio, layer_ms=layer_s * 1e3,
                      link_gbps=link_bw / 1e9, host=args.host, host_gbps=host_bw / 1e9, rounds=args.rounds,
                      sequences=args.sequences, seq_len=args.seq_len, results=results))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
