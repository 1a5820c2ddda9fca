"""python -m moe_prefetch.calibrate: train the accelerated-residual (m2r2) predictor on plain text.

1. Run the offloaded model over the text (prefill only) and record, for every MoE layer i, the
   residual stream h_i entering its MoE block; the true routing of layer j is router_j(norm_j(h_j)).
2. For each (i, d) fit A_{i,d}(h) = h + U V^T rmsnorm(h) so that router_{i+d}(norm_{i+d}(A(h_i)))
   matches the true routing distribution of layer i+d (cross-entropy to the soft router targets,
   optionally plus a regression of A(h_i) towards h_{i+d}). U starts at 0, i.e. at next-gate.
   With --next-token, also fit the maps with i+d >= L: from token t's residual at layer i to layer
   i+d-L of token t+1 (the next token of the same sequence), up to d = L.
3. Report held-out recall of the true top-k per distance, next-gate vs m2r2, and save the maps.
"""
from __future__ import annotations

import json
import sys
import time

import torch

from .cli_common import ArgumentParser, check_output_path, check_size_flag, run_main
from .errors import MoePrefetchError
from .predictors import ModelView, Predictor
from .predictors.accelerated import AcceleratedPredictor, AcceleratedResidual, save
from .progress import progress_bar


def read_text(path: str, what: str = "calibration text") -> str:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise MoePrefetchError(f"cannot read {what} {path}: {type(e).__name__}: {e}") from None
    if not text.strip():
        raise MoePrefetchError(f"{what} {path} is empty")
    return text


def text_chunks(tokenizer, text: str, seq_len: int, max_tokens: int, skip_tokens: int = 0,
                min_tokens: int | None = None, what: str = "calibration text") -> list[torch.Tensor]:
    """The token ids collect_residuals runs, as its sequences: contiguous chunks [S] of the text."""
    ids = tokenizer(text, return_tensors="pt", verbose=False)["input_ids"][0]  # chunked below: no length warning
    ids = ids[skip_tokens:skip_tokens + max_tokens]
    need = 2 * seq_len if min_tokens is None else min_tokens
    if ids.numel() < need:
        raise MoePrefetchError(f"{what} has {ids.numel()} tokens; at least {need} are needed")
    shortest = min(9, need)  # a stub at the end of the text is dropped, unless the text is that short
    return [ids[s:s + seq_len] for s in range(0, ids.numel() - 1, seq_len) if ids[s:s + seq_len].numel() >= shortest]


