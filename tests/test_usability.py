"""What a new user trips over (issue 14): each bad flag is refused before any work with one line that
names it, the library entry points accept what the CLI accepts, the lookahead rule is one rule, and
logs stay readable."""
from __future__ import annotations

import importlib.metadata
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import moe_prefetch as mp
from moe_prefetch import calibrate, run, trace
from moe_prefetch.errors import MoePrefetchError
from conftest import make_mixtral, reference_generate

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "w5 w17 w33 w8"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_mixtral(tmp_path_factory.mktemp("usability") / "m", layers=4, experts=8, top_k=2, seed=3)


@pytest.fixture
def no_loading(monkeypatch):
    """Fail the test if a command gets as far as loading the model."""
    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the bad flag was refused")
    monkeypatch.setattr("moe_prefetch.runtime.load_model", refuse)


def one_error_line(capsys, rc, *fragments):
    out, err = capsys.readouterr()
    assert rc != 0
    assert out == "", f"something was written to stdout: {out!r}"
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for f in fragments:
        assert f in lines[0], lines[0]
    return lines[0]


def load(ckpt, **kw):
    model, _ = mp.load_model(str(ckpt), mp.OffloadConfig(device="cpu", expert_cache=6, show_progress=False, **kw))
    return model


# 1. sampling flags ------------------------------------------------------------------------------
@pytest.mark.parametrize("flags, fragment", [
    (["--do-sample", "--top-k", "-3"], "--top-k must be at least 1, got -3"),
    (["--top-k", "0"], "--top-k must be at least 1"),
    (["--do-sample", "--top-p", "0"], "--top-p must be in (0, 1]"),
    (["--top-p", "1.5"], "--top-p must be in (0, 1]"),
    (["--do-sample", "--temperature", "0"], "--temperature must be positive"),
    (["--temperature", "-1"], "--temperature must be positive"),
])
def test_bad_sampling_flags_refused_before_generating(ckpt, capsys, no_loading, flags, fragment):
    rc = run.main(["--model", str(ckpt), "--device", "cpu", "--prompt", PROMPT, *flags])
    one_error_line(capsys, rc, fragment)


def test_sampling_parameter_turns_sampling_on(ckpt, capsys):
    args = ["--model", str(ckpt), "--device", "cpu", "--prompt", PROMPT, "--max-new-tokens", "12", "--no-progress", "--json"]
    assert run.main(args) == 0
    greedy = json.loads(capsys.readouterr().out)["token_ids"]
    assert greedy == reference_generate(ckpt, torch.tensor([[5, 17, 33, 8]]), 12)[0, 4:].tolist()[:len(greedy)]
    assert run.main(args + ["--temperature", "50"]) == 0  # no --do-sample: the temperature alone samples
    hot = json.loads(capsys.readouterr().out)["token_ids"]
    assert hot != greedy


# 2. output paths are checked first --------------------------------------------------------------
@pytest.mark.parametrize("main", [calibrate.main, trace.main], ids=["calibrate", "trace"])
def test_out_into_missing_directory_refused_before_loading(tmp_path, capsys, no_loading, main):
    text = tmp_path / "text.txt"
    text.write_text("w5 w6 w7 " * 400)
    rc = main(["--model", "demo", "--data", str(text), "--out", str(tmp_path / "no" / "such" / "dir" / "x.out")])
    one_error_line(capsys, rc, "--out", "does not exist")
    rc = main(["--model", "demo", "--data", str(text), "--out", str(tmp_path)])
    one_error_line(capsys, rc, "is a directory")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root may write into read-only directories")
def test_out_into_read_only_directory_refused(tmp_path, capsys, no_loading):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        rc = trace.main(["--model", "demo", "--prompt", "x", "--out", str(locked / "t.npz")])
        one_error_line(capsys, rc, "not writable")
    finally:
        locked.chmod(0o700)


# 3. set_predictor by name, reset_stats on a plain module -----------------------------------------
def test_set_predictor_accepts_names_and_paths(ckpt, tmp_path):
    model = load(ckpt, predictor="none")
    assert mp.stats(model)["predictor"] == "none"
    assert mp.set_predictor(model, "history", lookahead=2) == 2
    assert mp.stats(model)["predictor"] == "history" and mp.stats(model)["lookahead"] == 2
    with pytest.raises(MoePrefetchError, match="needs --predictor-path"):
        mp.set_predictor(model, "m2r2")
    with pytest.raises(MoePrefetchError, match="unknown predictor"):
        mp.set_predictor(model, "psychic")
    assert mp.stats(model)["predictor"] == "history"  # a refused swap leaves the old predictor in place
    path = tmp_path / "routing.npz"
    assert trace.main(["--model", str(ckpt), "--device", "cpu", "--prompt", PROMPT, "--max-new-tokens", "8",
                       "--no-progress", "--out", str(path)]) == 0
    mp.set_predictor(model, "oracle", path=str(path))
    assert mp.stats(model)["predictor"] == "oracle"
    mp.set_predictor(model, "none")
    assert mp.stats(model)["predictor"] == "none" and model.moe_runtime.prefetcher is None


def test_reset_stats_and_set_predictor_need_an_offloaded_model():
    plain = torch.nn.Linear(2, 2)
    for call in (mp.reset_stats, mp.stats, lambda m: mp.set_predictor(m, "history")):
        with pytest.raises(MoePrefetchError, match="needs a model returned by moe_prefetch.load_model"):
            call(plain)


