"""Checkpoint reading, size parsing and memory planning."""
import json
import shutil

import pytest
import torch

from moe_prefetch.checkpoint import Checkpoint
from moe_prefetch.config import OffloadConfig, parse_size
from moe_prefetch.errors import MoePrefetchError
from conftest import make_mixtral


def test_views_match_safetensors_library(tiny_mixtral):
    from safetensors.torch import load_file

    ck = Checkpoint(tiny_mixtral)
    ref = load_file(tiny_mixtral / "model.safetensors")
    assert set(ck.keys()) == set(ref)
    for k, v in ref.items():
        assert torch.equal(ck.tensor(k), v), k


def test_sharded_checkpoint_is_indexed(tmp_path):
    path = make_mixtral(tmp_path / "sh", shard="30KB")
    files = list(path.glob("model-*.safetensors"))
    assert len(files) > 1
    ck = Checkpoint(path)
    index = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    assert set(ck.keys()) == set(index)


@pytest.mark.parametrize("cut", [4, 100, -10])
def test_truncated_file_is_refused(tmp_path, tiny_mixtral, cut):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_mixtral, bad)
    f = bad / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[:cut] if cut > 0 else data[:cut])
    with pytest.raises(MoePrefetchError, match="corrupt or truncated"):
        Checkpoint(bad)


def test_garbage_header_is_refused(tmp_path, tiny_mixtral):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_mixtral, bad)
    f = bad / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:20] = b"\xff" * 12
    f.write_bytes(bytes(data))
    with pytest.raises(MoePrefetchError, match="corrupt or truncated"):
        Checkpoint(bad)


@pytest.mark.parametrize("text,value", [("512MiB", 512 * 2**20), ("12GiB", 12 * 2**30), ("12GB", 12 * 10**9),
                                        ("1.5g", int(1.5 * 2**30)), ("1048576", 2**20), ("64 kb", 64000)])
def test_parse_size(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "abc", "12XB", "-5GiB", "0", "1e3GiB"])
def test_parse_size_rejects_malformed(text):
    with pytest.raises(MoePrefetchError):
        parse_size(text)


def test_config_validation_messages():
    with pytest.raises(MoePrefetchError, match="unknown device"):
        OffloadConfig(device="tpu")
    with pytest.raises(MoePrefetchError, match="positive number of experts"):
        OffloadConfig(expert_cache=0)
    assert OffloadConfig(device_memory="1GiB").device_memory == 2**30
    with pytest.raises(Exception):
        OffloadConfig().device = "cpu"  # frozen


def test_budget_below_minimum_names_the_minimum(tiny_mixtral):
    import moe_prefetch as mp

    with pytest.raises(MoePrefetchError, match=r"too small: the minimum is [\d.]+KiB"):
        mp.load_model(str(tiny_mixtral), mp.OffloadConfig(device="cpu", device_memory="20KiB", reserve=0,
                                                            show_progress=False))
    with pytest.raises(MoePrefetchError, match="below the minimum of 2 experts"):
        mp.load_model(str(tiny_mixtral), mp.OffloadConfig(device="cpu", expert_cache=1, show_progress=False))


def test_budget_sizes_the_cache(tiny_mixtral):
    import moe_prefetch as mp

    probe, _ = mp.load_model(str(tiny_mixtral), mp.OffloadConfig(device="cpu", expert_cache=2, reserve=0, show_progress=False))
    plan = probe.moe_runtime.plan
    budget = plan.dense_bytes + 5 * plan.expert_bytes + plan.expert_bytes // 2
    model, _ = mp.load_model(str(tiny_mixtral), mp.OffloadConfig(device="cpu", device_memory=budget, reserve=0,
                                                                  show_progress=False))
    assert model.moe_runtime.plan.slots == 5
    assert model.moe_runtime.offloader.pool.shape[0] == 5
