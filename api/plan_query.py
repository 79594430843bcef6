"""The query parameters of `POST /v1/plans`, read in one place: by the router and by the cached
fast path in front of it, so that a request the router would refuse is never answered from the
cache (and the other way round)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from starlette.datastructures import QueryParams

from api.errors import InvalidRequestError
from api.plan_service import MAX_WAIT_SECONDS
from api.worker_availability import FLAG_VALUES, QUEUE_WITHOUT_WORKER

WAIT = "wait"


@dataclass(frozen=True)
class PlanQuery:
    wait: float
    """Seconds to wait for a probe job before answering 202 (0 to `MAX_WAIT_SECONDS`)."""
    queue_without_worker: bool
    """Queue the probe job although no live worker can run it yet."""


def parse_plan_query(query: QueryParams) -> PlanQuery:
    """`?wait=S&queue_without_worker=B`; an invalid value raises `InvalidRequestError` (422)
    naming the parameter. Where a parameter repeats, the last value counts."""
    return PlanQuery(
        wait=parse_wait(query.get(WAIT)),
        queue_without_worker=parse_flag(QUEUE_WITHOUT_WORKER, query.get(QUEUE_WITHOUT_WORKER)),
    )


def parse_flag(name: str, value: str | None) -> bool:
    """A boolean query parameter: `true`/`1` or `false`/`0` (absent: false)."""
    if value is None:
        return False
    flag = FLAG_VALUES.get(value.strip().lower())
    if flag is None:
        raise InvalidRequestError(f"Invalid request: query.{name} must be true or false, got {value!r}.")
    return flag


def parse_wait(value: str | None) -> float:
    """`?wait=S`: seconds, 0 to 300."""
    if value is None:
        return 0.0
    try:
        wait = float(value)
    except ValueError:
        wait = math.nan
    if not 0 <= wait <= MAX_WAIT_SECONDS:
        raise InvalidRequestError(
            f"Invalid request: query.{WAIT} must be a number of seconds from 0 to 300, got {value!r}."
        )
    return wait
