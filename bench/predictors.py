"""Recall of each predictor per distance d on held-out text.

    python -m moe_prefetch.calibrate --model demo --data moe_prefetch/demo_model/heldout.txt \
        --max-tokens 36000 --lookahead 4 --out demo.m2r2.safetensors
    python bench/predictors.py --model demo --predictor-path demo.m2r2.safetensors

Calibration uses the first 36000 tokens of the demo held-out text; this table uses tokens from
38000 on, which neither the model nor the predictor has seen.

For every token of the held-out text and every MoE layer l, each predictor scores the experts of
layer l+d from what it can see at layer l; recall is the fraction of the true top-k experts of layer
l+d found in the predictor's top-k. Prints a Markdown table (and --json for machines).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from moe_prefetch.cli_common import ArgumentParser, run_main  # noqa: E402
import moe_prefetch  # noqa: E402
from moe_prefetch.calibrate import collect_residuals, read_text, recall_by_distance, true_topk  # noqa: E402
from moe_prefetch.hub import DEMO_DIR  # noqa: E402
from moe_prefetch.predictors import HistoryPredictor, NextGatePredictor, OraclePredictor  # noqa: E402
from moe_prefetch.predictors.accelerated import AcceleratedPredictor, load  # noqa: E402


def main(argv=None) -> int:
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="demo", help="alias, directory or hub id (default: demo)")
    p.add_argument("--data", default=str(DEMO_DIR / "heldout.txt"), help="held-out text (default: the demo model's)")
    p.add_argument("--predictor-path", help="trained m2r2 predictor (omit to skip the m2r2 row)")
    p.add_argument("--distances", type=int, default=4, help="report d = 1..N (default: 4)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (default: 256)")
    p.add_argument("--skip-tokens", type=int, default=None,
                   help="start this far into the text, past what calibration used (default: 38000 for the demo's "
                   "held-out text, whose first 36000 tokens calibrate its predictor; 0 for any other text)")
    p.add_argument("--max-tokens", type=int, default=8192, help="held-out tokens to use (default: 8192)")
    p.add_argument("--device", default="cpu", help="device (default: cpu)")
    p.add_argument("--json", action="store_true", help="print the table as JSON instead of Markdown")
    args = p.parse_args(argv)
    if args.skip_tokens is None:
        args.skip_tokens = 38000 if Path(args.data).resolve() == (DEMO_DIR / "heldout.txt").resolve() else 0
    import transformers

    transformers.logging.set_verbosity_error()

    model, tok = moe_prefetch.load_model(args.model, moe_prefetch.OffloadConfig(
        device=args.device, predictor="none", show_progress=False, max_context=args.seq_len))
    view, H, lengths = collect_residuals(model, tok, read_text(args.data), args.seq_len, args.max_tokens, False,
                                         args.skip_tokens, what=f"{args.data} past --skip-tokens {args.skip_tokens}")
    truth = true_topk(view, H)
    D = [d for d in range(1, args.distances + 1) if d < len(view.layers)]
    trace = []  # oracle: the true routing, step by step, as the runtime would record it
    for t in range(H[0].shape[0]):
        trace.append([truth[i][t:t + 1] for i in range(len(H))])
    rows = {
        "next-gate": NextGatePredictor(view),
        "history": HistoryPredictor(view),
    }
    if args.predictor_path:
        rows["m2r2"] = AcceleratedPredictor(view, load(view, args.predictor_path))
    results = {name: recall_by_distance(pred, view, H, lengths, truth, D) for name, pred in rows.items()}
    oracle = OraclePredictor(view, trace)
    oracle.reset = lambda: None  # one global trace across sequences: do not rewind at sequence starts
    results["oracle"] = recall_by_distance(oracle, view, H, lengths, truth, D)
    k = view.top_k
    results["random"] = {d: k / view.num_experts for d in D}  # expected recall of a uniform guess
    if args.json:
        print(json.dumps({"model": args.model, "tokens": H[0].shape[0], "top_k": k,
                          "recall": {n: {str(d): round(v, 4) for d, v in r.items()} for n, r in results.items()}}))
        return 0
    print(f"Recall of the true top-{k} experts at layer l+d, predicted at layer l "
          f"({H[0].shape[0]} held-out tokens, {len(view.layers)} MoE layers, {view.num_experts} experts)\n")
    print("| predictor | " + " | ".join(f"d={d}" for d in D) + " |")
    print("|---|" + "---|" * len(D))
    for name, r in results.items():
        print(f"| {name} | " + " | ".join(f"{r[d]:.1%}" if d in r else "-" for d in D) + " |")
    if "m2r2" in results and any(d >= 2 for d in D):
        worse = [d for d in D if d >= 2 and results["m2r2"][d] <= results["next-gate"][d]]
        print("\nm2r2 beats next-gate at every d >= 2" if not worse else f"\nm2r2 does NOT beat next-gate at d={worse}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))  # failures: one line on stderr, non-zero status
