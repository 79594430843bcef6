"""The identity of a stored plan: what makes two plans "the same plan" in the database.

A plan is a pure function of the request it answers and of the probe results it was derived from
(`tuner.planner.make_plan`). Its identity is therefore the SHA-256 of the JSON document

    {"probe_ids": {"off": <id>, "on": <id>}, "request": <canonical plan request>}

serialized with sorted keys, no whitespace (`separators=(",", ":")`) and ASCII escapes
(`ensure_ascii=True`), encoded as UTF-8, as 64 lowercase hex digits. `request` is the plan request
as the API stores it (`api.plan_service.canonical_request`: every default filled in, device
included), `probe_ids` the plan's `probe_ids` (`off`/`on` → probe result id; only the choices the
policy needed). The probe ids are part of it because the same request planned from other probes (a
new torch minor release, a re-probed device) is a different plan.

The column `plans.request_hash` holds it under a unique index. Migration 0002 computed it for
existing rows with a frozen copy of this function; a test checks that the two agree.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any


def plan_request_hash(request: Mapping[str, Any], probe_ids: Mapping[str, int]) -> str:
    """The identity of the plan for `request` derived from the probes `probe_ids`."""
    document = {"probe_ids": {str(k): int(v) for k, v in probe_ids.items()}, "request": dict(request)}
    text = json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