@torch.inference_mode()
def collect_residuals(model, tokenizer, text: str, seq_len: int, max_tokens: int, progress: bool = True,
                      skip_tokens: int = 0, min_tokens: int | None = None, what: str = "calibration text",
                      chunks: list[torch.Tensor] | None = None):
    """Residuals entering each MoE block: list over MoE layers of [N, H] (float32, CPU), plus the
    number of tokens per sequence (sequences are contiguous chunks of the text, in order).
    The text must have min_tokens tokens (default: two sequences, enough to hold one out).
    chunks: the sequences text_chunks() made of the text already, if the caller needs their ids too."""
    rt = model.moe_runtime
    view = ModelView.of(model, rt.adapter)
    view.need_routers("calibrate")
    if chunks is None:
        chunks = text_chunks(tokenizer, text, seq_len, max_tokens, skip_tokens, min_tokens, what)
    store: list[list[torch.Tensor]] = [[] for _ in view.layers]
    handles = []
    for i, norm in enumerate(view.taps):
        handles.append(norm.register_forward_pre_hook(
            lambda m, a, i=i: store[i].append(a[0].reshape(-1, a[0].shape[-1]).float().cpu())))
    try:
        for chunk in progress_bar(chunks, desc="recording residuals", unit="seq", disable=not progress):
            model(chunk[None].to(rt.device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return view, [torch.cat(s) for s in store], [c.numel() for c in chunks]


def true_topk(view: ModelView, H: list[torch.Tensor]) -> list[torch.Tensor]:
    with torch.no_grad():
        return [torch.topk(view.router_probs(i, H[i].to(view.routers[i].dtype)), view.top_k, -1).indices
                for i in range(len(H))]


def with_next(lengths: list[int]) -> torch.Tensor:
    """Positions [M] (in the concatenated sequences) of the tokens that have a next token in their sequence."""
    out, start = [], 0
    for length in lengths:
        out.append(torch.arange(start, start + length - 1))
        start += length
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


def _overlap(pred_scores: torch.Tensor, truth: torch.Tensor, k: int) -> torch.Tensor:
    """Per-token |top-k(pred) & truth| as a float tensor [N]."""
    pred = torch.topk(pred_scores.float(), k, -1).indices  # [N, k]
    return (pred[:, :, None] == truth[:, None, :]).any(-1).float().sum(-1)


@torch.no_grad()
def recall_by_distance(predictor: Predictor, view: ModelView, H: list[torch.Tensor], lengths: list[int],
                       truth: list[torch.Tensor], distances: list[int], part: str = "all") -> dict[int, float]:
    """Recall of the true top-k experts at layer i+d from the predictor's top-k made at layer i,
    averaged over tokens and layers. Sequential predictors are fed token by token. part: "all", or
    only the targets in the same token ("this") or past the last layer, in the next token ("next")."""
    keep = {"all": lambda i, d: True, "this": lambda i, d: i + d < len(H), "next": lambda i, d: i + d >= len(H)}[part]
    n, k = len(H), view.top_k
    hits = {d: 0.0 for d in distances}
    total = {d: 0 for d in distances}
    dtype = view.routers[0].dtype
    if not predictor.sequential:
        rows = with_next(lengths)  # past the last layer: token t's prediction of token t+1's layer
        for i in range(n):
            for d, s in predictor.predict(i, H[i].to(dtype), [d for d in distances if keep(i, d)]).items():
                got = truth[i + d] if i + d < n else truth[i + d - n][rows + 1]
                hits[d] += float(_overlap(s if i + d < n else s[rows], got, k).sum())
                total[d] += got.numel()
        return {d: hits[d] / total[d] for d in distances if total[d]}
    start = 0
    for length in lengths:
        predictor.reset()
        for t in range(start, start + length):
            if hasattr(predictor, "begin_step"):
                predictor.begin_step()
            for i in range(n):
                for d, s in predictor.predict(i, H[i][t:t + 1].to(dtype), [d for d in distances if keep(i, d)]).items():
                    step, j = t + (i + d) // n, (i + d) % n
                    if step < start + length:
                        hits[d] += float(_overlap(s, truth[j][step:step + 1], k).sum())
                        total[d] += k
                predictor.observe(i, truth[i][t:t + 1])
        start += length
    return {d: hits[d] / total[d] for d in distances if total[d]}


def train(view: ModelView, H: list[torch.Tensor], lookahead: int, rank: int, steps: int, lr: float,
          batch: int, regression_weight: float, seed: int, progress: bool = True,
          next_token_lengths: list[int] | None = None) -> AcceleratedResidual:
    """Fit the maps for distances 1..lookahead. next_token_lengths (the tokens per sequence of H): also
    fit the maps past the last layer, each token's residual to its next token's routing."""
    torch.manual_seed(seed)
    n = len(H)
    if any(r.weight is None for r in view.routers):
        raise MoePrefetchError("m2r2 trains against each router's [experts, hidden] weight, and this model's routers "
                               "are not one linear map of their input; use --predictor next-gate or history")
    wraps = next_token_lengths is not None
    maps = AcceleratedResidual(n, lookahead, view.hidden_size, rank, wraps=wraps)
    dtype = view.routers[0].dtype
    with torch.no_grad():  # soft targets: the true routing distribution of every layer
        targets = [view.router_probs(i, H[i].to(dtype)).float() for i in range(n)]
    pairs = [(i, d) for i in range(n) for d in range(1, lookahead + 1) if i + d < n or wraps]
    opt = torch.optim.Adam(maps.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    N = H[0].shape[0]
    rows = with_next(next_token_lengths) if wraps else None  # tokens whose next token is known
    bar = progress_bar(range(steps), desc="training m2r2 maps", unit="step", disable=not progress)
    for _step in bar:
        if rows is None:
            idx = torch.randint(0, N, (min(batch, N),))
        else:
            idx = rows[torch.randint(0, rows.numel(), (min(batch, rows.numel()),))]
        loss = 0.0
        for i, d in pairs:
            j, at = (i + d, idx) if i + d < n else (i + d - n, idx + 1)  # target layer, and whose routing
            a = maps(i, d, H[i][idx])  # [B, H]
            logits = torch.nn.functional.linear(view.norms[j](a.to(dtype)), view.routers[j].weight).float()
            loss = loss + torch.sum(-targets[j][at] * torch.log_softmax(logits, -1), -1).mean()
            if regression_weight:
                tgt = H[j][at]
                loss = loss + regression_weight * ((a - tgt).pow(2).mean() / tgt.pow(2).mean())
        loss = loss / len(pairs)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{float(loss.detach()):.4f}")
    return maps.requires_grad_(False)


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m moe_prefetch.calibrate",
                       description="Train the accelerated-residual (m2r2) expert predictor for a model.")
    p.add_argument("--model", default="demo", help="alias, checkpoint directory or hub id (default: demo)")
    p.add_argument("--data", required=True, help="plain UTF-8 text to calibrate on")
    p.add_argument("--out", required=True, help="where to write the predictor (.safetensors)")
    p.add_argument("--lookahead", type=int, default=3, help="train maps for distances 1..K (default: 3; with "
                   "--next-token up to the number of MoE layers, a whole token ahead)")
    p.add_argument("--next-token", action="store_true", help="also train the maps that reach past the last layer "
                   "into the next token's layers (each token's residual to its next token's routing)")
    p.add_argument("--rank", type=int, default=32, help="rank of each low-rank map (default: 32)")
    p.add_argument("--steps", type=int, default=600, help="optimisation steps (default: 600)")
    p.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate (default: 3e-3)")
    p.add_argument("--batch", type=int, default=512, help="tokens per step (default: 512)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per calibration sequence (default: 256)")
    p.add_argument("--max-tokens", type=int, default=60000, help="use at most this many tokens of the text (default: 60000)")
    p.add_argument("--skip-tokens", type=int, default=0, help="start this many tokens into the text (default: 0)")
    p.add_argument("--heldout", type=float, default=0.1, help="fraction of sequences held out for the recall report (default: 0.1)")
    p.add_argument("--regression-weight", type=float, default=0.0, help="weight of the regression of A(h_l) to h_{l+d} (default: 0)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda (default: auto)")
    p.add_argument("--device-memory", help="device memory budget while recording, e.g. 20GiB")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--json", action="store_true", help="print the recall report as one JSON object on stdout")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return p


def main_body(argv=None) -> int:
    args = build_parser().parse_args(argv)
    for name in ("lookahead", "rank", "steps", "batch", "seq_len", "max_tokens"):
        if getattr(args, name) < 1:
            raise MoePrefetchError(f"--{name.replace('_', '-')} must be at least 1")
    if not 0 < args.heldout < 1:
        raise MoePrefetchError("--heldout must be between 0 and 1")
    check_size_flag("--device-memory", args.device_memory)
    check_output_path(args.out)  # before any work, not after it
    text = read_text(args.data)
    import transformers

    transformers.logging.set_verbosity_error()
    from .config import OffloadConfig
    from .families import adapter_for
    from .hub import resolve_model
    from .predictors import NextGatePredictor
    from .predictors.base import residual_reach
    from .runtime import _load_config, load_model

    t0 = time.perf_counter()
    path = resolve_model(args.model)
    n_layers = len(adapter_for(_load_config(path)).moe_layers())
    if args.next_token and args.lookahead > n_layers:
        raise MoePrefetchError(f"--lookahead {args.lookahead} is more than m2r2 can use: with --next-token it predicts "
                               f"at most one token ahead, {n_layers} layers on a model with {n_layers} MoE layers")
    if not args.next_token and args.lookahead > n_layers - 1:  # the rule run applies (Predictor.max_lookahead)
        raise MoePrefetchError(f"--lookahead {args.lookahead} is more than m2r2 can use: {residual_reach(n_layers)}"
                               " (--next-token trains maps into the next token's layers)")
    cfg = OffloadConfig(device=args.device, device_memory=args.device_memory, predictor="none",
                        max_context=args.seq_len, show_progress=not args.no_progress)
    model, tokenizer = load_model(str(path), cfg)
    view, H, lengths = collect_residuals(model, tokenizer, text, args.seq_len, args.max_tokens, not args.no_progress,
                                         args.skip_tokens)
    n_held = max(1, int(len(lengths) * args.heldout))
    n_train_tok = sum(lengths[:-n_held])
    H_train = [h[:n_train_tok] for h in H]
    H_held = [h[n_train_tok:] for h in H]
    maps = train(view, H_train, args.lookahead, args.rank, args.steps, args.lr, args.batch,
                 args.regression_weight, args.seed, not args.no_progress,
                 lengths[:-n_held] if args.next_token else None)
    truth = true_topk(view, H_held)
    distances = list(range(1, args.lookahead + 1))
    base = recall_by_distance(NextGatePredictor(view), view, H_held, lengths[-n_held:], truth, distances)
    ours = recall_by_distance(AcceleratedPredictor(view, maps), view, H_held, lengths[-n_held:], truth, distances,
                              "this")
    ahead = recall_by_distance(AcceleratedPredictor(view, maps), view, H_held, lengths[-n_held:], truth, distances,
                               "next") if args.next_token else {}
    report = {"model": args.model, "train_tokens": n_train_tok, "heldout_tokens": sum(lengths[-n_held:]),
              "lookahead": args.lookahead, "next_token": args.next_token, "rank": args.rank, "steps": args.steps,
              "recall_next_gate": {str(d): round(v, 4) for d, v in base.items()},
              "recall_m2r2": {str(d): round(v, 4) for d, v in ours.items()},
              "recall_m2r2_next_token": {str(d): round(v, 4) for d, v in ahead.items()},
              "seconds": round(time.perf_counter() - t0, 1), "out": args.out}
    save(maps, view, args.out, extra={k: report[k] for k in ("train_tokens", "recall_m2r2", "recall_m2r2_next_token",
                                                              "recall_next_gate")})
    model.moe_runtime.close()
    if args.json:
        print(json.dumps(report))
    else:
        print(f"held-out recall of the true top-{view.top_k} ({report['heldout_tokens']} tokens)")
        cell = lambda r, d, w: f"{r[d]:{w}.1%}" if d in r else f"{'-':>{w}}"  # noqa: E731 (no such target at d)
        if args.next_token:  # the layers d ahead in this token, and those past the last layer (next token)
            print("distance  next-gate  m2r2  m2r2, next token")
            for d in distances:
                print(f"d={d:<7} {cell(base, d, 9)}  {cell(ours, d, 5)}  {cell(ahead, d, 16)}")
        else:
            print("distance  next-gate  m2r2")
            for d in distances:
                print(f"d={d:<7} {cell(base, d, 9)}  {cell(ours, d, 5)}")
        print(f"saved {args.out} ({report['seconds']} s)")
    return 0


def main(argv=None) -> int:
    return run_main(main_body, argv)


if __name__ == "__main__":
    sys.exit(main())
