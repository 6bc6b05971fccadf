"""polm: one engine for post-training language models.

Every stage, objective, reward, tuning method, encoder, connector and
bundled dataset is a plugin on a pluggy-hosted core (entry-point group ``polm``).
"""

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
