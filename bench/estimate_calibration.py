"""The estimate against real H100 runs: the device model's fit on the calibration file, every
point before (the constant device model and the step that dropped its outputs) and after (the
loop shape of the run, the allocator replay with the run's history), and the largest micro-batch
each predicts against the H100's.

    .venv/bin/python bench/estimate_calibration.py [--calibration FILE]

Prints markdown tables; docs/estimate.md holds the latest run.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from probes.child import run_in_child  # noqa: E402

CALIBRATION = REPO.parent / "shared" / "calibration" / "h100-gpt2.json"
MIB = 1 << 20
SEGMENT = 2 * MIB
# The constant device model the allocator replay replaced: traced peak + 80 MiB, reserved ×1.05
# without and ×1.15 with checkpointing, 800 MiB of context; its step dropped the outputs.
BEFORE_UNTRACKED = 80 * MIB
BEFORE_FRAGMENTATION = {False: 1.05, True: 1.15}
BEFORE_CONTEXT = 800 * MIB


def _before(allocated_traced: int, checkpointing: bool) -> tuple[int, int]:
    allocated = allocated_traced + BEFORE_UNTRACKED
    reserved = math.ceil(allocated * BEFORE_FRAGMENTATION[checkpointing] / SEGMENT) * SEGMENT
    return allocated, reserved


def _measure(path: str) -> dict[str, object]:
    from probes.estimate.calibration import calibrate, load_calibration
    from probes.estimate.session import EstimateSession, calibration_tracer, search_max_batch
    from tuner.search import find_max_batch
    from tuner.search_types import Trial
    from tuner.spec import LoopSpec

    data = load_calibration(path)
    session = EstimateSession()
    started = time.perf_counter()
    fit = calibrate(data, calibration_tracer(session))
    fit_seconds = time.perf_counter() - started
    before: dict[tuple[str, int], tuple[int, int]] = {}
    for cal_set in data.sets:
        released = cal_set.spec.model_copy(update={"loop": LoopSpec(keeps_outputs=False)})
        for real in cal_set.trials:
            ckpt = cal_set.gradient_checkpointing
            traced = session.step_trace(released, real.batch_size, gradient_checkpointing=ckpt)
            before[(cal_set.name, real.batch_size)] = _before(traced.peak_bytes, ckpt)
    largest = []
    total = data.total_memory_bytes
    for cal_set in data.sets:
        if cal_set.fresh_process:
            continue
        truth = max(t.batch_size for t in cal_set.trials if t.ok)
        released = cal_set.spec.model_copy(update={"loop": LoopSpec(keeps_outputs=False)})
        ckpt = cal_set.gradient_checkpointing

        def old_fits(b: int, spec: object = released, checkpointing: bool = ckpt) -> Trial:
            traced = session.step_trace(spec, b, gradient_checkpointing=checkpointing)  # type: ignore[arg-type]
            allocated, reserved = _before(traced.peak_bytes, checkpointing)
            return Trial(b, reserved <= total - BEFORE_CONTEXT, allocated, reserved, traced.seconds)

        old = find_max_batch(old_fits, strategy="doubling", max_batch_size=4096).max_batch_size
        started = time.perf_counter()
        new = search_max_batch(
            cal_set.spec, total, gradient_checkpointing=ckpt, alloc_conf=cal_set.alloc_conf
        ).max_batch_size
        largest.append((cal_set.name, truth, old, new, time.perf_counter() - started))
    return {
        "fit": fit,
        "fit_seconds": fit_seconds,
        "before": before,
        "largest": largest,
        "device": data.device_name,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calibration", type=Path, default=CALIBRATION)
    args = parser.parse_args()
    result = run_in_child(_measure, str(args.calibration), timeout=3600, what="calibration")
    fit = result["fit"]
    model = fit.device_model
    print(f"Fitted on {args.calibration.name} ({result['device']}) in {result['fit_seconds']:.0f} s:")
    context = model.context_overhead_bytes
    print(
        f"- context_overhead_bytes {context:,} ({context / MIB:,.0f} MiB); allocator capacity "
        f"{fit.capacity_low_bytes / MIB:,.0f} MiB, consistent up to "
        f"{(fit.capacity_high_bytes or 0) / MIB:,.0f} MiB: {'yes' if fit.consistent else 'no'}"
    )
    per_set = ", ".join(f"{v / MIB:.1f}" for v in fit.untracked_by_set.values())
    untracked = model.persistent_untracked_bytes
    print(f"- persistent_untracked_bytes {untracked:,} ({untracked / MIB:.1f} MiB; per set: {per_set})")
    print(
        f"- activation_slack {model.activation_slack:.4f} (16-bit compute; ×2 for fp32), "
        f"with checkpointing {model.activation_slack_checkpointing:.4f}\n"
    )
    print(
        "| set | b | real | real alloc MiB | real res MiB | before alloc | before res | after alloc "
        "| after res | after res/alloc vs real |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for p in fit.points:
        b_alloc, b_res = result["before"][(p.set_name, p.batch_size)]
        slack = model.slack_bytes(
            p.activation_bytes,
            gradient_checkpointing="checkpointing on" in p.set_name,
            compute_dtype_bytes=4 if "fp32" in p.set_name else 2,
        )
        alloc, res = p.model_allocated_bytes + slack, p.model_reserved_bytes + slack
        ra, rr = p.real_allocated_bytes, p.real_reserved_bytes
        if not p.ok:  # an out-of-memory trial's peaks stop where it failed: nothing to compare
            capacity = p.needed_capacity_bytes
            needed = "" if capacity is None else f"needs {capacity / MIB:,.0f} MiB"
            print(f"| {p.set_name} | {p.batch_size} | OOM | | | | | | | {needed} |")
            continue
        frag = f"{p.model_reserved_bytes / p.model_allocated_bytes:.3f} vs {rr / ra:.3f}"
        print(
            f"| {p.set_name} | {p.batch_size} | pass | {ra / MIB:,.0f} | {rr / MIB:,.0f} "
            f"| {b_alloc / ra:.3f} | {b_res / rr:.3f} | {alloc / ra:.3f} | {res / rr:.3f} | {frag} |"
        )
    print("\n| set | H100 largest | before | after | after: search s |")
    print("|---|---|---|---|---|")
    for name, truth, old, new, seconds in result["largest"]:
        print(f"| {name} | {truth} | {old} | {new} | {seconds:.1f} |")


if __name__ == "__main__":
    main()
