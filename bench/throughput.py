"""Real decode throughput of the runtime on the demo model, CPU, with an emulated PCIe link.

    python bench/throughput.py --predictor-path demo.m2r2 --out bench/results

Every policy the runtime implements, at expert caches of 25/50/75/100% of all experts, decoding the
demo model's held-out text token by token (teacher forcing, KV cache, batch 1), all in one run. The
CPU engine is throttled to a link bandwidth chosen so that one expert's transfer takes R times one
decoder layer's compute, R taken from a GPU profile (default: Mixtral-8x7B int4 experts on an
RTX 4090 over PCIe 4.0), so the CPU reproduces that GPU's compute-to-transfer ratio.
Also measured: the all-resident upper bound (plain transformers) and HF accelerate's offloading of the
same experts over the same emulated link. Then the simulator is checked against these measurements.
A predictor trained with `calibrate --next-token` also gets rows at its full reach (K = the MoE layers
for one trained a whole token ahead).
--repeats N runs every row N times in interleaved rounds and reports each row's median round, which
keeps a slow stretch of a shared machine from deciding one row's figure.
Writes throughput.md, throughput.json and throughput.png to --out.
"""
from __future__ import annotations

import os

# Before torch loads: OpenMP threads that sleep when idle instead of spinning, so the copy and host
# threads' work does not stall the compute thread's matmuls on a small machine.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import dataclasses  # noqa: E402
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import moe_prefetch as mp  # noqa: E402
from moe_prefetch.cli_common import ArgumentParser, run_main  # noqa: E402
from moe_prefetch.config import format_size  # noqa: E402
from moe_prefetch.errors import MoePrefetchError  # noqa: E402
from moe_prefetch.families.adapter import is_experts_module  # noqa: E402
from moe_prefetch.hub import DEMO_DIR, resolve_model  # noqa: E402
from moe_prefetch.predictors import ModelView, resolve_auto  # noqa: E402
from moe_prefetch.sim import CostModel, Policy, load_profiles, simulate  # noqa: E402


def sequences(tokenizer, path: Path, n: int, length: int) -> list[torch.Tensor]:
    """`n` consecutive sequences of `length` tokens from the start of the text file at `path`."""
    # verbose=False: the whole file is one long sequence here, which is not a model input
    ids = tokenizer(path.read_text(encoding="utf-8"), return_tensors="pt", verbose=False)["input_ids"][0]
    if ids.numel() < n * length:
        raise MoePrefetchError(f"{path} has {ids.numel()} tokens, fewer than the {n} x {length} asked for "
                               "(fewer or shorter sequences, or a longer text)")
    return [ids[s * length:(s + 1) * length] for s in range(n)]


@torch.inference_mode()
def teacher_forced(model, seqs, device="cpu") -> tuple[float, int]:
    """Decode every token of every sequence one at a time; returns (decode seconds, decode steps),
    counting all steps but each sequence's first (its prefill)."""
    seconds, steps = 0.0, 0
    for seq in seqs:
        cache = None  # the model makes its own on the first step (some families need their own cache class)
        for t in range(seq.numel()):
            t0 = time.perf_counter()
            out = model(seq[t:t + 1][None].to(device), use_cache=True,
                        **(mp.cache_kwargs(model, cache) if cache is not None else {}))
            # renamed `cache` in newer transformers, which warn when the old name is asked for
            cache = out["cache"] if "cache" in out else out.get("past_key_values")
            if t:
                seconds += time.perf_counter() - t0
                steps += 1
    return seconds, steps


def rate(bytes_per_s: float) -> str:
    """A transfer rate in the unit that suits it (a tiny model's emulated link is a few hundred KiB/s:
    "0.000 GB/s" would read as no link at all)."""
    return f"{format_size(int(bytes_per_s))}/s"


def gpu_ratio(hw_name: str, shape_name: str, dtype: str) -> float:
    """Transfer time of one expert / compute time of one MoE layer (attention + top-k experts)."""
    hw, shape = load_profiles("hardware")[hw_name], load_profiles("models")[shape_name]
    c = CostModel.for_gpu(hw, shape, dtype, shape["moe_layers"])
    return c.transfer_s / (c.attn_s + shape["top_k"] * c.expert_s)


#: the rows whose policy predicts (the default's predictor is next-gate, or history where routers cannot run ahead)
PREDICTING = ("ours", "default", "next-gate", "history K=")

EXPERT: dict = {}  # loading options every row shares (--expert-dtype): set once the full-precision probe ran


def load(model_name, **kw):
    model, tok = mp.load_model(model_name, mp.OffloadConfig(device="cpu", show_progress=False, **{**EXPERT, **kw}))
    return model, tok


