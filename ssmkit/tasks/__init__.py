"""The papers' synthetic tasks behind one interface (:class:`~ssmkit.tasks.base.Task`).

``task.sample(batch_size, generator) -> Batch(inputs, targets, loss_mask)`` and
``task.metric(logits, batch) -> {"acc": ..., "seq_acc": ...}``; :func:`get_task` builds one by
name: ``copying``, ``selective-copying``, ``induction-heads``, ``mqar``, ``listops``, ``pathfinder``.
"""

from ssmkit.tasks.base import IGNORE_INDEX, Batch, Task, masked_cross_entropy  # noqa: F401
from ssmkit.tasks.copying import Copying  # noqa: F401
from ssmkit.tasks.induction_heads import InductionHeads  # noqa: F401
from ssmkit.tasks.listops import ListOps  # noqa: F401
from ssmkit.tasks.mqar import MQAR  # noqa: F401
from ssmkit.tasks.pathfinder import Pathfinder  # noqa: F401
from ssmkit.tasks.registry import TASKS, get_task, task_names  # noqa: F401
from ssmkit.tasks.selective_copying import SelectiveCopying  # noqa: F401
