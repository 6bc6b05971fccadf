"""mergekit's merge methods as pure functions over the tensors that share one name in every model.

Each method follows the ``polm_register_merge_methods`` contract::

    merge(tensors, base, *, <per-model parameters>, <method parameters>) -> torch.Tensor

and takes mergekit's parameter names and defaults, so a mergekit YAML config means the same here. The
per-model parameters (``weight``, ``density``, ``epsilon``) are required keyword arguments of the function,
each a list with one float per model; their defaults live once, in the ``model_parameters`` metadata. The
method's own parameters (``normalize``, ``rescale``, ``lambda``, ``int8_mask``, ``t``, ``filter_wise``) carry
their defaults in the signature; slerp's ``t`` has none, as mergekit requires it.

``lambda`` is a Python keyword, so the functions take it as ``lambda_``; every method that has it registers
``aliases={"lambda": "lambda_"}`` (config key to keyword name), and a config reader renames the keys found
in ``aliases`` before it calls the function. ``int8_mask`` is accepted wherever mergekit accepts it and has
no effect (mergekit uses it to store sign masks in int8).

Where polm departs from mergekit: ``rescale`` in DARE and DELLA divides each survivor by its keep
probability, as both papers define it and which keeps the expected value exactly; mergekit instead scales
each dropped task vector back to its L1 norm, about the same factor on a large tensor.

| method | base | models | per-model parameters |
|---|---|---|---|
| ``linear`` | unused | any | weight |
| ``task_arithmetic`` | required | any | weight |
| ``ties`` | required | any | weight, density |
| ``dare_linear``, ``dare_ties`` | required | any | weight, density |
| ``della``, ``della_linear`` | required | any | weight, density, epsilon |
| ``slerp`` | required | 1 | none |
| ``model_stock`` | required | at least 2 | none |
"""

from __future__ import annotations

from polm.engine.hookspecs import Register
from polm.plugins.integration.merge.methods.dare import dare_linear, dare_ties
from polm.plugins.integration.merge.methods.della import della, della_linear
from polm.plugins.integration.merge.methods.linear import linear
from polm.plugins.integration.merge.methods.model_stock import model_stock
from polm.plugins.integration.merge.methods.slerp import slerp
from polm.plugins.integration.merge.methods.task_arithmetic import task_arithmetic
from polm.plugins.integration.merge.methods.ties import ties

__all__ = [
    "dare_linear",
    "dare_ties",
    "della",
    "della_linear",
    "linear",
    "model_stock",
    "register_merge_methods",
    "slerp",
    "task_arithmetic",
    "ties",
]

LAMBDA_ALIAS = {"lambda": "lambda_"}
WEIGHT = {"weight": 1.0}
WEIGHT_DENSITY = {"weight": 1.0, "density": 1.0}
WEIGHT_DENSITY_EPSILON = {"weight": 1.0, "density": 1.0, "epsilon": 0.15}


def register_merge_methods(register: Register) -> None:
    """Register every merge method with its metadata (called from the integration plugin's hook)."""
    register("linear", linear, base="unused", model_parameters=dict(WEIGHT),
             description="weighted average of the models (Model Soups)")
    register("task_arithmetic", task_arithmetic, base="required", model_parameters=dict(WEIGHT),
             aliases=dict(LAMBDA_ALIAS), description="base plus the weighted, lambda-scaled task vectors")
    register("ties", ties, base="required", model_parameters=dict(WEIGHT_DENSITY), aliases=dict(LAMBDA_ALIAS),
             description="TIES: trim task vectors by magnitude, elect signs, merge the agreeing entries")
    register("dare_linear", dare_linear, base="required", model_parameters=dict(WEIGHT_DENSITY),
             aliases=dict(LAMBDA_ALIAS), description="DARE: drop task-vector entries at random and rescale, then sum")
    register("dare_ties", dare_ties, base="required", model_parameters=dict(WEIGHT_DENSITY),
             aliases=dict(LAMBDA_ALIAS), description="DARE's random drop, then TIES's sign election and disjoint merge")
    register("della", della, base="required", model_parameters=dict(WEIGHT_DENSITY_EPSILON),
             aliases=dict(LAMBDA_ALIAS), description="DELLA: drop by magnitude rank and rescale, then TIES's merge")
    register("della_linear", della_linear, base="required", model_parameters=dict(WEIGHT_DENSITY_EPSILON),
             aliases=dict(LAMBDA_ALIAS), description="DELLA's magnitude-ranked drop, then a weighted sum")
    register("slerp", slerp, base="required", models=1, model_parameters={},
             description="spherical interpolation from the base to one model at t")
    register("model_stock", model_stock, base="required", model_parameters={},
             description="Model Stock: interpolate to the models' average by their task vectors' angle")
