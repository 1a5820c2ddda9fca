"""Where a model lives: a local checkpoint directory, a built-in alias, or a hub id served from
huggingface_hub's local cache (HF_HUB_OFFLINE is honoured; nothing is downloaded when it is set)."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import MoePrefetchError

DEMO_DIR = Path(__file__).resolve().parent / "demo_model"

@dataclass(frozen=True)
class ModelEntry:
    """A built-in alias. Sizes are the published ones (the model card and config.json of `target`), so
    --list-models can show them without the checkpoint; a checkpoint already on disk is measured instead."""

    target: str               # hub id, or a local directory
    description: str
    family: str               # transformers model_type
    params_b: float           # total parameters, billions
    active_b: float           # parameters used per token, billions
    hidden: int               # hidden size
    expert_intermediate: int  # one routed expert's intermediate size
    moe_layers: int           # decoder layers with routed experts
    experts: int              # routed experts per MoE layer
    top_k: int
    dtype_bytes: int = 2      # bf16 checkpoints

    @property
    def expert_bytes(self) -> int:
        """One routed expert (gate, up and down matrices) at the checkpoint dtype."""
        return 3 * self.hidden * self.expert_intermediate * self.dtype_bytes

    @property
    def all_expert_bytes(self) -> int:
        return self.expert_bytes * self.experts * self.moe_layers


_MIXTRAL = dict(family="mixtral", params_b=46.7, active_b=12.9, hidden=4096, expert_intermediate=14336, moe_layers=32,
                experts=8, top_k=2)
ALIASES: dict[str, ModelEntry] = {
    "mixtral": ModelEntry("mistralai/Mixtral-8x7B-Instruct-v0.1", "Mixtral-8x7B Instruct v0.1", **_MIXTRAL),
    "mixtral-base": ModelEntry("mistralai/Mixtral-8x7B-v0.1", "Mixtral-8x7B base v0.1", **_MIXTRAL),
    "qwen3-30b-a3b": ModelEntry("Qwen/Qwen3-30B-A3B", "Qwen3-30B-A3B (128 experts, top-8)", "qwen3_moe", 30.5, 3.3,
                                2048, 768, 48, 128, 8),
    "deepseek-v2-lite": ModelEntry("deepseek-ai/DeepSeek-V2-Lite", "DeepSeek-V2-Lite (64 routed + 2 shared experts, "
                                   "first layer dense)", "deepseek_v2", 15.7, 2.4, 2048, 1408, 26, 64, 6),
    "gpt-oss-20b": ModelEntry("unsloth/gpt-oss-20b-BF16", "GPT-OSS-20B, bf16 experts (OpenAI's own repo ships MXFP4 "
                              "experts, which are refused)", "gpt_oss", 20.9, 3.6, 2880, 2880, 24, 32, 4),
    "olmoe": ModelEntry("allenai/OLMoE-1B-7B-0924", "OLMoE-1B-7B (64 experts, top-8)", "olmoe", 6.9, 1.3, 2048, 1024, 16,
                        64, 8),
    "phi-3.5-moe": ModelEntry("microsoft/Phi-3.5-MoE-instruct", "Phi-3.5-MoE instruct (16 experts, top-2)", "phimoe",
                              41.9, 6.6, 4096, 6400, 32, 16, 2),
    "glm-4.5-air": ModelEntry("zai-org/GLM-4.5-Air", "GLM-4.5-Air (128 routed + 1 shared experts)", "glm4_moe", 106.0,
                              12.0, 4096, 1408, 45, 128, 8),
    "demo": ModelEntry(str(DEMO_DIR), "the embedded demo model: a small Mixtral trained on public-domain English text, "
                       "ships with the package", "mixtral", 0, 0, 0, 0, 0, 0, 0),
}
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"]


def _quantized(matrices: list[tuple[int, int]]) -> str:
    """One expert's size as --expert-dtype int8 / int4 would store it (group size 128)."""
    from . import quant

    sizes = [sum(quant.nbytes(m, quant.QuantSpec.from_name(k)) for m in matrices) for k in ("int8", "int4")]
    return f"as int8 {_gib(sizes[0])}, as int4 {_gib(sizes[1])}"


def _gib(n: float) -> str:
    if n >= 2**30:
        return f"{n / 2**30:.1f} GiB"
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.0f} KiB"


