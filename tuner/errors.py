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


_CLIENT_FAULTS: tuple[type[TunerError], ...] = (
    SpecError,
    ModelBuildError,
    EstimateError,
    NothingFitsError,
    PlanError,
    DeviceRequiredError,
)
CLIENT_FAULT_CODES: frozenset[str] = frozenset(error.code for error in _CLIENT_FAULTS)
"""The codes of errors the request itself causes: another attempt fails the same way, so a job that
fails with one fails at once, without retries, and its waiters get a 422 with that code. Every
other failure (a crash, a hang, retries spent) is the service's (503 `probe_failed`)."""


def job_error_text(error: TunerError) -> str:
    """How a job stores a client-fault error: `<code>: <sentence>`, read back by `parse_job_error`."""
    return f"{error.code}: {error.message}"


def parse_job_error(text: str | None) -> tuple[str | None, str]:
    """A job's stored error as (client-fault code or None, sentence): `nothing_fits: Nothing ...`
    gives `("nothing_fits", "Nothing ...")`; any other text is a failure of the service."""
    if not text:
        return None, "The probe job failed without a message."
    code, sep, message = text.partition(": ")
    if sep and code in CLIENT_FAULT_CODES:
        return code, message
    return None, text


def client_fault_error(code: str, message: str) -> TunerError:
    """A `TunerError` with a client-fault `code` (one of `CLIENT_FAULT_CODES`), e.g. rebuilt from
    a job's stored error."""
    for error_class in _CLIENT_FAULTS:
        if error_class.code == code:
            return error_class(message)
    raise ValueError(f"{code!r} is not a client-fault code")