def run_policy(model_name, seqs, **kw) -> dict:
    model, _ = load(model_name, **kw)
    seconds, steps = teacher_forced(model, seqs)
    st = mp.stats(model)
    eng = model.moe_runtime.offloader.engine
    link_s = eng.seconds_per_copy() or 0.0  # what one copy really took on the (emulated) link
    layers = (steps + len(seqs)) * len(model.moe_runtime.adapter.moe_layers())  # MoE layer runs, first tokens included
    others = st["predict_seconds"] - st["predicted_seconds"]  # the prefetcher's time on layers it did not predict
    model.moe_runtime.close()
    return dict(tokens_per_s=steps / seconds, link_s=link_s, hit_rate=st["hit_rate"], stall_s=st["stall_seconds"],
                mb_moved=st["bytes_to_device"] / 1e6, bytes_moved=st["bytes_to_device"],
                host_computed=st["host_computed"], prefetch_gated=st["prefetch_gated"],
                host_s=model_host.seconds_per_job() if (model_host := model.moe_runtime.offloader.host) else None,
                prefetch_issued=st["prefetch_issued"],
                prefetch_used=st["prefetch_used"], prefetch_late=st["prefetch_late"],
                prefetch_wasted=st["prefetch_wasted"], seconds=seconds, steps=steps,
                predict_s=st["predicted_seconds"] / st["predicted_layers"] if st["predicted_layers"] else 0.0,
                prefetch_layer_s=others / (layers - st["predicted_layers"]) if layers > st["predicted_layers"] else 0.0,
                plan_s=st["plan_seconds"] / layers,
                settle_s=st["settle_seconds"] / layers,  # the planner's deferred bookkeeping, all of it
                settle_paid_s=(st["settle_seconds"] - st["settle_hidden_seconds"]) / layers,  # in plan_s too
                predicted_layers=st["predicted_layers"],
                eviction_epochs=st["eviction_epochs"])  # eviction auto: epochs under each rule (None otherwise)


def measure_costs(model_name, seqs, top_k, **kw) -> tuple[float, float, float, float, float]:
    """attn_s, expert_s, tail_s of the CPU runtime with every expert resident (no transfers), from
    forward hooks on the decoder layers and MoE blocks, and the planner's time per layer of hits in them:
    deciding, and its deferred bookkeeping (Planner.settle, paid in full where nothing is in flight; both
    are in the hooks' times); `kw` sets the predictor and eviction in use."""
    model, _ = load(model_name, **kw)
    rt = model.moe_runtime
    a = rt.adapter
    layers = [(model.get_submodule(a.info(l).decoder), a.block(model, l)) for l in a.moe_layers()]
    spans = {"layer": 0.0, "moe": 0.0}
    marks = {}

    def timer(kind):
        def pre(m, *a):
            marks[kind] = time.perf_counter()

        def post(m, *a):
            spans[kind] += time.perf_counter() - marks[kind]
        return pre, post

    handles = []
    for layer, block in layers:
        for mod, kind in ((layer, "layer"), (block, "moe")):
            pre, post = timer(kind)
            handles += [mod.register_forward_pre_hook(pre), mod.register_forward_hook(post)]
    teacher_forced(model, seqs[:1])  # warm-up: brings every used expert in
    spans.update(layer=0.0, moe=0.0)
    mp.reset_stats(model)
    seconds, steps = teacher_forced(model, seqs)
    n_layers = len(layers)
    first_tokens = len(seqs)  # hooks also timed the untimed first token of each sequence
    calls = (steps + first_tokens) * n_layers
    st = mp.stats(model)
    settle = st["settle_seconds"] / calls
    plan = st["plan_seconds"] / calls - settle  # deciding alone
    attn = (spans["layer"] - spans["moe"]) / calls
    expert = spans["moe"] / calls / top_k
    tail = max(0.0, seconds / steps - n_layers * spans["layer"] / calls)
    model.moe_runtime.close()
    return attn, expert, tail, plan, settle


def emulated_speeds(model_name, seqs, top_k: int, all_experts: int, expert_bytes: int, ratio: float, hw: str,
                    host: str) -> tuple[float, float, float]:
    """(a layer's compute in s at top-k, measured all-resident; the emulated link in bytes/s, so that one
    full-precision expert takes `ratio` layer-computes; the host profile's expert read rate over the
    hardware profile's link rate)."""
    attn, expert, _, _, _ = measure_costs(model_name, seqs, top_k, predictor="none", expert_cache=all_experts)
    layer_s = attn + top_k * expert
    host_over_link = load_profiles("hosts")[host]["read_gbps"] / load_profiles("hardware")[hw]["h2d_gbps"]
    return layer_s, expert_bytes / (ratio * layer_s), host_over_link


def experts_modules(model) -> list[torch.nn.Module]:
    """Every MoE layer's experts module, in any family (dense layers and shared experts are not experts)."""
    return [m for m in model.modules() if is_experts_module(m)]


