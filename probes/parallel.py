"""One rank of a data-parallel job, on one device, without the other ranks.

Both backends run the canonical step on a model wrapped here, so that what one rank of the job
holds is what the trace (or the one GPU) sees:

- FSDP: `fully_shard` per block and at the root over a fake process group (`FakeStore`) of the
  job's world size. The collectives do nothing, but every buffer they write into (the all-gather
  outputs, the reduce-scatter inputs, the sharded gradients) is allocated as it would be, so a
  trace of rank 0 holds what one rank of 64 holds. Works on fake CPU tensors and on a real GPU.
- DDP: the reducer (C++) needs real data and a real process group, so under `FakeTensorMode` its
  memory is modelled by `DdpBuckets`: the same bucket assignment PyTorch computes
  (`dist._compute_bucket_assignment_by_size`, parameters in reverse order, per dtype, 1 MiB first
  bucket then `bucket_cap_mb`), one flat gradient buffer per bucket allocated when DDP is built,
  and each gradient copied into its bucket as it is ready (`gradient_as_bucket_view=False`: the
  gradient keeps its own storage too) or replaced by its view into the bucket (`True`: the fresh
  gradient dies at once). `tests/probes/test_parallel_real.py` checks both against the real
  thing on gloo.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils._python_dispatch import _disable_current_modes

from tuner.errors import ModelBuildError, SpecError
from tuner.parallelism import FIRST_BUCKET_MB, ParallelismSpec, ParallelSetup

MIB = 1 << 20
_PARAM_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def fully_shard_available() -> bool:
    """Whether this torch has FSDP2's `fully_shard` (torch ≥ 2.6 exports it publicly)."""
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        return False
    return True


def require_fully_shard() -> None:
    """A `SpecError` naming the field where this torch has no `fully_shard`."""
    if not fully_shard_available():
        raise SpecError(
            f"parallelism.strategy 'fsdp' needs FSDP2's fully_shard, which torch {torch.__version__} "
            "does not have (torch 2.6 or later); use 'ddp'."
        )


