"""A hand-written greedy decode loop (with a KV cache) over an offloaded MoE model.

    python examples/custom_loop.py --model demo --prompt "And God said" --max-new-tokens 40

The model returned by moe_prefetch.load_model is an ordinary transformers causal LM: call it
with a KV cache like any other (moe_prefetch.cache_kwargs names the argument for the installed
transformers). Expert fetching happens inside its MoE blocks.
"""
from __future__ import annotations

import argparse
import sys

import torch
from transformers import DynamicCache

import moe_prefetch
from moe_prefetch.stats import format_summary


def greedy(model, input_ids: torch.Tensor, max_new_tokens: int, eos_token_id: int | None = None) -> list[int]:
    """Greedy decoding, one token per step, reusing the KV cache; returns the new token ids."""
    device = model.moe_runtime.device
    cache = DynamicCache(config=model.config)
    kv = moe_prefetch.cache_kwargs(model, cache)
    ids = input_ids.to(device)  # [1, T]
    out: list[int] = []
    with torch.inference_mode():
        for _ in range(max_new_tokens):
            logits = model(input_ids=ids, use_cache=True, **kv).logits  # [1, t, V]
            next_id = int(logits[0, -1].argmax())
            out.append(next_id)
            if eos_token_id is not None and next_id == eos_token_id:
                break
            ids = torch.tensor([[next_id]], device=device)  # [1, 1]
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="demo", help="alias, checkpoint directory or hub id (default: demo)")
    p.add_argument("--prompt", default="And God said", help="prompt text")
    p.add_argument("--max-new-tokens", type=int, default=40, help="tokens to generate")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--expert-cache", type=int, default=None, help="expert cache slots (default: from memory)")
    args = p.parse_args(argv)
    try:
        cfg = moe_prefetch.OffloadConfig(device=args.device, expert_cache=args.expert_cache, show_progress=False)
        model, tokenizer = moe_prefetch.load_model(args.model, cfg)
    except moe_prefetch.MoePrefetchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    ids = tokenizer(args.prompt, return_tensors="pt")["input_ids"]
    new = greedy(model, ids, args.max_new_tokens, tokenizer.eos_token_id)
    print(args.prompt + tokenizer.decode(new, skip_special_tokens=True))
    print("---")
    print(format_summary(moe_prefetch.stats(model)))
    model.moe_runtime.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
