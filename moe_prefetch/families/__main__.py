"""python -m moe_prefetch.families: the supported-families table (Markdown), from the registry in data.py
and the aliases in hub.py; the README's table is this output (a test keeps them equal)."""
from __future__ import annotations

from . import data


def markdown() -> str:
    from ..hub import ALIASES

    aliases: dict[str, list[str]] = {}
    for name, entry in ALIASES.items():
        if name != "demo":
            aliases.setdefault(entry.family, []).append(f"`{name}`")
    rows = ["| model type | served | aliases | notes |", "|---|---|---|---|"]
    for family in sorted(set(data.TESTED) | set(data.UNTESTED)):
        if family in data.UNTESTED:
            rows.append(f"| `{family}` | no | | {data.UNTESTED[family]} |")
            continue
        notes = []
        if family in data.ROUTERS_NOT_AHEAD:
            notes.append("routers read more than the block input: predictors history/oracle only")
        if family in data.POST_NORM_FAMILIES:
            notes.append("post-norm: predictors read the raw residual")
        rows.append(f"| `{family}` | yes, token-identical | {', '.join(aliases.get(family, []))} | {'; '.join(notes)} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(markdown(), end="")