def accelerate_peer(path, seqs, link_bw: float) -> float | None:
    """HF accelerate's cpu_offload on every layer's experts, each moved tensor throttled by the link."""
    try:
        import accelerate.hooks as hooks
        from accelerate import cpu_offload
    except ImportError:
        return None
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path)
    original = hooks.set_module_tensor_to_device

    def throttled(module, name, device, value=None, *a, **k):
        t0 = time.perf_counter()
        original(module, name, device, value, *a, **k)
        if value is not None and str(device) != "meta":
            delay = value.numel() * value.element_size() / link_bw - (time.perf_counter() - t0)
            if delay > 0:
                time.sleep(delay)

    hooks.set_module_tensor_to_device = throttled
    try:
        for module in experts_modules(model):
            cpu_offload(module, execution_device=torch.device("cpu"))
        seconds, steps = teacher_forced(model, seqs)
    finally:
        hooks.set_module_tensor_to_device = original
    return steps / seconds


def main(argv=None) -> int:
    p = ArgumentParser(description=__doc__.splitlines()[0])  # a bad flag: one line
    p.add_argument("--model", default="demo", help="model (default: demo)")
    p.add_argument("--data", default=str(DEMO_DIR / "heldout.txt"), help="text to decode (default: demo held-out text)")
    p.add_argument("--predictor-path", help="trained m2r2 predictor for the model (rows skipped without it)")
    p.add_argument("--sequences", type=int, default=3, help="sequences to decode per run (default: 3)")
    p.add_argument("--repeats", type=int, default=1, help="rounds of every row, interleaved; each row reports its "
                   "median round, the lower middle one for an even count (default: 1)")
    p.add_argument("--seq-len", type=int, default=64, help="tokens per sequence (default: 64)")
    p.add_argument("--profile", default="rtx4090-pcie4:mixtral-8x7b:int4",
                   help="HARDWARE:SHAPE:DTYPE whose transfer/compute ratio the link reproduces (default: %(default)s)")
    p.add_argument("--ratio", type=float, help="override: expert transfer time / layer compute time")
    p.add_argument("--host", default="ddr5-2ch", help="host profile (moe_prefetch/profiles/hosts.json) whose expert read "
                   "rate, relative to the GPU profile's link, sets the emulated host speed of the host-compute rows "
                   "(default: %(default)s)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the emulated device (default 1: the other "
                   "core is left to the copy and host threads, as a GPU machine has its own)")
    p.add_argument("--caches", type=float, nargs="+", default=[0.25, 0.5, 0.75], help="cache fractions (default: 0.25 0.5 0.75)")
    p.add_argument("--expert-dtype", default="auto", choices=("auto", "bf16", "fp16", "int8", "int4"),
                   help="experts of every row kept as this (default auto); the emulated link stays the one derived "
                        "from the full-precision experts, so smaller experts move faster over the same link")
    p.add_argument("--out", default="bench/results", help="output folder (default: bench/results)")
    p.add_argument("--tag", default="", help="suffix for the output file names (default: none)")
    p.add_argument("--replot", help="only redraw the plot and rewrite the report (ratios recomputed) from a throughput "
                   "JSON written earlier")
    args = p.parse_args(argv)
    if args.replot:
        path = Path(args.replot)
        if not path.is_file():
            p.error(f"--replot {path} does not exist (a throughput JSON this bench wrote)")
        try:
            r = json.loads(path.read_text())
            r["results"]
        except (ValueError, KeyError, TypeError):
            p.error(f"--replot {path} is not a throughput JSON this bench wrote")
        if "layers" not in r:  # written before the report kept the model's shape
            probe, _ = load(r.get("model", "demo"), predictor="none")
            r.update(layers=len(probe.moe_runtime.adapter.moe_layers()), experts=probe.moe_runtime.adapter.num_experts)
            probe.moe_runtime.close()
        r["targets"] = targets(r["results"])
        path.write_text(json.dumps(r, indent=1))
        path.with_suffix(".md").write_text(render(r, r["layers"], r["experts"]))
        plot(r, path.with_suffix(".png"))
        return 0
    if args.predictor_path and not Path(args.predictor_path).is_file():
        p.error(f"--predictor-path {args.predictor_path} does not exist (train one with python -m moe_prefetch.calibrate)")
    next_token = 0  # how far the predictor's maps reach when they reach into the next token (its own rows)
    if args.predictor_path:
        from moe_prefetch.predictors.accelerated import read as read_predictor

        meta = read_predictor(args.predictor_path)[0]
        next_token = int(meta.get("lookahead", 0)) if meta.get("next_token") == "1" else 0
    if args.repeats < 1:
        p.error(f"--repeats must be at least 1, got {args.repeats}")
    if not all(0 < c <= 1 for c in args.caches):
        p.error(f"--caches are fractions of all experts, in (0, 1]; got {args.caches}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)

    probe, tok = load(args.model, predictor="none")
    rt = probe.moe_runtime
    if args.predictor_path:  # a file trained for another model: refused now, not at its first row minutes in
        read_predictor(args.predictor_path, rt.fingerprint)
    L, E, k = len(rt.adapter.moe_layers()), rt.adapter.num_experts, rt.adapter.top_k
    view = ModelView.of(probe, rt.adapter)
    no_routers = view.routers_unavailable  # next-gate and m2r2 cannot run then
    auto = resolve_auto(view)              # what the default predictor runs
    if no_routers:
        print(f"next-gate and m2r2 rows skipped: {no_routers}")
    expert_bytes = rt.store.expert_nbytes
    probe.moe_runtime.close()
    seqs = sequences(tok, Path(args.data), args.sequences, args.seq_len)
    hw, shape, dtype = args.profile.split(":")
    ratio = args.ratio or gpu_ratio(hw, shape, dtype)
    layer_s, link_bw, host_over_link = emulated_speeds(args.model, seqs, k, L * E, expert_bytes, ratio, hw, args.host)
    if args.expert_dtype != "auto":
        EXPERT.update(expert_dtype=args.expert_dtype)
        probe, _ = load(args.model, predictor="none")
        expert_bytes = probe.moe_runtime.store.expert_nbytes
        probe.moe_runtime.close()
        print(f"experts as {args.expert_dtype}: {expert_bytes / 1e6:.3f} MB each, one copy takes "
              f"{expert_bytes / link_bw / layer_s:.2f} full-precision layer-computes")
    host_bw = link_bw * host_over_link
    print(f"{args.model}: {L} MoE layers x {E} experts (top-{k}), expert {expert_bytes / 1e6:.2f} MB; CPU layer compute "
          f"{layer_s * 1e3:.3f} ms; emulated link {rate(link_bw)} so one expert takes {ratio:.1f} layer-computes "
          f"(the ratio of {args.profile}); emulated host {rate(host_bw)} ({args.host} reads experts "
          f"{host_over_link:.2f}x as fast as {hw}'s link)")

    # oracle trace: routing of exactly these sequences
    rec, _ = load(args.model, predictor="none", expert_cache=L * E)
    from moe_prefetch.trace import record_routing, routing_meta, save_routing

    with record_routing(rec) as trace:
        teacher_forced(rec, seqs)
    rec.moe_runtime.close()
    trace_path = out / f"oracle_routing{args.tag}.npz"
    save_routing(trace, trace_path, meta=routing_meta(rec))

    DEFAULT = f"default (no flags): {auto} K=2, auto eviction, gated"
    KN = min(next_token, L)  # an m2r2 file's reach into the next token (0: it stops at the last layer)
    reach = "a whole token ahead" if KN == L else "into the next token"
    def policies(slots):
        """(name, predictor, eviction, host compute, loading kwargs); default-config row flagged by name."""
        none = dict(predictor="none")
        host = dict(host_bandwidth=host_bw, host_compute="on")
        rows = [("LRU, no prefetch", none | dict(eviction="lru")),
                ("LFU, no prefetch", none | dict(eviction="lfu")),
                ("predictive eviction, no prefetch", none | dict(eviction="predictive")),
                # the default eviction: predictive while it pays for its planning, else LFU's or LRU's rule
                ("auto eviction, no prefetch", none | dict(eviction="auto"))]
        if not no_routers:
            rows.append(("LRU + next-gate K=1, ungated (mixtral-offloading paper)",
                         dict(predictor="next-gate", lookahead=1, eviction="lru", prefetch_gate=False)))
        rows += [("LFU + history K=1, ungated (MoE-Infinity-like)",
                  dict(predictor="history", lookahead=1, eviction="lfu", prefetch_gate=False)),
                 (DEFAULT, {})]  # every option at its default
        if args.predictor_path and not no_routers:
            m2r2 = dict(predictor="m2r2", predictor_path=args.predictor_path, eviction="predictive")
            rows += [(f"ours: m2r2 K={K}, predictive, gated", dict(m2r2, lookahead=K)) for K in (1, 2, 3)]
            if KN > 3:  # maps trained into the next token's layers (calibrate --next-token), beyond the rows above
                rows.append((f"ours: m2r2 K={KN} ({reach}), predictive, gated", dict(m2r2, lookahead=KN)))
        oracle = dict(predictor="oracle", predictor_path=str(trace_path), lookahead=2, eviction="predictive")
        rows.append(("oracle K=2, predictive, gated", oracle))
        # perfect predictions a whole token ahead: on a saturated link, what steering eviction can be worth
        rows.append((f"oracle K={L} (a whole token ahead), predictive, gated", dict(oracle, lookahead=L)))
        rows += [("LFU, no prefetch, host compute", none | dict(eviction="lfu") | host),
                 ("predictive eviction, no prefetch, host compute", none | dict(eviction="predictive") | host),
                 ("auto eviction, no prefetch, host compute", none | dict(eviction="auto") | host),
                 # its twin with the keep rule fixed (the row above counts which keep rule pays: KeepLedger)
                 ("predictive eviction, no prefetch, host compute, keeps on frequency",
                  none | dict(eviction="predictive", keep_rule="frequency") | host),
                 (f"{auto} K=2, auto eviction, gated, host compute", dict(predictor=auto, lookahead=2) | host),
                 # the next token's layers a whole token ahead: what pays where routing sticks across tokens
                 (f"history K={L} (a whole token ahead), predictive, gated, host compute",
                  dict(predictor="history", lookahead=L, eviction="predictive") | host)]
        if args.predictor_path and not no_routers:
            rows.append(("ours: m2r2 K=2, predictive, gated, host compute", dict(m2r2, lookahead=2) | host))
            if KN > 3:
                rows.append((f"ours: m2r2 K={KN} ({reach}), predictive, gated, host compute",
                             dict(m2r2, lookahead=KN) | host))
        rows.append(("oracle K=2, predictive, gated, host compute", oracle | host))
        return [(n, dict(kw, expert_cache=slots, link_bandwidth=link_bw)) for n, kw in rows]

    t_start = time.perf_counter()
    plan = [("on-demand (top-k slots, no reuse)", k, dict(predictor="none", eviction="lru", expert_cache=k,
                                                           link_bandwidth=link_bw))]
    for frac in args.caches:
        slots = max(k, round(frac * L * E))
        plan += [(name, slots, kw) for name, kw in policies(slots)]
    # --repeats rounds, each running every row once in turn, so that a stretch of a slow machine (a noisy
    # neighbour on a VM) hits one round of a few rows rather than all of one row; each row reports its
    # median round (tokens/s and the counters of that same run) and every round's tokens/s. Each round
    # starts a further 1/repeats of the way down the list (and wraps round), so that no row always runs
    # early or late in a round, while neighbours in the list still run close in time
    runs: list[list[dict]] = [[] for _ in plan]
    for rep in range(args.repeats):
        start = rep * len(plan) // args.repeats
        for i in [*range(start, len(plan)), *range(start)]:
            name, slots, kw = plan[i]
            r = run_policy(args.model, seqs, **kw)
            runs[i].append(r)
            print(f"  {'' if args.repeats == 1 else f'round {rep + 1}  '}cache {slots / (L * E):4.0%}  {name:<24} "
                  f"{r['tokens_per_s']:7.1f} tok/s  hit {r['hit_rate']:.1%}")
    results = []
    for (name, slots, kw), rs in zip(plan, runs):
        median = sorted(rs, key=lambda r: r["tokens_per_s"])[(len(rs) - 1) // 2]
        results.append(dict(policy=name, cache=slots / (L * E), predictor=kw.get("predictor", auto),
                            eviction=kw.get("eviction", "auto"), host_compute=kw.get("host_compute") == "on",
                            **median, tokens_per_s_rounds=[r["tokens_per_s"] for r in rs]))
    from transformers import AutoModelForCausalLM

    resident = AutoModelForCausalLM.from_pretrained(resolve_model(args.model))
    s, n = teacher_forced(resident, seqs)
    upper = n / s
    peer = accelerate_peer(resolve_model(args.model), seqs, link_bw)
    wall = time.perf_counter() - t_start

    # simulator check: same routing, cache and policy, costs measured on this CPU per predictor
    checks = []
    fitted = dict(copy_s=0.0, host_job_s=0.0)
    if no_routers:  # its trace needs the routers run on recorded residuals
        print("simulator check skipped: the model's routers cannot run ahead of time")
    else:
        from moe_prefetch.trace import record_trace

        sim_trace = record_trace(rec_model := load(args.model, predictor="none", expert_cache=L * E)[0], tok,
                                 Path(args.data).read_text(encoding="utf-8"), 3, args.seq_len,
                                 args.sequences * args.seq_len, args.predictor_path, progress=False)
        rec_model.moe_runtime.close()
        check_set = [("LRU, no prefetch", Policy("lru", eviction="lru"), dict(predictor="none", eviction="lru")),
                     (DEFAULT, Policy("default", auto, 2, eviction="auto"), {}),
                     ("predictive eviction, no prefetch, host compute",
                      Policy("host", eviction="predictive", host_compute=True), dict(predictor="none"))]
        if args.predictor_path and not no_routers:
            m2r2 = dict(predictor="m2r2", predictor_path=args.predictor_path, lookahead=2)
            check_set += [("ours: m2r2 K=2, predictive, gated", Policy("m2r2", "m2r2", 2, eviction="predictive"), m2r2),
                          ("ours: m2r2 K=2, predictive, gated, host compute",
                           Policy("m2r2h", "m2r2", 2, eviction="predictive", host_compute=True), m2r2)]
        # at the 50% cache when it was measured, else at the first cache that was
        check_frac = 0.5 if 0.5 in args.caches else args.caches[0]
        # The CPU backend's fixed costs per copy and per host job (Python, thread hand-offs, two cores shared
        # by three threads) are not in the resident-model timings: each is fitted once, on the row without
        # prediction that exercises it (LRU: copies; predictive + host compute: host jobs), and then holds
        # for every other row. The predictor's cost per predicted layer is what each row's run measured.
        slots = max(k, round(check_frac * L * E))  # as the rows above were sized
        calibrate_on = {"LRU, no prefetch": "copy_s", "predictive eviction, no prefetch, host compute": "host_job_s"}

        # per row: the fit and the check use the same compute timings. They are measured in --repeats
        # interleaved rounds, like the rows, each part the median of its rounds. With one resident run per
        # row, a ratio-1 check on a second trained model was off by +25% and +15% on two rows (a row lasts
        # about a second there, and this VM's speed moves by 10-40% between runs); with the median of 3,
        # the next run's check was within -4.4..+3.6% (2026-12-06)
        resident_runs: dict[str, list] = {name: [] for name, _, _ in check_set}
        for _ in range(args.repeats):
            for name, _, kw in check_set:
                resident_runs[name].append(measure_costs(args.model, seqs, k, expert_cache=L * E, **kw))
        measured_costs = {name: tuple(statistics.median(part) for part in zip(*rs)) for name, rs in resident_runs.items()}

        def sim_row(name, pol, kw, overheads):
            attn, expert, tail, resident_plan, resident_settle = measured_costs[name]
            row = next(r for r in results if r["policy"] == name and abs(r["cache"] - slots / (L * E)) < 1e-9)
            # the link time per expert as the engine measured it in that run (throttle plus copy)
            # the planner's deferred bookkeeping is in the resident timings; the model charges it after the
            # plan, where copies in flight cover it (settle_s: the row's own)
            cost = CostModel(max(0.0, attn - resident_settle), expert, row["link_s"] or expert_bytes / link_bw,
                             expert_bytes, tail,
                             host_s=(row.get("host_s") or expert_bytes / host_bw) if row["host_compute"] else None,
                             predict_s=row.get("predict_s", 0.0), prefetch_layer_s=row.get("prefetch_layer_s", 0.0),
                             plan_s=max(0.0, row.get("plan_s", 0.0) - row.get("settle_paid_s", 0.0) - resident_plan),
                             settle_s=row.get("settle_s", 0.0), **overheads)
            return row, cost, simulate(sim_trace, cost, slots, pol)

        for name, pol, kw in check_set:  # fit in check_set order: LRU's copy cost first, then the host's
            param = calibrate_on.get(name)
            if param is None:
                continue
            row, cost, res = sim_row(name, pol, kw, fitted)
            measured_s = res.tokens / row["tokens_per_s"]
            for _ in range(8):  # fixed point: overhead paid while a copy is in flight adds less than its length
                ops = res.bytes_moved / expert_bytes if param == "copy_s" else res.host_computed
                if not ops:
                    break
                fitted[param] = max(0.0, fitted[param] + (measured_s - res.seconds) / ops)
                cost = dataclasses.replace(cost, **{param: fitted[param]})
                res = simulate(sim_trace, cost, slots, pol)
        print(f"fitted CPU-backend overheads: {fitted['copy_s'] * 1e3:.3f} ms per copy, "
              f"{fitted['host_job_s'] * 1e3:.3f} ms per host job")
        for name, pol, kw in check_set:
            row, cost, res = sim_row(name, pol, kw, fitted)
            sim, meas = res.tokens_per_s, row["tokens_per_s"]
            checks.append(dict(policy=name, cache=slots / (L * E), measured=meas, simulated=sim, error=sim / meas - 1,
                               link_ms=cost.transfer_s * 1e3, nominal_link_ms=expert_bytes / link_bw * 1e3,
                               predict_ms=cost.predict_s * 1e3, prefetch_layer_ms=cost.prefetch_layer_s * 1e3,
                               plan_ms=cost.plan_s * 1e3, settle_ms=cost.settle_s * 1e3, resident_rounds=len(resident_runs[name]),
                               fitted=calibrate_on.get(name)))

    for r in results:
        r["cache_fraction"] = r["cache"]
    report = dict(sim_overheads=fitted, model=args.model, layers=L, experts=E, expert_dtype=args.expert_dtype, profile=args.profile, ratio=ratio, link_gbps=link_bw / 1e9, layer_ms=layer_s * 1e3,
                  host=args.host, host_gbps=host_bw / 1e9, threads=args.threads, targets=targets(results),
                  expert_mb=expert_bytes / 1e6, steps=results[0]["steps"], all_resident=upper,
                  accelerate=peer, results=results, sim_check=checks, wall_seconds=wall, repeats=args.repeats)
    (out / f"throughput{args.tag}.json").write_text(json.dumps(report, indent=1))
    md = render(report, L, E)
    (out / f"throughput{args.tag}.md").write_text(md)
    print(md)
    plot(report, out / f"throughput{args.tag}.png")
    return 0


HOST_TWIN = "predictive eviction, no prefetch, host compute"  # the host-compute rows' no-predictor twin
# the row of --host-compute on with every other option at its default (its name carries the default's predictor)
DEFAULT_HOST = tuple(f"{p} K=2, auto eviction, gated, host compute" for p in ("next-gate", "history"))


def targets(results: list[dict]) -> list[dict]:
    """Per cache: the issue's ratios. best ours / LRU no prefetch; prediction's gain with host compute
    on and off (best predictor row / the same planner without a predictor); the worst predictor row
    against its no-predictor twin."""
    out = []
    for cache in sorted({r["cache"] for r in results[1:]}):
        rows = {r["policy"]: r["tokens_per_s"] for r in results[1:] if r["cache"] == cache}
        rounds = {r["policy"]: r.get("tokens_per_s_rounds") for r in results[1:] if r["cache"] == cache}

        def paired(row, against):
            """row / against in each round (the rounds interleave, so round i of both ran minutes apart at
            most, unless that round started between them): how far the machine's noise moves the ratio; None
            with one round or a row missing."""
            a, b = rounds.get(row), rounds.get(against)
            if not a or not b or len(a) < 2 or len(a) != len(b):
                return None
            return [x / y for x, y in zip(a, b)]

        def fastest(host):  # the fastest configuration without prediction, by its median round
            return max((n for n in rows if "no prefetch" in n and ("host compute" in n) == host), key=rows.get)

        default = next(n for n in rows if n.startswith("default"))
        default_host = next((n for n in rows if n in DEFAULT_HOST), None)

        def best(host):
            return max((v for n, v in rows.items() if (n.startswith(PREDICTING) and
                                                        ("host compute" in n) == host)), default=None)

        twin_off, twin_on = rows.get("predictive eviction, no prefetch"), rows.get(HOST_TWIN)
        worst = min((v / (twin_on if "host compute" in n else twin_off), n) for n, v in rows.items()
                    if n.startswith(PREDICTING))
        ours = max(v for n, v in rows.items() if n.startswith(PREDICTING))
        out.append(dict(cache=cache, best_over_lru=ours / rows["LRU, no prefetch"],
                        prediction_host_on=best(True) / twin_on, prediction_host_off=best(False) / twin_off,
                        worst_predictor_vs_twin=worst[0], worst_row=worst[1],
                        default_vs_best_no_prediction=rows[default] / rows[fastest(False)],
                        default_vs_best_no_prediction_rounds=paired(default, fastest(False)),
                        # the same with host compute on: --host-compute on and nothing else (the default's
                        # predictor, K=2, predictive eviction, the gate) against the host rows without prediction
                        default_host_vs_best_no_prediction=(rows[default_host] if default_host else math.nan) /
                        rows[fastest(True)],
                        default_host_vs_best_no_prediction_rounds=paired(default_host, fastest(True)),
                        keep_switch_over_frequency=twin_on / rows[f"{HOST_TWIN}, keeps on frequency"]))
    return out


def render(r: dict, L: int, E: int) -> str:
    lines = [f"Decode tokens/s, {r.get('model', 'demo')} ({L} MoE layers x {E} experts), CPU "
             f"({r['steps']} teacher-forced decode steps per row), emulated link {rate(r['link_gbps'] * 1e9)} = {r['ratio']:.1f} layer-computes per "
             f"full-precision expert (ratio of {r['profile']})"
             + (f"; experts kept as {r['expert_dtype']} ({r['expert_mb']:.3f} MB: one copy takes "
                f"{r['expert_mb'] * 1e6 / (r['link_gbps'] * 1e9) / (r['layer_ms'] / 1e3):.1f} full-precision layer-computes; "
                "every row also dequantizes on this CPU)" if r.get("expert_dtype", "auto") != "auto" else "")
             + ". All rows measured in one run"
             + (f", each the median of {r['repeats']} interleaved rounds (tokens/s of every round in the last column)"
                if r.get("repeats", 1) > 1 else "") + ".\n",
             "| policy | cache | tokens/s | x on-demand | x LRU same cache | hit rate | stall s | MB moved | prefetch used/late/wasted |"
             + (" rounds |" if r.get("repeats", 1) > 1 else ""),
             "|---|---|---|---|---|---|---|---|---|" + ("---|" if r.get("repeats", 1) > 1 else "")]
    base = r["results"][0]["tokens_per_s"]
    lru = {x["cache"]: x["tokens_per_s"] for x in r["results"] if x["policy"] == "LRU, no prefetch"}
    for x in r["results"]:
        rel = f"{x['tokens_per_s'] / lru[x['cache']]:.2f}" if x["cache"] in lru else "-"
        lines.append(f"| {x['policy']} | {x['cache']:.0%} | {x['tokens_per_s']:.1f} | {x['tokens_per_s'] / base:.2f} | {rel} "
                     f"| {x['hit_rate']:.1%} | {x['stall_s']:.2f} | {x['mb_moved']:.1f} "
                     f"| {x['prefetch_used']}/{x['prefetch_late']}/{x['prefetch_wasted']} |"
                     + (f" {' '.join(f'{v:.1f}' for v in x['tokens_per_s_rounds'])} |" if r.get("repeats", 1) > 1 else ""))
    lines.append(f"| all experts resident (plain transformers) | 100% | {r['all_resident']:.1f} | {r['all_resident'] / base:.2f} | - | - | - | - | - |"
                 + (" - |" if r.get("repeats", 1) > 1 else ""))
    if r["accelerate"]:
        lines.append(f"| HF accelerate cpu_offload of the experts, same link | 0% | {r['accelerate']:.1f} | "
                     f"{r['accelerate'] / base:.2f} | - | - | - | - | - |" + (" - |" if r.get("repeats", 1) > 1 else ""))
    if r.get("targets"):
        lines += ["", "Ratios per cache (best ours / LRU no prefetch; prediction = best predictor row / the same planner "
                  "with no predictor, host compute on and off; worst predictor row / its no-predictor twin; default "
                  "config / best no-prediction config, without host compute and with it (--host-compute on, every "
                  "other option at its default), each followed by the same ratio in every round where rows ran in "
                  "rounds (the rounds interleave, so each round's pair ran close in time unless that round started "
                  "between them: how far this machine's noise "
                  "moves the ratio); with host compute and no predictor, the measured keep rule / keeps on "
                  "frequency):", "",
                  "| cache | best ours / LRU | prediction, host on | prediction, host off | worst row / twin | default / best no-prediction | the same, host compute on | keep rule chosen / frequency keeps |",
                  "|---|---|---|---|---|---|---|---|"]
        for t in r["targets"]:
            keep, host = t.get("keep_switch_over_frequency"), t.get("default_host_vs_best_no_prediction")

            def spread(key):  # round by round, where there are rounds (the range beyond 5 of them)
                rr = t.get(key)
                if not rr:
                    return ""
                return " [" + (" ".join(f"{x:.2f}" for x in rr) if len(rr) <= 5 else f"{min(rr):.2f}-{max(rr):.2f}") + "]"
            lines.append(f"| {t['cache']:.0%} | {t['best_over_lru']:.2f} | {t['prediction_host_on']:.2f} | "
                         f"{t['prediction_host_off']:.2f} | {t['worst_predictor_vs_twin']:.2f} ({t['worst_row']}) | "
                         f"{t['default_vs_best_no_prediction']:.2f}{spread('default_vs_best_no_prediction_rounds')} | "
                         f"{'-' if host is None else f'{host:.2f}'}{spread('default_host_vs_best_no_prediction_rounds')} | "
                         f"{'-' if keep is None else f'{keep:.2f}'} |")
    if r["sim_check"]:
        ov = r.get("sim_overheads", {})
        n_res = r["sim_check"][0].get("resident_rounds", 1)  # (reports written before it: one resident run)
        lines += ["", "Simulator vs measurement (same routing, cache and policy, through the same planner; compute "
                  "costs measured on this CPU with every expert resident"
                  f"{f', the median of {n_res} interleaved runs' if n_res > 1 else ''}, link time per expert as the engine measured "
                  "it in the row's run, the predictor's time per predicted layer and the prefetcher's per other layer "
                  "as the row's run measured them, and the planner's time per layer beyond a layer of hits' (the row's "
                  "run against its resident run); the "
                  f"CPU backend's fixed costs fitted once, {ov.get('copy_s', 0) * 1e3:.3f} ms per copy on the LRU row "
                  f"and {ov.get('host_job_s', 0) * 1e3:.3f} ms per host job on the host-compute row without prediction, "
                  "and held for every other row):", "",
                  "| policy | cache | measured tok/s | simulated tok/s | error | link ms/expert (nominal) | predict ms/layer | prefetcher ms/other layer | planner ms/layer | deferred bookkeeping ms/layer |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for c in r["sim_check"]:
            note = f" (fits {c['fitted']})" if c.get("fitted") else ""
            lines.append(f"| {c['policy']}{note} | {c['cache']:.0%} | {c['measured']:.1f} | {c['simulated']:.1f} | "
                         f"{c['error']:+.1%} | {c['link_ms']:.2f} ({c['nominal_link_ms']:.2f}) | "
                         + " | ".join("-" if c.get(f) is None else f"{c[f]:.3f}"  # '-': not measured by that run's version
                                      for f in ("predict_ms", "prefetch_layer_ms", "plan_ms", "settle_ms")) + " |")
    return "\n".join(lines) + "\n"


def plot(r: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot (pip install '.[bench]')")
        return
    fig, ax = plt.subplots(figsize=(8, 5))
    names = [n for n in dict.fromkeys(x["policy"] for x in r["results"][1:])]
    for n in names:
        pts = sorted((x["cache"], x["tokens_per_s"]) for x in r["results"] if x["policy"] == n)
        ax.plot([c * 100 for c, _ in pts], [t for _, t in pts], marker="o", label=n)
    ax.axhline(r["all_resident"], color="k", ls="--", label="all resident (transformers)")
    ax.axhline(r["results"][0]["tokens_per_s"], color="gray", ls=":", label="on-demand, no reuse")
    if r["accelerate"]:
        ax.axhline(r["accelerate"], color="r", ls="-.", label="HF accelerate offload")
    ax.set_yscale("log")
    ax.set_xlabel("expert cache (% of all experts)")
    ax.set_ylabel("decode tokens/s (CPU, emulated link)")
    ax.set_title(f"{r.get('model', 'demo')}, link = {r['ratio']:.1f} layer-computes per expert ({r['profile']})")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(run_main(main))  # failures: one line on stderr, non-zero status
