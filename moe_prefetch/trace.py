"""Routing traces: which experts every MoE layer chose, per forward pass.

record_routing(model) records them from an offloaded model; save_routing/load_routing store them as
npz (one [T, L, k] array per forward pass; the model's shape and router fingerprint in the header, so
a trace is never replayed on another model). The oracle predictor replays a trace; benchmarks and the
simulator read them.

    python -m moe_prefetch.trace --prompt "..." --out run.npz   # the routing of one run, for --predictor oracle
    python -m moe_prefetch.trace --data text.txt --out sim.npz  # every token of a text, for the simulator
"""
from __future__ import annotations

import contextlib
import json
import sys
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
        experts = rt.adapter.experts_module(model, layer)
        handles.append(experts.register_forward_hook(
            lambda m, a, o: trace[-1].append(m.__dict__["_moe_offload"].last_indices.detach().cpu().clone())))
    try:
        yield trace
    finally:
        for h in handles:
            h.remove()


def routing_meta(model) -> dict:
    """Header fields that tie a trace to the model it was recorded on (pass as save_routing's meta)."""
    rt = model.moe_runtime
    return dict(fingerprint=rt.fingerprint, layers=len(rt.adapter.moe_layers()), experts=rt.adapter.num_experts,
                top_k=rt.adapter.top_k)


def save_routing(trace, path, meta: dict | None = None) -> None:
    arrays = {f"step{s:06d}": torch.stack(layers, dim=1).numpy().astype(np.int16) for s, layers in enumerate(trace)}
    header = dict(meta or {}, steps=len(trace), format="moe_prefetch.routing.v1")
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez_compressed(tmp, header=np.array(json.dumps(header)), **arrays)
    tmp.replace(path)


def read_routing_header(path, expected_fingerprint: str | None = None) -> dict:
    """The header of a routing trace; refuses one recorded on another model (router fingerprint).
    Traces written before fingerprints were recorded carry none and are accepted."""
    path = Path(path)
    if not path.is_file():
        raise MoePrefetchError(f"routing trace {path} does not exist (record one with python -m moe_prefetch.trace)")
    try:
        with np.load(path) as z:
            header = json.loads(str(z["header"]))
    except Exception as e:  # noqa: BLE001
        raise MoePrefetchError(f"cannot read routing trace {path} ({type(e).__name__})") from None
    found = header.get("fingerprint")
    if expected_fingerprint is not None and found is not None and found != expected_fingerprint:
        raise MoePrefetchError(f"routing trace {path} was recorded on a different model (router fingerprint mismatch); "
                               "record one for this model with python -m moe_prefetch.trace")
    return header


def load_routing(path, expected_fingerprint: str | None = None) -> list[list[torch.Tensor]]:
    """Steps of a routing trace: one per forward pass (save_routing), or one per token of a
    simulator trace (python -m moe_prefetch.trace --data), each a list over MoE layers of [T, k] indices."""
    path = Path(path)
    header = read_routing_header(path, expected_fingerprint)
    try:
        with np.load(path) as z:
            if "routing" in z.files:  # simulator trace: [N, L, k], every token one decode step
                steps = [a[None] for a in z["routing"]]
            else:
                steps = [z[f"step{s:06d}"] for s in range(header["steps"])]
    except Exception as e:  # noqa: BLE001
        raise MoePrefetchError(f"cannot read routing trace {path} ({type(e).__name__})") from None
    return [[torch.from_numpy(a[:, i].astype(np.int64)) for i in range(a.shape[1])] for a in steps]


# ---- python -m moe_prefetch.trace ---------------------------------------------------------------
@torch.inference_mode()
def record_generation(model, ids: torch.Tensor, generate_kwargs: dict) -> list[list[torch.Tensor]]:
    """Routing of every forward pass of a greedy generate() from prompt ids [1, T]: what `run` with
    the same prompt and --max-new-tokens does, so the oracle replays it exactly."""
    device = model.moe_runtime.device
    with record_routing(model) as trace:
        model.generate(ids.to(device), attention_mask=torch.ones_like(ids).to(device), **generate_kwargs)
    return trace


def record_trace(model, tokenizer, text: str, lookahead: int, seq_len: int, max_tokens: int,
                 predictor_path: str | None = None, progress: bool = True, skip_tokens: int = 0):
    """Routing of every token of `text` (each token = one decode step) and every predictor's scores
    for distances 1..lookahead, as a sim.Trace."""
    from .calibrate import collect_residuals, true_topk
    from .predictors.history import history_scores
    from .predictors.accelerated import AcceleratedPredictor, load
    from .sim import Trace

    view, H, lengths = collect_residuals(model, tokenizer, text, seq_len, max_tokens, progress, skip_tokens,
                                         min_tokens=2, what="text")
    truth = true_topk(view, H)
    N, L, E, K = H[0].shape[0], len(H), view.num_experts, lookahead
    dtype = view.routers[0].dtype
    predictors = {"next-gate": None} if view.routers_unavailable is None else {}  # routers run ahead, or not at all
    if predictor_path:
        predictors["m2r2"] = AcceleratedPredictor(view, load(view, predictor_path))
    scores = {}
    with torch.no_grad():
        for name, pred in predictors.items():
            s = np.full((N, L, K, E), np.nan, dtype=np.float32)
            for i in range(L):
                for d in range(1, K + 1):
                    if i + d >= L and not getattr(pred, "wraps", False):  # m2r2 --next-token maps reach on
                        continue
                    if pred is None:
                        s[:, i, d - 1] = view.router_probs(i + d, H[i].to(dtype)).float().numpy()
                    elif d in (p := pred.predict(i, H[i].to(dtype), [d])):  # a predictor trained for fewer
                        s[:, i, d - 1] = p[d].float().numpy()                # distances leaves these NaN
            scores[name] = s
    routing = torch.stack(truth, dim=1).numpy()  # [N, L, k]
    scores["history"] = history_scores(routing, lengths, K, E)  # as the runtime's history predictor scores
    rt = model.moe_runtime
    c = model.config
    header = dict(format="moe_prefetch.trace.v1", layers=L, experts=E, top_k=view.top_k, hidden=c.hidden_size,
                  intermediate=getattr(c, "intermediate_size", None), expert_bytes=rt.store.expert_nbytes,
                  dtype=str(rt.dtype).replace("torch.", ""), lookahead=K, tokens=N,
                  predictors=sorted(scores), fingerprint=rt.fingerprint)
    return Trace(routing, lengths, scores, header)