# 4. the oracle for one's own run; traces tied to their model --------------------------------------
def test_trace_of_a_prompt_makes_the_oracle_perfect_for_that_run(ckpt, tmp_path, capsys):
    path = tmp_path / "mine.npz"
    common = ["--model", str(ckpt), "--device", "cpu", "--prompt", PROMPT, "--max-new-tokens", "10", "--no-progress"]
    assert trace.main(common + ["--out", str(path)]) == 0
    assert "10 forward passes" in capsys.readouterr().out
    assert run.main(common + ["--json"]) == 0
    plain = json.loads(capsys.readouterr().out)
    assert run.main(common + ["--json", "--predictor", "oracle", "--predictor-path", str(path), "--lookahead", "2",
                              "--expert-cache", "6", "--prefetch-budget", "1GiB"]) == 0
    oracle = json.loads(capsys.readouterr().out)
    assert oracle["token_ids"] == plain["token_ids"]
    recall = oracle["stats"]["predictor_recall"]
    assert set(recall) == {"1", "2"} and all(v == 1.0 for v in recall.values()), recall


def test_trace_of_a_short_text_is_not_held_to_calibrations_minimum(ckpt, tmp_path, capsys):
    text = tmp_path / "short.txt"
    text.write_text("w5 w6 w7 w8 w9")
    rc = trace.main(["--model", str(ckpt), "--device", "cpu", "--data", str(text), "--lookahead", "2",
                     "--no-progress", "--out", str(tmp_path / "t.npz")])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "calibration" not in err
    from moe_prefetch.sim import Trace

    assert Trace.load(tmp_path / "t.npz").shape[0] == 5  # every word one step


def test_trace_from_another_model_is_refused_before_loading(ckpt, tmp_path, capsys, monkeypatch):
    other = make_mixtral(tmp_path / "other", layers=4, experts=8, top_k=2, seed=4)  # same shape, other weights
    path = tmp_path / "other.npz"
    assert trace.main(["--model", str(other), "--device", "cpu", "--prompt", PROMPT, "--max-new-tokens", "4",
                       "--no-progress", "--out", str(path)]) == 0
    capsys.readouterr()
    with monkeypatch.context() as m:
        m.setattr("moe_prefetch.runtime._load_dense", lambda *a, **k: pytest.fail("loaded before refusing"))
        with pytest.raises(MoePrefetchError, match="recorded on a different model"):
            load(ckpt, predictor="oracle", predictor_path=str(path))
    model = load(ckpt, predictor="none")
    with pytest.raises(MoePrefetchError, match="recorded on a different model"):
        mp.set_predictor(model, "oracle", path=str(path))
    # a trace without a fingerprint (written before they were recorded) is still accepted
    from moe_prefetch.trace import load_routing, save_routing

    save_routing(load_routing(path), tmp_path / "legacy.npz")
    mp.set_predictor(model, "oracle", path=str(tmp_path / "legacy.npz"))


# 5. the download hint names the command huggingface_hub installs ---------------------------------
def test_offline_hint_suggests_the_installed_hf_command(monkeypatch):
    import huggingface_hub

    def offline(*a, **k):
        raise OSError("offline")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    from moe_prefetch.hub import resolve_model

    with pytest.raises(MoePrefetchError) as e:
        resolve_model("mixtral")
    assert "hf download mistralai/Mixtral-8x7B-Instruct-v0.1" in str(e.value)
    assert "huggingface-cli" not in str(e.value)
    scripts = {ep.name for ep in importlib.metadata.distribution("huggingface_hub").entry_points
               if ep.group == "console_scripts"}
    assert "hf" in scripts, scripts


# 6. one lookahead rule ------------------------------------------------------------------------------
def test_lookahead_beyond_the_model_runs_at_the_limit_and_stats_say_so(ckpt):
    model = load(ckpt, predictor="next-gate", lookahead=10)  # 4 MoE layers: next-gate reaches 3 ahead
    assert model.moe_runtime.prefetcher.lookahead == 3 and model.moe_runtime.prefetcher.distances == [1, 2, 3]
    assert mp.stats(model)["lookahead"] == 3
    assert "predicts at most 3 layers ahead on a model with 4 MoE layers" in model.moe_runtime.lookahead_note
    assert mp.set_predictor(model, "history", lookahead=10) == 4  # wraps: one whole token ahead
    assert mp.set_predictor(model, "next-gate", lookahead=2) == 2 and model.moe_runtime.lookahead_note is None


def test_m2r2_runs_at_most_its_trained_lookahead(ckpt):
    from moe_prefetch.predictors import ModelView
    from moe_prefetch.predictors.accelerated import AcceleratedPredictor, AcceleratedResidual

    model = load(ckpt, predictor="none")
    view = ModelView.of(model, model.moe_runtime.adapter)
    trained_for_2 = AcceleratedPredictor(view, AcceleratedResidual(len(view.layers), 2, view.hidden_size, 4))
    assert mp.set_predictor(model, trained_for_2, lookahead=3) == 2
    assert mp.stats(model)["lookahead"] == 2
    assert "trained for distances up to 2" in model.moe_runtime.lookahead_note
    with torch.inference_mode():
        model.generate(torch.tensor([[5, 17, 33, 8]]), max_new_tokens=6, do_sample=False)
    assert set(mp.stats(model)["predictor_recall"]) == {"1", "2"}


def test_cli_notes_the_lookahead_it_runs_with(ckpt, capsys):
    rc = run.main(["--model", str(ckpt), "--device", "cpu", "--prompt", PROMPT, "--max-new-tokens", "3",
                   "--no-progress", "--json", "--lookahead", "10"])
    out, err = capsys.readouterr()
    assert rc == 0
    assert json.loads(out)["stats"]["lookahead"] == 3
    notes = [ln for ln in err.splitlines() if ln.strip()]
    assert notes == ["note: --lookahead 10 is more than next-gate can use: it reads the residual stream, so it "
                     "predicts at most 3 layers ahead on a model with 4 MoE layers; running with 3"]


