"""Shared command-line plumbing: one-line errors instead of usage dumps or tracebacks."""
from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from pathlib import Path

from .errors import MoePrefetchError


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line on stderr (and exit status 2), not a usage block, and a
    value that starts with a dash is still a value (`--device-memory -5GiB`, `--prompt "-x"`)."""

    def error(self, message):
        raise MoePrefetchError(f"{message} (see {self.prog} --help)")

    def parse_known_args(self, args=None, namespace=None):
        return super().parse_known_args(self._join_dash_values(sys.argv[1:] if args is None else list(args)), namespace)

    def _join_dash_values(self, args: list[str]) -> list[str]:
        """argparse reads `--flag -5GiB` as two options and fails with "expected one argument"; for a
        flag that takes one value, a following single-dash word that is no option is its value, so
        it is passed as `--flag=-5GiB` and the flag's own check says what is wrong with it."""
        out, i = [], 0
        while i < len(args):
            a = args[i]
            action = self._option_string_actions.get(a)
            nxt = args[i + 1] if i + 1 < len(args) else None
            if (action is not None and action.nargs is None and isinstance(action, argparse._StoreAction)
                    and nxt is not None and nxt.startswith("-") and not nxt.startswith("--")
                    and nxt not in self._option_string_actions):
                out.append(f"{a}={nxt}")
                i += 2
                continue
            out.append(a)
            if a == "--":
                out.extend(args[i + 1:])
                break
            i += 1
        return out


def check_size_flag(flag: str, value) -> None:
    """A size flag's value (512MiB, 12GiB, ...) checked before anything loads; the error names the flag."""
    from .config import parse_size

    if value is not None:
        try:
            parse_size(value)
        except MoePrefetchError as e:
            raise MoePrefetchError(f"{flag}: {e}") from None


def check_output_path(path: str, flag: str = "--out") -> None:
    """Fail before any work when `path` cannot be written: its folder is missing or read-only, or it
    names a folder. (The commands write a temporary file next to it, then rename it into place.)"""
    target = Path(path).expanduser()
    parent = target.parent
    if target.is_dir():
        raise MoePrefetchError(f"{flag} {path} is a directory; give a file name inside it")
    if not parent.is_dir():
        raise MoePrefetchError(f"{flag} {path}: the directory {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise MoePrefetchError(f"{flag} {path}: the directory {parent} is not writable")
    if target.exists() and not os.access(target, os.W_OK):
        raise MoePrefetchError(f"{flag} {path} exists and is not writable")


def write_report(out, stem: str, lines: list[str], data: dict) -> None:
    """A bench's results into folder `out` (created): its markdown table as <stem>.md, its figures as
    <stem>.json."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (out / f"{stem}.json").write_text(json.dumps(data, indent=1), encoding="utf-8")


def run_main(body, argv=None) -> int:
    """Run body(argv) turning every failure into `error: ...` on stderr and a non-zero status."""
    try:
        return body(argv) or 0
    except MoePrefetchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 1
    except Exception as e:  # noqa: BLE001 - last resort, still one line unless debugging
        if os.environ.get("MOE_PREFETCH_DEBUG"):
            traceback.print_exc()
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        print(f"error: unexpected {type(e).__name__}: {msg} (set MOE_PREFETCH_DEBUG=1 for a traceback)", file=sys.stderr)
        return 1
