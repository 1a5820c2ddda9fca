"""The CLI as a user runs it: --json contract, and every bad input gives one line and a non-zero exit."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import reference_generate

ROOT = Path(__file__).resolve().parents[1]


def cli(*args, env_extra=None, module="moe_prefetch.run"):
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, env=env, timeout=300)


def test_json_output_is_one_object_with_generated_ids_only(tiny_mixtral):
    r = cli("--model", str(tiny_mixtral), "--prompt", "w5 w17 w33 w8", "--max-new-tokens", "12",
            "--device", "cpu", "--expert-cache", "3", "--json")
    assert r.returncode == 0, r.stderr
    obj = json.loads(r.stdout)  # exactly one JSON document on stdout
    assert set(obj) == {"text", "token_ids", "stats"}
    ref = reference_generate(tiny_mixtral, torch.tensor([[5, 17, 33, 8]]), 12)[0, 4:].tolist()
    # the CLI stops at EOS like transformers does; compare the common prefix and the stop rule
    assert obj["token_ids"] == ref[:len(obj["token_ids"])]
    assert len(obj["token_ids"]) == 12 or obj["token_ids"][-1] == 2
    st = obj["stats"]
    for key in ("prompt_tokens", "generated_tokens", "prefill_seconds", "decode_seconds", "decode_tokens_per_s",
                "expert_requests", "hits", "misses", "hit_rate", "bytes_to_device", "stall_seconds"):
        assert key in st, key
    assert st["prompt_tokens"] == 4 and st["generated_tokens"] == len(obj["token_ids"])
    assert st["expert_cache_slots"] == 3
    assert st["bytes_to_device"] > 0 and st["misses"] > 0


def test_text_mode_streams_then_summarises(tiny_mixtral):
    r = cli("--model", str(tiny_mixtral), "--prompt", "w5 w17", "--max-new-tokens", "5", "--device", "cpu", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("w5 w17")
    assert "hit rate" in r.stdout and "decode" in r.stdout


def test_list_models():
    r = cli("--list-models")
    assert r.returncode == 0
    for alias in ("mixtral", "mixtral-base", "demo"):
        assert alias in r.stdout


def _assert_one_line_error(r, pattern):
    assert r.returncode != 0
    assert r.stdout == "", f"something was written to stdout: {r.stdout!r}"
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got: {r.stderr!r}"
    assert "Traceback" not in r.stderr
    assert lines[0].startswith("error: ")
    assert pattern.lower() in lines[0].lower(), lines[0]


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory, tiny_mixtral):
    root = tmp_path_factory.mktemp("bad")
    empty = root / "empty"
    empty.mkdir()
    truncated = root / "truncated"
    shutil.copytree(tiny_mixtral, truncated)
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    dense = root / "dense"
    from transformers import MistralConfig, MistralForCausalLM

    MistralForCausalLM(MistralConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                     num_attention_heads=4, num_key_value_heads=2)).save_pretrained(dense)
    shutil.copy(tiny_mixtral / "tokenizer.json", dense)
    prompt = root / "long.txt"
    prompt.write_text(" ".join(f"w{i % 90 + 3}" for i in range(200)))
    return dict(empty=empty, truncated=truncated, dense=dense, long=prompt, hf_home=root / "hf")


CASES = {
    "missing path": (["--model", "/no/such/dir"], "does not exist"),
    "no config.json": (["--model", "{empty}"], "no config.json"),
    "not an MoE": (["--model", "{dense}"], "not a supported Mixture-of-Experts family"),
    "truncated weights": (["--model", "{truncated}"], "corrupt or truncated"),
    "budget too small": (["--model", "{tiny}", "--device-memory", "16KiB"], "the minimum is"),
    "cache below top-k": (["--model", "{tiny}", "--expert-cache", "1"], "minimum of 2 experts"),
    "prompt too long": (["--model", "{tiny}", "--prompt-file", "{long}"], "context is 128 tokens"),
    "alias not cached offline": (["--model", "mixtral"], "--model /path/to/local"),
    "unknown flag": (["--model", "{tiny}", "--frobnicate"], "unrecognized arguments"),
    "malformed size": (["--model", "{tiny}", "--device-memory", "12XB"], "malformed size"),
    "bad int": (["--model", "{tiny}", "--expert-cache", "many"], "invalid int value"),
    "missing prompt file": (["--model", "{tiny}", "--prompt-file", "/no/file.txt"], "cannot read prompt file"),
    "m2r2 without a file": (["--model", "{tiny}", "--predictor", "m2r2"], "needs --predictor-path"),
    "predictor for another model": (["--model", "{tiny}", "--predictor", "m2r2", "--predictor-path", "{long}"],
                                    "not a readable m2r2 predictor"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_one_line_nonzero_nothing_written(case, bad_inputs, tiny_mixtral):
    args, pattern = CASES[case]
    fill = dict(bad_inputs, tiny=tiny_mixtral)
    args = [a.format(**fill) for a in args] + ["--device", "cpu", "--json"]
    r = cli(*args, env_extra={"HF_HOME": str(bad_inputs["hf_home"])})
    _assert_one_line_error(r, pattern)


def test_custom_loop_example_matches_generate(tiny_mixtral):
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import custom_loop
    finally:
        sys.path.pop(0)
    import moe_prefetch as mp

    model, _ = mp.load_model(str(tiny_mixtral), mp.OffloadConfig(device="cpu", expert_cache=3, show_progress=False))
    prompt = torch.tensor([[5, 17, 33, 8, 61]])
    new = custom_loop.greedy(model, prompt, 15)
    ref = reference_generate(tiny_mixtral, prompt, 15)[0, 5:].tolist()
    assert new == ref
    st = mp.stats(model)
    assert st["prompt_tokens"] == 5 and st["decode_steps"] == 14 and st["generated_tokens"] == 15


def test_custom_loop_example_runs_as_script(tiny_mixtral):
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, str(ROOT / "examples" / "custom_loop.py"), "--model", str(tiny_mixtral),
                        "--prompt", "w5 w6", "--max-new-tokens", "6", "--device", "cpu"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "hit rate" in r.stdout
