"""``vq eval``: measured quality, memory and speed of vq caches against mlx-lm's own caches.

One module per concept: :mod:`.text` (the default text), :mod:`.specs` (what a row is),
:mod:`.prefix` (the exact prefix shared by every row), :mod:`.scoring` (PPL, KL, top-1),
:mod:`.needle`, :mod:`.layer_cosine`, :mod:`.speed`, :mod:`.report` and :mod:`.harness`.
"""

from vq_mlxlm.evaluation.harness import FULL, QUICK, Budget, run
from vq_mlxlm.evaluation.specs import CacheSpec, expand, parse_spec

__all__ = ["FULL", "QUICK", "Budget", "CacheSpec", "expand", "parse_spec", "run"]