def build_parser():
    from .cli_common import ArgumentParser
    from .run import add_prompt_flags

    p = ArgumentParser(prog="python -m moe_prefetch.trace",
                       description="Record which experts every MoE layer routes to: over one run's prompt and generated "
                       "tokens (--prompt, for --predictor oracle), or over every token of a text with every predictor's "
                       "scores (--data, for the simulator).")
    p.add_argument("--model", default="demo", help="alias, checkpoint directory or hub id (default: demo)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", help="plain UTF-8 text; each token becomes one decode step (simulator trace)")
    add_prompt_flags(p, source)
    p.add_argument("--out", required=True, help="trace file to write (.npz)")
    p.add_argument("--predictor-path", help="--data: a trained m2r2 predictor whose scores to include (from calibrate)")
    p.add_argument("--lookahead", type=int, default=4, help="--data: record scores for distances 1..K (default: 4)")
    p.add_argument("--seq-len", type=int, default=256, help="--data: tokens per sequence (default: 256)")
    p.add_argument("--max-tokens", type=int, default=4096, help="--data: tokens of the text to use (default: 4096)")
    p.add_argument("--skip-tokens", type=int, default=0, help="--data: start this many tokens into the text (default: 0)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    p.add_argument("--device-memory", help="device memory budget while recording, e.g. 20GiB (default: as run)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return p


def main_body(argv=None) -> int:
    from .cli_common import check_output_path, check_size_flag

    args = build_parser().parse_args(argv)
    for name in ("lookahead", "seq_len", "max_tokens", "max_new_tokens"):
        if getattr(args, name) < 1:
            raise MoePrefetchError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    check_size_flag("--device-memory", args.device_memory)
    check_output_path(args.out)
    from .calibrate import read_text
    from .config import OffloadConfig
    from .run import _read_prompt, encode_prompt, generate_kwargs
    from .runtime import _load_config, _load_tokenizer, load_model

    text = read_text(args.data, "text") if args.data is not None else None
    import transformers

    transformers.logging.set_verbosity_error()
    from .hub import resolve_model

    path = resolve_model(args.model)
    if text is None:
        ids, max_new = encode_prompt(args, _read_prompt(args), _load_tokenizer(path), _load_config(path))
        context = ids.shape[1] + max_new
    else:
        context = args.seq_len
    model, tok = load_model(str(path), OffloadConfig(device=args.device, device_memory=args.device_memory,
                                                     predictor="none", max_context=context,
                                                     show_progress=not args.no_progress))
    try:
        if text is None:
            trace = record_generation(model, ids, generate_kwargs(tok, max_new))
            save_routing(trace, args.out, meta=dict(routing_meta(model), model=args.model, prompt_tokens=ids.shape[1],
                                                    generated_tokens=len(trace)))
            print(f"wrote {args.out}: routing of {len(trace)} forward passes (a {ids.shape[1]}-token prompt, {len(trace)} "
                  f"tokens generated); replay it with run's same --model, prompt and --max-new-tokens plus "
                  f"--predictor oracle --predictor-path {args.out}")
            return 0
        trace = record_trace(model, tok, text, args.lookahead, args.seq_len, args.max_tokens, args.predictor_path,
                             not args.no_progress, args.skip_tokens)
        trace.header["model"] = args.model
        trace.save(args.out)
    finally:
        model.moe_runtime.close()
    if "m2r2" in trace.scores:  # distances the predictor file has no map for are left empty (NaN): say so
        m2r2, L = trace.scores["m2r2"], trace.header["layers"]  # [N, L, K, E]
        empty = [d for d in range(1, m2r2.shape[2] + 1) if d < L and np.isnan(m2r2[:, :, d - 1]).all()]
        if empty:
            print(f"note: the m2r2 predictor has no map for distance {', '.join(map(str, empty))} (trained with a "
                  f"smaller --lookahead); the trace's m2r2 scores there are empty", file=sys.stderr)
    print(f"wrote {args.out}: {trace.header['tokens']} tokens x {trace.header['layers']} layers, "
          f"predictors {', '.join(trace.header['predictors'])}")
    return 0


def main(argv=None) -> int:
    from .cli_common import run_main

    return run_main(main_body, argv)


if __name__ == "__main__":
    sys.exit(main())
