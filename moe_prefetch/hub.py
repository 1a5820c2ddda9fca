"""Where a model lives: a local checkpoint directory, a built-in alias, or a hub id served from
huggingface_hub's local cache (HF_HUB_OFFLINE is honoured; nothing is downloaded when it is set)."""
from __future__ import annotations

import re
from pathlib import Path

from .errors import MoePrefetchError

DEMO_DIR = Path(__file__).resolve().parent / "demo_model"

ALIASES: dict[str, tuple[str, str]] = {
    "mixtral": ("mistralai/Mixtral-8x7B-Instruct-v0.1", "Mixtral-8x7B Instruct v0.1 (46.7B parameters, 8 experts, top-2)"),
    "mixtral-base": ("mistralai/Mixtral-8x7B-v0.1", "Mixtral-8x7B base v0.1"),
    "demo": (str(DEMO_DIR), "the embedded demo model: a small Mixtral trained on public-domain English text, ships with the package"),
}
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"]


def list_models() -> str:
    return "\n".join(f"{name:<14} {target if name != 'demo' else '(packaged)'}\n{'':<14} {desc}"
                     for name, (target, desc) in ALIASES.items())


def _check_dir(path: Path) -> Path:
    if not (path / "config.json").is_file():
        raise MoePrefetchError(f"{path} is not a model checkpoint: it has no config.json")
    return path


def resolve_model(name: str) -> Path:
    """Return a local directory holding config.json, weights and tokenizer for `name`."""
    if not name:
        raise MoePrefetchError("no model given: pass an alias (see --list-models), a directory or a hub id")
    target = ALIASES[name][0] if name in ALIASES else name
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
