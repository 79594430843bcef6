"""Gradient checkpointing: which choices a plan policy needs a probe of, and how a choice is named.

A probe measures one choice (on or off); the policy `auto` needs both and lets the planner pick.
The CLI, `plan_for`, the API, the worker and the planner all ask this module.
"""

from __future__ import annotations

from typing import Literal

CheckpointingPolicy = Literal["auto", "on", "off"]

_CHOICES: dict[str, tuple[bool, ...]] = {"off": (False,), "on": (True,), "auto": (False, True)}


def checkpointing_choices(policy: CheckpointingPolicy) -> tuple[bool, ...]:
    """The checkpointing choices `policy` needs a probe of, off first."""
    return _CHOICES[policy]


def on_off(checkpointing: bool) -> str:
    """A choice as the API, the pages and the CLI name it: `on` or `off`."""
    return "on" if checkpointing else "off"
