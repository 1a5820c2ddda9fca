"""What the runtime costs when there is nothing to move: every expert resident, against plain transformers.

    python bench/overhead.py --out bench/results

Decodes the demo model's held-out text token by token (teacher forcing, KV cache, batch 1) through
  plain transformers (all weights resident),
  the runtime with a cache that holds every expert, no predictor,
  the same with next-gate K=1 (and any other --predictor/--lookahead pairs given),
in one process, interleaved: each repeat runs every variant once, in turn, so that drift of the
machine hits all of them alike; the table reports the median tokens/s over the repeats and its ratio
to plain transformers. Caches are warmed before timing. Writes overhead.md and overhead.json.
"""
from __future__ import annotations

import os

# Before torch loads: OpenMP threads that sleep when idle instead of spinning, so the copy and host
# threads' work does not stall the compute thread's matmuls on a small machine.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import json
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from moe_prefetch.cli_common import ArgumentParser, run_main  # noqa: E402
import moe_prefetch as mp  # noqa: E402
from moe_prefetch.hub import DEMO_DIR, resolve_model  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import sequences, teacher_forced  # noqa: E402


def main(argv=None) -> int:
    p = ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="demo", help="alias or checkpoint directory (default: demo)")
    p.add_argument("--data", default=str(DEMO_DIR / "heldout.txt"), help="text to decode (default: the demo's held-out text)")
    p.add_argument("--seqs", type=int, default=2, help="sequences per timed run (default 2)")
    p.add_argument("--seq-len", type=int, default=64, help="tokens per sequence (default 64)")
    p.add_argument("--repeats", type=int, default=7, help="interleaved repeats (default 7)")
    p.add_argument("--variants", default="none:0,next-gate:1",
                   help="comma-separated predictor:lookahead pairs run through the runtime (default none:0,next-gate:1)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"), help="directory for overhead.md/.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model(args.model)
    tok = AutoTokenizer.from_pretrained(path)
    seqs = sequences(tok, Path(args.data), args.seqs, args.seq_len)
    models = {"plain transformers": AutoModelForCausalLM.from_pretrained(path).eval()}
    for spec in args.variants.split(","):
        pred, k = spec.split(":")
        m, _ = mp.load_model(str(path), mp.OffloadConfig(device="cpu", expert_cache=10**6, predictor=pred,
                                                         lookahead=int(k), show_progress=False))
        models[f"runtime, all experts resident, {pred} K={k}" if pred != "none" else
               "runtime, all experts resident, no predictor"] = m
    for m in models.values():
        teacher_forced(m, seqs)  # warm-up: fills the caches, first-use costs
    rates: dict[str, list[float]] = {name: [] for name in models}
    for r in range(args.repeats):
        for name, m in models.items():
            s, n = teacher_forced(m, seqs)
            rates[name].append(n / s)
        print(f"repeat {r + 1}/{args.repeats}: " + ", ".join(f"{v[-1]:.0f}" for v in rates.values()), file=sys.stderr)
    base = statistics.median(rates["plain transformers"])
    rows = [{"variant": name, "tokens_per_s": statistics.median(v), "ratio": statistics.median(v) / base,
             "min": min(v), "max": max(v)} for name, v in rates.items()]
    steps = args.seqs * (args.seq_len - 1)
    lines = [f"Decode with nothing to fetch: {args.model}, CPU ({args.threads} threads), {steps} teacher-forced "
             f"steps per run, median of {args.repeats} interleaved repeats, one process.", "",
             "| variant | tokens/s (median) | min-max | x plain transformers |", "|---|---|---|---|"]
    lines += [f"| {r['variant']} | {r['tokens_per_s']:.1f} | {r['min']:.0f}-{r['max']:.0f} | {r['ratio']:.3f} |" for r in rows]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "overhead.md").write_text("\n".join(lines) + "\n")
    (out / "overhead.json").write_text(json.dumps(rows, indent=1) + "\n")
    print("\n".join(lines))
    for m in models.values():
        if hasattr(m, "moe_runtime"):
            m.moe_runtime.close()
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))  # failures: one line on stderr, non-zero status