def _measured(path: Path) -> str | None:
    """Sizes read from a checkpoint on disk (the config and the safetensors headers), or None."""
    try:
        from .checkpoint import Checkpoint
        from .families import adapter_for
        from .runtime import _load_config

        config = _load_config(path)
        ckpt = Checkpoint(path)
        adapter = adapter_for(config, ckpt)
    except Exception:  # noqa: BLE001 - listing never fails on one odd checkpoint
        return None
    total = sum(math.prod(i.shape) for i in ckpt.tensors.values())
    expert = sum(math.prod(ckpt.info(s.key).shape[1 if s.index is not None else 0:]) *
                 ckpt.info(s.key).dtype.itemsize for p in adapter.expert_layout(ckpt, adapter.moe_layers()[0], 0).parts
                 for s in p.sources)
    n = len(adapter.moe_layers()) * adapter.num_experts
    matrices = [tuple(shape) for _, shape in adapter.params if len(shape) == 2]
    return (f"{total / 1e6:.1f}M parameters; {n} experts ({len(adapter.moe_layers())} layers x {adapter.num_experts}, "
            f"top-{adapter.top_k}) of {_gib(expert)} each ({_quantized(matrices)}), {_gib(expert * n)} in all (measured)")


def _local_copy(entry: ModelEntry) -> Path | None:
    path = Path(entry.target)
    if path.is_dir():
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(entry.target, allow_patterns=_PATTERNS, local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached
        return None


def list_models() -> str:
    lines = []
    for name, e in ALIASES.items():
        local = _local_copy(e)
        sizes = _measured(local) if local is not None else None
        if sizes is None and e.params_b:
            n = e.moe_layers * e.experts
            matrices = [(2 * e.expert_intermediate, e.hidden), (e.hidden, e.expert_intermediate)]
            sizes = (f"{e.params_b:g}B parameters, {e.active_b:g}B active; {n} experts ({e.moe_layers} layers x {e.experts}, "
                     f"top-{e.top_k}) of {_gib(e.expert_bytes)} each at bf16 ({_quantized(matrices)}), "
                     f"{_gib(e.all_expert_bytes)} in all (published{'; not downloaded' if local is None else ''})")
        target = "(packaged)" if name == "demo" else e.target
        lines.append(f"{name:<17} {target}  [{e.family}]\n{'':<17} {e.description}\n{'':<17} {sizes or 'sizes unknown'}")
    return "\n".join(lines)


def _check_dir(path: Path) -> Path:
    if not (path / "config.json").is_file():
        raise MoePrefetchError(f"{path} is not a model checkpoint: it has no config.json")
    return path


def resolve_model(name: str) -> Path:
    """Return a local directory holding config.json, weights and tokenizer for `name`."""
    if not name:
        raise MoePrefetchError("no model given: pass an alias (see --list-models), a directory or a hub id")
    target = ALIASES[name].target if name in ALIASES else name
    path = Path(target).expanduser()
    if path.is_dir():
        return _check_dir(path)
    if path.exists():
        raise MoePrefetchError(f"{path} is a file, not a checkpoint directory")
    if target.startswith((".", "/", "~")) or not _REPO_ID.match(target):
        raise MoePrefetchError(f"model directory {target} does not exist")
    return _from_hub(target, alias=name if name in ALIASES else None)


def _from_hub(repo_id: str, alias: str | None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.constants import HF_HUB_OFFLINE

    what = f"'{alias}' ({repo_id})" if alias else repo_id
    # `hf` is the command huggingface_hub installs now (huggingface-cli is gone from current releases)
    how = (f"download it where there is network (hf download {repo_id} --local-dir DIR; gated repos need "
           f"hf auth login first) and pass --model /path/to/local/checkpoint, or fill the hub cache (hf download {repo_id})")
    try:
        local = snapshot_download(repo_id, allow_patterns=_PATTERNS, local_files_only=bool(HF_HUB_OFFLINE))
    except Exception as e:  # noqa: BLE001 - every hub failure becomes one actionable line
        mode = "HF_HUB_OFFLINE is set and it is not in the local cache" if HF_HUB_OFFLINE else \
            f"it is not in the local cache and could not be downloaded ({type(e).__name__})"
        raise MoePrefetchError(f"model {what} is unavailable: {mode}; {how}") from None
    return _check_dir(Path(local))
