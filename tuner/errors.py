"""The domain's error hierarchy.

Every error a user can cause or meet is a `TunerError` with a machine `code` and one clear
sentence as its message. Only `api/` turns them into HTTP responses (one handler, one table of
status codes); nothing outside `api/` raises `HTTPException`.
"""

from __future__ import annotations


class TunerError(Exception):
    """Base class: `code` is stable and machine-readable, the message is for people.

    `client_fault` says who is at fault: True when the request itself causes the error, so that
    another attempt fails the same way (a probe job failing with one fails at once, without
    retries, and its waiters get a 422 with the code); False for a failure of the service (a
    crash, a hang, retries spent: 503 `probe_failed`)."""

    code: str = "tuner_error"
    client_fault: bool = False

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    @property
    def client_fault_code(self) -> str | None:
        """`code` when the request is at fault (what a failed job stores as its `error_code`)."""
        return self.code if self.client_fault else None


class SpecError(TunerError):
    """A workload, device, policy or plan request that does not validate."""

    code = "invalid_spec"
    client_fault = True


class ModelBuildError(TunerError):
    """A spec that validates but whose model cannot be built (unknown model_type, bad kwargs)."""

    code = "model_build_failed"
    client_fault = True


class EstimateError(TunerError):
    """The fake-tensor trace failed (data-dependent ops, unsupported ops, a timeout)."""

    code = "estimate_failed"
    client_fault = True


class ProbeError(TunerError):
    """A probe crashed, hung or raised something other than an out-of-memory error."""

    code = "probe_failed"


class NothingFitsError(TunerError):
    """Not even the smallest micro-batch fits the device's memory budget."""

    code = "nothing_fits"
    client_fault = True


class PlanError(TunerError):
    """The request cannot be turned into a plan (e.g. effective batch smaller than world size)."""

    code = "plan_impossible"
    client_fault = True


class DeviceRequiredError(TunerError):
    """The backend needs a device (name and memory) that the request did not give."""

    code = "device_required"
    client_fault = True


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


def _client_fault_classes() -> dict[str, type[TunerError]]:
    """Every client-fault error class by its code (the subclasses that say so of themselves)."""
    found: dict[str, type[TunerError]] = {}
    pending = list(TunerError.__subclasses__())
    while pending:
        error_class = pending.pop(0)
        pending.extend(error_class.__subclasses__())
        if error_class.client_fault and error_class.code not in found:
            found[error_class.code] = error_class
    return found


CLIENT_FAULT_CODES: frozenset[str] = frozenset(_client_fault_classes())
"""The codes of the errors that are the request's fault (`TunerError.client_fault`)."""


def client_fault_error(code: str, message: str) -> TunerError:
    """A `TunerError` with a client-fault `code` (one of `CLIENT_FAULT_CODES`), e.g. rebuilt from
    a failed job's `error_code` and `error` columns."""
    error_class = _client_fault_classes().get(code)
    if error_class is None:
        raise ValueError(f"{code!r} is not a client-fault code")
    return error_class(message)
