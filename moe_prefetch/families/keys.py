"""CheckpointKeys: which checkpoint tensors fill each parameter of the model, derived from
transformers' own checkpoint conversion mapping (the renamings and expert-merging converters that
`from_pretrained` applies), so no family's names are written here.

Each checkpoint key is renamed the way transformers renames it on load. A key that a converter
claims (for example `mlp.experts.3.gate_proj.weight` -> `mlp.experts.gate_up_proj`) is recorded as
source number p (p-th source pattern: gate before up) of expert 3 of that fused parameter; any other
key names one model parameter. Fused expert tensors stored as such on disk (GPT-OSS) are found
under their own name and read one expert row at a time.
"""
from __future__ import annotations

import re
from collections import defaultdict

from ..errors import MoePrefetchError


def _transforms(model):
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming

    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    return renamings, converters


def _expert_merge(converter) -> bool:
    """True for the converters that stack per-expert tensors (MergeModulelist on dim 0, then optionally
    Concatenate on dim 1): the only converters whose inputs we read as is."""
    from transformers.core_model_loading import Concatenate, MergeModulelist

    ops = list(getattr(converter, "operations", []) or [])
    if not ops or not isinstance(ops[0], MergeModulelist) or ops[0].dim != 0:
        return False
    return all(isinstance(op, Concatenate) and op.dim == 1 for op in ops[1:])


def _natural(key: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", key)]


def _star_regex(pattern: str) -> re.Pattern:
    """A converter source pattern ('mlp.experts.*.gate_proj.weight') -> regex capturing the expert id."""
    parts = [re.escape(p.replace("\\.", ".")) for p in pattern.lstrip("^").split("*")]
    return re.compile(r"(\d+)".join(parts))


class CheckpointKeys:
    def __init__(self, model, checkpoint_keys, expected: set[str]):
        """model: the meta skeleton with all its parameters; checkpoint_keys: the names in the files;
        expected: the model's state_dict names."""
        from transformers.core_model_loading import apply_renamings

        renamings, converters = _transforms(model)
        prefix = getattr(model, "base_model_prefix", "") or ""
        self.direct: dict[str, str] = {}  # model key -> checkpoint key
        self.stacked: dict[str, dict[int, dict[int, str]]] = defaultdict(lambda: defaultdict(dict))
        self.unsupported: dict[str, str] = {}  # model key -> why its checkpoint tensors cannot be read as is
        self.n_sources: dict[str, int] = {}  # fused model key -> checkpoint tensors per expert
        self.converted: dict[str, tuple] = {}  # converter's first target -> (converter, {pattern: [keys]})
        for key in checkpoint_keys:
            renamed = apply_renamings(key, renamings)
            pattern, conv = None, None
            for c in converters:
                target, pattern = c.rename_source_key(renamed)
                if pattern is not None:
                    conv, renamed = c, target
                    break
            renamed = self._prefixed(renamed, prefix, expected)
            if conv is None and renamed not in expected and self._prefixed(key, prefix, expected) in expected:
                renamed = self._prefixed(key, prefix, expected)  # a renaming meant for other keys caught this one
            if conv is None:
                self.direct.setdefault(renamed, key)
            elif _expert_merge(conv):
                m = _star_regex(pattern).search(key) or _star_regex(pattern).search(apply_renamings(key, renamings))
                if m is None:
                    self.unsupported[renamed] = f"cannot find the expert number in checkpoint key {key}"
                    continue
                self.stacked[renamed][int(m.group(1))][conv.source_patterns.index(pattern)] = key
                self.n_sources[renamed] = len(conv.source_patterns)
            else:  # a dense conversion (fused or split projections): applied at load, as transformers does
                group = self.converted.setdefault(renamed, (conv, defaultdict(list)))
                group[1][pattern].append(key)

    @staticmethod
    def _prefixed(key: str, prefix: str, expected: set[str]) -> str:
        """Add or strip the base-model prefix as transformers does (checkpoints of the bare model)."""
        if not prefix or key in expected:
            return key
        if key.startswith(prefix + ".") and key[len(prefix) + 1:] in expected:
            return key[len(prefix) + 1:]
        if f"{prefix}.{key}" in expected:
            return f"{prefix}.{key}"
        return key

    def converted_tensors(self, checkpoint, model, config) -> dict:
        """Model key -> tensor for the dense parameters that transformers builds with a conversion (its own
        operations, run on the checkpoint's tensors; these are small: norms, convolutions, projections)."""
        out = {}
        for layer_name, (conv, keys) in self.converted.items():
            if _expert_merge(conv) or any(".experts." in k for ks in keys.values() for k in ks):
                raise MoePrefetchError(f"checkpoint tensors for {layer_name} need a conversion "
                                       f"({', '.join(type(op).__name__ for op in conv.operations)}) that the expert "
                                       "store does not apply")
            collected = {p: [checkpoint.tensor(k) for k in sorted(ks, key=_natural)] for p, ks in keys.items()}
            for op in conv.operations:
                collected = op.convert(collected, source_patterns=conv.source_patterns, target_patterns=conv.target_patterns,
                                       full_layer_name=layer_name, model=model, config=config, missing_keys=None)
            for target, tensor in collected.items():
                prefix, _, suffix = layer_name.partition(conv.target_patterns[0])
                name = prefix + target + suffix if target not in layer_name else layer_name.replace(conv.target_patterns[0], target, 1)
                out[name] = tensor[0] if isinstance(tensor, list) else tensor
        return out

    def dense(self, model_key: str) -> str | None:
        """The checkpoint key holding model parameter `model_key` as is (None if none does)."""
        if model_key in self.unsupported:
            raise MoePrefetchError(self.unsupported[model_key])
        return self.direct.get(model_key)

    def expert_sources(self, model_key: str, expert: int):
        """Checkpoint sources of expert `expert` of fused parameter `model_key`: a list of keys to
        concatenate along dim 0, or (key, expert) for a fused tensor on disk; None if absent."""
        if model_key in self.direct:
            return [(self.direct[model_key], expert)]
        if model_key in self.stacked:
            parts = self.stacked[model_key].get(expert, {})
            if len(parts) != self.n_sources[model_key]:
                return None
            return [(parts[i], None) for i in range(len(parts))]
        if model_key in self.unsupported:
            raise MoePrefetchError(self.unsupported[model_key])
        if model_key in self.converted:
            ops = ", ".join(type(op).__name__ for op in self.converted[model_key][0].operations)
            raise MoePrefetchError(f"the checkpoint stores {model_key} in a layout that needs a conversion ({ops}) "
                                   "before experts can be read one by one; this is not supported")
        return None
