#!/usr/bin/env python3
"""Train the small Mixtral demo checkpoint shipped in ``moe_prefetch/demo_model``.

The model is a tiny ``MixtralForCausalLM`` (8 experts per layer, top-2 routing)
trained from scratch on the King James Bible, which is public domain. The text
comes from the Debian package ``bible-kjv-text``:

    apt-get install bible-kjv bible-kjv-text

``bible-kjv-text`` installs the text in a compressed, random-access format
(``/usr/lib/bible.data``); the ``bible`` program from ``bible-kjv`` decodes it.
This script accepts either that data file (it calls ``bible`` to dump the whole
text) or a plain-text file: either a dump made with
``bible -f Gen1:1-Rev22:21 > kjv.txt`` (one verse per line, each starting with
its reference) or any other UTF-8 prose, split into paragraphs at blank lines.

Everything is CPU-only and seeded; with the defaults a run takes roughly half an
hour on two CPU cores. The checkpoint is written to a temporary directory next
to ``--out`` and renamed into place only when it is complete.

Reproduce the shipped checkpoint with:

    python examples/train_demo_model.py
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

DEFAULT_TEXT = "/usr/lib/bible.data"
REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "moe_prefetch" / "demo_model"

BOS, EOS, UNK, PAD = "<s>", "</s>", "<unk>", "<pad>"
SPECIAL_TOKENS = [BOS, EOS, UNK, PAD]  # ids 0, 1, 2, 3

# "Ge1:1 In the beginning ..." / "1Sm3:4 ..." as printed by `bible -f`.
VERSE_RE = re.compile(r"^(\d?[A-Za-z]+)(\d+):(\d+)\s+(.*)$")

SOURCE_NOTE = (
    "King James Version of the Bible (1611), public domain, from the Debian "
    "package bible-kjv-text (install with: apt-get install bible-kjv bible-kjv-text)"
)


# --------------------------------------------------------------------------- data


def read_source(path: str) -> tuple[str, str]:
    """Return (raw_text, how_it_was_read) for a BRS data file or a plain-text file."""
    p = Path(path)
    if not p.exists():
        sys.exit(
            f"text file {path!r} not found. Install the King James Bible with\n"
            "    apt-get install bible-kjv bible-kjv-text\n"
            "or pass --text with a plain-text file."
        )
    raw = p.read_bytes()
    try:
        text = raw.decode("utf-8")
        if "\x00" not in text:
            return text, "plain text"
    except UnicodeDecodeError:
        pass
    # Not text: assume the compressed format of bible-kjv-text and decode it.
    exe = shutil.which("bible")
    if exe is None:
        sys.exit(
            f"{path} is not plain text and the `bible` program is missing; install it "
            "with `apt-get install bible-kjv`, or pass a plain-text file with --text."
        )
    name = p.name[:-5] if p.name.endswith(".conc") else p.name
    out = subprocess.run(
        [exe, "-f", "-p", str(p.resolve().parent), "-d", name, "Gen1:1-Rev22:21"],
        check=True,
        capture_output=True,
        cwd=tempfile.gettempdir(),
    ).stdout.decode("utf-8")
    return out, f"decoded with `{exe} -f Gen1:1-Rev22:21`"


def clean_into_documents(text: str) -> list[str]:
    """Split raw text into prose documents.

    Verse-per-line dumps become one document per chapter, with the references
    removed and the verses joined into a single paragraph. Other text is split
    into paragraphs at blank lines.
    """
    lines = [ln.strip() for ln in text.splitlines()]
    verse_lines = [ln for ln in lines if ln]
    n_verse = sum(1 for ln in verse_lines if VERSE_RE.match(ln))
    docs: list[str] = []
    if verse_lines and n_verse / len(verse_lines) > 0.9:
        current_key, current = None, []
        for ln in verse_lines:
            m = VERSE_RE.match(ln)
            if not m:  # continuation of a wrapped verse
                if current:
                    current.append(ln)
                continue
            key = (m.group(1), m.group(2))
            if key != current_key and current:
                docs.append(" ".join(current))
                current = []
            current_key = key
            current.append(m.group(4))
        if current:
            docs.append(" ".join(current))
    else:
        para: list[str] = []
        for ln in lines + [""]:
            if ln:
                para.append(ln)
            elif para:
                docs.append(" ".join(para))
                para = []
    return [re.sub(r"\s+", " ", d).strip() for d in docs if d.strip()]


def split_heldout(docs: list[str], every: int) -> tuple[list[str], list[str]]:
    """Hold out every `every`-th document (offset every//2), about 1/every of the text."""
    train, held = [], []
    for i, d in enumerate(docs):
        (held if i % every == every // 2 else train).append(d)
    return train, held


# ---------------------------------------------------------------------- tokenizer


def train_tokenizer(texts: list[str], vocab_size: int, max_len: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    # Prepend <s> when encoding with add_special_tokens=True (the default), like Mixtral.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=PAD,
        clean_up_tokenization_spaces=False,
        model_max_length=max_len,
    )
    return fast


def encode_docs(tokenizer, docs: list[str]) -> torch.Tensor:
    """Concatenate documents as  <s> doc </s> <s> doc </s> ...  into one id stream."""
    encs = tokenizer.backend_tokenizer.encode_batch(docs, add_special_tokens=False)
    ids: list[int] = []
    for e in encs:
        ids.append(tokenizer.bos_token_id)
        ids.extend(e.ids)
        ids.append(tokenizer.eos_token_id)
    return torch.tensor(ids, dtype=torch.long)


# -------------------------------------------------------------------------- model


def build_model(args, tokenizer):
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        head_dim=args.hidden_size // args.heads,
        max_position_embeddings=args.max_positions,
        num_local_experts=args.experts,
        num_experts_per_tok=args.top_k,
        output_router_logits=True,
        router_aux_loss_coef=args.aux_coef,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        use_cache=True,  # training calls pass use_cache=False explicitly
    )
    model = MixtralForCausalLM(config)
    model.set_experts_implementation(args.experts_impl)
    return model


def per_layer_balance_loss(router_logits, num_experts: int, top_k: int) -> torch.Tensor:
    """Mixtral/Switch load-balancing loss computed for each layer separately, then averaged.

    transformers' ``load_balancing_loss_func`` concatenates the router logits of all
    layers before computing expert load, so it only balances the load summed over
    layers: one layer can starve an expert while another over-uses it. Applying the
    same formula per layer balances every layer. As in transformers, a perfectly
    even routing gives ``top_k`` (2.0 for top-2).
    """
    losses = []
    for logits in router_logits:
        probs = torch.softmax(logits.float(), dim=-1)  # (tokens, E)
        top = torch.topk(probs, top_k, dim=-1).indices  # (tokens, k)
        frac = torch.nn.functional.one_hot(top, num_experts).float().mean(dim=0)  # (k, E)
        losses.append((frac * probs.mean(dim=0).unsqueeze(0)).sum() * num_experts)
    return torch.stack(losses).mean()


def lr_at(step: int, args) -> float:
    """Linear warmup then cosine decay to min_lr_ratio * lr."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    cos = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return args.lr * (args.min_lr_ratio + (1.0 - args.min_lr_ratio) * cos)


@torch.no_grad()
def evaluate(model, ids: torch.Tensor, seq_len: int, batch_size: int, max_windows: int | None = None):
    """Mean next-token LM loss (no aux loss) over non-overlapping windows, plus
    per-layer counts of top-k expert selections."""
    was_training = model.training
    model.eval()
    cfg = model.config
    n_win = (len(ids) - 1) // seq_len
    if max_windows is not None:
        n_win = min(n_win, max_windows)
    windows = ids[: n_win * seq_len + 1]
    inputs = windows[:-1].view(n_win, seq_len)
    targets = windows[1:].view(n_win, seq_len)
    total_loss, total_tok = 0.0, 0
    usage = torch.zeros(cfg.num_hidden_layers, cfg.num_local_experts, dtype=torch.long)
    for i in range(0, n_win, batch_size):
        x, y = inputs[i : i + batch_size], targets[i : i + batch_size]
        out = model(input_ids=x, output_router_logits=True, use_cache=False)
        loss = torch.nn.functional.cross_entropy(
            out.logits.reshape(-1, out.logits.size(-1)).float(), y.reshape(-1), reduction="sum"
        )
        total_loss += loss.item()
        total_tok += y.numel()
        for layer, logits in enumerate(out.router_logits):
            top = logits.topk(cfg.num_experts_per_tok, dim=-1).indices.reshape(-1)
            usage[layer] += torch.bincount(top, minlength=cfg.num_local_experts)
    if was_training:
        model.train()
    return total_loss / total_tok, usage


def format_usage(usage: torch.Tensor) -> list[str]:
    rows = []
    for layer, counts in enumerate(usage):
        share = counts.double() / counts.sum()
        rows.append(
            f"layer {layer}: "
            + " ".join(f"{100 * s:5.1f}" for s in share.tolist())
            + f"   (min {100 * share.min():.1f}%, max {100 * share.max():.1f}%)"
        )
    return rows


# ------------------------------------------------------------------------- output


def write_model_card(path: Path, info: dict) -> None:
    c = info["config"]
    usage_rows = "\n".join(info["usage_rows"])
    text = f"""# moe_prefetch demo model: a tiny Mixtral trained on the King James Bible

This directory holds a very small mixture-of-experts language model that
`moe_prefetch` ships so that its examples and tests can run a *real* trained MoE
model offline, on a CPU, in seconds. It is a `transformers` `MixtralForCausalLM`
trained from scratch; it writes King-James-flavoured English and is useful only
as a test and demo model (its routing decisions are real, learned ones, which is
what matters for expert prefetching). It is not meant for any other use.

## Architecture

| setting | value |
| --- | --- |
| model class | `MixtralForCausalLM` (`model_type: mixtral`) |
| layers | {c['num_hidden_layers']} |
| hidden size | {c['hidden_size']} |
| expert intermediate size | {c['intermediate_size']} |
| experts per layer | {c['num_local_experts']} |
| experts per token (top-k) | {c['num_experts_per_tok']} |
| attention heads / KV heads | {c['num_attention_heads']} / {c['num_key_value_heads']} (head dim {c['head_dim']}) |
| max positions | {c['max_position_embeddings']} |
| vocabulary | {c['vocab_size']} (byte-level BPE) |
| tied embeddings | {c['tie_word_embeddings']} |
| parameters | {info['n_params']:,} in total, about {info['n_active']:,} used per token |
| weights | float32, `model.safetensors` ({info['weights_mb']:.2f} MB) |

The saved config has `output_router_logits: false` and `use_cache: true`, so
plain inference and generation need no extra flags. Special tokens: `<s>` (bos,
id {c['bos_token_id']}), `</s>` (eos, id {c['eos_token_id']}), `<unk>` (id 2), `<pad>`
(pad, id {c['pad_token_id']}). The tokenizer prepends `<s>` when encoding.

## Data

* Text: the King James Version of the Bible (1611). The translation is in the
  public domain.
* Source: Debian package `bible-kjv-text` version {info['pkg_version']} (from
  Debian bookworm), which stores the text in a compressed format that the
  `bible` program of package `bible-kjv` decodes. The packaging and the `bible`
  program are GPL-2+ and are not redistributed here; only the (public-domain)
  Bible text, and a model trained on it, are. Get it with
  `apt-get install bible-kjv bible-kjv-text`.
* Cleaning: the whole text was dumped verse by verse (`bible -f Gen1:1-Rev22:21`),
  the verse references were removed, and the verses of each chapter were joined
  into one paragraph: {info['n_docs']} chapters, {info['n_chars']:,} characters.
* Split: every {info['heldout_every']}th chapter in Bible order (chapters
  number {info['heldout_every'] // 2 + 1}, {info['heldout_every'] // 2 + 1 + info['heldout_every']}, ... counting from Genesis 1) was held out: {info['n_held_docs']} chapters,
  {info['n_held_tokens']:,} tokens. They are in `heldout.txt` here, one chapter per
  paragraph (paragraphs separated by blank lines). The other
  {info['n_train_docs']} chapters ({info['n_train_tokens']:,} tokens) were used to train
  the tokenizer and the model.

## Tokenizer

A byte-level BPE (`tokenizers` library: ByteLevel pre-tokenizer and decoder, no
prefix space) with {c['vocab_size']} entries including the 4 special tokens, trained on the
training chapters only and saved as a `PreTrainedTokenizerFast` (named
`TokenizersBackend` in transformers 5), so `AutoTokenizer.from_pretrained(<this dir>)`
loads it. On this text it averages
{info['chars_per_token']:.2f} characters per token.

## Training

* From random initialisation, seed {info['seed']}; AdamW (betas 0.9/0.95, weight
  decay {info['weight_decay']}), peak learning rate {info['lr']}, linear warmup over
  {info['warmup']} steps then cosine decay to {info['min_lr_ratio']} of the peak,
  gradient clipping at 1.0.
* {info['steps']} steps of {info['batch_size']} random windows of {info['seq_len']} tokens
  ({info['tokens_seen']:,} tokens, about {info['epochs']:.1f} passes over the training text).
* Loss: next-token cross-entropy plus {info['aux_coef']} (`router_aux_loss_coef`) times
  Mixtral's load-balancing loss, computed from the router logits
  (`output_router_logits=True` during training). The balancing loss is applied to
  each layer separately and averaged over layers: the stock `transformers`
  version pools all layers' routing before measuring the load, which let single
  layers leave experts almost unused in a trial run. For a perfectly even split the
  loss is 2.0.
* Hardware: {info['hardware']}; wall-clock training time {info['train_minutes']:.1f}
  minutes (whole script {info['total_minutes']:.1f} minutes).
* Final training-batch losses (mean of the last 50 steps): LM {info['final_train_lm']:.3f},
  aux {info['final_train_aux']:.3f}.

## Held-out results

Measured on `heldout.txt` ({info['n_held_tokens']:,} tokens, windows of
{info['seq_len']} tokens), language-model loss only:

| metric | value |
| --- | --- |
| held-out LM loss | {info['heldout_loss']:.3f} nats/token |
| perplexity | {info['heldout_ppl']:.1f} |
| loss / ln(vocab) | {100 * info['loss_frac']:.1f}% (ln {c['vocab_size']} = {math.log(c['vocab_size']):.3f}) |

Share of top-{c['num_experts_per_tok']} expert selections per layer over the held-out text
(percent, experts 0..{c['num_local_experts'] - 1}; a perfectly even split is
{100 / c['num_local_experts']:.1f}%):

```
{usage_rows}
```

Greedy continuation of `{info['prompt']}` ({info['gen_tokens']} new tokens, generated
in {info['gen_seconds']:.2f} s on the training machine):

> {info['sample']}

## Reproduce

```
apt-get install bible-kjv bible-kjv-text
{info['command']}
```

The run is seeded (Python, PyTorch, batch sampling) and uses
`torch.set_num_threads({info['threads']})`; results are reproducible on the same software
versions and hardware (torch {info['torch_version']}, transformers
{info['transformers_version']}, tokenizers {info['tokenizers_version']}), and close
otherwise.
"""
    path.write_text(text, encoding="utf-8")


def debian_version(pkg: str) -> str:
    try:
        return subprocess.run(
            ["dpkg-query", "-W", "-f=${Version}", pkg], capture_output=True, text=True, check=True
        ).stdout.strip() or "unknown"
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


# --------------------------------------------------------------------------- main


def parse_args(argv=None):
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] + "\n\n" + SOURCE_NOTE + ".",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    ap.add_argument(
        "--text",
        default=DEFAULT_TEXT,
        help="Training text: the bible-kjv-text data file (decoded with the `bible` program "
        "from bible-kjv; get both with `apt-get install bible-kjv bible-kjv-text`), a "
        "`bible -f Gen1:1-Rev22:21` dump, or any UTF-8 prose file",
    )
    ap.add_argument("--out", default=str(DEFAULT_OUT), help="checkpoint directory to (re)create")
    ap.add_argument("--steps", type=int, default=1500, help="optimizer steps")
    ap.add_argument("--seed", type=int, default=1234, help="random seed")
    ap.add_argument("--batch-size", type=int, default=16, help="sequences per step")
    ap.add_argument("--seq-len", type=int, default=256, help="tokens per training sequence")
    ap.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    ap.add_argument("--min-lr-ratio", type=float, default=0.05, help="final LR as a fraction of --lr")
    ap.add_argument("--warmup", type=int, default=100, help="linear warmup steps")
    ap.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay (matrices only)")
    ap.add_argument("--vocab-size", type=int, default=4096, help="BPE vocabulary size incl. special tokens")
    ap.add_argument("--hidden-size", type=int, default=128, help="model width")
    ap.add_argument("--intermediate-size", type=int, default=160, help="expert MLP width")
    ap.add_argument("--layers", type=int, default=6, help="decoder layers")
    ap.add_argument("--heads", type=int, default=4, help="attention heads")
    ap.add_argument("--kv-heads", type=int, default=2, help="key/value heads")
    ap.add_argument("--experts", type=int, default=8, help="experts per layer (num_local_experts)")
    ap.add_argument("--top-k", type=int, default=2, help="experts per token (num_experts_per_tok)")
    ap.add_argument("--max-positions", type=int, default=512, help="max_position_embeddings")
    ap.add_argument("--aux-coef", type=float, default=0.02, help="router_aux_loss_coef (load balancing)")
    ap.add_argument("--heldout-every", type=int, default=20, help="hold out every N-th chapter/paragraph")
    ap.add_argument("--log-every", type=int, default=25, help="print progress every N steps")
    ap.add_argument(
        "--eval-every", type=int, default=500, help="quick held-out check every N steps (0: only at the end)"
    )
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads value")
    ap.add_argument(
        "--experts-impl",
        default="grouped_mm",
        choices=["eager", "grouped_mm"],
        help="transformers experts implementation used for training (not saved)",
    )
    ap.add_argument("--prompt", default="And the LORD said", help="prompt for the sanity-check generation")
    ap.add_argument("--no-save", action="store_true", help="train and evaluate but write nothing (timing runs)")
    return ap.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    t_start = time.time()
    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    torch.manual_seed(args.seed)

    import tokenizers
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()

    # ---- data
    raw, how = read_source(args.text)
    docs = clean_into_documents(raw)
    train_docs, held_docs = split_heldout(docs, args.heldout_every)
    n_chars = sum(len(d) for d in docs)
    print(f"text: {args.text} ({how}); {len(docs)} documents, {n_chars:,} chars; "
          f"train {len(train_docs)} / held-out {len(held_docs)} documents", flush=True)

    # ---- tokenizer
    tokenizer = train_tokenizer(train_docs, args.vocab_size, args.max_positions)
    train_ids = encode_docs(tokenizer, train_docs)
    held_ids = encode_docs(tokenizer, held_docs)
    chars_per_token = sum(len(d) for d in train_docs) / (len(train_ids) - 2 * len(train_docs))
    print(f"tokenizer: vocab {len(tokenizer)}; train {len(train_ids):,} tokens, held-out "
          f"{len(held_ids):,} tokens, {chars_per_token:.2f} chars/token", flush=True)

    # ---- model
    model = build_model(args, tokenizer)
    n_params = sum(p.numel() for p in model.parameters())
    cfg = model.config
    per_expert = 3 * cfg.hidden_size * cfg.intermediate_size
    n_active = n_params - cfg.num_hidden_layers * (cfg.num_local_experts - cfg.num_experts_per_tok) * per_expert
    print(f"model: {n_params:,} parameters ({n_active:,} active per token)", flush=True)

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
        eps=1e-8,
    )
    gen = torch.Generator().manual_seed(args.seed)
    max_start = len(train_ids) - args.seq_len - 1

    # ---- training
    model.train()
    t_train = time.time()
    lm_hist, aux_hist = [], []
    win_lm = win_aux = win_hf_aux = 0.0
    win_n = 0
    win_t = time.time()
    for step in range(args.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args)
        starts = torch.randint(0, max_start, (args.batch_size,), generator=gen)
        batch = torch.stack([train_ids[s : s + args.seq_len + 1] for s in starts.tolist()])
        x, y = batch[:, :-1], batch[:, 1:]
        out = model(input_ids=x, output_router_logits=True, use_cache=False)
        lm = torch.nn.functional.cross_entropy(out.logits.reshape(-1, out.logits.size(-1)), y.reshape(-1))
        aux = per_layer_balance_loss(out.router_logits, cfg.num_local_experts, cfg.num_experts_per_tok)
        loss = lm + args.aux_coef * aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

        lm_hist.append(lm.item())
        aux_hist.append(aux.item())
        win_lm += lm_hist[-1]
        win_aux += aux_hist[-1]
        win_hf_aux += out.aux_loss.item()
        win_n += 1
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            now = time.time()
            tok_s = win_n * args.batch_size * args.seq_len / (now - win_t)
            print(f"step {step + 1:5d}/{args.steps}  lm {win_lm / win_n:.3f}  aux {win_aux / win_n:.3f} "
                  f"(hf {win_hf_aux / win_n:.3f})  "
                  f"lr {opt.param_groups[0]['lr']:.2e}  {tok_s:,.0f} tok/s  elapsed {now - t_start:7.1f}s",
                  flush=True)
            win_lm = win_aux = win_hf_aux = 0.0
            win_n = 0
            win_t = time.time()
        if args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < args.steps:
            t0 = time.time()
            hl, hu = evaluate(model, held_ids, args.seq_len, 32, max_windows=64)
            share = hu.double() / hu.sum(dim=1, keepdim=True)
            print(f"  quick held-out (64 windows): lm {hl:.3f}  ppl {math.exp(hl):.1f}  expert share "
                  f"min {100 * share.min():.1f}% max {100 * share.max():.1f}%  ({time.time() - t0:.1f}s)",
                  flush=True)
            win_t += time.time() - t0
    train_seconds = time.time() - t_train

    # ---- final evaluation
    held_loss, usage = evaluate(model, held_ids, args.seq_len, 32)
    loss_frac = held_loss / math.log(len(tokenizer))
    print(f"held-out LM loss {held_loss:.4f}  perplexity {math.exp(held_loss):.2f}  "
          f"= {100 * loss_frac:.1f}% of ln(V={len(tokenizer)})", flush=True)
    usage_rows = format_usage(usage)
    print("expert usage over held-out text (% of top-k selections, experts 0..N-1):")
    for r in usage_rows:
        print("  " + r)
    if args.no_save:
        print(f"--no-save: done in {time.time() - t_start:.1f}s")
        return

    # ---- save into a temporary directory, check it, then rename into place
    out = Path(args.out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    tmp.chmod(0o755)
    try:
        model.config.output_router_logits = False
        model.config.use_cache = True
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "heldout.txt").write_text("\n\n".join(held_docs) + "\n", encoding="utf-8")

        # sanity check: reload through the Auto classes and generate greedily
        tok2 = AutoTokenizer.from_pretrained(tmp)
        model2 = AutoModelForCausalLM.from_pretrained(tmp)
        model2.eval()
        assert model2.config.use_cache and not model2.config.output_router_logits
        enc = tok2(args.prompt, return_tensors="pt")
        with torch.no_grad():
            model2.generate(**enc, max_new_tokens=5, do_sample=False)  # warm-up
            t0 = time.time()
            gen_ids = model2.generate(**enc, max_new_tokens=40, min_new_tokens=40, do_sample=False)
            gen_seconds = time.time() - t0
        sample = tok2.decode(gen_ids[0], skip_special_tokens=True)
        print(f"sample ({gen_seconds:.2f}s for 40 tokens): {sample!r}", flush=True)
        reload_loss, _ = evaluate(model2, held_ids, args.seq_len, 32, max_windows=16)
        ref_loss, _ = evaluate(model, held_ids, args.seq_len, 32, max_windows=16)
        assert abs(reload_loss - ref_loss) < 1e-4, (reload_loss, ref_loss)

        train_args = [a for a in (sys.argv[1:] if argv is None else argv)]
        info = {
            "config": json.loads((tmp / "config.json").read_text()),
            "n_params": n_params,
            "n_active": n_active,
            "weights_mb": (tmp / "model.safetensors").stat().st_size / 1e6,
            "pkg_version": debian_version("bible-kjv-text"),
            "n_docs": len(docs),
            "n_chars": n_chars,
            "heldout_every": args.heldout_every,
            "n_held_docs": len(held_docs),
            "n_held_tokens": len(held_ids),
            "n_train_docs": len(train_docs),
            "n_train_tokens": len(train_ids),
            "chars_per_token": chars_per_token,
            "seed": args.seed,
            "weight_decay": args.weight_decay,
            "lr": args.lr,
            "warmup": args.warmup,
            "min_lr_ratio": args.min_lr_ratio,
            "steps": args.steps,
            "batch_size": args.batch_size,
            "seq_len": args.seq_len,
            "tokens_seen": args.steps * args.batch_size * args.seq_len,
            "epochs": args.steps * args.batch_size * args.seq_len / len(train_ids),
            "aux_coef": args.aux_coef,
            "hardware": f"{args.threads} CPU threads ({os.cpu_count()} cores visible), no GPU",
            "train_minutes": train_seconds / 60,
            "total_minutes": (time.time() - t_start) / 60,
            "final_train_lm": sum(lm_hist[-50:]) / len(lm_hist[-50:]),
            "final_train_aux": sum(aux_hist[-50:]) / len(aux_hist[-50:]),
            "heldout_loss": held_loss,
            "heldout_ppl": math.exp(held_loss),
            "loss_frac": loss_frac,
            "usage_rows": usage_rows,
            "prompt": args.prompt,
            "gen_tokens": 40,
            "gen_seconds": gen_seconds,
            "sample": sample,
            "command": "python examples/train_demo_model.py" + "".join(f" {a}" for a in train_args),
            "threads": args.threads,
            "torch_version": torch.__version__,
            "transformers_version": transformers.__version__,
            "tokenizers_version": tokenizers.__version__,
        }
        write_model_card(tmp / "README.md", info)
        for f in tmp.iterdir():
            f.chmod(0o644)

        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    total = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    print(f"saved {out} ({total / 1e6:.2f} MB):", flush=True)
    for f in sorted(out.iterdir()):
        print(f"  {f.name:28s} {f.stat().st_size:>10,d} bytes")
    print(f"total time {time.time() - t_start:.1f}s", flush=True)


if __name__ == "__main__":
    main()
