"""The hooks through which every polm component arrives.

Each ``polm_register_*`` hook receives a ``register(name, obj, **metadata)``
callback. A plugin calls it once per thing it contributes; the plugin manager
collects the calls into the matching :class:`~polm.engine.registry.Registry`.
Built-in paradigms and third-party distributions (entry-point group ``polm``)
use the same hooks, so a pip-installed plugin is a first-class citizen.

Write an implementation like this::

    from polm import hookimpl

    @hookimpl
    def polm_register_rewards(register):
        register("shout", lambda prompts, completions, **fields: [c.isupper() * 1.0 for c in completions])
"""

from __future__ import annotations

from typing import Any, Protocol

import pluggy

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

    ``obj`` is a pure function returning ``(loss, metrics)``. Objectives of
    one family share a signature documented by the stage that uses them, for
    example the pairwise preference objectives used by ``dpo``.
    """


@hookspec
def polm_register_rewards(register: Register) -> None:
    """Contribute reward functions.

    ``obj`` is a callable ``(prompts: list[str], completions: list[str],
    **fields) -> list[float]`` where ``fields`` holds the dataset's other
    columns (for example ``answer``), one list entry per completion.
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
