"""``vq plan``: per-layer key/value widths, key method and exact window for a budget.

:mod:`.probe` measures each layer's sensitivity, :mod:`.allocate` solves the budgeted
choice, :mod:`.search` puts them together and checks the result against uniform settings,
:mod:`.plan_file` reads and writes the plan that ``vq generate``, ``serve`` and ``eval``
take with ``--plan``.
"""

from vq_mlxlm.planner.plan_file import Plan, load_plan, save_plan
from vq_mlxlm.planner.search import Target, make_plan

__all__ = ["Plan", "Target", "load_plan", "make_plan", "save_plan"]
