"""OffloadConfig: every knob of the runtime in one frozen dataclass, plus size parsing ("12GiB")."""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

from .errors import MoePrefetchError

_UNITS = {
    "": 1, "b": 1,
    "k": 1024, "kb": 1000, "kib": 1024,
    "m": 1024**2, "mb": 1000**2, "mib": 1024**2,
    "g": 1024**3, "gb": 1000**3, "gib": 1024**3,
    "t": 1024**4, "tb": 1000**4, "tib": 1024**4,
}
_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*$")


def parse_size(text: str | int | float) -> int:
    """Parse a byte size: 512MiB, 12GiB, 12GB (decimal), 1.5g (binary), 1048576. Raises MoePrefetchError."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        if text <= 0:
            raise MoePrefetchError(f"size must be positive, got {text}")
        return int(text)
    if str(text).strip().startswith("-"):
        raise MoePrefetchError(f"size must be positive, got {text!r}")
    m = _SIZE_RE.match(str(text))
    unit = m.group(2).lower() if m else None
    if not m or unit not in _UNITS:
        raise MoePrefetchError(
            f"malformed size {text!r}: use a number with an optional unit, e.g. 512MiB, 12GiB, 12GB")
    value = float(m.group(1)) * _UNITS[unit]
    if value < 1:
        raise MoePrefetchError(f"size must be positive, got {text!r}")
    return int(value)


def format_size(n: int) -> str:
    """Human-readable binary size: 1536 -> '1.5KiB'."""
    for unit, scale in (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return f"{n}B"


DTYPES = ("auto", "float32", "float16", "bfloat16")
MAX_LOOKAHEAD = 128  # a whole token ahead on the deepest MoE models (DeepSeek-V3: 58 MoE layers, Kimi K2: 60)
DEVICES = ("auto", "cpu", "cuda")
EVICTION_POLICIES = ("auto", "predictive", "lfu", "lru")
HOST_COMPUTE = ("auto", "on", "off")
KEEP_RULES = ("auto", "frequency", "recency")
HOST_KERNELS = ("auto", "exact", "fused")
PIN_MODES = ("auto", "on", "off")


@dataclass(frozen=True)
class OffloadConfig:
    """How to run an MoE model with offloaded experts.

    device:         "auto" (cuda if available), "cuda", "cuda:N" or "cpu".
    device_memory:  budget on the compute device for dense weights + expert cache + reserve
                    (bytes or a size string). None: free device memory (CUDA) / available RAM (CPU).
    expert_cache:   number of expert slots; overrides the size derived from device_memory.
    dtype:          compute dtype; "auto" keeps the checkpoint's (float16 becomes float32 on CPU).
    eviction:       cache eviction policy: "predictive" (expected next use from predictions, frequency and
                    recency, an approximation of Belady), "lru", "lfu", or "auto" (default): predictive while
                    what it saves beats what its planning costs, else the better of LFU's and LRU's rules
                    (priced: the misses it saves over each, counted as decode runs against LFU's victims and
                    a shadow LRU cache, times a miss's cost, against the measured planning time of each rule;
                    LRU's is a candidate only where misses are copied in; lossless either way).
    max_context:    longest sequence (prompt + new tokens) the KV-cache reserve is sized for.
    reserve:        extra bytes kept free for activations; None estimates it from the model shape.
    pin_memory:     "auto" (default), "on" or "off" (True/False/None are accepted as on/off/auto). On CUDA,
                    "on" page-locks every expert in host RAM (refused up front when it does not fit with a
                    margin); "off" streams experts from the memory-mapped checkpoint through a small pinned
                    staging ring; "auto" pins only when it fits. The CPU backend never pins.
    device_slack:   device memory left unplanned when the budget comes from free GPU memory (cuBLAS
                    workspaces, kernels loaded on first use, allocator fragmentation); default 1GiB.
    show_progress:  show a progress bar while loading.
    predictor:      "auto" (default: next-gate, or history on a model whose routers cannot run ahead of
                    time), "none", "next-gate", "history", "m2r2" (needs predictor_path) or "oracle" (a trace).
    predictor_path: m2r2 predictor file (calibrate.py) or routing trace (trace.py) for the oracle.
    lookahead:      K: predict and prefetch the experts of layers l+1 .. l+K (0 to MAX_LOOKAHEAD; a K beyond
                    the predictor's reach runs at it: a residual predictor reaches the last MoE layer,
                    history and oracle the same layer of the next token, K = the MoE layers).
    prefetch_budget: cap on bytes in flight for prefetches; None = top_k experts (one layer's worth).
    link_bandwidth: emulate a host-to-device link of this many bytes/s on the CPU engine (benchmarks).
    host_compute:   compute missed experts on the host CPU when that beats copying them: "on", "off", or
                    "auto" (default): on for the CPU backend when host_bandwidth is set (lossless there),
                    off on CUDA, where the host's arithmetic differs from the GPU's (opt in with "on").
    host_bandwidth: CPU backend: emulate a host that reads experts at this many bytes/s (benchmarks).
    host_kernel:    how the host computes int8/int4 experts: "exact" (dequantize, then the device's matmul:
                    token-identical on the CPU backend), "fused" (PyTorch's weight-only CPU kernels on
                    experts repacked once: no dequantized copy, several times faster, lossy by a few units
                    in the last place), or "auto" (default: fused on CUDA, where host compute is opt-in and
                    not bit-identical anyway; exact on the CPU backend).
    adaptive_prediction: predict only while predicting measurably speeds decode up (default): decode
                    alternates short epochs with and without prediction and keeps the faster, re-testing
                    the other now and then, and predicts a layer only to steer eviction while steering's
                    counted value beats the predictor's cost; False predicts wherever a prefetch could be
                    issued or a prediction would steer eviction.
    keep_rule:      with host compute and predictive eviction, how a host-computed miss is judged for a
                    background copy into the cache (a keep): "frequency" (its use count against its
                    victim's), "recency" (with the recency line eviction uses: pays where routing sticks
                    across tokens), or "auto" (default: the uses where the two rules' keeps differ are
                    counted as decode runs, and the rule that saves more host time than its keeps cost runs).
    prefetch_gate:  issue a prefetch only when its expected saving beats its cost (default); False issues
                    every predicted expert that fits the budget (the ungated behaviour, for comparison).
    expert_dtype:   how experts are kept, moved and cached: "auto" (the compute dtype, lossless), "bf16" or
                    "fp16" (down-cast), "int8" or "int4" (group-wise weight-only quantization: 2-4x fewer
                    bytes, lossy, quality measured in the README). Built once per model in the cache directory.
    expert_group_size: quantization group along each matrix's input dimension (int8/int4), default 128.
    """

    device: str = "auto"
    device_memory: int | str | None = None
    expert_cache: int | None = None
    dtype: str = "auto"
    eviction: str = "auto"
    max_context: int = 2048
    reserve: int | str | None = None
    pin_memory: str | bool | None = "auto"
    device_slack: int | str = "1GiB"
    show_progress: bool = True
    predictor: str = "auto"
    predictor_path: str | None = None
    lookahead: int = 2
    prefetch_budget: int | str | None = None
    link_bandwidth: float | None = None
    host_compute: str = "auto"
    host_bandwidth: float | None = None
    host_kernel: str = "auto"
    prefetch_gate: bool = True
    adaptive_prediction: bool = True
    keep_rule: str = "auto"
    expert_dtype: str = "auto"
    expert_group_size: int = 128

    def __post_init__(self):
        dev = self.device
        if not (dev in DEVICES or re.fullmatch(r"cuda:\d+", dev or "")):
            raise MoePrefetchError(f"unknown device {dev!r}: use auto, cpu, cuda or cuda:N")
        if self.dtype not in DTYPES:
            raise MoePrefetchError(f"unknown dtype {self.dtype!r}: use one of {', '.join(DTYPES)}")
        if self.eviction not in EVICTION_POLICIES:
            raise MoePrefetchError(f"unknown eviction policy {self.eviction!r}: use one of {', '.join(EVICTION_POLICIES)}")
        if self.device_memory is not None:
            object.__setattr__(self, "device_memory", parse_size(self.device_memory))
        pin = {None: "auto", True: "on", False: "off"}.get(self.pin_memory, self.pin_memory)
        if pin not in PIN_MODES:
            raise MoePrefetchError(f"unknown pin_memory {self.pin_memory!r}: use one of {', '.join(PIN_MODES)}")
        object.__setattr__(self, "pin_memory", pin)
        object.__setattr__(self, "device_slack", 0 if self.device_slack in (0, "0") else parse_size(self.device_slack))
        if self.reserve is not None and self.reserve != 0:  # 0: no reserve (tests, exact budgets)
            object.__setattr__(self, "reserve", parse_size(self.reserve))
        if self.expert_cache is not None and (not isinstance(self.expert_cache, int) or self.expert_cache < 1):
            raise MoePrefetchError(f"expert cache must be a positive number of experts, got {self.expert_cache!r}")
        from .predictors import PREDICTORS

        if self.predictor not in PREDICTORS:
            raise MoePrefetchError(f"unknown predictor {self.predictor!r}: use one of {', '.join(PREDICTORS)}")
        if self.predictor in ("m2r2", "oracle") and not self.predictor_path:
            what = "FILE (train it with python -m moe_prefetch.calibrate)" if self.predictor == "m2r2" else \
                "TRACE (a routing trace from moe_prefetch.trace)"
            raise MoePrefetchError(f"--predictor {self.predictor} needs --predictor-path {what}")
        if not isinstance(self.lookahead, int) or isinstance(self.lookahead, bool) or not 0 <= self.lookahead <= MAX_LOOKAHEAD:
            raise MoePrefetchError(f"lookahead must be an integer from 0 to {MAX_LOOKAHEAD}, got {self.lookahead!r}")
        if self.prefetch_budget is not None:
            object.__setattr__(self, "prefetch_budget", parse_size(self.prefetch_budget))
        if self.host_compute not in HOST_COMPUTE:
            raise MoePrefetchError(f"unknown host_compute {self.host_compute!r}: use one of {', '.join(HOST_COMPUTE)}")
        if self.keep_rule not in KEEP_RULES:
            raise MoePrefetchError(f"unknown keep_rule {self.keep_rule!r}: use one of {', '.join(KEEP_RULES)}")
        if self.host_kernel not in HOST_KERNELS:
            raise MoePrefetchError(f"unknown host_kernel {self.host_kernel!r}: use one of {', '.join(HOST_KERNELS)}")
        if self.host_bandwidth is not None and not (isinstance(self.host_bandwidth, (int, float)) and self.host_bandwidth > 0):
            raise MoePrefetchError(f"host bandwidth must be a positive number of bytes/s, got {self.host_bandwidth!r}")
        if self.link_bandwidth is not None and not (isinstance(self.link_bandwidth, (int, float)) and self.link_bandwidth > 0):
            raise MoePrefetchError(f"link bandwidth must be a positive number of bytes/s, got {self.link_bandwidth!r}")
        from .quant_store import EXPERT_DTYPES

        if self.expert_dtype not in EXPERT_DTYPES:
            raise MoePrefetchError(f"unknown expert dtype {self.expert_dtype!r}: use one of {', '.join(EXPERT_DTYPES)}")
        if not isinstance(self.expert_group_size, int) or self.expert_group_size < 1:
            raise MoePrefetchError(f"expert group size must be a positive integer, got {self.expert_group_size!r}")
        if not isinstance(self.max_context, int) or self.max_context < 1:
            raise MoePrefetchError(f"max_context must be a positive integer, got {self.max_context!r}")

    def replace(self, **changes) -> "OffloadConfig":
        return dataclasses.replace(self, **changes)
