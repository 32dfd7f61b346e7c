"""Tasks by name: ``get_task("selective-copying", length=256)``."""

from __future__ import annotations

from ssmkit.tasks.base import Task
from ssmkit.tasks.copying import Copying
from ssmkit.tasks.induction_heads import InductionHeads
from ssmkit.tasks.listops import ListOps
from ssmkit.tasks.mqar import MQAR
from ssmkit.tasks.pathfinder import Pathfinder
from ssmkit.tasks.selective_copying import SelectiveCopying

TASKS: dict[str, type[Task]] = {
    "copying": Copying,
    "selective-copying": SelectiveCopying,
    "induction-heads": InductionHeads,
    "mqar": MQAR,
    "listops": ListOps,
    "pathfinder": Pathfinder,
}


def task_names() -> list[str]:
    return list(TASKS)


def get_task(name: str, **kwargs) -> Task:
    """Build the task ``name`` (dashes or underscores) with its size fields from ``kwargs``."""
    if not isinstance(name, str):
        raise TypeError(f"task name must be a string, got {type(name).__name__}")
    key = name.strip().lower().replace("_", "-")
    if key not in TASKS:
        raise ValueError(f"unknown task {name!r}: choose one of {', '.join(TASKS)}")
    cls = TASKS[key]
    import dataclasses

    known = {f.name for f in dataclasses.fields(cls)}
    bad = sorted(set(kwargs) - known)
    if bad:
        raise ValueError(f"task {key!r} has no option(s) {', '.join(bad)}; options: {', '.join(sorted(known))}")
    return cls(**kwargs)
