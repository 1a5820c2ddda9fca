"""Tiny random checkpoints written with transformers' save_pretrained (the real loading path)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, torch.get_num_threads()))

VOCAB = 96
# The device equivalence tests run on: MOE_PREFETCH_TEST_DEVICE if set, else CUDA where present, else CPU.
# Runtime and reference always run on the same device, so each is compared with its own arithmetic.
TEST_DEVICE = os.environ.get("MOE_PREFETCH_TEST_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")


def insert_checking_victim(cache, key, rng, step, max_protected: int = 3) -> bool:
    """Insert `key` with up to two random experts pinned and some protected; when an eviction is due, assert
    that the policy's fast victim() picks what its plain scan victim_ref() picks. Returns whether it checked."""
    pins = rng.sample(sorted(cache.keys()), min(len(cache), rng.randrange(3)))
    for p in pins:
        cache.pin(p)
    protected = set(rng.sample(sorted(cache.keys()), min(len(cache), rng.randrange(max_protected))))
    candidates = cache.evictable(protected)
    checked = not cache.has_free() and bool(candidates)
    if checked:
        assert cache.policy.victim(candidates) == cache.policy.victim_ref(set(candidates)), step
    if cache.has_free() or candidates:
        cache.insert(key, protected=protected)
    for p in pins:
        cache.unpin(p)
    return checked


def save_tokenizer(path: Path, vocab: int = VOCAB) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"w{i}": i for i in range(3, vocab)}
    tok = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>").save_pretrained(path)


def make_mixtral(path: Path, layers=2, experts=4, top_k=2, hidden=32, inter=48, dtype=torch.float32,
                 shard: str | None = None, tie=False, seed=0, context=128, std=0.15) -> Path:
    """Save a random Mixtral checkpoint (+ tokenizer) to `path` and return it.
    A large init std makes routing and next-token choices decisive instead of near-uniform."""
    from transformers import MixtralConfig, MixtralForCausalLM

    cfg = MixtralConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=experts,
                        num_experts_per_tok=top_k, max_position_embeddings=context, initializer_range=std,
                        tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    model = MixtralForCausalLM(cfg).to(dtype)
    kwargs = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(path, **kwargs)
    save_tokenizer(path)
    return path


@pytest.fixture(scope="session")
def tiny_mixtral(tmp_path_factory) -> Path:
    return make_mixtral(tmp_path_factory.mktemp("ckpt") / "tiny")


def reference_generate(path, ids, new_tokens, dtype=torch.float32, device=None, **kwargs):
    """Greedy tokens of the unmodified transformers model, on `device` (default: TEST_DEVICE), as a CPU tensor."""
    from transformers import AutoModelForCausalLM

    device = device or TEST_DEVICE
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs).to(device)
    with torch.inference_mode():
        out = model.generate(ids.to(device), max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    return out.cpu()


def chain_text(path: Path, words: int, seed: int) -> Path:
    """A text of conftest-tokenizer words where each word follows from the last (a fixed successor 9 times
    in 10, else a random word): its next token is predictable from the current one."""
    import random

    rng, out, w = random.Random(seed), [], 10
    for _ in range(words):
        w = (7 * w + 11) % 90 + 3 if rng.random() < 0.9 else rng.randrange(3, 93)
        out.append(f"w{w}")
    path.write_text(" ".join(out))
    return path