def test_calibrate_refuses_the_same_lookahead_with_the_same_words(ckpt, tmp_path, capsys, monkeypatch):
    text = tmp_path / "text.txt"
    text.write_text("w5 w6 w7 " * 400)
    monkeypatch.setattr("moe_prefetch.runtime.load_model", lambda *a, **k: pytest.fail("loaded before refusing"))
    rc = calibrate.main(["--model", str(ckpt), "--data", str(text), "--out", str(tmp_path / "p.safetensors"),
                         "--lookahead", "4"])
    one_error_line(capsys, rc, "--lookahead 4 is more than m2r2 can use: it reads the residual stream, so it "
                               "predicts at most 3 layers ahead on a model with 4 MoE layers")


# 7. small messages ----------------------------------------------------------------------------------
@pytest.mark.parametrize("flags, fragments", [
    (["--prefetch-budget", "0"], ["--prefetch-budget", "positive"]),
    (["--device-memory", "-5GiB"], ["--device-memory", "positive", "-5GiB"]),
    (["--device-memory=-5GiB"], ["--device-memory", "positive", "-5GiB"]),
    (["--expert-cache", "0"], ["--expert-cache", "positive"]),
])
def test_size_and_count_flags_are_named(ckpt, capsys, no_loading, flags, fragments):
    rc = run.main(["--model", str(ckpt), "--prompt", PROMPT, *flags])
    one_error_line(capsys, rc, *fragments)


@pytest.mark.parametrize("main", [calibrate.main, trace.main], ids=["calibrate", "trace"])
def test_device_memory_named_by_calibrate_and_trace(tmp_path, capsys, no_loading, main):
    rc = main(["--data", str(tmp_path / "t.txt"), "--out", str(tmp_path / "x"), "--device-memory", "-1GiB"])
    one_error_line(capsys, rc, "--device-memory", "positive")


@pytest.mark.skipif(torch.cuda.device_count() > 1, reason="cuda:1 exists here")
def test_device_message_names_the_device_asked_for():
    from moe_prefetch.runtime import _resolve_device

    with pytest.raises(MoePrefetchError, match=r"--device cuda:1 was requested"):
        _resolve_device("cuda:1")


def test_a_value_may_start_with_a_dash():
    p = run.build_parser()
    args = p.parse_args(["--prompt", "-5 degrees", "--device-memory", "-1GiB", "--top-k", "-2"])
    assert (args.prompt, args.device_memory, args.top_k) == ("-5 degrees", "-1GiB", -2)
    with pytest.raises(MoePrefetchError, match="expected one argument"):
        p.parse_args(["--prompt", "--json"])  # a flag is still a flag


# 8. progress in log files -------------------------------------------------------------------------
def test_progress_off_a_terminal_is_a_few_plain_lines(capsys):
    from moe_prefetch.progress import PlainProgress, progress_bar

    bar = progress_bar(range(1000), desc="training", unit="step")  # capsys: stderr is not a terminal
    assert isinstance(bar, PlainProgress)
    bar.interval = 0.0
    for _ in bar:
        bar.set_postfix(loss="0.5")
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = err.splitlines()
    assert 2 <= len(lines) <= 11, lines
    assert lines[-1].startswith("training: 1000/1000 step (100%)") and lines[-1].endswith("loss=0.5")
    for _ in progress_bar(range(10), desc="hidden", disable=True):
        pass
    assert capsys.readouterr().err == ""


def test_run_logs_without_carriage_returns(ckpt, tmp_path):
    log = tmp_path / "run.log"
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    with open(log, "w") as f:
        r = subprocess.run([sys.executable, "-m", "moe_prefetch.run", "--model", str(ckpt), "--device", "cpu",
                            "--prompt", PROMPT, "--max-new-tokens", "2"], stdout=subprocess.DEVNULL, stderr=f,
                           env=env, timeout=300)
    assert r.returncode == 0
    text = log.read_text()
    assert "\r" not in text and "loading dense weights" in text
    assert len(text.splitlines()) <= 3, text


