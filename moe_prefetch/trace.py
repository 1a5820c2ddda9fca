"""Routing traces: which experts every MoE layer chose, per forward pass.

record_routing(model) records them from an offloaded model; save_routing/load_routing store them as
npz (one [T, L, k] array per forward pass, the model's shape in the header). The oracle predictor
replays a trace; benchmarks and the simulator read them.
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np
import torch

from .errors import MoePrefetchError


@contextlib.contextmanager
def record_routing(model):
    """Yield a list that fills with trace[step][i] = indices [T, k] while the model runs."""
    rt = model.moe_runtime
    trace: list[list[torch.Tensor]] = []
    handles = [model.register_forward_pre_hook(lambda m, a, k: trace.append([]), with_kwargs=True)]
    for layer in rt.adapter.moe_layers():
        block = rt.adapter.get_block(model, layer)
        handles.append(block.register_forward_hook(lambda m, a, o: trace[-1].append(m._indices.detach().cpu().clone())))
    try:
        yield trace
    finally:
        for h in handles:
            h.remove()


def save_routing(trace, path, meta: dict | None = None) -> None:
    arrays = {f"step{s:06d}": torch.stack(layers, dim=1).numpy().astype(np.int16) for s, layers in enumerate(trace)}
    header = dict(meta or {}, steps=len(trace), format="moe_prefetch.routing.v1")
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez_compressed(tmp, header=np.array(json.dumps(header)), **arrays)
    tmp.replace(path)


def load_routing(path) -> list[list[torch.Tensor]]:
    """Steps of a routing trace: one per forward pass (save_routing), or one per token of a
    simulator trace (python -m moe_prefetch.trace), each a list over MoE layers of [T, k] indices."""
    path = Path(path)
    try:
        with np.load(path) as z:
            header = json.loads(str(z["header"]))
            if "routing" in z.files:  # simulator trace: [N, L, k], every token one decode step
                steps = [a[None] for a in z["routing"]]
            else:
                steps = [z[f"step{s:06d}"] for s in range(header["steps"])]
    except Exception as e:  # noqa: BLE001
        raise MoePrefetchError(f"cannot read routing trace {path} ({type(e).__name__})") from None
    return [[torch.from_numpy(a[:, i].astype(np.int64)) for i in range(a.shape[1])] for a in steps]


# ---- python -m moe_prefetch.trace ---------------------------------------------------------------
def record_trace(model, tokenizer, text: str, lookahead: int, seq_len: int, max_tokens: int,
                 predictor_path: str | None = None, progress: bool = True, skip_tokens: int = 0):
    """Routing of every token of `text` (each token = one decode step) and every predictor's scores
    for distances 1..lookahead, as a sim.Trace."""
    from .calibrate import collect_residuals, true_topk
    from .predictors import HistoryPredictor
    from .predictors.accelerated import AcceleratedPredictor, load
    from .sim import Trace

    view, H, lengths = collect_residuals(model, tokenizer, text, seq_len, max_tokens, progress, skip_tokens)
    truth = true_topk(view, H)
    N, L, E, K = H[0].shape[0], len(H), view.num_experts, lookahead
    dtype = view.routers[0].weight.dtype
    predictors = {"next-gate": None}
    if predictor_path:
        predictors["m2r2"] = AcceleratedPredictor(view, load(view, predictor_path))
    scores = {}
    with torch.no_grad():
        for name, pred in predictors.items():
            s = np.full((N, L, K, E), np.nan, dtype=np.float32)
            for i in range(L):
                for d in range(1, K + 1):
                    if i + d < L:
                        p = view.router_probs(i + d, H[i].to(dtype)) if pred is None else pred.predict(i, H[i].to(dtype), [d])[d]
                        s[:, i, d - 1] = p.float().numpy()
            scores[name] = s
        hist = HistoryPredictor(view)
        s = np.full((N, L, K, E), np.nan, dtype=np.float32)
        start = 0
        dummy = torch.zeros(1, view.hidden_size)
        for length in lengths:
            hist.reset()
            for t in range(start, start + length):
                for i in range(L):
                    for d, p in hist.predict(i, dummy, list(range(1, K + 1))).items():
                        s[t, i, d - 1] = p[0].numpy()
                    hist.observe(i, truth[i][t:t + 1])
            start += length
        scores["history"] = s
    routing = torch.stack(truth, dim=1).numpy()  # [N, L, k]
    rt = model.moe_runtime
    c = model.config
    header = dict(format="moe_prefetch.trace.v1", layers=L, experts=E, top_k=view.top_k, hidden=c.hidden_size,
                  intermediate=getattr(c, "intermediate_size", None), expert_bytes=rt.store.expert_nbytes,
                  dtype=str(rt.dtype).replace("torch.", ""), lookahead=K, tokens=N,
                  predictors=sorted(scores))
    return Trace(routing, lengths, scores, header)


def main_body(argv=None) -> int:
    from .cli_common import ArgumentParser

    p = ArgumentParser(prog="python -m moe_prefetch.trace",
                       description="Record per-token routing and every predictor's scores over a text.")
    p.add_argument("--model", default="demo", help="alias, checkpoint directory or hub id (default: demo)")
    p.add_argument("--data", required=True, help="plain UTF-8 text; each token becomes one decode step")
    p.add_argument("--out", required=True, help="trace file to write (.npz)")
    p.add_argument("--predictor-path", help="trained m2r2 predictor to include (from moe_prefetch.calibrate)")
    p.add_argument("--lookahead", type=int, default=4, help="record scores for distances 1..K (default: 4)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (default: 256)")
    p.add_argument("--max-tokens", type=int, default=4096, help="tokens of the text to use (default: 4096)")
    p.add_argument("--skip-tokens", type=int, default=0, help="start this many tokens into the text (default: 0)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    args = p.parse_args(argv)
    if args.lookahead < 1:
        raise MoePrefetchError("--lookahead must be at least 1")
    from .calibrate import read_text
    from .config import OffloadConfig
    from .runtime import load_model

    text = read_text(args.data)
    import transformers

    transformers.logging.set_verbosity_error()
    model, tok = load_model(args.model, OffloadConfig(device=args.device, predictor="none", max_context=args.seq_len,
                                                      show_progress=not args.no_progress))
    trace = record_trace(model, tok, text, args.lookahead, args.seq_len, args.max_tokens, args.predictor_path,
                         not args.no_progress, args.skip_tokens)
    trace.header["model"] = args.model
    trace.save(args.out)
    model.moe_runtime.close()
    print(f"wrote {args.out}: {trace.header['tokens']} tokens x {trace.header['layers']} layers, "
          f"predictors {', '.join(trace.header['predictors'])}")
    return 0


def main(argv=None) -> int:
    from .cli_common import run_main

    return run_main(main_body, argv)


if __name__ == "__main__":
    import sys

    sys.exit(main())
