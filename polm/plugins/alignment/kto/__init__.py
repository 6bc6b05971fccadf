"""KTO on unpaired rows: the ``kto`` stage."""

from polm.plugins.alignment.kto.rows import collate_unpaired, encode_unpaired, unpaired_rows
from polm.plugins.alignment.kto.stage import KTOOptions, KTOStage

__all__ = ["KTOOptions", "KTOStage", "collate_unpaired", "encode_unpaired", "unpaired_rows"]
