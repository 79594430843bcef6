"""Planning for a smaller card on a bigger one: the allocator cap that emulates it, and the cards
that cannot be emulated. (The cap itself is applied on a GPU: tests/gpu/test_cuda_probe.py.)"""

from __future__ import annotations

import pytest

from probes.cuda import plan_emulation
from tuner.errors import ProbeError
from tuner.spec import DeviceSpec

MIB = 1 << 20
H200 = DeviceSpec(name="NVIDIA H200", total_memory_bytes=150_119_636_992)
H100 = DeviceSpec(name="NVIDIA H100 80GB HBM3", total_memory_bytes=85_017_493_504)
CONTEXT = 1074 * MIB


def test_this_machines_own_gpu_is_measured_as_it_is() -> None:
    assert plan_emulation(None, H200, context_overhead_bytes=CONTEXT) is None
    assert plan_emulation(H200, H200, context_overhead_bytes=CONTEXT) is None


def test_a_smaller_card_caps_the_allocator_at_its_memory_less_its_own_context() -> None:
    emulation = plan_emulation(H100, H200, context_overhead_bytes=CONTEXT)
    assert emulation is not None
    assert emulation.target == H100 and emulation.host == H200
    assert emulation.allocator_limit_bytes == H100.total_memory_bytes - CONTEXT
    assert emulation.fraction == pytest.approx(emulation.allocator_limit_bytes / H200.total_memory_bytes)
    described = emulation.describe()
    assert "NVIDIA H100 80GB HBM3" in described and "emulated on NVIDIA H200" in described


@pytest.mark.parametrize(
    ("requested", "message"),
    [
        (DeviceSpec(name="Bigger", total_memory_bytes=200 << 30), "only a smaller card can be emulated"),
        (DeviceSpec(name="H200 NVL", total_memory_bytes=H200.total_memory_bytes), "only a smaller card"),
        (DeviceSpec(name="Tiny", total_memory_bytes=512 * MIB), "smaller than the CUDA context"),
    ],
)
def test_cards_that_cannot_be_emulated_are_refused(requested: DeviceSpec, message: str) -> None:
    with pytest.raises(ProbeError, match=message):
        plan_emulation(requested, H200, context_overhead_bytes=CONTEXT)
