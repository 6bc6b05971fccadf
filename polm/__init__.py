"""polm: one engine for post-training language models.

Every stage, objective, reward, tuning method, encoder, connector and
bundled dataset is a plugin on a pluggy-hosted core (entry-point group ``polm``).
"""

import logging

# transformers imports torchao whenever it is installed (the quantize extra), and torch 2.14 warns on each
# import that torchao registers its enums in a deprecated way: a line about torchao's code, not the user's,
# that would break polm's one-line errors. Set before torch is imported, so the level holds.
logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)

from polm.engine.errors import PolmError
from polm.engine.evaluation import evaluate, generate
from polm.engine.hookspecs import hookimpl
from polm.engine.models import load_model
from polm.engine.pipeline import Pipeline, RunResult, StageResult
from polm.engine.plugins import components, plugin_manager

__version__ = "0.1.0"

__all__ = [
    "Pipeline",
    "PolmError",
    "RunResult",
    "StageResult",
    "components",
    "evaluate",
    "generate",
    "hookimpl",
    "load_model",
    "plugin_manager",
]
