"""``edgeloop rollouts watch``: one rich frame per look at ``GET /api/v1/rollouts/{id}``.

Pure rendering: a rollout detail (JSON) in, a rich renderable out; the CLI polls and redraws.
"""

from __future__ import annotations

from typing import Any

from rich.console import Group
from rich.table import Table
from rich.text import Text

from server.rollout.states import (
    FAILURE_STATES,
    FINISHED_ROLLOUT_STATES,
    HELD_STATES,
    SUCCESS_STATES,
)

_STYLE = {
    "succeeded": "green",
    "running": "cyan",
    "awaiting_approval": "yellow",
    "paused": "yellow",
    "rolled_back": "red",
    "pending": "dim",
}


def finished(detail: dict[str, Any]) -> bool:
    return detail.get("state") in FINISHED_ROLLOUT_STATES


def _bar(done: int, total: int, width: int = 20) -> str:
    filled = round(width * done / total) if total else 0
    return "█" * filled + "░" * (width - filled)


def frame(detail: dict[str, Any]) -> Group:
    """The rollout's header, one row per wave, and the last reason."""
    head = Text.assemble(
        (f"rollout #{detail['id']} ", "bold"),
        f"{detail['model_line']} v{detail.get('from_version')} -> v{detail['to_version']}  ",
        (detail["state"].replace("_", " "), "bold magenta"),
        f"  release {detail.get('release') or '-'}",
        f"  approved by {detail['approved_by']}" if detail.get("approved_by") else "",
    )
    table = Table(show_edge=False, pad_edge=False)
    for col in (
        "wave",
        "plan",
        "state",
        "progress",
        "committed",
        "in progress",
        "failed",
        "queued/held",
    ):
        table.add_column(col)
    for w in detail.get("waves") or []:
        counts: dict[str, int] = w.get("devices") or {}
        total = sum(counts.values())
        ok = sum(n for s, n in counts.items() if s in SUCCESS_STATES)
        bad = sum(n for s, n in counts.items() if s in FAILURE_STATES)
        held = sum(n for s, n in counts.items() if s in HELD_STATES)
        busy = total - ok - bad - held
        state = w.get("state", "pending")
        table.add_row(
            str(w["index"] + 1),
            w.get("label", ""),
            Text(state.replace("_", " "), style=_STYLE.get(state, "")),
            f"{_bar(ok, total)} {ok}/{total}",
            str(ok),
            str(busy),
            Text(str(bad), style="red" if bad else ""),
            str(held),
        )
    parts: list[Any] = [head, table]
    if detail.get("reason"):
        parts.append(Text(detail["reason"], style="dim"))
    return Group(*parts)