# 9. the throughput bench with one cache size, on another model -------------------------------------
def test_throughput_bench_with_one_cache_and_its_model_named(tmp_path):
    small = make_mixtral(tmp_path / "small", layers=2, experts=4, top_k=2, seed=1)
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "throughput.py"), "--model", str(small), "--sequences", "1",
                        "--seq-len", "6", "--caches", "1", "--repeats", "2", "--out", str(tmp_path / "out")],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads((tmp_path / "out" / "throughput.json").read_text())
    assert report["sim_check"] and all(c["cache"] == 1.0 for c in report["sim_check"])
    # the measured keep rule against its twin with keeps fixed on frequency, per cache
    assert [t["cache"] for t in report["targets"]] == [1.0] and report["targets"][0]["keep_switch_over_frequency"] > 0
    title = (tmp_path / "out" / "throughput.md").read_text().splitlines()[0]
    assert str(small) in title and "demo" not in title
    # two interleaved rounds of every row; each row reports its lower-middle round, counters from that run
    assert "median of 2 interleaved rounds" in title
    for row in report["results"]:
        rounds = row["tokens_per_s_rounds"]
        assert len(rounds) == 2 and row["tokens_per_s"] == min(rounds), row["policy"]
    # the second round runs the same rows starting half way down the list (no row always runs first)
    order = {1: [], 2: []}
    for line in r.stdout.splitlines():
        m = re.match(r"\s+round (\d)\s+(cache .*?)\s+[\d.]+ tok/s", line)
        if m:
            order[int(m.group(1))].append(m.group(2))
    half = len(order[1]) // 2
    assert len(order[1]) > 4 and order[2] == order[1][half:] + order[1][:half], order
    # the default with --host-compute on against the best host-compute row without prediction
    t = report["targets"][0]
    assert t["default_host_vs_best_no_prediction"] > 0
    # and both default ratios round by round: round i of the default over round i of the fastest row
    # without prediction (the fastest by its median round)
    rows = {x["policy"]: x["tokens_per_s_rounds"] for x in report["results"] if x["cache"] == 1.0}
    best = max((n for n in rows if "no prefetch" in n and "host compute" not in n),
               key=lambda n: next(x["tokens_per_s"] for x in report["results"] if x["policy"] == n and x["cache"] == 1.0))
    default = next(n for n in rows if n.startswith("default"))
    assert t["default_vs_best_no_prediction_rounds"] == pytest.approx([a / b for a, b in zip(rows[default], rows[best])])
    assert len(t["default_host_vs_best_no_prediction_rounds"]) == 2
    assert all("prefetch_layer_ms" in c for c in report["sim_check"])
    # the simulator's compute costs: the median of as many resident runs as rows have rounds
    assert all(c["resident_rounds"] == 2 for c in report["sim_check"])
    # --replot rewrites the report from the JSON (the ratios recomputed), without running anything
    md = tmp_path / "out" / "throughput.md"
    md.write_text("stale")
    report["targets"] = []
    (tmp_path / "out" / "throughput.json").write_text(json.dumps(report))
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "throughput.py"), "--replot",
                        str(tmp_path / "out" / "throughput.json")], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "the same, host compute on" in md.read_text() and str(small) in md.read_text().splitlines()[0]
    ratios = " ".join(f"{x:.2f}" for x in t["default_vs_best_no_prediction_rounds"])
    assert f"{t['default_vs_best_no_prediction']:.2f} [{ratios}] |" in md.read_text()
    assert json.loads((tmp_path / "out" / "throughput.json").read_text())["targets"][0]["cache"] == 1.0



def test_throughput_bench_rows_for_maps_into_the_next_token(tmp_path):
    """An m2r2 file calibrated with --next-token gets its own rows at its full reach, a whole token ahead
    here (4 MoE layers), with host compute off and on; the K = 1-3 rows stay."""
    from moe_prefetch.calibrate import main as calibrate_main

    small = make_mixtral(tmp_path / "small", layers=4, experts=4, top_k=2, seed=1)
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"w{(7 * i) % 90 + 3}" for i in range(600)))
    pred = tmp_path / "next.safetensors"
    assert calibrate_main(["--model", str(small), "--data", str(text), "--out", str(pred), "--lookahead", "4",
                           "--next-token", "--rank", "4", "--steps", "5", "--seq-len", "64", "--device", "cpu",
                           "--json", "--no-progress"]) == 0
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "throughput.py"), "--model", str(small), "--data", str(text),
                        "--predictor-path", str(pred), "--sequences", "1", "--seq-len", "6", "--caches", "0.5",
                        "--out", str(tmp_path / "out")], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    names = [x["policy"] for x in json.loads((tmp_path / "out" / "throughput.json").read_text())["results"]]
    assert "ours: m2r2 K=4 (a whole token ahead), predictive, gated" in names
    assert "ours: m2r2 K=4 (a whole token ahead), predictive, gated, host compute" in names
    assert "ours: m2r2 K=3, predictive, gated" in names


def test_throughput_replot_of_a_missing_or_foreign_file_is_one_line(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    (tmp_path / "other.json").write_text('{"a": 1}')
    for path, says in ((tmp_path / "none.json", "does not exist"), (tmp_path / "other.json", "is not a throughput JSON")):
        r = subprocess.run([sys.executable, str(ROOT / "bench" / "throughput.py"), "--replot", str(path)],
                           capture_output=True, text=True, env=env, timeout=120)
        assert r.returncode == 2 and says in r.stderr and len(r.stderr.splitlines()) == 1, r.stderr

def test_throughput_bench_on_a_family_with_a_dense_layer_and_a_shared_expert(tmp_path):
    """Held-out models are not all Mixtral: Qwen2-MoE has a dense layer 0 (no experts module) and a shared
    expert beside the routed ones; every row runs, and the accelerate peer offloads the experts modules only."""
    from moe_families import make_family
    from conftest import save_tokenizer
    sys.path.insert(0, str(ROOT / "bench"))
    import throughput

    ckpt = tmp_path / "qwen2_moe"
    config = make_family("qwen2_moe", ckpt, seed=0)
    save_tokenizer(ckpt)
    data = tmp_path / "text.txt"
    data.write_text(" ".join(f"w{(7 * i) % 120 + 3}" for i in range(64)))
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(ckpt)
    found = throughput.experts_modules(model)
    moe_layers = config.num_hidden_layers - len(config.mlp_only_layers)
    assert len(found) == moe_layers == 2 and all(m.down_proj.shape[0] == config.num_experts for m in found)
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "throughput.py"), "--model", str(ckpt), "--data", str(data),
                        "--sequences", "1", "--seq-len", "6", "--caches", "0.5", "--out", str(tmp_path / "out")],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads((tmp_path / "out" / "throughput.json").read_text())
    rows = {row["policy"]: row for row in report["results"]}
    assert "LRU, no prefetch" in rows and any(row["host_compute"] for row in rows.values())
    assert all(row["tokens_per_s"] > 0 and row["steps"] == 5 for row in rows.values())


