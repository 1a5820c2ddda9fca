"""calibrate: trains, saves, reloads, drives generation losslessly, refuses the wrong model."""
from __future__ import annotations

import json
import random

import pytest
import torch

import moe_prefetch as mp
from moe_prefetch.calibrate import main as calibrate_main
from conftest import make_mixtral, reference_generate


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cal")
    ckpt = make_mixtral(root / "m", layers=4, experts=8, top_k=2, seed=21)
    rng = random.Random(0)
    text = root / "text.txt"
    text.write_text(" ".join(f"w{rng.randrange(3, 96)}" for _ in range(4000)))
    return root, ckpt, text


def test_calibrate_trains_saves_and_improves_on_next_gate(setup, capsys):
    root, ckpt, text = setup
    out = root / "pred.safetensors"
    rc = calibrate_main(["--model", str(ckpt), "--data", str(text), "--out", str(out), "--lookahead", "2",
                         "--rank", "8", "--steps", "150", "--seq-len", "64", "--device", "cpu", "--json", "--no-progress"])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    assert out.is_file()
    for d in ("1", "2"):
        assert report["recall_m2r2"][d] > report["recall_next_gate"][d], report

    # reload through the runtime: output stays identical to transformers
    prompt = torch.tensor([[5, 9, 44, 12, 80, 31]])
    ref = reference_generate(ckpt, prompt, 12)
    model, _ = mp.load_model(str(ckpt), mp.OffloadConfig(device="cpu", expert_cache=6, predictor="m2r2",
                                                          predictor_path=str(out), lookahead=2, show_progress=False))
    with torch.inference_mode():
        got = model.generate(prompt, max_new_tokens=12, min_new_tokens=12, do_sample=False)
    assert torch.equal(got, ref)
    st = mp.stats(model)
    assert st["predictor"] == "m2r2" and st["prefetch_issued"] > 0
    assert set(st["predictor_recall"]) == {"1", "2"}

    # a trace asked for more distances than the predictor was trained for: those stay missing (NaN)
    import numpy as np
    from moe_prefetch.trace import record_trace
    model, tok = mp.load_model(str(ckpt), mp.OffloadConfig(device="cpu", predictor="none", show_progress=False))
    tr = record_trace(model, tok, text.read_text(), lookahead=3, seq_len=32, max_tokens=64, predictor_path=str(out),
                      progress=False)
    m2r2, gate = tr.scores["m2r2"], tr.scores["next-gate"]  # [N, L, K, E]
    assert not np.isnan(m2r2[:, 0, :2]).any() and np.isnan(m2r2[:, 0, 2]).all()
    assert not np.isnan(gate[:, 0, 2]).any(), "next-gate reaches every later layer"


def test_predictor_refuses_another_model(setup, tmp_path, capsys):
    root, ckpt, text = setup
    out = root / "pred.safetensors"
    if not out.is_file():
        pytest.skip("depends on the training test")
    other = make_mixtral(tmp_path / "other", layers=4, experts=8, top_k=2, seed=99)
    with pytest.raises(mp.MoePrefetchError, match="trained for a different model"):
        mp.load_model(str(other), mp.OffloadConfig(device="cpu", predictor="m2r2", predictor_path=str(out),
                                                    show_progress=False))
    # the same model in another dtype is the same model: accepted
    model, _ = mp.load_model(str(ckpt), mp.OffloadConfig(device="cpu", dtype="bfloat16", predictor="m2r2",
                                                          predictor_path=str(out), show_progress=False))
    assert model.moe_runtime.prefetcher.predictor.name == "m2r2"
    bogus = tmp_path / "bogus.safetensors"
    bogus.write_bytes(b"not a predictor")
    with pytest.raises(mp.MoePrefetchError, match="not a readable m2r2 predictor"):
        mp.load_model(str(ckpt), mp.OffloadConfig(device="cpu", predictor="m2r2", predictor_path=str(bogus),
                                                   show_progress=False))


def test_calibrate_bad_input_is_one_line(setup, tmp_path, capsys):
    root, ckpt, text = setup
    rc = calibrate_main(["--model", str(ckpt), "--data", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0 and len(err) == 1 and "cannot read calibration text" in err[0]
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("model_type", ["deepseek_v3", "qwen2_moe", "gpt_oss"])
def test_calibrate_other_families(tmp_path, capsys, model_type):
    """calibrate trains m2r2 maps through each family's own routers (DeepSeek's grouped top-k with score
    bias, Qwen's shared expert, GPT-OSS's biased router) and the maps drive generation losslessly."""
    from conftest import save_tokenizer
    from moe_families import make_family

    ckpt = tmp_path / model_type
    make_family(model_type, ckpt)
    save_tokenizer(ckpt, 128)
    rng = random.Random(1)
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"w{rng.randrange(3, 96)}" for _ in range(1500)))
    out = tmp_path / "pred.safetensors"
    rc = calibrate_main(["--model", str(ckpt), "--data", str(text), "--out", str(out), "--lookahead", "1",
                         "--rank", "4", "--steps", "40", "--seq-len", "64", "--device", "cpu", "--json", "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    report = json.loads(capsys.readouterr().out)
    assert 0 < report["recall_m2r2"]["1"] <= 1 and out.is_file()
    prompt = torch.tensor([[5, 9, 44, 12, 80, 31]])
    ref = reference_generate(ckpt, prompt, 8, device="cpu")
    model, _ = mp.load_model(str(ckpt), mp.OffloadConfig(device="cpu", expert_cache=4, predictor="m2r2",
                                                          predictor_path=str(out), lookahead=1, show_progress=False))
    with torch.inference_mode():
        got = model.generate(prompt, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    model.moe_runtime.close()
    assert torch.equal(got, ref)
