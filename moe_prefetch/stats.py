"""RunStats: the counters of one offloaded model, and the one fixed format they are printed in."""
from __future__ import annotations

from dataclasses import asdict, dataclass


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
    bytes_to_device: int = 0
    stall_seconds: float = 0.0

    def reset(self) -> None:
        for name, value in asdict(RunStats()).items():
            setattr(self, name, value)

    def as_dict(self) -> dict:
        d = asdict(self)
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
        f"expert requests    {d['expert_requests']}  hits {d['hits']}  misses {d['misses']}  hit rate {d['hit_rate']:.1%}",
        f"moved to device    {d['bytes_to_device'] / 2**20:.1f} MiB",
        f"stalled on experts {d['stall_seconds']:.3f} s",
    ]
    for key in ("device", "backend", "expert_cache_slots", "total_experts"):
        if key in d:
            lines.append(f"{key.replace('_', ' '):<18} {d[key]}")
    return "\n".join(lines)