def test_bench_decode_loop_lets_the_model_make_its_own_cache(tmp_path):
    """MiniMax refuses a DynamicCache (it keeps linear-attention state in a cache class of its own): the
    benches' teacher-forced loop takes whatever cache the model returns, and decodes what a full pass does."""
    from moe_families import make_family
    sys.path.insert(0, str(ROOT / "bench"))
    import throughput
    from transformers import AutoModelForCausalLM

    make_family("minimax", tmp_path / "minimax", seed=0)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "minimax")
    seq = torch.arange(3, 13)
    seconds, steps = throughput.teacher_forced(model, [seq, seq[:4]])
    assert steps == 9 + 3 and seconds > 0


def test_planner_cost_bench_runs_and_refuses_an_unknown_shape(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    bench = str(ROOT / "bench" / "planner_cost.py")
    r = subprocess.run([sys.executable, bench, "--shapes", "nope"], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2 and r.stderr.startswith("error: unknown shape 'nope'") and len(r.stderr.splitlines()) == 1
    r = subprocess.run([sys.executable, bench, "--shapes", "olmoe-1b-7b", "--tokens", "6", "--repeats", "1",
                        "--out", str(tmp_path)], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.loads((tmp_path / "planner_cost.json").read_text())["rows"]
    assert [row["policy"].split(",")[0] for row in rows] == ["LRU", "LFU", "predictive eviction",
                                                             "next-gate K=2 (the default's predictor)",
                                                             "history K=L=16"]
    assert all(row["slots"] == 16 * 64 // 2 and row["fast_ms"] > 0 and row["scan_ms"] > 0 for row in rows)


def test_eviction_bench_on_a_recorded_trace_and_sticky_routing(tmp_path):
    """bench/eviction.py on a trace file and a synthetic trace whose routing sticks: predictive eviction's
    recency factor must pay there (without host compute), and a missing trace is one line."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    bench = str(ROOT / "bench" / "eviction.py")
    r = subprocess.run([sys.executable, bench, "--trace", str(tmp_path / "none.npz")], capture_output=True, text=True,
                       env=env, timeout=120)
    assert r.returncode == 2 and r.stderr.startswith("error: trace ") and "does not exist" in r.stderr
    assert len(r.stderr.splitlines()) == 1
    from test_sim import make_trace

    make_trace(N=60, L=4, E=8, k=2, seed=0).save(tmp_path / "t.npz")
    r = subprocess.run([sys.executable, bench, "--trace", str(tmp_path / "t.npz"), "--sticky", "0.6", "--tokens", "300",
                        "--caches", "0.5", "--out", str(tmp_path)], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.loads((tmp_path / "eviction.json").read_text())["rows"]
    assert [(row["trace"], row["host_compute"]) for row in rows] == [
        ("t.npz", False), ("t.npz", True), ("synthetic, sticky 0.6", False), ("synthetic, sticky 0.6", True)]
    sticky = rows[2]
    assert sticky["stickiness"] > 0.6 and sticky["slots"] == 32
    assert sticky["predictive_over_frequency_only"] > 1.3, sticky
    assert sticky["auto_over_predictive"] > 0.98, sticky  # the default keeps the rule that pays there
    # with host compute there, keeps judged with recency pay, and the default's keep switch finds them
    tps = rows[3]["tokens_per_s"]
    assert tps["predictive, keeps with recency"] > 1.2 * tps["predictive, keeps on frequency"], tps
    assert tps["predictive"] > 1.1 * tps["predictive, keeps on frequency"], tps
    assert "predictive, keeps with recency" not in rows[2]["tokens_per_s"]  # no keeps without host compute
    for row in rows:  # Belady's eviction, with host compute too, is the bound of every row
        tps = row["tokens_per_s"]
        assert tps["Belady (bound)"] >= max(v for k, v in tps.items() if k != "Belady (bound)"), row
    assert "| synthetic, sticky 0.6 |" in (tmp_path / "eviction.md").read_text()


def test_steering_bench_on_a_recorded_trace(tmp_path):
    """bench/steering.py on a trace file of another model: its rows carry the file's name, and a trace
    recorded without a trained predictor has no m2r2 row; a missing trace is one line."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    bench = str(ROOT / "bench" / "steering.py")
    r = subprocess.run([sys.executable, bench, "--trace", str(tmp_path / "none.npz")], capture_output=True, text=True,
                       env=env, timeout=120)
    assert r.returncode == 2 and r.stderr.startswith("error: trace ") and len(r.stderr.splitlines()) == 1
    from test_sim import make_trace

    make_trace(N=60, L=4, E=8, k=2, seed=0).save(tmp_path / "other.npz")  # next-gate scores only
    r = subprocess.run([sys.executable, bench, "--trace", str(tmp_path / "other.npz"), "--tokens", "60", "--ratios", "11.2",
                        "--caches", "0.5", "--predict-costs", "0", "--out", str(tmp_path)],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.loads((tmp_path / "steering.json").read_text())["rows"]
    mine = [row["predictor"] for row in rows if row["trace"] == "other.npz"]
    assert mine and mine[0].startswith("next-gate K=2") and not any("m2r2" in p for p in mine), mine
    assert "oracle K=4" in mine and all(row["trace"] != "demo trace" for row in rows)
    r = subprocess.run([sys.executable, bench, "--trace", str(tmp_path / "other.npz"), "--tokens", "60", "--ratios", "11.2",
                        "--caches", "0.5", "--predict-costs", "0", "--host-compute", "--out", str(tmp_path)],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    host = json.loads((tmp_path / "steering_host.json").read_text())
    assert host["host_compute"] and "host compute on" in (tmp_path / "steering_host.md").read_text()
    assert [row["predictor"] for row in host["rows"]] == [row["predictor"] for row in rows]
    # nothing steers with host compute: its two predictor columns are the one run
    assert all(row["tokens_per_s"]["steering"] == row["tokens_per_s"]["prefetch only"] for row in host["rows"])
    assert any(row["tokens_per_s"]["none"] != row["tokens_per_s"]["prefetch only"] for row in host["rows"])


def test_steering_bench_rows_for_m2r2_a_token_ahead():
    """bench/steering.py adds m2r2 a whole token ahead only where the trace's m2r2 scores reach past the
    last layer (maps trained with calibrate --next-token), m2r2 K=3 wherever it has m2r2 scores."""
    import numpy as np

    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import steering
    finally:
        sys.path.remove(str(ROOT / "bench"))
    from test_sim import make_trace

    tr = make_trace(N=30, L=4, E=8, k=2, seed=0)
    within = np.random.default_rng(1).random((30, 4, 4, 8)).astype(np.float32)
    for i in range(4):
        within[:, i, 3 - i:] = np.nan  # distance d = index + 1 reaches layer i + d: NaN from the next token on
    partial = np.nan_to_num(within, nan=0.1)
    partial[:, :, 2:] = np.nan  # maps into the next token, but only two layers ahead (calibrate --lookahead 2)
    for scores, want in ((within, ["m2r2 K=3"]), (partial, ["m2r2 K=3"]),
                         (np.nan_to_num(within, nan=0.1), ["m2r2 K=3", "m2r2 K=4 (a token)"])):
        tr.scores["m2r2"] = scores
        got = [label for label, name, K in steering.predictors(tr, demo=True) if name == "m2r2"]
        assert got == want, got
        assert steering.reaches_next_token(tr, "m2r2") == (len(want) == 2)
    assert not steering.reaches_next_token(tr, "next-gate")  # two distances: not a whole token


def test_switch_bench_on_a_recorded_trace(tmp_path):
    """bench/switch.py on a trace file: every (trace, link, host, cache, predictor) row with the three
    arms, the file's own name on its rows; a missing trace is one line."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    bench = str(ROOT / "bench" / "switch.py")
    r = subprocess.run([sys.executable, bench, "--trace", str(tmp_path / "none.npz")], capture_output=True, text=True,
                       env=env, timeout=120)
    assert r.returncode == 2 and r.stderr.startswith("error: trace ") and len(r.stderr.splitlines()) == 1, r.stderr
    (tmp_path / "junk.npz").write_bytes(b"not an npz")
    r = subprocess.run([sys.executable, bench, "--trace", str(tmp_path / "junk.npz")], capture_output=True, text=True,
                       env=env, timeout=120)
    assert r.returncode == 2 and r.stderr.startswith("error: cannot read trace") and len(r.stderr.splitlines()) == 1
    from test_sim import make_trace

    make_trace(N=40, L=4, E=8, k=2, seed=0).save(tmp_path / "t.npz")
    r = subprocess.run([sys.executable, bench, "--trace", str(tmp_path / "t.npz"), "--tokens", "12", "--out", str(tmp_path)],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.loads((tmp_path / "switch.json").read_text())["rows"]
    # the file's trace (history and oracle: it has no m2r2 scores) + 4 synthetic traces x 3 predictors,
    # x 2 links x host on and off x 3 caches
    assert len(rows) == (2 + 4 * 3) * 2 * 2 * 3
    assert {row["predictor"] for row in rows if row["trace"] == "t.npz"} == {"history K=4", "oracle K=4"}
    assert {row["trace"] for row in rows} == {"t.npz", "8 layers, sticky 0.6", "16 layers, sticky 0.6",
                                              "16 layers, sticky 0.3", "32 layers, sticky 0.6"}
    assert all(row[arm] > 0 for row in rows for arm in ("none", "always", "adaptive"))
    assert "simulated configurations" in (tmp_path / "switch.md").read_text()
    # the switch seeing each token's time through a noisy clock: its own report; a negative sigma is one line
    r = subprocess.run([sys.executable, bench, "--trace", str(tmp_path / "t.npz"), "--tokens", "12", "--clock-noise",
                        "0.2", "--out", str(tmp_path)], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "x lognormal(0, 0.2)" in (tmp_path / "switch_noise0.2.md").read_text()
    r = subprocess.run([sys.executable, bench, "--clock-noise", "-1"], capture_output=True, text=True, env=env,
                       timeout=120)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "--clock-noise" in r.stderr, r.stderr


def test_keep_switch_bench_on_a_recorded_trace(tmp_path):
    """bench/keep_switch.py: both trace sets, every configuration with the two fixed keep rules and the ledger;
    a missing trace is one line."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    bench = str(ROOT / "bench" / "keep_switch.py")
    r = subprocess.run([sys.executable, bench, "--trace", str(tmp_path / "none.npz")], capture_output=True, text=True,
                       env=env, timeout=120)
    assert r.returncode == 2 and len(r.stderr.splitlines()) == 1 and "does not exist" in r.stderr
    from test_sim import make_trace

    make_trace(N=40, L=4, E=8, k=2, seed=0).save(tmp_path / "t.npz")
    r = subprocess.run([sys.executable, bench, "--trace", str(tmp_path / "t.npz"), "--tokens", "40", "--ratios", "11.2",
                        "--caches", "0.5", "--copy-costs", "0", "--out", str(tmp_path)],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.loads((tmp_path / "keep_switch.json").read_text())["rows"]
    assert [row["set"] for row in rows] == ["tuning"] * 5 + ["held-out"] * 4
    assert all(set(row["tokens_per_s"]) == {"frequency", "recency", "ledger"} and row["ledger_over_best"] > 0
               for row in rows)
    assert "| tuning | 0 | 5 |" in (tmp_path / "keep_switch.md").read_text()


def test_every_bench_refuses_a_bad_flag_in_one_line():
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    benches = sorted(p.name for p in (ROOT / "bench").glob("*.py"))
    assert len(benches) >= 12
    for bench in benches:
        r = subprocess.run([sys.executable, str(ROOT / "bench" / bench), "--no-such-flag"], capture_output=True,
                           text=True, env=env, timeout=120)
        assert r.returncode == 2 and not r.stdout, bench
        assert r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1, (bench, r.stderr)


def test_throughput_bench_refuses_another_models_predictor_and_a_short_text_before_any_row(tmp_path, ckpt):
    """A predictor trained for another model is refused when the model is first loaded, not at its first row
    minutes into the run; so is a text with fewer tokens than the sequences asked for. One line each, and no
    report written."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    bench = str(ROOT / "bench" / "throughput.py")
    r = subprocess.run([sys.executable, bench, "--model", str(ckpt), "--predictor-path",
                        str(ROOT / "bench/results/demo.m2r2.safetensors"), "--out", str(tmp_path / "a")],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "trained for a different model" in r.stderr and "round" not in r.stdout
    assert not list((tmp_path / "a").glob("*"))
    text = tmp_path / "short.txt"
    text.write_text("a short text")
    r = subprocess.run([sys.executable, bench, "--model", str(ckpt), "--data", str(text), "--out", str(tmp_path / "b")],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "fewer than the 3 x 64 asked for" in r.stderr and not list((tmp_path / "b").glob("*"))


def test_trace_benches_check_their_numbers_in_one_line(tmp_path):
    """bench/simulate.py refuses a cache fraction outside (0, 1]; bench/ceiling.py asks a trace recorded with
    a lookahead below its default for no more than that, and refuses a larger one in one line."""
    from test_sim import make_trace

    env = dict(os.environ, PYTHONPATH=str(ROOT))
    make_trace(N=40, L=4, E=8, k=2, seed=0).save(tmp_path / "t.npz")  # next-gate scores for 2 layers ahead
    for bad in ("1.5", "-0.5", "0"):
        r = subprocess.run([sys.executable, str(ROOT / "bench" / "simulate.py"), "--trace", str(tmp_path / "t.npz"),
                            "--cache", bad], capture_output=True, text=True, env=env, timeout=120)
        assert r.returncode == 2 and not r.stdout and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert "--cache takes fractions" in r.stderr
    ceiling = str(ROOT / "bench" / "ceiling.py")
    r = subprocess.run([sys.executable, ceiling, "--trace", str(tmp_path / "t.npz"), "--tokens", "20"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "| next-gate K=2 | off |" in r.stdout and "| oracle K=2 + Belady eviction | on |" in r.stdout
    r = subprocess.run([sys.executable, ceiling, "--trace", str(tmp_path / "t.npz"), "--tokens", "20", "--lookahead", "3"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 2 and not r.stdout and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "lookahead of at most 2" in r.stderr


def test_predictors_bench_says_what_the_skip_left(tmp_path):
    text = tmp_path / "short.txt"
    text.write_text("a short text")
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "predictors.py"), "--data", str(text), "--skip-tokens", "5"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert f"{text} past --skip-tokens 5 has 0 tokens" in r.stderr


def test_benches_refuse_a_missing_predictor_file_in_one_line(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    for bench in ("throughput.py", "predictor_cost.py"):
        r = subprocess.run([sys.executable, str(ROOT / "bench" / bench), "--predictor-path", str(tmp_path / "none.m2r2")],
                           capture_output=True, text=True, env=env, timeout=300)
        assert r.returncode == 2 and not r.stdout, bench
        assert r.stderr.startswith("error: --predictor-path") and len(r.stderr.strip().splitlines()) == 1, r.stderr


# 10. the README's sample summary is what the CLI prints -------------------------------------------
def test_readme_sample_summary_has_the_lines_the_cli_prints(ckpt, capsys):
    readme = (ROOT / "README.md").read_text()
    sample = re.search(r"a summary follows[^\n]*\n+```\n(.*?)```", readme, re.S).group(1).splitlines()
    sample = sample[sample.index("---") + 1:] if "---" in sample else sample
    assert run.main(["--model", str(ckpt), "--device", "cpu", "--prompt", PROMPT, "--max-new-tokens", "4",
                     "--no-progress"]) == 0
    printed = capsys.readouterr().out.split("\n---\n", 1)[1].splitlines()

    def labels(lines):  # format_summary pads every label to 18 characters, then a space
        return [ln[:19].strip() for ln in lines if ln.strip()]
    assert labels(sample) == labels(printed)


def test_next_token_bench(tmp_path, capsys):
    """bench/next_token.py: per layer of the next token, recall from the true next token's table, the
    logit lens, an m2r2 --next-token file and the previous token. The table is looked up with the token
    that really comes next: on a text whose words each follow from the last, that is far above the
    previous token's experts (a table misaligned by one token would score like them). A file without
    --next-token, and a bad --table, are one line each."""
    from conftest import chain_text, make_mixtral
    from moe_prefetch.calibrate import main as calibrate_main

    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import next_token
    finally:
        sys.path.remove(str(ROOT / "bench"))
    ckpt = make_mixtral(tmp_path / "m", layers=3, experts=8, top_k=2, seed=5)
    text = chain_text(tmp_path / "chain.txt", 3000, 3)
    common = ["--model", str(ckpt), "--data", str(text), "--rank", "4", "--steps", "30", "--seq-len", "64",
              "--device", "cpu", "--json", "--no-progress", "--max-tokens", "2400"]
    wrap, plain = tmp_path / "wrap.safetensors", tmp_path / "plain.safetensors"
    assert calibrate_main(common + ["--lookahead", "3", "--next-token", "--out", str(wrap)]) == 0
    assert calibrate_main(common + ["--lookahead", "2", "--out", str(plain)]) == 0
    capsys.readouterr()
    bench = ["--model", str(ckpt), "--data", str(text), "--seq-len", "64", "--skip-tokens", "2400", "--table", "0.5"]
    assert next_token.main(bench + ["--predictor-path", str(wrap), "--out", str(tmp_path / "r")]) == 0
    r = json.loads((tmp_path / "r" / "next_token.json").read_text())
    assert [row["layer"] for row in r["rows"]] == [0, 1, 2] and r["chance"] == 0.25 and 0 <= r["lens_top1"] <= 1
    first = r["rows"][0]
    assert first["true_next_token"] > first["previous_token"] + 0.2, first
    for row in r["rows"]:
        assert all(0 <= row[c] <= 1 for c in ("true_next_token", "lens_and_table", "m2r2_from_last_layer", "m2r2_best"))
    # the next token's layer j is reached from layer i at d = 3 - i + j <= 3: layer 0 from layers 0-2, layer 2
    # from layer 2 only
    assert r["rows"][2]["m2r2_best_layer"] == 2 and r["rows"][2]["m2r2_best"] == r["rows"][2]["m2r2_from_last_layer"]
    assert "| 0 | " in (tmp_path / "r" / "next_token.md").read_text()
    capsys.readouterr()
    for extra, says in ((["--predictor-path", str(plain)], "was not calibrated with --next-token"),
                        (["--table", "1.5"], "--table is a fraction")):
        assert next_token.run_main(next_token.main, bench + extra) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and says in err[0], err


def test_paired_bench_reports_the_default_against_each_row_with_its_noise(tmp_path):
    """bench/paired.py: per mode and cache, every row's rounds, the default over each row with a 95%
    interval that holds its mean, and over the best row picked on the other half of the rounds, and the
    epochs eviction auto ran under each rule; bad input is one line."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    bench = str(ROOT / "bench" / "paired.py")
    for bad, said in ((["--rounds", "0"], "--rounds"), (["--caches", "1.5"], "--caches"),
                      (["--data", str(tmp_path / "none.txt")], "--data")):
        r = subprocess.run([sys.executable, bench, *bad], capture_output=True, text=True, env=env, timeout=120)
        assert r.returncode == 2 and said in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    r = subprocess.run([sys.executable, bench, "--rounds", "3", "--caches", "0.5", "--sequences", "1", "--seq-len", "6",
                        "--host-compute", "both", "--out", str(tmp_path), "--tag", "_t"],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    results = json.loads((tmp_path / "paired_t.json").read_text())["results"]
    assert [(x["host_compute"], x["cache"]) for x in results] == [(False, 0.5), (True, 0.5)]
    for x in results:
        names = list(x["rounds"])
        assert names[0].startswith("default") and len(names) == (6 if x["host_compute"] else 5)
        assert all(len(v) == 3 and min(v) > 0 for v in x["rounds"].values())
        assert set(x["default_over"]) == set(names[1:])
        for name, a in x["default_over"].items():
            ratios = [d / o for d, o in zip(x["rounds"][names[0]], x["rounds"][name])]
            assert abs(a["mean"] - sum(ratios) / 3) < 1e-9 and a["low"] <= a["mean"] <= a["high"]
            assert a["slower_beyond_noise"] == (a["high"] < 1.0)
        best = x["default_over_best"]
        assert {h["best"] for h in best["halves"]} <= set(names[1:]) and best["ratio"] > 0
        # which rules eviction auto ran, per round: the rows that run it (the default, auto eviction)
        assert set(x["eviction_epochs"]) == {names[0], "auto eviction, no prefetch"}
        assert all(len(v) == 3 and set(v[0]) == {"predictive", "lfu", "lru"} for v in x["eviction_epochs"].values())
    md = (tmp_path / "paired_t.md").read_text()
    assert "split halves" in md and md.count("| on | 50% |") == 9 and md.count("eviction auto's epochs") == 4


def test_load_model_leaves_transformers_logging_as_it_found_it(ckpt, capfd):
    """Loading quiets transformers' warnings about the skeleton only while it loads: a level left set
    on transformers' logger would quiet the user's own later loads, and (transformers reads an explicit
    level as "verify the tensor-parallel plan") make a plain from_pretrained warn "not sharded"."""
    import logging

    from transformers import AutoModelForCausalLM

    log = logging.getLogger("transformers.modeling_utils")
    before = log.level
    model, _ = mp.load_model(str(ckpt), mp.OffloadConfig(device="cpu", show_progress=False))
    model.moe_runtime.close()
    assert log.level == before
    capfd.readouterr()
    AutoModelForCausalLM.from_pretrained(ckpt)
    assert "not sharded" not in capfd.readouterr().err
