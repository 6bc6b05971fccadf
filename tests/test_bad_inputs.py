"""Bad input of every kind, through the command line: one line on stderr that names the file and line, the
field or the option, exit status 2, no traceback, no output folder created, and the input files unchanged.

Each case writes its inputs (a recipe, data files, media) into ``inputs/`` and returns the command's
arguments; the run's output folder ``out/`` does not exist beforehand and is never made, not even for a
moment: every row, media file and reward option is checked before the run writes anything (the errors that
need the model, such as an image row for a text-only model, once it has loaded).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from polm.engine.cli import main

GOOD_ROW = {"prompt": "What is 1 + 2?", "completion": "3"}
IMAGE = "encoders: {image: open_clip:polm-tiny-vit}\n    connectors: {image: mlp2x_gelu}"
AUDIO = "encoders: {audio: whisper:polm-tiny}\n    connectors: {audio: mlp2x_gelu}"


def _jsonl(inputs: Path, *lines: str | dict, name: str = "train.jsonl") -> Path:
    path = inputs / name
    path.write_bytes(b"".join((line if isinstance(line, str) else json.dumps(line)).encode() + b"\n"
                              for line in lines))
    return path


def _recipe(inputs: Path, model: Path, stage: str = "", *, name: str = "sft", data: str | Path | None = None,
            top: str = "") -> Path:
    """A one-stage recipe; ``stage`` holds extra option lines (indented by the caller's 4 spaces)."""
    data = data if data is not None else _jsonl(inputs, GOOD_ROW, GOOD_ROW)
    path = inputs / "recipe.yaml"
    options = f"\n    {stage}" if stage else ""
    path.write_text(f"{top}model: {model}\nstages:\n  - name: {name}\n    data: {data}\n    max_steps: 2\n"
                    f"    batch_size: 2\n    eval_size: 0{options}\n")
    return path


def _run(recipe: Path, *extra: str) -> list[str]:
    return ["run", str(recipe), "--output", str(recipe.parent.parent / "out"), *extra]


def _image_row(inputs: Path, image: str) -> dict:
    return {"messages": [{"role": "user", "content": [{"type": "image", "path": image},
                                                      {"type": "text", "text": "What colour?"}]},
                         {"role": "assistant", "content": "red"}]}


def _audio_row(audio: str) -> dict:
    return {"messages": [{"role": "user", "content": [{"type": "audio", "path": audio},
                                                      {"type": "text", "text": "How many beeps?"}]},
                         {"role": "assistant", "content": "2"}]}


def _not_an_image(inputs: Path) -> str:
    (inputs / "picture.png").write_bytes(b"this is not a png")
    return "picture.png"


def _an_image(inputs: Path) -> str:
    from PIL import Image

    Image.new("RGB", (4, 4), "red").save(inputs / "red.png")
    return "red.png"


def _not_audio(inputs: Path) -> str:
    (inputs / "sound.wav").write_text("this is not a wav file")
    return "sound.wav"


def _empty_folder(inputs: Path) -> Path:
    (inputs / "not-a-model").mkdir()
    (inputs / "not-a-model" / "README.md").write_text("notes, not a model\n")
    return inputs / "not-a-model"


#: case -> (how to build the command from (inputs, model folder), what the error line must contain: a text, or
#: several).
CASES: dict[str, tuple[Callable[[Path, Path], list[str]], str | tuple[str, ...]]] = {
    # data files
    "malformed JSON line": (lambda i, m: _run(_recipe(i, m, data=_jsonl(i, GOOD_ROW, "{not json"))),
                            "train.jsonl:2: invalid JSON"),
    "row missing its field": (lambda i, m: _run(_recipe(i, m, data=_jsonl(i, GOOD_ROW, {"prompt": "x"}))),
                              "train.jsonl:2: cannot tell the row format from its fields ['prompt']"),
    "field of the wrong type": (lambda i, m: _run(_recipe(i, m, data=_jsonl(i, {"prompt": 3, "completion": "b"}))),
                                "train.jsonl:1: field 'prompt' must be a string, got int"),
    "empty data file": (lambda i, m: _run(_recipe(i, m, data=_jsonl(i))), "train.jsonl: the file has no rows"),
    "unknown role in a chat row": (
        lambda i, m: _run(_recipe(i, m, data=_jsonl(i, {"messages": [{"role": "bot", "content": "hi"}]}))),
        "train.jsonl:1: field 'messages[0].role' is 'bot'"),
    "non-UTF-8 bytes": (lambda i, m: _run(_recipe(i, m, data=_write(i / "train.jsonl", b'{"text": "caf\xe9"}\n'))),
                        "train.jsonl:1: not UTF-8 text (byte 0xe9 at column 14)"),
    "a JSON list per line": (lambda i, m: _run(_recipe(i, m, data=_jsonl(i, "[1, 2]"))),
                             "train.jsonl:1: expected a JSON object per line, got list"),
    "missing data file": (lambda i, m: _run(_recipe(i, m, data=i / "missing.jsonl")),
                          ("data file not found: ", "missing.jsonl")),
    "unknown bundled dataset": (lambda i, m: _run(_recipe(i, m, data="polm:arithmetik")),
                                "recipe.yaml:3: stage 0 'sft': unknown dataset 'arithmetik'. Did you mean 'arithmetic'?"),
    "prm labels that do not match the steps": (
        lambda i, m: _run(_recipe(i, m, name="prm", data=_jsonl(
            i, {"prompt": "What is 1 + 1?", "steps": ["1 + 1 = 2"], "labels": [1, 0]}))),
        "train.jsonl:1: field 'labels' must hold one 0 or 1 per step"),
    # recipes and options
    "unknown stage": (lambda i, m: _run(_recipe(i, m, name="sfft")), "unknown stage 'sfft'. Did you mean 'sft'?"),
    "unknown option": (lambda i, m: _run(_recipe(i, m, "lrr: 0.001")), "unknown option 'lrr'. Did you mean 'lr'?"),
    "option of the wrong type": (lambda i, m: _run(_recipe(i, m, "save_every: often")),
                                 "option 'save_every' must be int, got 'often'"),
    "negative lr": (lambda i, m: _run(_recipe(i, m, "lr: -0.001")), "'lr' must not be negative, got -0.001"),
    "zero batch size": (lambda i, m: _run(_recipe(i, m, "batch_size: 0")), "'batch_size' must be at least 1, got 0"),
    "infinite lr": (lambda i, m: _run(_recipe(i, m, "lr: .inf")), "option 'lr' must be a finite number"),
    "NaN max_grad_norm": (lambda i, m: _run(_recipe(i, m, "max_grad_norm: .nan")),
                          "option 'max_grad_norm' must be a finite number"),
    "unknown tuning method": (lambda i, m: _run(_recipe(i, m, "tuning: lorra")), "'lorra'. Did you mean 'lora'?"),
    "bad tuning option": (lambda i, m: _run(_recipe(i, m, "tuning: lora\n    tuning_options: {rr: 4}")),
                          "unknown option 'rr'. Did you mean 'r'?"),
    "unknown reward": (lambda i, m: _run(_recipe(i, m, "rewards: {acuracy: 1.0}", name="grpo",
                                                 data="polm:arithmetic")), "'acuracy'. Did you mean 'accuracy'?"),
    "non-numeric reward weight": (lambda i, m: _run(_recipe(i, m, "rewards: {accuracy: high}", name="grpo",
                                                            data="polm:arithmetic")),
                                  "option 'rewards': the weight of reward 'accuracy' must be a number, got 'high'"),
    "unknown objective": (lambda i, m: _run(_recipe(i, m, "objective: sigmoidd", name="dpo",
                                                    data="polm:arithmetic-prefs")),
                          "stage 0 'dpo': unknown objective 'sigmoidd'"),
    "YAML syntax error": (lambda i, m: _run(_write(i / "recipe.yaml", b"model: x\nstages:\n  - name: sft\n   lr: 1\n")),
                          "recipe.yaml:4: invalid YAML"),
    "YAML list instead of a mapping": (lambda i, m: _run(_write(i / "recipe.yaml", b"- sft\n- dpo\n")),
                                       "recipe.yaml: a recipe is a mapping"),
    "no stages": (lambda i, m: _run(_write(i / "recipe.yaml", f"model: {m}\nstages: []\n".encode())),
                  "recipe.yaml: 'stages' must be a non-empty list"),
    "unknown recipe key": (lambda i, m: _run(_recipe(i, m, top="outptu_dir: x\n")),
                           "unknown recipe key 'outptu_dir'. Did you mean 'output_dir'?"),
    "unknown student config field": (lambda i, m: _run(_recipe(i, m, "student: {num_hidden_layer: 1}", name="distill")),
                                     ("'num_hidden_layer' is not a field of the teacher's LlamaConfig",
                                      "Did you mean 'num_hidden_layers'?")),
    # models
    "missing model path": (lambda i, m: _run(_recipe(i, i / "no-such-model")),
                           "no-such-model' is neither a folder nor a registered model"),
    "a folder that is not a model": (lambda i, m: _run(_recipe(i, _empty_folder(i))),
                                     "not-a-model is not a model folder: it has no config.json"),
    "missing reward-model folder for ppo": (
        lambda i, m: _run(_recipe(i, m, f"rewards: {{reward_model: 1.0}}\n    reward_options: "
                                        f"{{reward_model: {{path: {i / 'no-rm'}}}}}", name="ppo",
                                  data="polm:arithmetic")), "no-rm' not found"),
    # media
    "corrupt image": (lambda i, m: _run(_recipe(i, m, IMAGE, name="align",
                                                data=_jsonl(i, _image_row(i, _not_an_image(i))))),
                      "picture.png: cannot identify image file"),
    "missing image": (lambda i, m: _run(_recipe(i, m, IMAGE, name="align", data=_jsonl(i, _image_row(i, "missing.png")))),
                      ("train.jsonl:1: image file not found: ", "missing.png")),
    "non-audio file": (lambda i, m: _run(_recipe(i, m, AUDIO, name="align", data=_jsonl(i, _audio_row(_not_audio(i))))),
                       "sound.wav: it is not a WAV file"),
    "image row for a text-only model": (lambda i, m: _run(_recipe(i, m, data=_jsonl(i, _image_row(i, _an_image(i))))),
                                        "train.jsonl:1: the row holds image content, which the text-only model"),
    "unknown encoder": (lambda i, m: _run(_recipe(i, m, "encoders: {image: open_clip:nope}\n    connectors: "
                                                         "{image: mlp2x_gelu}", name="align",
                                                  data=_jsonl(i, _image_row(i, _not_an_image(i))))),
                        "open_clip has no architecture 'nope'"),
    "unknown connector": (lambda i, m: _run(_recipe(i, m, "encoders: {image: open_clip:polm-tiny-vit}\n    "
                                                           "connectors: {image: mlp3x}", name="align",
                                                    data=_jsonl(i, _image_row(i, _not_an_image(i))))),
                          "unknown connector 'mlp3x'. Did you mean 'mlp2x_gelu'?"),
    # command-line flags
    "bad --set key": (lambda i, m: _run(_recipe(i, m), "--set", "stages.9.lr=1"), "is not a stage index"),
    "--set into a value": (lambda i, m: _run(_recipe(i, m), "--set", "seed.x=1"), "'seed' must be an integer"),
    "--output naming an existing file": (
        lambda i, m: ["run", str(_recipe(i, m)), "--output", str(_write(i / "a-file", b"keep me\n"))],
        "a-file is a file; choose another --output"),
    "polm eval on a folder that is not a checkpoint": (
        lambda i, m: ["eval", str(_empty_folder(i)), "--data", "polm:arithmetic"],
        "not-a-model is not a model folder"),
    "polm eval with a missing data file": (
        lambda i, m: ["eval", str(m), "--data", str(i / "missing.jsonl")],
        ("data file not found: ", "missing.jsonl")),
}


def _write(path: Path, content: bytes) -> Path:
    path.write_bytes(content)
    return path


def _snapshot(folder: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None) for p in sorted(folder.rglob("*"))}


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_exit_2_and_nothing_is_written(case, model_dir, tmp_path, capsys, monkeypatch):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    build, expected = CASES[case]
    argv = build(inputs, model_dir)
    before = _snapshot(inputs)
    made: list[Path] = []
    real_mkdir = os.mkdir

    def recording_mkdir(path, *args, **kwargs):  # a folder made and removed again leaves no trace otherwise
        made.append(Path(path))
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", recording_mkdir)
    status = main(argv)

    err = capsys.readouterr().err
    assert status == 2, (status, err[-2000:])
    assert "Traceback" not in err and len(err.splitlines()) == 1, err[-2000:]
    assert err.startswith("polm: error: "), err
    assert all(text in err for text in ((expected,) if isinstance(expected, str) else expected)), err
    assert not (tmp_path / "out").exists(), "an output folder was written"
    assert not [path for path in made if tmp_path / "out" in (path, *path.parents)], "out/ was made, then removed"
    assert _snapshot(inputs) == before, "an input file changed"


def test_a_later_stage_with_a_bad_row_stops_the_run_before_the_first_stage_trains(model_dir, tmp_path, capsys):
    """sft -> dpo where the dpo data's second line is not JSON: refused before sft takes a step, naming the line
    (every stage's rows are read before the model loads), and no output folder."""
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    good = _jsonl(inputs, GOOD_ROW, GOOD_ROW)
    pairs = _jsonl(inputs, {"prompt": "What is 1 + 2?", "chosen": "3", "rejected": "4"}, "{not json", name="pairs.jsonl")
    recipe = inputs / "recipe.yaml"
    recipe.write_text(f"model: {model_dir}\nstages:\n"
                      f"  - {{name: sft, data: {good}, max_steps: 2, batch_size: 2, eval_size: 0}}\n"
                      f"  - {{name: dpo, data: {pairs}, max_steps: 2, batch_size: 2, eval_size: 0}}\n")

    assert main(_run(recipe)) == 2
    assert "pairs.jsonl:2: invalid JSON" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
