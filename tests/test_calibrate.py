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
    plain = root / "plain.txt"
    plain.write_text("x")  # the predictor file is as readable as any file written here (not 0600)
    assert out.stat().st_mode & 0o777 == plain.stat().st_mode & 0o777
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
    # the trace command says so
    from moe_prefetch.trace import main as trace_main
    capsys.readouterr()
    assert trace_main(["--model", str(ckpt), "--data", str(text), "--out", str(root / "t3.npz"), "--lookahead", "3",
                       "--predictor-path", str(out), "--seq-len", "32", "--max-tokens", "64", "--device", "cpu",
                       "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "note: the m2r2 predictor has no map for distance 3 (trained with a smaller --lookahead)" in err, err


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


@pytest.mark.parametrize("model_type,next_token", [("deepseek_v3", False), ("qwen2_moe", False), ("gpt_oss", False),
                                                   ("deepseek_v3", True), ("gpt_oss", True)])
def test_calibrate_other_families(tmp_path, capsys, model_type, next_token):
    """calibrate trains m2r2 maps through each family's own routers (DeepSeek's grouped top-k with score
    bias, Qwen's shared expert, GPT-OSS's biased router), into the next token's layers too, and the maps
    drive generation losslessly."""
    from conftest import save_tokenizer
    from moe_families import make_family

    ckpt = tmp_path / model_type
    make_family(model_type, ckpt)
    save_tokenizer(ckpt, 128)
    rng = random.Random(1)
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"w{rng.randrange(3, 96)}" for _ in range(1500)))
    out = tmp_path / "pred.safetensors"
    K = 2 if next_token else 1
    rc = calibrate_main(["--model", str(ckpt), "--data", str(text), "--out", str(out), "--lookahead", str(K),
                         "--rank", "4", "--steps", "40", "--seq-len", "64", "--device", "cpu", "--json", "--no-progress"]
                        + (["--next-token"] if next_token else []))
    assert rc == 0, capsys.readouterr().err
    report = json.loads(capsys.readouterr().out)
    assert 0 < report["recall_m2r2"]["1"] <= 1 and out.is_file()
    assert bool(report["recall_m2r2_next_token"]) == next_token
    prompt = torch.tensor([[5, 9, 44, 12, 80, 31]])
    ref = reference_generate(ckpt, prompt, 8, device="cpu")
    model, _ = mp.load_model(str(ckpt), mp.OffloadConfig(device="cpu", expert_cache=4, predictor="m2r2",
                                                          predictor_path=str(out), lookahead=K, show_progress=False,
                                                          adaptive_prediction=not next_token))
    assert model.moe_runtime.prefetcher.lookahead == K
    with torch.inference_mode():
        got = model.generate(prompt, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    model.moe_runtime.close()
    assert torch.equal(got, ref)


def test_next_token_maps_learn_the_next_tokens_routing(tmp_path, capsys):
    """calibrate --next-token fits the maps past the last layer to each token's *next* token's routing.
    On a text whose next word follows from the current one (a fixed successor 9 times in 10), the
    trained maps predict the next token's experts far better than the untrained ones (next-gate's
    guess: this token's residual through the target layer's router), and the predictor then runs a
    whole token ahead through the runtime, token-identical to transformers."""
    ckpt = make_mixtral(tmp_path / "m", layers=3, experts=8, top_k=2, seed=5)
    from conftest import chain_text

    text, unseen = chain_text(tmp_path / "chain.txt", 5000, 3), chain_text(tmp_path / "unseen.txt", 1200, 4)
    out = tmp_path / "wrap.safetensors"
    args = ["--model", str(ckpt), "--data", str(text), "--out", str(out), "--lookahead", "3", "--next-token",
            "--rank", "8", "--steps", "200", "--seq-len", "64", "--device", "cpu", "--json", "--no-progress"]
    assert calibrate_main(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report["recall_m2r2_next_token"]) == {"1", "2", "3"}  # d=1 from the last layer, d=3 from every one
    assert set(report["recall_next_gate"]) == {"1", "2"}

    from moe_prefetch.calibrate import collect_residuals, recall_by_distance, true_topk
    from moe_prefetch.predictors.accelerated import AcceleratedPredictor, AcceleratedResidual, load
    model, tok = mp.load_model(str(ckpt), mp.OffloadConfig(device="cpu", predictor="none", show_progress=False))
    view, H, lengths = collect_residuals(model, tok, unseen.read_text(), 64, 1500, progress=False)
    truth = true_topk(view, H)
    trained = recall_by_distance(AcceleratedPredictor(view, load(view, out)), view, H, lengths, truth, [1, 2, 3], "next")
    untrained = recall_by_distance(AcceleratedPredictor(view, AcceleratedResidual(3, 3, view.hidden_size, 8, wraps=True)),
                                   view, H, lengths, truth, [1, 2, 3], "next")
    model.moe_runtime.close()
    gains = [trained[d] - untrained[d] for d in (1, 2, 3)]  # seeded: 0.12, 0.11, 0.06 when written
    assert min(gains) > 0.03 and sum(gains) / 3 > 0.07, (trained, untrained)

    prompt = torch.tensor([[5, 9, 44, 12, 80, 31]])
    ref = reference_generate(ckpt, prompt, 12)
    model, _ = mp.load_model(str(ckpt), mp.OffloadConfig(device="cpu", expert_cache=6, predictor="m2r2",
                                                          predictor_path=str(out), lookahead=3, show_progress=False,
                                                          adaptive_prediction=False))  # predict on every layer
    assert model.moe_runtime.prefetcher.lookahead == 3 and model.moe_runtime.lookahead_note is None
    with torch.inference_mode():
        got = model.generate(prompt, max_new_tokens=12, min_new_tokens=12, do_sample=False)
    assert torch.equal(got, ref)
    st = mp.stats(model)
    model.moe_runtime.close()
    assert st["prefetch_issued"] > 0 and "3" in st["predictor_recall"]


def test_maps_without_next_token_stop_at_the_last_layer(setup, tmp_path, capsys):
    """A file trained without --next-token never predicts past the last layer (its maps there were never
    trained), and calibrate refuses a lookahead each mode cannot reach, in one line."""
    from moe_prefetch.predictors.accelerated import AcceleratedPredictor, load
    root, ckpt, text = setup
    common = ["--model", str(ckpt), "--data", str(text), "--rank", "4", "--steps", "5", "--seq-len", "64",
              "--device", "cpu", "--json", "--no-progress"]
    plain, wrap = tmp_path / "plain.safetensors", tmp_path / "wrap.safetensors"
    assert calibrate_main(common + ["--lookahead", "3", "--out", str(plain)]) == 0
    assert calibrate_main(common + ["--lookahead", "4", "--next-token", "--out", str(wrap)]) == 0
    capsys.readouterr()
    model, tok = mp.load_model(str(ckpt), mp.OffloadConfig(device="cpu", predictor="none", show_progress=False))
    from moe_prefetch.predictors import ModelView
    view = ModelView.of(model, model.moe_runtime.adapter)
    h = torch.randn(1, view.hidden_size)
    p_plain, p_wrap = AcceleratedPredictor(view, load(view, plain)), AcceleratedPredictor(view, load(view, wrap))
    assert not p_plain.wraps and p_plain.max_lookahead()[0] == 3
    assert p_wrap.wraps and p_wrap.max_lookahead()[0] == 4
    assert set(p_plain.predict(3, h, [1, 2])) == set() and set(p_wrap.predict(3, h, [1, 2])) == {1, 2}
    done, scores = p_wrap.predict_stacked(2, h, [1, 2, 3, 4])
    assert done == [1, 2, 3, 4] and scores.shape == (4, 1, view.num_experts)
    for n, d in enumerate(done):  # the batched scores are predict()'s, wrapped targets included
        torch.testing.assert_close(scores[n], p_wrap.predict(2, h, [d])[d].float())
    from moe_prefetch.predictors.accelerated import AcceleratedResidual
    too_far = AcceleratedPredictor(view, AcceleratedResidual(4, 6, view.hidden_size, 4, wraps=True))
    assert set(too_far.predict(0, h, [4, 5, 6])) == {4} and too_far.max_lookahead()[0] == 4  # one token at most
    assert too_far.predict_stacked(1, h, [4, 5])[0] == [4]
    # the simulator's trace holds the wrapped scores too: layer 3's distance 1 is the next token's layer 0
    import numpy as np
    from moe_prefetch.trace import record_trace
    for path, wraps in ((plain, False), (wrap, True)):
        tr = record_trace(model, tok, text.read_text(), lookahead=4, seq_len=32,
                          max_tokens=64, predictor_path=str(path), progress=False)
        m2r2 = tr.scores["m2r2"]  # [N, L, K, E]
        assert not np.isnan(m2r2[:, 0, :3]).any()
        assert np.isnan(m2r2[:, 3, 0]).all() != wraps and np.isnan(m2r2[:, 1, 3]).all() != wraps
        assert np.isnan(tr.scores["next-gate"][:, 3, 0]).all(), "next-gate does not reach into the next token"
    model.moe_runtime.close()
    for extra, says in ((["--lookahead", "4"], "--next-token"), (["--lookahead", "5", "--next-token"], "one token ahead")):
        rc = calibrate_main(common + extra + ["--out", str(tmp_path / "x.safetensors")])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc != 0 and len(err) == 1 and says in err[0], err
        assert not (tmp_path / "x.safetensors").exists()


def test_text_chunks_of_a_long_text_do_not_warn_about_its_length(capfd):
    """The text is tokenized whole and then cut into chunks the model's context holds, so transformers'
    "longer than the maximum sequence length ... indexing errors" warning would be wrong (calibrate,
    trace --data and the throughput bench's simulator check all read text this way)."""
    from transformers import AutoTokenizer

    from moe_prefetch.calibrate import text_chunks
    from moe_prefetch.hub import DEMO_DIR

    tok = AutoTokenizer.from_pretrained(DEMO_DIR)
    text = (DEMO_DIR / "heldout.txt").read_text(encoding="utf-8")[:20 * tok.model_max_length * 4]
    chunks = text_chunks(tok, text, 64, 1024)
    assert len(chunks) == 16 and all(c.numel() == 64 for c in chunks)
    assert "maximum sequence length" not in capfd.readouterr().err
