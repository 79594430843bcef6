"""The domain's error hierarchy.

Every error a user can cause or meet is a `TunerError` with a machine `code` and one clear
sentence as its message. Only `api/` turns them into HTTP responses (one handler, one table of
status codes); nothing outside `api/` raises `HTTPException`.
"""

from __future__ import annotations


class TunerError(Exception):
    """Base class: `code` is stable and machine-readable, the message is for people."""

    code: str = "tuner_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class SpecError(TunerError):
    """A workload, device, policy or plan request that does not validate."""

    code = "invalid_spec"


class ModelBuildError(TunerError):
    """A spec that validates but whose model cannot be built (unknown model_type, bad kwargs)."""

    code = "model_build_failed"


class EstimateError(TunerError):
    """The fake-tensor trace failed (data-dependent ops, unsupported ops, a timeout)."""

    code = "estimate_failed"


class ProbeError(TunerError):
    """A probe crashed, hung or raised something other than an out-of-memory error."""

    code = "probe_failed"


class NothingFitsError(TunerError):
    """Not even the smallest micro-batch fits the device's memory budget."""

    code = "nothing_fits"


class PlanError(TunerError):
    """The request cannot be turned into a plan (e.g. effective batch smaller than world size)."""

    code = "plan_impossible"


class DeviceRequiredError(TunerError):
    """The backend needs a device (name and memory) that the request did not give."""

    code = "device_required"


class NotFoundError(TunerError):
    """No plan, job or probe with that id."""

    code = "not_found"


class ConflictError(TunerError):
    """A stored result conflicts with the one being written."""

    code = "conflict"


class AuthError(TunerError):
    """A write without a valid bearer token while `TUNER_API_TOKEN` is set."""

    code = "unauthorized"


class ServiceError(TunerError):
    """The tuner service answered with an error or could not be reached."""

    code = "service_error"

    def __init__(self, message: str, *, status_code: int | None = None, code: str | None = None):
        super().__init__(message)
        self.status_code = status_code
        if code is not None:
            self.code = code
