"""The hooks through which every polm component arrives.

Each ``polm_register_*`` hook receives a ``register(name, obj, **metadata)``
callback. A plugin calls it once per thing it contributes; the plugin manager
collects the calls into the matching :class:`~polm.engine.registry.Registry`.
The other hooks choose one plugin for a job (``firstresult``): the first
plugin to answer with something other than None does it, for example
:func:`polm_load_model` for a model folder only that plugin can read.
Built-in paradigms and third-party distributions (entry-point group ``polm``)
use the same hooks, so a pip-installed plugin is a first-class citizen.

Write an implementation like this::

    from polm import hookimpl

    @hookimpl
    def polm_register_rewards(register):
        register("shout", lambda prompts, completions, **fields: [c.isupper() * 1.0 for c in completions])
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import pluggy

if TYPE_CHECKING:
    import torch

PROJECT_NAME = "polm"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


class Register(Protocol):
    """The callback handed to every ``polm_register_*`` hook."""

    def __call__(self, name: str, obj: Any, **metadata: Any) -> None: ...


@hookspec
def polm_register_stages(register: Register) -> None:
    """Contribute pipeline stages.

    Called once when the plugin manager is built. ``obj`` is a subclass of
    :class:`polm.engine.stage.Stage`; its ``Options`` dataclass declares the
    stage-specific options a recipe may set. ``name`` is what recipes write
    in ``stages: [{name: ...}]``.
    """


@hookspec
def polm_register_objectives(register: Register) -> None:
    """Contribute training objectives (loss functions).

    Called once when the plugin manager is built. ``obj`` is a pure function
    returning ``(loss, metrics)``, a scalar tensor and a dict of floats, and
    the ``family`` metadata says which signature it has and so which stages
    may train with it (:mod:`polm.engine.objectives` documents each):
    ``register("smoothed", fn, family="language_modelling")`` for ``fn(logits,
    labels, **options)`` (``sft``, ``align``), ``family="pairwise"`` for
    ``fn(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
    ref_rejected_logps, **options)`` (``dpo``, ``simpo``, ``orpo``,
    ``online_dpo``; also ``reference_free`` and ``average_logps``), and
    ``family="unpaired"`` for ``fn(policy_logps, ref_logps, labels,
    reference_point, **options)`` (``kto``), and ``family="policy_gradient"``
    for ``fn(logps, old_logps, advantages, mask, *, ref_logps, beta,
    epsilon_low, epsilon_high, max_completion_length, **options)`` (``grpo``,
    ``ppo``; also ``token_level``), and ``family="distillation"`` for
    ``fn(student_logits, teacher_logits, labels, **options)`` (a student
    against a teacher; no stage yet). A stage's ``objective`` option
    names one; one of another family, or without a family, is refused when the
    stage is added. Keyword options with defaults are set by the stage's
    ``objective_options``.
    """


@hookspec
def polm_register_rewards(register: Register) -> None:
    """Contribute reward functions.

    ``obj`` is a callable ``(prompts: list[str], completions: list[str],
    **fields) -> list[float]`` where ``fields`` holds the dataset's other
    columns (for example ``answer``), one list entry per completion.

    A reward whose options name something that must exist (a model folder) may carry a
    ``check_options(**options)`` attribute that raises :class:`~polm.engine.errors.PolmError`: a stage
    calls it with the reward's ``reward_options`` before it writes anything.
    """


@hookspec
def polm_register_tuning_methods(register: Register) -> None:
    """Contribute tuning methods selected with a stage's ``tuning`` option.

    ``obj`` is a :class:`polm.engine.tuning.TuningMethod`: it validates its
    options and turns a base model into the model to train (for example by
    wrapping it with a peft adapter).
    """


@hookspec
def polm_register_encoders(register: Register) -> None:
    """Contribute modality encoders (vision, audio).

    ``obj`` is a factory ``(spec: str, **options) -> encoder`` where the
    encoder reports its output width and number of tokens per input.
    """


@hookspec
def polm_register_connectors(register: Register) -> None:
    """Contribute connectors that map encoder outputs into a language model.

    ``obj`` is a factory ``(encoder_width: int, lm_width: int, **options) ->
    torch.nn.Module``.
    """


@hookspec
def polm_register_datasets(register: Register) -> None:
    """Contribute bundled datasets, referenced in recipes as ``polm:<name>``.

    ``obj`` is a :class:`polm.engine.data.BundledDataset`.
    """


@hookspec
def polm_register_models(register: Register) -> None:
    """Contribute named models that ``Pipeline(model=...)`` accepts by name.

    ``obj`` is a zero-argument callable returning ``(model, tokenizer)``,
    for example the embedded default ``polm-tiny``.
    """


@hookspec
def polm_register_inference_methods(register: Register) -> None:
    """Contribute inference-time scaling methods, chosen with ``polm eval --method NAME``.

    ``obj`` is a callable ``(model, tokenizer, rows, *, max_new_tokens, **options) ->
    list[str]`` returning one completion per row; a row holds the ``prompt`` and the
    dataset's other columns. Its keyword parameters other than ``max_new_tokens`` are the
    options ``--option KEY=VALUE`` sets: the engine checks them against the signature before
    it loads the model, then grades the completions with ``exact_match``
    (:func:`polm.engine.evaluation.scaled_exact_match`).
    """


@hookspec
def polm_register_commands(register: Register) -> None:
    """Contribute ``polm NAME`` commands.

    Called when the command line builds its parser. ``obj`` is a
    :class:`polm.engine.commands.Command`: its help line, a function that adds its
    arguments to the command's ``argparse`` parser, and a function that runs it on the
    parsed arguments and returns the exit status. A name of a built-in command (``run``,
    ``plugins``, ``eval``, ``quickstart``) is refused with a warning.
    """


@hookspec
def polm_register_merge_methods(register: Register) -> None:
    """Contribute model-merging methods, chosen with ``merge_method:`` in a merge config.

    ``obj`` is a pure function over the tensors that share one name in every input model::

        merge(tensors, base, *, <per-model parameters>, <method parameters>) -> torch.Tensor

    ``tensors`` is a list with one tensor per input model (all of one shape), ``base`` the base model's
    tensor or None. Each per-model parameter named in the ``model_parameters`` metadata (a dict of
    defaults, e.g. ``{"weight": 1.0, "density": 1.0}``) arrives as a list with one float per model, from
    ``models: [{model, parameters: {...}}]``; the function's other keyword parameters are the method's own
    (``parameters:`` of the config), checked against its signature before any model loads. A ``generator``
    keyword parameter receives a seeded ``torch.Generator`` for methods that sample. Metadata ``base``:
    ``"required"``, ``"optional"`` or ``"unused"``; ``models``: the exact number of non-base models the
    method takes, when it has one (slerp: 1).
    """


@hookspec
def polm_register_retrievers(register: Register) -> None:
    """Contribute retrievers for document stores, chosen with ``retriever:`` (``rag_sft``) or ``polm eval
    --retriever``.

    ``obj`` is a factory called with the texts of the store's passages and the retriever's options, once when
    the store is built and again when passages are added::

        build(texts: list[str], **options) -> Retriever

    and the object it returns answers ``search(queries: list[str], k: int)`` with each query's best ``k``
    passages as ``(index into texts, score)`` pairs, best first (:class:`polm.engine.retrieval.Retriever`).
    """


@hookspec
def polm_register_domains(register: Register) -> None:
    """Contribute domains: what adapting a model to one field (code, mathematics...) takes.

    Called once when the plugin manager is built. ``obj`` is a :class:`polm.engine.domains.Domain`: the
    bundled datasets it provides, by name (registered through :func:`polm_register_datasets`), its recipe
    of stages (a YAML path or the same mapping; ``polm domain recipe NAME`` prints it for ``polm run``), its
    evaluator ``(model, tokenizer, **options) -> {metric: value}`` (``polm domain eval NAME CHECKPOINT``),
    the names of the metrics that returns, and optional settings of a tokenizer extension. ``polm plugins``
    lists each domain with what it contributes.
    """


@hookspec(firstresult=True)
def polm_load_model(path: Path, tokenizer: Any) -> tuple[torch.nn.Module, Any] | None:
    """Load a model folder that this plugin knows how to read.

    :func:`polm.engine.models.load_model` asks for every local folder (a run's stage folder
    is first resolved to its ``final/``) before it falls back to ``from_pretrained``.
    Plugins are asked in turn, the last registered first, and the first answer that is not
    None wins; the others are not asked.

    Args:
        path: the folder.
        tokenizer: the tokenizer the caller passed, or None to load the folder's own.

    Returns:
        ``(model, tokenizer)``, or None for a folder this plugin does not claim.
    """
