"""RunStats: the counters of one offloaded model, and the one fixed format they are printed in."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class RunStats:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    decode_steps: int = 0
    expert_requests: int = 0
    hits: int = 0
    misses: int = 0
    host_computed: int = 0  # experts the planner ran on the host instead of copying them
    bytes_to_device: int = 0
    stall_seconds: float = 0.0
    prefetch_issued: int = 0
    prefetch_used: int = 0
    prefetch_late: int = 0
    prefetch_wasted: int = 0
    prefetch_cancelled: int = 0
    bytes_wasted: int = 0
    predicted_layers: int = 0      # layers where the predictor ran
    predict_seconds: float = 0.0   # host time spent predicting and planning prefetches on them
    predicted_seconds: float = 0.0  # the share of it on the layers where the predictor ran (what the planner weighs)
    plan_seconds: float = 0.0      # host time the planner took deciding the executing layers' actions
    # the planner's bookkeeping after the layers' copies and host jobs started (Planner.settle), all of it,
    # and the share that ran while the layer still waited for a copy or the host (it cost the layer nothing;
    # the rest is in plan_seconds too)
    settle_seconds: float = 0.0
    settle_hidden_seconds: float = 0.0
    # per distance d: [correct, predicted, actual] expert counts over decode steps
    prediction: dict = field(default_factory=dict)

    def reset(self) -> None:
        for name, value in asdict(RunStats()).items():
            setattr(self, name, value)

    def record_prediction(self, d: int, correct: int, predicted: int, actual: int) -> None:
        c = self.prediction.setdefault(d, [0, 0, 0])
        c[0] += correct
        c[1] += predicted
        c[2] += actual

    def as_dict(self) -> dict:
        d = asdict(self)
        pred = d.pop("prediction")
        d["predictor_recall"] = {str(k): v[0] / v[2] if v[2] else 0.0 for k, v in sorted(pred.items())}
        d["predictor_precision"] = {str(k): v[0] / v[1] if v[1] else 0.0 for k, v in sorted(pred.items())}
        d["decode_tokens_per_s"] = self.decode_steps / self.decode_seconds if self.decode_seconds > 0 else 0.0
        d["hit_rate"] = self.hits / self.expert_requests if self.expert_requests else 0.0
        return d


def format_summary(d: dict) -> str:
    """Human-readable run summary (the same fields as --json's "stats")."""
    lines = [
        f"prompt tokens      {d['prompt_tokens']}",
        f"generated tokens   {d['generated_tokens']}",
        f"prefill            {d['prefill_seconds']:.3f} s",
        f"decode             {d['decode_seconds']:.3f} s  ({d['decode_tokens_per_s']:.2f} tokens/s over {d['decode_steps']} steps)",
        f"expert requests    {d['expert_requests']}  hits {d['hits']}  misses {d['misses']}  hit rate {d['hit_rate']:.1%}"
        + (f"  on host {d['host_computed']}" if d.get("host_computed") else ""),
        f"moved to device    {d['bytes_to_device'] / 2**20:.1f} MiB",
        f"stalled on experts {d['stall_seconds']:.3f} s",
        f"prefetches         issued {d['prefetch_issued']}  used {d['prefetch_used']}  late {d['prefetch_late']}  "
        f"wasted {d['prefetch_wasted']} ({d['bytes_wasted'] / 2**20:.1f} MiB moved, {d['prefetch_cancelled']} cancelled before moving)",
    ]
    if d.get("predictor_recall"):
        lines.append("predictor recall   " + "  ".join(f"d={k}: {v:.1%}" for k, v in d["predictor_recall"].items()))
        lines.append("predictor precision " + " ".join(f"d={k}: {v:.1%}" for k, v in d["predictor_precision"].items()))
    for key in ("device", "backend", "predictor", "lookahead", "eviction", "expert_cache_slots", "total_experts"):
        if key in d:
            value = d[key]
            if key == "eviction" and d.get("eviction_epochs"):  # auto: which rule evicts now, epochs of each
                ep = d["eviction_epochs"]
                names = {"predictive": "predictive", "lfu": "LFU", "lru": "LRU"}
                value = (f"auto ({names[ep['now']]} now; epochs "
                         + ", ".join(f"{names[r]} {ep[r]}" for r in names) + ")")
            lines.append(f"{key.replace('_', ' '):<18} {value}")
    return "\n".join(lines)
