"""Host RAM plan (pin or stream, refuse up front), pinning failures and cleanup, VRAM reserve."""
from __future__ import annotations

import gc

import pytest
import torch

import moe_prefetch as mp
from moe_prefetch.budget import estimate_reserve
from moe_prefetch.errors import MoePrefetchError
from moe_prefetch.hostmem import PinnedBlocks, PinningError, host_margin, plan_host

GiB = 2**30
MIXTRAL_FP16_EXPERTS = 256 * 3 * 4096 * 14336 * 2  # 84 GiB


@pytest.mark.parametrize("ram_gib, mode, pinned", [
    (128, "auto", True), (128, "on", True), (128, "off", False),
    (64, "auto", False), (32, "auto", False), (32, "off", False),
])
def test_mixtral_host_plans(ram_gib, mode, pinned):
    total = ram_gib * GiB
    plan = plan_host(mode, "cuda", MIXTRAL_FP16_EXPERTS, available=total - 4 * GiB, total=total)
    assert plan.pinned is pinned
    assert plan.resident_bytes == (MIXTRAL_FP16_EXPERTS if pinned else 0)
    if mode == "auto" and not pinned:
        assert "84.0GiB" in plan.reason and "memory-mapped" in plan.reason


def test_pinning_that_does_not_fit_is_refused_with_the_numbers():
    with pytest.raises(MoePrefetchError) as e:
        plan_host("on", "cuda", MIXTRAL_FP16_EXPERTS, available=60 * GiB, total=64 * GiB)
    msg = str(e.value)
    assert "84.0GiB" in msg and "60.0GiB" in msg and "--pin-memory off" in msg and "\n" not in msg


def test_margin_is_kept():
    total = 100 * GiB
    margin = host_margin(total)
    assert margin == 10 * GiB
    assert plan_host("auto", "cuda", 90 * GiB - margin, available=90 * GiB, total=total).pinned
    assert not plan_host("auto", "cuda", 90 * GiB - margin + 1, available=90 * GiB, total=total).pinned


def test_cpu_backend_never_pins_and_checks_its_ram():
    assert not plan_host("auto", "cpu", 10 * GiB, device_side_bytes=GiB, available=8 * GiB, total=16 * GiB).pinned
    with pytest.raises(MoePrefetchError, match="needs a CUDA device"):
        plan_host("on", "cpu", GiB, available=8 * GiB, total=16 * GiB)
    with pytest.raises(MoePrefetchError, match="--device-memory"):
        plan_host("auto", "cpu", GiB, device_side_bytes=20 * GiB, available=8 * GiB, total=16 * GiB)


class FakeDriver:
    """cudaHostRegister/Unregister stand-ins: fail the n-th registration."""

    def __init__(self, fail_at=None):
        self.fail_at, self.calls, self.registered = fail_at, 0, set()

    def register(self, ptr, nbytes):
        self.calls += 1
        if self.calls == self.fail_at:
            return "out of memory"
        self.registered.add(ptr)
        return None

    def unregister(self, ptr):
        self.registered.remove(ptr)


def test_exact_size_blocks_and_release():
    drv = FakeDriver()
    blocks = PinnedBlocks(drv.register, drv.unregister)
    a = blocks.allocate(1000, torch.float16)
    assert a.numel() == 1000 and a.dtype == torch.float16  # exact size: no power-of-two rounding
    blocks.allocate(10, torch.float32)
    assert len(drv.registered) == 2
    blocks.release()
    assert not drv.registered


def test_failed_registration_releases_everything_pinned_before():
    drv = FakeDriver(fail_at=3)
    blocks = PinnedBlocks(drv.register, drv.unregister)
    blocks.allocate(100, torch.float32)
    blocks.allocate(100, torch.float32)
    with pytest.raises(PinningError, match="--pin-memory off"):
        blocks.allocate(100, torch.float32)
    assert not drv.registered and blocks.count == 0


