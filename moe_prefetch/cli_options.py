"""The model-loading flags shared by every command that loads an offloaded model (run, serve):
one definition, one validation, one mapping onto OffloadConfig."""
from __future__ import annotations

import argparse

from .cli_common import check_size_flag
from .config import DEVICES, DTYPES, EVICTION_POLICIES, HOST_COMPUTE, HOST_KERNELS, KEEP_RULES, PIN_MODES, OffloadConfig
from .errors import MoePrefetchError
from .predictors import PREDICTORS


def add_loading_flags(p: argparse.ArgumentParser) -> None:
    """--model and everything that shapes how it is loaded and offloaded."""
    p.add_argument("--model", default="demo", help="alias (see --list-models), checkpoint directory, or hub id (default: demo)")
    p.add_argument("--device", default="auto", help=f"compute device: {', '.join(DEVICES)} or cuda:N (default: auto)")
    p.add_argument("--device-memory", type=str, help="memory budget on the device for dense weights, expert cache and "
                   "reserve, e.g. 512MiB, 12GiB, 12GB (default: free GPU memory / 80%% of available RAM)")
    p.add_argument("--expert-cache", type=int, help="number of expert slots in the cache (overrides the budget-derived size)")
    p.add_argument("--eviction", default="auto", choices=EVICTION_POLICIES,
                   help="expert cache eviction: predictive (evict the expert expected to be needed last, from "
                   "predictions, frequency and recency), lru, lfu, or auto (default: predictive while the misses it "
                   "saves are worth more than its planning time, else the better of LFU's and LRU's cheaper rules, each measured "
                   "against it on the same uses)")
    p.add_argument("--predictor", default="auto", choices=PREDICTORS,
                   help="what drives prefetching: none (demand only), next-gate, history, m2r2 (trained, needs "
                   "--predictor-path), oracle (replays a routing trace given by --predictor-path); default auto: "
                   "next-gate, or history where the model's routers cannot run ahead of time")
    p.add_argument("--predictor-path", help="m2r2 predictor file from moe_prefetch.calibrate, or a routing trace for oracle")
    p.add_argument("--lookahead", type=int, help="prefetch the experts of layers l+1..l+K (default: 2; 0 = off; more than "
                   "the predictor can use on the model runs at its limit, with a note)")
    p.add_argument("--prefetch-budget", help="cap on prefetch bytes in flight, e.g. 256MiB (default: top-k experts, one layer's worth)")
    p.add_argument("--link-gbps", type=float, help="CPU only: emulate a host-to-device link of this many GB/s "
                   "(throttles expert copies; for benchmarks; default off)")
    p.add_argument("--host-compute", default="auto", choices=HOST_COMPUTE,
                   help="compute a missed expert on the host CPU when that finishes before a copy would: on, off, or "
                   "auto (default: on for the CPU backend with --host-gbps, off on CUDA where it changes the arithmetic)")
    p.add_argument("--host-gbps", type=float, help="CPU only: emulate a host that reads experts at this many GB/s "
                   "(for benchmarks, with --link-gbps; default off)")
    p.add_argument("--host-kernel", default="auto", choices=HOST_KERNELS,
                   help="host compute of int8/int4 experts: exact (dequantize, then the device's matmul; token-identical "
                   "on the CPU backend), fused (PyTorch's weight-only CPU kernels, no dequantized copy, lossy by a few "
                   "ulp), or auto (default: fused on CUDA, exact on the CPU backend)")
    p.add_argument("--keep-rule", default="auto", choices=KEEP_RULES,
                   help="with host compute: how a host-computed miss is judged for a background copy into the cache: "
                   "frequency, recency (pays where routing sticks across tokens), or auto (default: count, on the uses "
                   "where the two differ, which saves more host time than its keeps cost)")
    p.add_argument("--always-predict", action="store_true",
                   help="predict on every layer where a prefetch could be issued or (predictive eviction, no host "
                   "compute) the prediction would steer eviction, even where predicting has not lately sped decoding "
                   "up (default: measure, and predict only while it pays)")
    p.add_argument("--no-prefetch-gate", action="store_true",
                   help="issue every predicted prefetch that fits the budget, even when it is not expected to pay")
    p.add_argument("--pin-memory", default="auto", choices=PIN_MODES,
                   help="CUDA: page-lock every expert in host RAM (on), stream them from the memory-mapped checkpoint "
                   "through a small pinned ring (off), or pin only when they fit in available RAM with a margin "
                   "(auto, the default)")
    p.add_argument("--expert-dtype", default="auto", choices=("auto", "bf16", "fp16", "int8", "int4"),
                   help="how experts are kept and moved: auto (compute dtype, lossless), bf16/fp16, or int8/int4 "
                        "group-wise weight-only quantization (2-4x fewer bytes, lossy; built once per model)")
    p.add_argument("--expert-group-size", type=int, default=128, help="int8/int4 quantization group size (default 128)")
    p.add_argument("--dtype", default="auto", choices=DTYPES, help="compute dtype (default: the checkpoint's; float16 becomes float32 on CPU)")
    p.add_argument("--no-progress", action="store_true", help="hide the loading progress bars")


def validate_loading_flags(args) -> None:
    """Checks that need no model: malformed sizes and numbers fail before anything loads, naming the flag."""
    check_size_flag("--device-memory", args.device_memory)
    check_size_flag("--prefetch-budget", args.prefetch_budget)
    if args.expert_cache is not None and args.expert_cache < 1:
        raise MoePrefetchError(f"--expert-cache must be a positive number of experts, got {args.expert_cache}")
    if args.host_gbps is not None and args.host_gbps <= 0:
        raise MoePrefetchError(f"--host-gbps must be positive, got {args.host_gbps}")
    if args.link_gbps is not None and args.link_gbps <= 0:
        raise MoePrefetchError(f"--link-gbps must be positive, got {args.link_gbps}")


def offload_config(args, max_context: int) -> OffloadConfig:
    """The OffloadConfig the loading flags describe (max_context sizes the KV-cache reserve)."""
    return OffloadConfig(device=args.device, device_memory=args.device_memory, expert_cache=args.expert_cache,
                         dtype=args.dtype, eviction=args.eviction, max_context=max_context,
                         predictor=args.predictor, predictor_path=args.predictor_path,
                         lookahead=OffloadConfig.lookahead if args.lookahead is None else args.lookahead,
                         prefetch_budget=args.prefetch_budget, pin_memory=args.pin_memory,
                         link_bandwidth=args.link_gbps * 1e9 if args.link_gbps else None,
                         host_compute=args.host_compute, prefetch_gate=not args.no_prefetch_gate,
                         adaptive_prediction=not args.always_predict, keep_rule=args.keep_rule,
                         host_bandwidth=args.host_gbps * 1e9 if args.host_gbps else None,
                         host_kernel=args.host_kernel,
                         expert_dtype=args.expert_dtype, expert_group_size=args.expert_group_size,
                         show_progress=not args.no_progress)