@contextlib.contextmanager
def fake_process_group(world_size: int, *, rank: int = 0) -> Iterator[None]:
    """A default process group of `world_size` ranks whose collectives do nothing (this process
    is `rank`), for the duration of the block. Refuses to replace a real one."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError("A process group is initialised already; one rank is traced alone.")
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()


def blocks_of(model: nn.Module, *, what: str = "model") -> list[nn.Module]:
    """The model's repeated blocks, which FSDP shards one by one: a builtin model's `blocks`, a
    transformers model's decoder/encoder layers (the `ModuleList` of one repeated class holding
    the most parameters). Raises `ModelBuildError` naming the field where there is none."""
    best: list[nn.Module] = []
    best_params = 0
    for module in model.modules():
        if not isinstance(module, nn.ModuleList) or len(module) < 1:
            continue
        children = list(module)
        if len({type(child) for child in children}) != 1:
            continue
        params = sum(p.numel() for child in children for p in child.parameters())
        if params > best_params:
            best, best_params = children, params
    if not best:
        raise ModelBuildError(
            f"parallelism.strategy 'fsdp': the {what} has no list of repeated blocks (an nn.ModuleList "
            "of one block class) to shard one by one; use 'ddp'."
        )
    return best


def apply_fsdp(model: nn.Module, spec: ParallelismSpec, world_size: int, device_type: str) -> nn.Module:
    """`fully_shard` each block, then the root, over a 1-D mesh of `world_size` ranks on
    `device_type` (the default process group must be of that size). Returns the model, now an
    `FSDPModule`; build the optimizer after this, over its sharded parameters."""
    require_fully_shard()
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    # The mesh holds real rank numbers and reads them: made outside any fake or tracking mode.
    with _disable_current_modes():
        mesh = init_device_mesh(device_type, (world_size,))
    dtype = _PARAM_DTYPES[spec.param_dtype] if spec.param_dtype else None
    policy = MixedPrecisionPolicy(param_dtype=dtype)
    for block in blocks_of(model):
        fully_shard(block, mesh=mesh, reshard_after_forward=spec.reshard_after_forward, mp_policy=policy)
    # The root keeps its (embedding, head) parameters gathered from forward to backward anyway.
    fully_shard(model, mesh=mesh, reshard_after_forward=spec.reshard_after_forward, mp_policy=policy)
    return model


def bucket_layout(parameters: list[torch.Tensor], bucket_cap_mb: float) -> list[list[int]]:
    """Which parameters share each DDP bucket, in PyTorch's own words: the indices into
    `parameters` (the module's trainable ones in registration order), as
    `DistributedDataParallel.__init__` computes them (reverse order, per dtype, 1 MiB first)."""
    limits = [int(FIRST_BUCKET_MB * MIB), int(bucket_cap_mb * MIB)]
    indices = list(range(len(parameters)))[::-1]
    reversed_params = [parameters[i] for i in indices]
    assignment, _limits = dist._compute_bucket_assignment_by_size(
        reversed_params, limits, [False] * len(parameters), list(range(len(parameters)))
    )
    return [[indices[j] for j in bucket] for bucket in assignment]


@dataclass
class DdpBuckets:
    """The reducer's gradient buckets of one DDP rank, modelled on fake (or real) tensors.

    `attach` allocates one flat buffer per bucket (what DDP's constructor does) and hooks every
    trainable parameter so that its gradient goes into its bucket when ready. The collectives
    themselves are not run: only their memory matters here."""

    buffers: list[torch.Tensor] = field(default_factory=list)
    views: dict[int, torch.Tensor] = field(default_factory=dict)
    handles: list[Any] = field(default_factory=list)

    @classmethod
    def attach(cls, model: nn.Module, spec: ParallelismSpec) -> DdpBuckets:
        parameters = [p for p in model.parameters() if p.requires_grad]
        buckets = cls()
        for members in bucket_layout(parameters, spec.bucket_cap_mb):
            total = sum(parameters[i].numel() for i in members)
            # A bucket holds one dtype (the assignment splits by dtype).
            first = parameters[members[0]]
            buffer = torch.zeros(total, dtype=first.dtype, device=first.device)
            buckets.buffers.append(buffer)
            offset = 0
            for i in members:
                count = parameters[i].numel()
                buckets.views[id(parameters[i])] = buffer[offset : offset + count].view_as(parameters[i])
                offset += count
        for parameter in parameters:
            view = buckets.views[id(parameter)]
            buckets.handles.append(
                parameter.register_post_accumulate_grad_hook(
                    _into_bucket(view, as_view=spec.gradient_as_bucket_view)
                )
            )
        return buckets

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()


def _into_bucket(view: torch.Tensor, *, as_view: bool) -> Any:
    def hook(parameter: torch.Tensor) -> None:
        grad = parameter.grad
        if grad is None or grad is view:
            return
        view.copy_(grad)
        if as_view:
            # gradient_as_bucket_view: the gradient becomes the bucket's view, its own storage dies.
            parameter.grad = view

    return hook


def local_tensors(tensors: Iterable[torch.Tensor | None]) -> list[torch.Tensor | None]:
    """Each tensor's local shard where it is a `DTensor` (FSDP's parameters, gradients and
    optimizer state): the storage this rank holds."""
    return [getattr(t, "_local_tensor", t) for t in tensors]


@dataclass
class Rank:
    """One rank of the job around a built workload (see `one_rank`)."""

    workload: Any
    setup: ParallelSetup
    buckets: DdpBuckets | None = None

    def attach_buckets(self) -> list[torch.Tensor]:
        """DDP: allocate the reducer's buckets and route each gradient into its bucket (call it
        after any other gradient hook, so that the fresh gradient is seen first). Returns the
        bucket buffers; nothing for other strategies."""
        if self.setup.parallelism.strategy != "ddp":
            return []
        self.buckets = DdpBuckets.attach(self.workload.model, self.setup.parallelism)
        return list(self.buckets.buffers)

    def close(self) -> None:
        if self.buckets is not None:
            self.buckets.remove()


@contextlib.contextmanager
def one_rank(workload: Any, setup: ParallelSetup, device_type: str) -> Iterator[Rank]:
    """`workload` (a `BuiltWorkload`) as rank 0 of `setup` for the block: FSDP shards its model in
    place over a fake process group of the job's world size (which lives until the block ends);
    DDP's buckets come with `Rank.attach_buckets`. Build the optimizer inside the block."""
    rank = Rank(workload, setup)
    if setup.parallelism.strategy != "fsdp":
        yield rank
    elif dist.is_initialized():
        # A real group (the tests' gloo ranks, which check the fake one): shard over it.
        if dist.get_world_size() != setup.world_size:
            raise RuntimeError(
                f"The process group has {dist.get_world_size()} ranks; the setup asks for {setup.world_size}."
            )
        apply_fsdp(workload.model, setup.parallelism, setup.world_size, device_type)
        yield rank
    else:
        with fake_process_group(setup.world_size):
            apply_fsdp(workload.model, setup.parallelism, setup.world_size, device_type)
            yield rank


def start_fake_process_group(world_size: int) -> None:
    """This process as rank 0 of a fake group of `world_size` (for the rest of its life: the
    cuda backend's child process); a fake group of that size already there is kept."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        if dist.get_backend() == "fake" and dist.get_world_size() == world_size:
            return
        raise RuntimeError("A process group is initialised already; one rank is probed alone.")
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)


def wrap_one_rank(workload: Any, setup: ParallelSetup, device_type: str = "cuda") -> Any:
    """`workload` (a `BuiltWorkload` on `device_type`) as rank 0 of `setup`, for the cuda backend:
    the real wrappers over a fake process group, so that the collectives are free while every
    buffer (FSDP's all-gather outputs and sharded gradients, DDP's reducer buckets) is a real
    allocation. Returns the workload to train (a copy whose model is the DDP wrapper, or the same
    one with its model sharded in place). The fake group stays for the rest of the process."""
    from dataclasses import replace

    from torch.distributed.algorithms.ddp_comm_hooks.debugging_hooks import noop_hook

    spec = setup.parallelism
    if spec.strategy == "none":
        return workload
    start_fake_process_group(setup.world_size)
    if spec.strategy == "fsdp":
        apply_fsdp(workload.model, spec, setup.world_size, device_type)
        return workload
    ddp = nn.parallel.DistributedDataParallel(
        workload.model,
        device_ids=[torch.cuda.current_device()] if device_type == "cuda" else None,
        bucket_cap_mb=spec.bucket_cap_mb,
        gradient_as_bucket_view=spec.gradient_as_bucket_view,
    )
    # The fake group's all-reduce completes with no result, which the reducer refuses; the
    # no-op hook hands each bucket back as reduced, so the buckets are real and the sums free.
    ddp.register_comm_hook(None, noop_hook)
    return replace(workload, model=ddp)
