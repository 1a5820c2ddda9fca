"""How predictable is the next token's routing? Recall of each next-token layer's true top-k experts.

    python bench/next_token.py --predictor-path bench/results/demo.m2r2.next.safetensors --out bench/results
    python bench/next_token.py --model DIR --data TEXT --skip-tokens 2000 --predictor-path DIR.next.safetensors

On a saturated link only predictions a whole token ahead pay (bench/steering.py: about 80% recall
needed), so this asks where the next token's routing could be predicted from (the model runs the
text teacher-forced; the first --table fraction of its sequences builds the tables, the rest is
scored; give a predictor calibrated on text before the scored part). Columns, per layer j of the next token:
  true next token   a table of each token's mean routing at layer j, looked up with the token that
                    really comes next: the ceiling of anything that guesses the next token first
  lens + table      the same table weighted by the model's own next-token distribution read from the
                    residual entering the last MoE layer (final norm and lm_head: the logit lens)
  m2r2 next token   a predictor file from calibrate --next-token, from the last MoE layer (d = j + 1)
                    and from the layer where it scores best
  previous token    the experts the current token used at layer j (what `history` leans on)
Chance is k / E. The lens top-1 column says how often the lens's best guess is the text's next token.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import moe_prefetch  # noqa: E402
from moe_prefetch.calibrate import _overlap, collect_residuals, read_text, text_chunks, true_topk, with_next  # noqa: E402
from moe_prefetch.cli_common import ArgumentParser, run_main, write_report  # noqa: E402
from moe_prefetch.errors import MoePrefetchError  # noqa: E402
from moe_prefetch.hub import DEMO_DIR  # noqa: E402


def lens_modules(model):
    """(final norm, lm_head) of a causal LM, or None where the model has no final norm where most
    families keep it (model.model.norm)."""
    norm = getattr(getattr(model, "model", None), "norm", None)
    head = model.get_output_embeddings()
    return (norm, head) if norm is not None and head is not None else None


@torch.no_grad()
def measure(model, tok, text: str, seq_len: int, max_tokens: int, skip: int, table_frac: float,
            predictor_path: str | None = None) -> dict:
    chunks = text_chunks(tok, text, seq_len, max_tokens, skip, what="text")
    view, H, lengths = collect_residuals(model, tok, text, seq_len, max_tokens, False, chunks=chunks)
    ids = torch.cat(chunks)  # [N], aligned with H
    n, k, E = len(H), view.top_k, view.num_experts
    truth = true_topk(view, H)
    n_table = max(1, min(len(lengths) - 1, round(len(lengths) * table_frac)))
    split = sum(lengths[:n_table])
    rows = with_next(lengths)
    rows = rows[rows >= split]  # scored: held-out tokens that have a next token
    if rows.numel() == 0:
        raise MoePrefetchError("no held-out tokens to score: give a longer text or a smaller --table")
    nxt = ids[rows + 1]

    def recall(scores, j):  # scores [M, E] for the next token's layer j
        return float(_overlap(scores, truth[j][rows + 1], k).sum()) / (rows.numel() * k)

    seen = torch.unique(ids[:split])  # the table's tokens [U]
    lens = lens_modules(model)
    mass = top1 = None
    if lens is not None:  # the model's next-token distribution at the last MoE layer's input, kept on the
        norm, head = lens  # table's tokens only ([M, U]): a whole vocabulary per row would not fit on big ones
        parts, hits = [], 0
        for b in range(0, rows.numel(), 512):
            p = torch.softmax(head(norm(H[n - 1][rows[b:b + 512]].to(head.weight.dtype))).float(), -1)  # [B, V]
            hits += int((p.argmax(-1) == nxt[b:b + 512]).sum())
            parts.append(p[:, seen])
        mass, top1 = torch.cat(parts), hits / rows.numel()
    m2r2 = None
    if predictor_path:
        from moe_prefetch.predictors.accelerated import AcceleratedPredictor, load

        m2r2 = AcceleratedPredictor(view, load(view, predictor_path))
        if not m2r2.wraps:
            raise MoePrefetchError(f"{predictor_path} was not calibrated with --next-token: it does not reach the next token")
    out = []
    dtype = view.routers[0].dtype
    for j in range(n):
        probs = view.router_probs(j, H[j][:split].to(dtype)).float()  # [S, E] soft routing of the table's tokens
        where = torch.searchsorted(seen, ids[:split])
        table = torch.zeros(seen.numel(), E).index_add_(0, where, probs)
        count = torch.bincount(where, minlength=seen.numel()).float()
        prior = probs.mean(0)  # [E]: tokens the table has not seen get the layer's mean routing
        table = (table + prior) / (count[:, None] + 1.0)
        pos = torch.searchsorted(seen, nxt).clamp(max=seen.numel() - 1)
        known = seen[pos] == nxt
        guess_true = torch.where(known[:, None], table[pos], prior)
        row = dict(layer=j, true_next_token=recall(guess_true, j),
                   previous_token=recall(torch.zeros(rows.numel(), E).scatter_(1, truth[j][rows], 1.0) + 1e-3 * prior, j))
        if mass is not None:
            row["lens_and_table"] = recall(mass @ table + (1 - mass.sum(-1, keepdim=True)) * prior, j)
        if m2r2 is not None:
            by_source = {}
            for i in range(n):
                d = n - i + j
                if d <= m2r2.maps.lookahead:
                    s = m2r2.predict(i, H[i][rows].to(dtype), [d])
                    by_source[i] = recall(s[d], j) if d in s else None
            got = {i: r for i, r in by_source.items() if r is not None}
            row["m2r2_from_last_layer"] = got.get(n - 1)
            if got:
                best = max(got, key=got.get)
                row["m2r2_best"], row["m2r2_best_layer"] = got[best], best
        out.append(row)
    return dict(layers=n, experts=E, top_k=k, table_tokens=split, scored_tokens=int(rows.numel()),
                lens_top1=top1, chance=k / E, rows=out)


def markdown(r: dict, label: str) -> list[str]:
    head = (f"Next-token routing recall (true top-{r['top_k']} of {r['experts']} experts) on {label}: tables from "
            f"{r['table_tokens']} tokens, {r['scored_tokens']} held-out tokens scored; chance {r['chance']:.1%}")
    if r["lens_top1"] is not None:
        head += f"; the logit lens at the last MoE layer's input names the next token {r['lens_top1']:.1%} of the time"
    cols = ["true next token", "lens + table", "m2r2 next token, from the last layer", "m2r2 next token, best layer",
            "previous token"]
    lines = [head + ".", "", "| next token's layer | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    fmt = lambda v: "-" if v is None else f"{v:.1%}"  # noqa: E731
    for row in r["rows"]:
        best = fmt(row.get("m2r2_best"))
        if "m2r2_best_layer" in row:
            best += f" (layer {row['m2r2_best_layer']})"
        lines.append(f"| {row['layer']} | {fmt(row['true_next_token'])} | {fmt(row.get('lens_and_table'))} | "
                     f"{fmt(row.get('m2r2_from_last_layer'))} | {best} | {fmt(row['previous_token'])} |")
    return lines


def main(argv=None) -> int:
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="demo", help="alias, directory or hub id (default: demo)")
    p.add_argument("--data", default=str(DEMO_DIR / "heldout.txt"), help="text (default: the demo model's held-out text)")
    p.add_argument("--predictor-path", help="an m2r2 file from calibrate --next-token (omit to skip its columns)")
    p.add_argument("--skip-tokens", type=int, default=None, help="start this far into the text (default: 2000 for the "
                   "demo's held-out text, as its predictors were calibrated; 0 for any other text)")
    p.add_argument("--max-tokens", type=int, default=40000, help="tokens to use (default: 40000)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (default: 256)")
    p.add_argument("--table", type=float, default=0.9, help="fraction of the sequences that build the tables; the "
                   "rest is scored (default: 0.9: with the defaults, the demo's tokens from about 38000 on, which "
                   "its predictors were not calibrated on)")
    p.add_argument("--device", default="cpu", help="device (default: cpu)")
    p.add_argument("--out", help="folder for next_token.md and .json (default: print only)")
    args = p.parse_args(argv)
    if not 0 < args.table < 1:
        p.error(f"--table is a fraction in (0, 1), got {args.table}")
    if args.predictor_path and not Path(args.predictor_path).is_file():
        p.error(f"--predictor-path {args.predictor_path} does not exist (train one with calibrate --next-token)")
    if args.predictor_path:  # refused before the model loads, as measure() would after
        from moe_prefetch.predictors.accelerated import read

        if read(args.predictor_path)[0].get("next_token") != "1":
            raise MoePrefetchError(f"{args.predictor_path} was not calibrated with --next-token: it does not reach "
                                   "the next token")
    if args.skip_tokens is None:
        args.skip_tokens = 2000 if Path(args.data).resolve() == (DEMO_DIR / "heldout.txt").resolve() else 0
    text = read_text(args.data, "text")
    import transformers

    transformers.logging.set_verbosity_error()
    model, tok = moe_prefetch.load_model(args.model, moe_prefetch.OffloadConfig(
        device=args.device, predictor="none", show_progress=False, max_context=args.seq_len))
    try:
        r = measure(model, tok, text, args.seq_len, args.max_tokens, args.skip_tokens, args.table, args.predictor_path)
    finally:
        model.moe_runtime.close()
    r.update(model=args.model, data=args.data, skip_tokens=args.skip_tokens)
    lines = markdown(r, f"{Path(args.data).name} from token {args.skip_tokens}")
    print("\n".join(lines))
    if args.out:
        write_report(args.out, "next_token", lines, r)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))  # failures: one line on stderr, non-zero status
