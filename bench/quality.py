"""Quality cost of keeping experts in lower precision: teacher-forced loss and perplexity on held-out
text through the real runtime, per --expert-dtype, against the full-precision experts.

    python bench/quality.py                      # the demo model on its held-out text
    python bench/quality.py --model DIR --data FILE --dtypes auto,int8,int4 --group-sizes 128,32

Writes bench/results/quality.md and quality.json (--tag to keep several). One process, one pass per row,
every expert resident (the cache size does not change the arithmetic; see tests/test_quant_store.py).
"""
from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))

from moe_prefetch.cli_common import ArgumentParser, run_main  # noqa: E402
import moe_prefetch as mp  # noqa: E402
from moe_prefetch.calibrate import read_text  # noqa: E402


def evaluate(model_name: str, ids: torch.Tensor, seq_len: int, **cfg) -> dict:
    model, _ = mp.load_model(model_name, mp.OffloadConfig(device="cpu", predictor="none", show_progress=False, **cfg))
    total, count = 0.0, 0
    t0 = time.perf_counter()
    with torch.inference_mode():
        for start in range(0, ids.numel() - 1, seq_len):
            chunk = ids[start:start + seq_len + 1]
            if chunk.numel() < 2:
                break
            logits = model(chunk[None, :-1]).logits[0].float()  # [T, V]
            total += torch.nn.functional.cross_entropy(logits, chunk[1:], reduction="sum").item()
            count += chunk.numel() - 1
    st = mp.stats(model)
    model.moe_runtime.close()
    loss = total / count
    return dict(loss=loss, perplexity=math.exp(loss), tokens=count, expert_bytes=st["expert_bytes"],
                expert_dtype=st["expert_dtype"], seconds=time.perf_counter() - t0)


def main(argv=None) -> int:
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="demo")
    p.add_argument("--data", default=str(ROOT.parent / "moe_prefetch" / "demo_model" / "heldout.txt"))
    p.add_argument("--tokens", type=int, default=32768, help="held-out tokens scored (default 32768)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--dtypes", default="auto,bf16,int8,int4")
    p.add_argument("--group-sizes", default="128,32", help="group sizes tried for int8/int4")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tag", default="")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("MOE_PREFETCH_CACHE", tempfile.mkdtemp(prefix="moe_prefetch_quality_"))
    from moe_prefetch.hub import resolve_model
    from transformers import AutoTokenizer

    path = resolve_model(args.model)
    ids = torch.tensor(AutoTokenizer.from_pretrained(path)(read_text(args.data, "held-out text"))["input_ids"])[:args.tokens + 1]
    rows = []
    for dtype in args.dtypes.split(","):
        groups = [int(g) for g in args.group_sizes.split(",")] if dtype in ("int8", "int4") else [128]
        for g in groups:
            r = evaluate(str(path), ids, args.seq_len, expert_dtype=dtype, expert_group_size=g)
            r.update(dtype=dtype, group_size=g if dtype in ("int8", "int4") else None)
            rows.append(r)
            print(f"{dtype:5} g={r['group_size']}: loss {r['loss']:.4f}  ppl {r['perplexity']:.3f}  "
                  f"{r['expert_bytes']} B/expert", flush=True)
    base = rows[0]
    lines = [f"Held-out loss and perplexity per expert dtype: `{args.model}` on `{Path(args.data).name}`, "
             f"{base['tokens']} tokens scored in windows of {args.seq_len} (`python bench/quality.py`).", "",
             "| experts | group | bytes / expert | x smaller | loss | perplexity | perplexity vs first row |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['dtype'] if r['dtype'] != 'auto' else 'full (' + base['expert_dtype'] + ')'} | "
                     f"{r['group_size'] or ''} | {r['expert_bytes']} | {base['expert_bytes'] / r['expert_bytes']:.2f} | "
                     f"{r['loss']:.4f} | {r['perplexity']:.3f} | {100 * (r['perplexity'] / base['perplexity'] - 1):+.2f}% |")
    out = ROOT / "results"
    out.mkdir(exist_ok=True)
    (out / f"quality{args.tag}.md").write_text("\n".join(lines) + "\n")
    (out / f"quality{args.tag}.json").write_text(json.dumps(rows, indent=1))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))  # failures: one line on stderr, non-zero status
