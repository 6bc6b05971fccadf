"""Stage options are checked when a stage is added, before any model loads or trains.

Every problem is one line (a ``PolmError``) naming the stage and the option,
since the CLI prints it as is.
"""

from __future__ import annotations

import pytest
import yaml

import polm

ROWS = [{"prompt": "What is 1 + 2?", "completion": "3"}, {"prompt": "What is 2 + 2?", "completion": "4"}]


def add_sft(**options):
    """A pipeline with one ``sft`` stage built from ``options`` (validation happens here)."""
    return polm.Pipeline().add("sft", **options)


def one_line_error(**options) -> str:
    """The message of the PolmError that adding an ``sft`` stage with ``options`` raises."""
    with pytest.raises(polm.PolmError) as caught:
        add_sft(**options)
    message = str(caught.value)
    assert "\n" not in message, f"not one line: {message!r}"
    return message


def test_valid_options_are_parsed_into_the_stage():
    """Given options land, typed, on the stage; the rest keep their defaults."""
    stage = add_sft(data=ROWS, max_steps=3, lr=1e-3).stages[0]
    assert (stage.name, stage.options.max_steps, stage.options.lr) == ("sft", 3, 1e-3)
    assert stage.options.batch_size == 8 and stage.options.tuning == "full"


def test_unknown_option_names_stage_and_option_and_suggests_the_closest():
    """``lrr`` is reported with the stage, and ``lr`` is suggested."""
    message = one_line_error(data=ROWS, lrr=1e-3)
    assert "stage 0 'sft'" in message
    assert "unknown option 'lrr'" in message
    assert "Did you mean 'lr'?" in message


def test_wrong_type_names_the_option_and_the_expected_type():
    """``batch_size: "eight"`` names the option, the expected type and the value given."""
    message = one_line_error(data=ROWS, batch_size="eight")
    assert "stage 0 'sft'" in message
    assert "option 'batch_size' must be int" in message
    assert "'eight'" in message


def test_yaml_exponent_without_dot_is_accepted_as_a_float():
    """YAML reads ``lr: 1e-4`` as the string "1e-4"; the option still becomes the float 0.0001."""
    raw = yaml.safe_load("lr: 1e-4")["lr"]
    assert raw == "1e-4"  # the premise: PyYAML (YAML 1.1) needs a dot for a float
    lr = add_sft(data=ROWS, lr=raw).stages[0].options.lr
    assert isinstance(lr, float) and lr == pytest.approx(1e-4)


@pytest.mark.parametrize(
    "option, value, accepted",
    [
        ("max_steps", 4.0, 4),  # a whole float is an int
        ("epochs", 2, 2.0),  # an int is a float
        ("weight_decay", "0.01", 0.01),  # a numeric string is a float
    ],
)
def test_lossless_conversions_are_accepted(option, value, accepted):
    """Values that convert to the option's type without loss are converted."""
    parsed = getattr(add_sft(data=ROWS, **{option: value}).stages[0].options, option)
    assert parsed == accepted and type(parsed) is type(accepted)


@pytest.mark.parametrize(
    "option, value",
    [("max_steps", 2.5), ("batch_size", True), ("lr", "fast"), ("tuning_options", "r=8")],
)
def test_lossy_or_wrong_types_are_rejected(option, value):
    """Values that would need guessing (2.5 steps, a bool for a count, a word for a number) are type errors."""
    message = one_line_error(data=ROWS, **{option: value})
    assert f"option '{option}' must be" in message


@pytest.mark.parametrize(
    "option, value, problem",
    [
        ("warmup_ratio", 1.5, "'warmup_ratio' must be in [0, 1)"),
        ("batch_size", 0, "'batch_size' must be at least 1"),
        ("lr", -1e-3, "'lr' must not be negative"),
        ("lr_scheduler", "cosin", "'lr_scheduler' must be one of cosine, linear, constant"),
        ("mixed_precision", "fp8", "'mixed_precision' must be one of"),
    ],
)
def test_invalid_values_fail_before_training(option, value, problem, tmp_path):
    """Out-of-range values are rejected by ``add``, so nothing is written or trained."""
    pipeline = polm.Pipeline()
    with pytest.raises(polm.PolmError) as caught:
        pipeline.add("sft", data=ROWS, **{option: value})
    assert problem in str(caught.value) and "stage 0 'sft'" in str(caught.value)
    assert pipeline.stages == []
    with pytest.raises(polm.PolmError, match="no stages"):
        pipeline.run(tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_no_length_at_all_is_rejected():
    """``max_steps: 0`` with ``epochs: 0`` would train for no steps, which is an error."""
    assert "set 'max_steps' or 'epochs' above 0" in one_line_error(data=ROWS, max_steps=0, epochs=0)


def test_missing_required_data_fails():
    """``sft`` without ``data`` names the missing option."""
    message = one_line_error(max_steps=3)
    assert "stage 0 'sft'" in message and "option 'data' is required" in message


def test_error_names_the_position_of_the_failing_stage():
    """In a multi-stage pipeline, the message says which stage is wrong."""
    pipeline = polm.Pipeline().add("sft", data=ROWS)
    with pytest.raises(polm.PolmError, match=r"stage 1 'sft': unknown option 'lrr'"):
        pipeline.add("sft", data=ROWS, lrr=1.0)


def test_unknown_tuning_method_lists_the_registered_methods():
    """``tuning: <unknown>`` names it and lists every registered tuning method."""
    message = one_line_error(data=ROWS, tuning="fulll")
    assert "unknown tuning method 'fulll'" in message
    assert "Did you mean 'full'?" in message
    methods = polm.components("tuning_methods")
    assert methods and all(name in message for name in methods)


def test_tuning_options_are_validated_by_the_tuning_method():
    """Options for the tuning method go through its own Options: ``full`` takes none."""
    message = one_line_error(data=ROWS, tuning="full", tuning_options={"r": 8})
    assert "stage 0 'sft' tuning 'full'" in message and "unknown option 'r'" in message
