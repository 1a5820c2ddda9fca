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
    add_prompt_flags(p, p.add_mutually_exclusive_group())
    p.add_argument("--seed", type=int, default=0, help="random seed for sampling (default: 0)")
    p.add_argument("--do-sample", action="store_true",
                   help="sample instead of greedy decoding (implied by --temperature, --top-p or --top-k)")
    p.add_argument("--temperature", type=float, help="sampling temperature, > 0 (turns sampling on; default 1.0)")
    p.add_argument("--top-p", type=float, help="nucleus sampling threshold in (0, 1] (turns sampling on; default 1.0, off)")
    p.add_argument("--top-k", type=int, help="sample among the k most likely tokens, k >= 1 (turns sampling on; default off)")
    p.add_argument("--json", action="store_true", help='print one JSON object {"text", "token_ids", "stats"} on stdout and nothing else')
    return p


def add_prompt_flags(p: ArgumentParser, source) -> None:
    """--prompt/--prompt-file (into the mutually exclusive group `source`), --chat, --max-new-tokens:
    run and trace --prompt read a prompt the same way, so a trace replays the run it was made for."""
    source.add_argument("--prompt", help=f"prompt text (default: {DEFAULT_PROMPT!r})")
    source.add_argument("--prompt-file", help="read the prompt from this UTF-8 file")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template (instruct models)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="number of tokens to generate (default: 64)")


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
    if args.temperature is not None and not args.temperature > 0:
        raise MoePrefetchError(f"--temperature must be positive, got {args.temperature}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise MoePrefetchError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.top_k is not None and args.top_k < 1:
        raise MoePrefetchError(f"--top-k must be at least 1, got {args.top_k}")
    # a sampling parameter means sampling: silently decoding greedily would ignore it
    args.do_sample = args.do_sample or any(v is not None for v in (args.temperature, args.top_p, args.top_k))


def encode_prompt(args, prompt: str, tokenizer, model_config):
    """Token ids [1, T] of the prompt (in the chat template with --chat), and --max-new-tokens cut to
    what the model's context leaves (with a note)."""
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
    return ids, max_new


def generate_kwargs(tokenizer, max_new: int) -> dict:
    """Greedy generate() arguments (sampling settings of the checkpoint's generation config switched off)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return dict(max_new_tokens=max_new, do_sample=False, pad_token_id=pad, temperature=None, top_p=None, top_k=None)


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
    ids, max_new = encode_prompt(args, prompt, tokenizer, model_config)
    n_prompt = ids.shape[1]
    cfg = offload_config(args, max_context=n_prompt + max_new)
    model, tokenizer = load_model(str(path), cfg)
    if args.lookahead is not None and model.moe_runtime.lookahead_note:
        print(f"note: --{model.moe_runtime.lookahead_note}", file=sys.stderr)
    device = model.moe_runtime.device
    torch.manual_seed(args.seed)
    gen = generate_kwargs(tokenizer, max_new)
    if args.do_sample:
        gen.update(do_sample=True, temperature=1.0 if args.temperature is None else args.temperature,
                   top_p=1.0 if args.top_p is None else args.top_p, top_k=args.top_k)
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
