"""The CUDA autocast policies the emulation registers are exactly the ops that carry an
`AutocastCUDA` kernel in the installed torch (asked of the dispatcher; nothing is patched)."""

from __future__ import annotations

import torch

from probes.estimate.autocast_lists import all_cuda_autocast_ops


def test_lists_match_the_installed_torch() -> None:
    registered = {
        name.removeprefix("aten::")
        for name in torch._C._dispatch_get_all_op_names()
        if name.startswith("aten::") and torch._C._dispatch_has_kernel_for_dispatch_key(name, "AutocastCUDA")
    }
    assert set(all_cuda_autocast_ops()) == registered
