"""The Accelerator's precision: auto on the CPU (native bf16 for pretraining only), and one process
that runs stages of different precision one after the other."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from labelfew import engine
from labelfew.engine import accelerator as accelerators


@pytest.fixture(autouse=True)
def _float32_after() -> object:
    yield
    engine.make_accelerator("no", seed=0)  # the next test's stages start from float32 as before


@pytest.mark.parametrize(("native", "cpu_bf16", "expected"), [
    (True, True, "bf16"), (False, True, "no"), (True, False, "no"), (False, False, "no"),
])  # fmt: skip
def test_auto_is_bf16_on_the_cpu_only_with_native_bf16_and_only_where_asked(
    monkeypatch: pytest.MonkeyPatch, native: bool, cpu_bf16: bool, expected: str
) -> None:
    monkeypatch.setattr(accelerators, "native_cpu_bf16", lambda: native)
    made = engine.make_accelerator("auto", seed=0, cpu_bf16=cpu_bf16)
    assert made.device.type == "cpu" and made.mixed_precision == expected


@pytest.mark.parametrize(("avx512_bf16", "amx"), [(True, False), (False, True), (False, False)])
def test_native_bf16_is_avx512_bf16_or_amx(
    monkeypatch: pytest.MonkeyPatch, avx512_bf16: bool, amx: bool
) -> None:
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    assert engine.native_cpu_bf16() is (avx512_bf16 or amx)


def test_a_process_runs_a_bf16_stage_then_a_float32_one() -> None:
    """Accelerate keeps one precision per process; a script that pretrains (bf16 on a native-bf16
    CPU) and then fine-tunes (float32) once failed with "AcceleratorState has already been
    initialized". Each prepared model computes in its own stage's precision."""
    computed = []
    for precision in ("bf16", "no", "bf16"):
        made = engine.make_accelerator(precision, seed=0)
        layer = nn.Linear(4, 2)
        layer.register_forward_hook(lambda module, inputs, output: computed.append(output.dtype))
        made.prepare(nn.Sequential(layer))(torch.ones(3, 4))  # Accelerate returns float32 outputs
        assert made.mixed_precision == precision
    assert computed == [torch.bfloat16, torch.float32, torch.bfloat16]
