"""``polm:shapes``: images of coloured shapes drawn with PIL, and questions with exact answers.

Each 32x32 image holds one to four shapes (circle, square, triangle) in red,
green, blue or yellow on black. Test and train questions come in four skills
(the ``skill`` field), each with a fixed set of answers:

=========  ========================================  ==================  ======
skill      question                                  answers             chance
=========  ========================================  ==================  ======
colour     What colour is the shape?                 red/green/blue/...  1/4
shape      What shape is it?                         circle/square/...   1/3
count      How many shapes are there?                1, 2, 3, 4          1/4
position   Is the shape on the left or the right?    left, right         1/2
=========  ========================================  ==================  ======

``polm:shapes-captions`` describes the same kind of images in one line
("2 shapes: a red circle on the left and a blue square on the right"), the
data of an ``align`` stage.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from polm.engine.data import Row
from polm.modalities.multimodal.tasks import generated_rows, image_question

SIZE = 32
COLOURS = {"red": (230, 40, 40), "green": (40, 200, 60), "blue": (50, 90, 240), "yellow": (240, 220, 40)}
SHAPES = ("circle", "square", "triangle")
SKILLS = {"colour": "What colour is the shape?", "shape": "What shape is it?",
          "count": "How many shapes are there?", "position": "Is the shape on the left or the right?"}
CHANCE = {"colour": 1 / len(COLOURS), "shape": 1 / len(SHAPES), "count": 1 / 4, "position": 1 / 2}
SPLIT_SIZES = {"train": 3000, "test": 400}


def _place(rng: np.random.Generator, count: int) -> list[tuple[int, int, int]]:
    """``count`` non-overlapping boxes ``(x, y, side)`` inside the image."""
    boxes: list[tuple[int, int, int]] = []
    tries = 0
    while len(boxes) < count:
        tries += 1
        if tries % 100 == 0:  # the boxes so far leave no room: start again
            boxes = []
        side = int(rng.integers(9, 13))
        x, y = (int(v) for v in rng.integers(1, SIZE - side, size=2))
        if all(x + side + 1 <= bx or bx + bs + 1 <= x or y + side + 1 <= by or by + bs + 1 <= y
               for bx, by, bs in boxes):
            boxes.append((x, y, side))
    return boxes


def draw(path: Path, shapes: list[tuple[str, str, tuple[int, int, int]]]) -> None:
    """Save a PNG of ``(shape, colour, (x, y, side))`` items on black."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (SIZE, SIZE))
    pen = ImageDraw.Draw(image)
    for shape, colour, (x, y, side) in shapes:
        box = (x, y, x + side - 1, y + side - 1)
        fill = COLOURS[colour]
        if shape == "circle":
            pen.ellipse(box, fill=fill)
        elif shape == "square":
            pen.rectangle(box, fill=fill)
        else:
            pen.polygon([(x + side / 2, y), (x, y + side - 1), (x + side - 1, y + side - 1)], fill=fill)
    image.save(path)


def _side(box: tuple[int, int, int]) -> str:
    return "left" if box[0] + box[2] / 2 < SIZE / 2 else "right"


def _random_shapes(rng: np.random.Generator, count: int) -> list[tuple[str, str, tuple[int, int, int]]]:
    boxes = _place(rng, count)
    return [(str(rng.choice(SHAPES)), str(rng.choice(list(COLOURS))), box) for box in boxes]


def _make_questions(rng: np.random.Generator, folder: Path, size: int) -> list[Row]:
    rows = []
    for index in range(size):
        skill = list(SKILLS)[index % len(SKILLS)]
        count = int(rng.integers(1, 5)) if skill == "count" else 1
        shapes = _random_shapes(rng, count)
        while skill == "position" and abs(shapes[0][2][0] + shapes[0][2][2] / 2 - SIZE / 2) < 3:
            shapes = _random_shapes(rng, 1)  # clearly on one side
        path = folder / f"{index:05d}.png"
        draw(path, shapes)
        answer = {"colour": shapes[0][1], "shape": shapes[0][0], "count": str(count),
                  "position": _side(shapes[0][2])}[skill]
        rows.append({"prompt": image_question(path, SKILLS[skill]), "answer": answer, "skill": skill})
    return rows


def caption(shapes: list[tuple[str, str, tuple[int, int, int]]]) -> str:
    """``"a red circle on the left"`` or ``"2 shapes: a red circle on the left and a blue square on the right"``."""
    parts = [f"a {colour} {shape} on the {_side(box)}" for shape, colour, box in shapes]
    if len(parts) == 1:
        return parts[0]
    return f"{len(parts)} shapes: " + ", ".join(parts[:-1]) + " and " + parts[-1]


def _make_captions(rng: np.random.Generator, folder: Path, size: int) -> list[Row]:
    rows = []
    for index in range(size):
        shapes = _random_shapes(rng, int(rng.integers(1, 5)))
        path = folder / f"{index:05d}.png"
        draw(path, shapes)
        rows.append({"prompt": image_question(path, "Describe the image."), "answer": caption(shapes)})
    return rows


def shapes_rows(split: str, size: int | None = None, seed: int = 0) -> list[Row]:
    """Question rows of ``polm:shapes`` (``{prompt, answer, skill}``; 3000 train, 400 test by default)."""
    return generated_rows("shapes", split, seed, size or SPLIT_SIZES[split], _make_questions)


def shapes_caption_rows(split: str, size: int | None = None, seed: int = 0) -> list[Row]:
    """Caption rows of ``polm:shapes-captions`` (``{prompt, answer}``)."""
    return generated_rows("shapes-captions", split, seed, size or SPLIT_SIZES[split], _make_captions)
