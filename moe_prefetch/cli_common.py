"""Shared command-line plumbing: one-line errors instead of usage dumps or tracebacks."""
from __future__ import annotations

import argparse
import os
import sys
import traceback

from .errors import MoePrefetchError


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line on stderr (and exit status 2), not a usage block."""

    def error(self, message):
        raise MoePrefetchError(f"{message} (see {self.prog} --help)")


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
