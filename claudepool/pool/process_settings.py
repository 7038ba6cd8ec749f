"""The process settings of a CLI as ``get_settings`` reports them, and the checks the reset makes
of them: every setting as at start, whatever a request switched (model, effort) restored.

>>> changed({"model": "a", "effort": "low"}, {"model": "a", "effort": "high"})
['effort']
"""

from __future__ import annotations

from typing import Any

from claudepool.errors import WorkerProtocolError
from claudepool.protocol.cli_events import ControlResponseBody


def applied_of(body: ControlResponseBody, worker: str) -> dict[str, Any]:
    """The settings in force from a ``get_settings`` answer: ``applied``, with ``effective`` beside."""
    response = body.response or {}
    applied, effective = response.get("applied"), response.get("effective")
    if not isinstance(applied, dict):
        raise WorkerProtocolError(f"worker {worker}: get_settings answered no applied settings")
    return {**applied, "effective": effective}


def check_effort(worker: str, wanted: str | None, applied: dict[str, Any], started: dict[str, Any]) -> str:
    """The effort in force, if it is ``wanted`` (None: as at start); the CLI ignores a level it does
    not know without an error, so the switch is read back. None in force is taken: the model in
    force has no effort levels (the real CLI reports none on Haiku, and sends none upstream)."""
    in_force = applied.get("effort")
    expected = wanted if wanted is not None else started.get("effort")
    if in_force is not None and in_force != expected:
        raise WorkerProtocolError(f"worker {worker}: effort {wanted!r} asked, {in_force!r} in force")
    return str(in_force) if in_force is not None else "none"


def restored_effort(started: dict[str, Any], now: dict[str, Any]) -> dict[str, Any]:
    """``now`` without the ``effortLevel`` a restore of the spawn's effort leaves in ``effective``:
    the CLI names an effort set by ``apply_flag_settings`` there, one set by ``--effort`` not."""
    effective, before = now.get("effective"), started.get("effective")
    if (isinstance(effective, dict) and "effortLevel" in effective and effective["effortLevel"] == now.get("effort")
            == started.get("effort") and not (isinstance(before, dict) and "effortLevel" in before)):
        return {**now, "effective": {k: v for k, v in effective.items() if k != "effortLevel"}}
    return now


def changed(started: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """Names of the settings whose values differ (a setting only one side has counts as changed)."""
    if not started or not now:
        return []  # nothing to compare with: a turn or reset that never reported
    return sorted(name for name in started.keys() | now.keys() if started.get(name) != now.get(name))