def test_blocks_are_unpinned_when_collected():
    drv = FakeDriver()
    blocks = PinnedBlocks(drv.register, drv.unregister)
    blocks.allocate(100, torch.float32)
    del blocks
    gc.collect()
    assert not drv.registered


def test_store_failing_mid_load_unpins_what_it_pinned(tiny_mixtral):
    from moe_prefetch.checkpoint import Checkpoint
    from moe_prefetch.families import adapter_for
    from moe_prefetch.runtime import _load_config
    from moe_prefetch.store import ExpertStore

    adapter = adapter_for(_load_config(tiny_mixtral), Checkpoint(tiny_mixtral))
    drv = FakeDriver(fail_at=2)  # the second layer's block
    with pytest.raises(PinningError):
        ExpertStore(Checkpoint(tiny_mixtral), adapter, torch.float32, pinned=True,
                    blocks=PinnedBlocks(drv.register, drv.unregister))
    assert not drv.registered
    ok = FakeDriver()
    store = ExpertStore(Checkpoint(tiny_mixtral), adapter, torch.float32, pinned=True,
                        blocks=PinnedBlocks(ok.register, ok.unregister))
    assert len(ok.registered) == len(adapter.moe_layers())  # one exact-size block per layer
    unpinned = ExpertStore(Checkpoint(tiny_mixtral), adapter, torch.float32)
    for key in [(0, 0), (1, 3)]:  # the packed copy holds the checkpoint's bytes
        flat = torch.cat([s.reshape(-1) for _, s in unpinned.pieces(*key)])
        assert torch.equal(store.pieces(*key)[0][1], flat)
        again = unpinned.pieces(*key)
        assert again is unpinned.pieces(*key) and all(t.data_ptr() == u.data_ptr() for (_, t), (_, u) in
                                                      zip(again, unpinned._mapped_pieces(*key)))  # views, made once


def test_pin_on_for_cpu_is_one_line_error(tiny_mixtral, capsys):
    from moe_prefetch.run import main

    assert main(["--model", str(tiny_mixtral), "--device", "cpu", "--pin-memory", "on", "--no-progress"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "CUDA" in err[0]


def test_stats_say_where_experts_live(tiny_mixtral):
    model, _ = mp.load_model(str(tiny_mixtral), mp.OffloadConfig(device="cpu", expert_cache=4, show_progress=False))
    assert mp.stats(model)["host_store"] == "memory-mapped"
    model.moe_runtime.close()


def test_reserve_is_quadratic_only_for_eager_attention():
    from transformers import MixtralConfig

    cfg = MixtralConfig()  # Mixtral-8x7B's shape
    sdpa = estimate_reserve(cfg, torch.bfloat16, 32768, 2, torch.device("cuda"), "sdpa")
    eager = estimate_reserve(cfg, torch.bfloat16, 32768, 2, torch.device("cuda"), "eager")
    kv = 2 * 32 * 8 * 128 * 32768 * 2
    assert kv < sdpa < kv + 8 * GiB, "SDPA: KV cache plus linear activations"
    assert eager - sdpa == 32 * 32768 * 32768 * 8, "eager: the [heads, T, T] scores and their float32 softmax"
    short = estimate_reserve(cfg, torch.bfloat16, 2048, 2, torch.device("cuda"), "sdpa")
    assert abs(short * 16 - sdpa) / sdpa < 0.01, "grows linearly with the context"


def test_budget_from_free_memory_keeps_the_slack():
    from moe_prefetch.budget import plan_memory

    cfg = mp.OffloadConfig(device="cpu", device_slack="1GiB")
    assert cfg.device_slack == GiB
    assert mp.OffloadConfig(device_slack=0).device_slack == 0
    plan = plan_memory(mp.OffloadConfig(device="cpu", device_memory="10GiB"), GiB, GiB, GiB, 100, 2, torch.device("cpu"))
    assert plan.slots == 8
