"""`tuner plan` (docs/contract.md): micro-batch, accumulation steps and checkpointing for an effective
batch, planned here (probe, then `tuner.planner.make_plan`) or by a tuner service."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from enum import StrEnum
from typing import TYPE_CHECKING, Any

import typer

from tuner.cli._common import clear_errors, fail, on_off, print_json, size_option
from tuner.cli._memory_chart import PlannedPoint, memory_chart_lines
from tuner.cli._options import (
    ALLOC_CONF_HELP,
    PARALLELISM_HELP,
    BackendChoice,
    alloc_conf_option,
    parallelism_option,
    resolve_backend,
    target_device,
)
from tuner.cli._progress import trial_progress

if TYPE_CHECKING:
    from contextlib import AbstractContextManager

    from tuner.parallelism import ParallelismSpec
    from tuner.plan_probes import ExtraProbes, ProbeNeed
    from tuner.results import Plan, ProbeResult
    from tuner.search_types import Trial
    from tuner.spec import Backend, DeviceSpec, PlanRequest, WorkloadSpec


class CheckpointingChoice(StrEnum):
    auto = "auto"
    on = "on"
    off = "off"


def plan(
    spec: str = typer.Argument(..., help="Workload spec JSON file."),
    effective_batch_size: int = typer.Option(
        ..., "--effective-batch-size", help="Samples per optimizer step."
    ),
    world_size: int = typer.Option(1, "--world-size", help="Data-parallel ranks."),
    local: bool = typer.Option(
        False, "--local", help="Probe on this machine (the default without --server or TUNER_SERVER)."
    ),
    server: str | None = typer.Option(None, "--server", help="Tuner service URL (default: TUNER_SERVER)."),
    backend: BackendChoice | None = typer.Option(
        None,
        "--backend",
        help="cuda: real trials on a GPU; estimate: GPU-free trace for --device-memory. "
        "Default here: estimate with --device-memory, else cuda on this machine's GPU.",
        show_default=False,
    ),
    device_memory: str | None = typer.Option(
        None,
        "--device-memory",
        help="Target device memory, e.g. 80GiB or 40GB: the estimate's card, or with --backend cuda a "
        "smaller card emulated on this GPU.",
    ),
    device_name: str | None = typer.Option(None, "--device-name", help="Target device name."),
    checkpointing: CheckpointingChoice = typer.Option(
        CheckpointingChoice.auto, "--checkpointing", help="auto: probe both and choose by predicted speed."
    ),
    margin: float = typer.Option(0.05, "--margin", help="Fraction of device memory kept free."),
    max_micro_batch_size: int | None = typer.Option(
        None, "--max-micro-batch-size", help="Never plan a larger micro-batch."
    ),
    allow_uneven: bool = typer.Option(
        False, "--allow-uneven", help="Allow micro-batches of different sizes when no divisor fits well."
    ),
    ramp_start: int | None = typer.Option(
        None, "--ramp-start", help="Batch-size ramp: the effective batch at step 0 (needs --ramp-steps)."
    ),
    ramp_steps: int | None = typer.Option(None, "--ramp-steps", help="Batch-size ramp: its length in steps."),
    wait: float = typer.Option(300.0, "--wait", help="With --server: seconds to wait for a probe job."),
    alloc_conf: str | None = typer.Option(
        None, "--alloc-conf", envvar="PYTORCH_CUDA_ALLOC_CONF", help=ALLOC_CONF_HELP
    ),
    min_seq_len: int | None = typer.Option(
        None,
        "--min-seq-len",
        help="Token inputs whose lengths vary from this to the spec's seq_len: also plan a token budget "
        "(max tokens per micro-batch).",
    ),
    effective_tokens: int | None = typer.Option(
        None, "--effective-tokens", help="With --min-seq-len: tokens per optimizer step to reach."
    ),
    plan_eval: bool = typer.Option(
        False,
        "--eval",
        help="Also plan an eval micro-batch (forward only, no grad, with the training state resident).",
    ),
    parallelism: str | None = typer.Option(None, "--parallelism", help=PARALLELISM_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print the plan as JSON."),
) -> None:
    """Plan micro-batch size, accumulation steps and gradient checkpointing for an effective batch."""
    with clear_errors():
        from tuner.settings import get_settings

        if local and server:
            fail("Give either --local or --server, not both.")
        server_url = None if local else (server or get_settings().server)
        total_memory = size_option(device_memory)
        chosen_backend = _resolve_backend(backend, total_memory, remote=server_url is not None)
        device = _device(chosen_backend, total_memory, device_name, remote=server_url is not None)
        from tuner.spec import load_workload_file

        workload = _with_length_range(load_workload_file(spec), min_seq_len)
        policy: dict[str, Any] = {
            "gradient_checkpointing": checkpointing.value,
            "memory_margin": margin,
            "max_micro_batch_size": max_micro_batch_size,
            "allow_uneven_micro_batches": allow_uneven,
            "eval": plan_eval,
        }
        if (ramp_start is None) != (ramp_steps is None):
            fail("A ramp needs both --ramp-start and --ramp-steps.")
        if ramp_start is not None:
            policy["ramp"] = {"start_effective_batch_size": ramp_start, "ramp_steps": ramp_steps}
        conf = alloc_conf_option(alloc_conf)
        parallel = parallelism_option(parallelism, world_size)
        request = _request(
            workload,
            effective_batch_size,
            world_size,
            device,
            chosen_backend,
            policy,
            conf,
            effective_tokens,
            parallel.parallelism,
        )
        from tuner.intake import refuse_what_cannot_fit

        refuse_what_cannot_fit(request)  # a card too small for the parameters alone: no probe
        eval_trials: list[Trial] = []
        if server_url is not None:
            result, trials, eval_trials = _plan_on_server(
                server_url, request, wait, with_trials=not as_json, show_progress=sys.stderr.isatty()
            )
        else:
            result, probes, extras = _plan_locally(request, show_progress=sys.stderr.isatty())
            trials = probes[result.gradient_checkpointing].trials
            eval_trials = extras.eval.trials if extras.eval is not None else []
    if as_json:
        print_json(result)
    else:
        print_plan(result, trials, eval_trials)


def _with_length_range(workload: WorkloadSpec, min_seq_len: int | None) -> WorkloadSpec:
    """The spec with `--min-seq-len` as its `inputs.min_seq_len` (validated as the API does)."""
    if min_seq_len is None:
        return workload
    from tuner.errors import SpecError
    from tuner.spec import parse_workload

    data = workload.model_dump(mode="json")
    if data["inputs"]["kind"] != "tokens":
        raise SpecError(
            f"--min-seq-len needs token inputs (inputs.kind 'tokens'), got {data['inputs']['kind']!r}."
        )
    data["inputs"]["min_seq_len"] = min_seq_len
    try:
        return parse_workload(data)
    except SpecError as exc:
        raise SpecError(exc.message.replace("workload spec", "--min-seq-len", 1)) from None


def _resolve_backend(choice: BackendChoice | None, total_memory: int | None, *, remote: bool) -> Backend:
    if remote and choice is None and total_memory is None:
        return "cuda"  # the service's cuda workers measure their own GPUs
    return resolve_backend(
        choice,
        total_memory,
        no_gpu_error="This machine has no CUDA GPU: pass --device-memory (e.g. 80GiB) to plan with the "
        "GPU-free estimate backend, or --server to ask a tuner service.",
    )


def _device(
    backend: Backend, total_memory: int | None, name: str | None, *, remote: bool
) -> DeviceSpec | None:
    from tuner.errors import DeviceRequiredError

    if backend == "estimate" and total_memory is None:
        raise DeviceRequiredError(
            "The estimate backend needs the target device's memory: pass --device-memory, e.g. 80GiB."
        )
    # With the cuda backend, a --device-memory smaller than this machine's GPU is emulated on it
    # (probes.cuda.plan_emulation); a service's workers check a requested device against their own.
    return target_device(total_memory, name)


def _request(
    workload: WorkloadSpec,
    effective_batch_size: int,
    world_size: int,
    device: DeviceSpec | None,
    backend: Backend,
    policy: dict[str, Any],
    alloc_conf: str | None = None,
    effective_tokens: int | None = None,
    parallelism: ParallelismSpec | None = None,
) -> PlanRequest:
    from tuner.spec import parse_plan_request

    return parse_plan_request(
        {
            "workload": workload.model_dump(mode="json"),
            "effective_batch_size": effective_batch_size,
            "world_size": world_size,
            "device": device.model_dump(mode="json") if device else None,
            "backend": backend,
            "policy": policy,
            "alloc_conf": alloc_conf,
            "effective_tokens": effective_tokens,
            "parallelism": parallelism.model_dump(mode="json") if parallelism else None,
        }
    )


def _plan_locally(
    request: PlanRequest, *, show_progress: bool
) -> tuple[Plan, dict[bool, ProbeResult], ExtraProbes]:
    """Probe each checkpointing choice the policy needs (and the eval step and a token budget's
    lengths where asked), one after the other, then plan."""
    from tuner.integration import probe_plan_locally
    from tuner.planner import make_plan

    def progress_for(need: ProbeNeed) -> AbstractContextManager[Any]:
        return trial_progress(
            need.workload,
            request.backend,
            need.gradient_checkpointing,
            show=show_progress,
            what=None if need.role == "train" else need.describe(),
        )

    probes, extras, _ = probe_plan_locally(request, progress_for=progress_for)
    return make_plan(request, probes, extras), probes, extras


def _plan_on_server(
    base_url: str, request: PlanRequest, wait: float, *, with_trials: bool, show_progress: bool
) -> tuple[Plan, list[Trial], list[Trial]]:
    """The server's plan and, for the chart, the trials of the probe it was made from; while a
    probe job runs for it, its progress (`show_progress`: on a terminal)."""
    from tuner.client import TunerClient
    from tuner.errors import ServiceError
    from tuner.settings import get_settings

    token = get_settings().api_token
    with TunerClient(base_url, token=token.get_secret_value() if token else None) as client:
        # Asked without holding the request, so that a probe job's progress shows while it runs
        # (a cached plan still answers at once).
        result: Plan = client.create_plan(request, wait=0, max_seconds=wait, progress=show_progress)
        probe_id = result.probe_ids.get(on_off(result.gradient_checkpointing), result.probe_id)
        trials: list[Trial] = []
        eval_trials: list[Trial] = []
        if with_trials and probe_id is not None:
            try:
                trials = client.get_probe(probe_id).trials
                if result.eval_probe_id is not None:
                    eval_trials = client.get_probe(result.eval_probe_id).trials
            except ServiceError as exc:  # the plan stands; only its picture is missing
                print(f"(no memory chart: {exc.message})", file=sys.stderr)
    return result, trials, eval_trials


def print_plan(plan: Plan, trials: Sequence[Trial] = (), eval_trials: Sequence[Trial] = ()) -> None:
    """The plan as a table on stdout, the memory curve of the trials it was made from (and of the
    eval probe's), then its reason, warnings and hints."""
    from rich.console import Console
    from rich.table import Table

    out = Console()
    table = Table(title=f"Plan for {plan.workload.describe()} on {plan.device.name}", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    for row in plan_rows(plan):
        table.add_row(*row)
    out.print(table)
    for line in _plan_charts(plan, trials, eval_trials):
        out.print(line, highlight=False)
    out.print(plan.reason, highlight=False)
    for warning in plan.warnings:
        out.print(f"[yellow]warning:[/] {warning}", highlight=False)
    for hint in plan.hints:
        out.print(f"[cyan]hint:[/] {hint}", highlight=False)


def plan_rows(plan: Plan) -> list[tuple[str, str]]:
    """The plan table's rows: the split, the memory it was planned in, and what the request added
    (eval micro-batch, token budget, memory per rank, ramp)."""
    from tuner.planner import Split, describe_split
    from tuner.units import format_bytes

    rows: list[tuple[str, str]] = []
    if plan.micro_batch_sizes:
        split = Split(plan.micro_batch_size, plan.accumulation_steps, tuple(plan.micro_batch_sizes))
        rows.append(("micro-batches per rank", f"{describe_split(split)} (uneven)"))
    else:
        rows.append(("micro-batch size", str(plan.micro_batch_size)))
    largest = ", ".join(f"{key}: {value}" for key, value in plan.max_micro_batch_size.items())
    rows += [
        ("accumulation steps", str(plan.accumulation_steps)),
        ("world size", str(plan.world_size)),
        ("parallelism", plan.parallelism.describe(plan.world_size)),
        ("effective batch", str(plan.effective_batch_size)),
        ("gradient checkpointing", on_off(plan.gradient_checkpointing)),
        ("largest micro-batch", largest),
        ("memory budget", format_bytes(plan.memory_budget_bytes)),
        ("predicted peak", format_bytes(plan.predicted_peak_bytes)),
    ]
    if plan.predicted_samples_per_second is not None:
        rows.append(("predicted samples/s", f"{plan.predicted_samples_per_second:.1f} per device"))
    if plan.eval_micro_batch_size is not None:
        rows.append(("eval micro-batch", str(plan.eval_micro_batch_size)))
    rows += _token_budget_rows(plan)
    rows.append(("backend", plan.backend))
    rows += memory_per_rank_rows(plan.memory_per_rank)
    if plan.accumulation_schedule:
        ramp = ", ".join(
            f"{entry['accumulation_steps']} until step {entry['until_step']}"
            for entry in plan.accumulation_schedule
        )
        rows.append(("ramp (accumulation)", ramp))
    return rows


def _token_budget_rows(plan: Plan) -> list[tuple[str, str]]:
    budget = plan.token_budget
    if budget is None:
        return []
    per_length = ", ".join(f"{point.seq_len}: {point.max_batch_size}" for point in budget.lengths)
    rows = [
        (
            "max tokens per micro-batch",
            f"{budget.max_tokens_per_micro_batch} (lengths {budget.min_seq_len}–{budget.seq_len}, "
            f"set by {budget.limiting_seq_len})",
        ),
        ("largest batch by length", per_length),
    ]
    if budget.accumulation_steps is not None:
        rows.append(
            (
                "token accumulation",
                f"{budget.accumulation_steps} micro-batches of ≤ {budget.tokens_per_micro_batch} tokens "
                f"for {budget.effective_tokens} tokens",
            )
        )
    return rows


def _plan_charts(plan: Plan, trials: Sequence[Trial], eval_trials: Sequence[Trial]) -> list[str]:
    """The memory curve of the train trials with the planned point, then the eval probe's."""
    planned = None
    if plan.predicted_peak_bytes is not None:
        planned = PlannedPoint(plan.micro_batch_size, plan.predicted_peak_bytes)
    chart = memory_chart_lines(
        trials, plan.device.total_memory_bytes, budget_bytes=plan.memory_budget_bytes, planned=planned
    )
    if plan.eval_micro_batch_size is not None and plan.eval_predicted_peak_bytes is not None:
        chart += memory_chart_lines(
            eval_trials,
            plan.device.total_memory_bytes,
            budget_bytes=plan.memory_budget_bytes,
            planned=PlannedPoint(plan.eval_micro_batch_size, plan.eval_predicted_peak_bytes),
            heading="Eval: peak reserved memory by batch, training state resident",
        )
    return chart


MEMORY_CATEGORIES = ("parameters", "gradients", "buckets", "optimizer_state", "activations")


def memory_per_rank_rows(memory: dict[str, int] | None) -> list[tuple[str, str]]:
    """Table rows of one rank's bytes per category (`Plan.memory_per_rank`): none without it,
    DDP's buckets only where there are any."""
    from tuner.units import format_bytes

    if not memory:
        return []
    rows = [(f"per rank at {memory.get('micro_batch_size', '?')}", "")]
    for name in MEMORY_CATEGORIES:
        if name in memory and (memory[name] or name != "buckets"):
            rows.append((f"  {name.replace('_', ' ')}", format_bytes(memory[name])))
    return rows
