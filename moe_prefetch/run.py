"""python -m moe_prefetch.run: generate text with an offloaded MoE model and report the counters."""
from __future__ import annotations

import json
import sys

from .cli_common import ArgumentParser, run_main
from .cli_options import add_loading_flags, offload_config, validate_loading_flags
from .errors import MoePrefetchError

DEFAULT_PROMPT = "In the beginning"


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m moe_prefetch.run",
                       description="Run a Mixture-of-Experts model with its experts offloaded to host memory.")
    add_loading_flags(p)
    p.add_argument("--list-models", action="store_true", help="print the built-in model aliases and exit")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", help=f"prompt text (default: {DEFAULT_PROMPT!r})")
    src.add_argument("--prompt-file", help="read the prompt from this UTF-8 file")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template (instruct models)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="number of tokens to generate (default: 64)")
    p.add_argument("--seed", type=int, default=0, help="random seed for sampling (default: 0)")
    p.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (with --do-sample; default 1.0)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold (with --do-sample; default 1.0)")
    p.add_argument("--top-k", type=int, default=0, help="top-k sampling cut-off, 0 = off (with --do-sample)")
    p.add_argument("--json", action="store_true", help='print one JSON object {"text", "token_ids", "stats"} on stdout and nothing else')
    return p


def _read_prompt(args) -> str:
    if args.prompt_file is not None:
        try:
            with open(args.prompt_file, encoding="utf-8") as f:
                return f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise MoePrefetchError(f"cannot read prompt file {args.prompt_file}: {e.__class__.__name__}: {e}") from None
    return DEFAULT_PROMPT if args.prompt is None else args.prompt


def _validate(args) -> None:
    if args.max_new_tokens < 1:
        raise MoePrefetchError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    validate_loading_flags(args)
    if args.do_sample and args.temperature <= 0:
        raise MoePrefetchError("--temperature must be positive when sampling")
    if not 0 < args.top_p <= 1:
        raise MoePrefetchError(f"--top-p must be in (0, 1], got {args.top_p}")


def main_body(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from .hub import list_models, resolve_model

    if args.list_models:
        print(list_models())
        return 0
    _validate(args)
    prompt = _read_prompt(args)

    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    from .runtime import _load_config, _load_tokenizer, load_model, stats

    path = resolve_model(args.model)
    model_config = _load_config(path)
    tokenizer = _load_tokenizer(path)
    if args.chat:
        if not getattr(tokenizer, "chat_template", None):
            raise MoePrefetchError(f"--chat: the tokenizer of {args.model} has no chat template")
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)["input_ids"]
    else:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    context = getattr(model_config, "max_position_embeddings", None) or 2**31
    n_prompt = ids.shape[1]
    if n_prompt == 0:
        raise MoePrefetchError("the prompt is empty after tokenisation")
    if n_prompt >= context:
        raise MoePrefetchError(f"the prompt is {n_prompt} tokens but the model's context is {context} tokens")
    max_new = args.max_new_tokens
    if n_prompt + max_new > context:
        max_new = context - n_prompt
        print(f"note: --max-new-tokens reduced to {max_new} to stay inside the {context}-token context", file=sys.stderr)

    cfg = offload_config(args, max_context=n_prompt + max_new)
    model, tokenizer = load_model(str(path), cfg)
    device = model.moe_runtime.device
    torch.manual_seed(args.seed)
    gen = dict(max_new_tokens=max_new, do_sample=args.do_sample,
               pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
    if args.do_sample:
        gen.update(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k or None)
    else:
        gen.update(temperature=None, top_p=None, top_k=None)
    streamer = None
    if not args.json:
        streamer = transformers.TextStreamer(tokenizer, skip_prompt=False, skip_special_tokens=True)
    with torch.inference_mode():
        out = model.generate(ids.to(device), attention_mask=torch.ones_like(ids).to(device), streamer=streamer, **gen)
    new_ids = out[0, n_prompt:].tolist()
    text = tokenizer.decode(new_ids, skip_special_tokens=True)
    summary = stats(model)
    model.moe_runtime.close()
    if args.json:
        print(json.dumps({"text": text, "token_ids": new_ids, "stats": summary}))
    else:
        from .stats import format_summary

        print("\n---")
        print(format_summary(summary))
    return 0


def main(argv=None) -> int:
    return run_main(main_body, argv)


if __name__ == "__main__":
    sys.exit(main())
