"""Image encoders from open_clip: ``open_clip:<architecture>``, per-patch features of its vision tower.

``open_clip:ViT-B-32`` with ``pretrained: openai`` (a tag open_clip knows, or a
local weights file) loads real CLIP weights; without ``pretrained`` the tower
is randomly initialised. ``open_clip:polm-tiny-vit`` is a two-layer ViT on
32x32 images (16 patches of 8x8), registered with open_clip for tests and the
quickstart.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from polm.engine.errors import PolmError
from polm.engine.media import Encoder
from polm.engine.options import parse_options

TINY_CONFIG = Path(__file__).with_name("polm-tiny-vit.json")


@dataclass
class OpenClipOptions:
    """Options of ``open_clip`` encoders."""

    pretrained: str | None = field(default=None, metadata={
        "help": "weights: a tag open_clip knows for the architecture (e.g. 'openai'), or a local file; none: random"})
    freeze: bool = field(default=True, metadata={"help": "keep the encoder's weights as they are"})
    cache_size: int = field(default=4096, metadata={"help": "features of this many images kept while frozen (0: off)"})

    def __post_init__(self) -> None:
        if self.cache_size < 0:
            raise ValueError(f"'cache_size' must not be negative, got {self.cache_size}")


class OpenClipEncoder(Encoder):
    """The vision tower of an open_clip model; its tokens are the patch features before pooling.

    Images go through open_clip's own evaluation preprocessing (resize, centre
    crop, normalisation with the weights' mean and standard deviation).
    """

    modality = "image"

    def __init__(self, architecture: str, options: OpenClipOptions) -> None:
        import open_clip

        if TINY_CONFIG.stem not in open_clip.list_models():
            open_clip.add_model_config(TINY_CONFIG)
        if architecture not in open_clip.list_models():
            raise PolmError(f"open_clip has no architecture '{architecture}'; available: "
                            f"{', '.join(open_clip.list_models())}")
        try:
            with _without_random_init_warning():
                model, _, preprocess = open_clip.create_model_and_transforms(architecture,
                                                                             pretrained=options.pretrained)
        except RuntimeError as error:  # an unknown tag or a failed download
            raise PolmError(f"open_clip:{architecture}: cannot load pretrained '{options.pretrained}': "
                            f"{str(error).splitlines()[0]}; pass a local weights file as 'pretrained'") from None
        visual = model.visual
        if not hasattr(visual, "output_tokens") or not hasattr(visual, "grid_size"):
            raise PolmError(f"open_clip:{architecture} has a {type(visual).__name__} vision tower; polm reads the "
                            "patch tokens of ViT towers only (choose a ViT architecture)")
        visual.output_tokens = True
        grid = visual.grid_size
        super().__init__(f"open_clip:{architecture}", options, width=visual.transformer.width,
                         num_tokens=grid[0] * grid[1], freeze=options.freeze,
                         rebuilds_weights=options.pretrained is not None, cache_size=options.cache_size)
        self.visual = visual  # the text tower is dropped
        self.preprocess = preprocess
        self.requires_grad_(not options.freeze)

    def load(self, path: str) -> torch.Tensor:
        """(3, H, W) normalised pixels of the image at ``path``."""
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path) as image:
                return self.preprocess(image.convert("RGB"))
        except (FileNotFoundError, UnidentifiedImageError, OSError) as error:
            raise PolmError(f"cannot read image {path}: {error}") from None

    def check_file(self, path: str) -> None:
        """Fail on a file PIL cannot identify or whose structure is damaged, without decoding its pixels."""
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path) as image:
                image.verify()
        except (FileNotFoundError, UnidentifiedImageError, OSError, SyntaxError) as error:  # verify raises SyntaxError
            raise PolmError(f"cannot read image {path}: {error}") from None

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) -> (N, num_tokens, width) patch features."""
        _, tokens = self.visual(inputs)
        return tokens


def open_clip_encoder(architecture: str, **options: object) -> OpenClipEncoder:
    """The factory registered as ``open_clip``: ``build_encoder("open_clip:ViT-B-32", pretrained="openai")``."""
    return OpenClipEncoder(architecture, parse_options("encoder 'open_clip'", OpenClipOptions, options))


@contextmanager
def _without_random_init_warning() -> Iterator[None]:
    """Drop open_clip's root-logger warning that a model without ``pretrained`` was initialised randomly: that
    is what such an encoder asks for (polm saves its weights with the model), not news to the user."""

    def keep(record: logging.LogRecord) -> bool:
        return "No pretrained weights loaded" not in record.getMessage()

    root = logging.getLogger()
    root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)
