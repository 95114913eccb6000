"""Subcommands of the ``vq`` command line; each takes the parsed arguments."""

from vq_mlxlm.commands.calibrate import calibrate
from vq_mlxlm.commands.estimate import estimate
from vq_mlxlm.commands.eval import eval
from vq_mlxlm.commands.generate import generate
from vq_mlxlm.commands.methods import methods
from vq_mlxlm.commands.plan import plan
from vq_mlxlm.commands.serve import serve

__all__ = ["calibrate", "estimate", "eval", "generate", "methods", "plan", "serve"]
