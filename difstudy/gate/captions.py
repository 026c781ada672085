"""GATE on real data: fine-grained captions from a CSV for the ``fine`` prompt technique."""

from __future__ import annotations

import csv
import os
from pathlib import Path

from ..errors import DifstudyError


def read_captions(path: str | os.PathLike) -> dict[str, str]:
    """``{image_id: caption}`` from a CSV with the header ``image_id,caption``."""
    p = Path(path)
    if not p.is_file():
        raise DifstudyError(f"caption file {str(p)!r} does not exist; expected a CSV with columns image_id,caption")
    with open(p, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not {"image_id", "caption"} <= set(reader.fieldnames):
            raise DifstudyError(
                f"caption file {str(p)!r} has columns {reader.fieldnames}; it needs a header image_id,caption"
            )
        return {row["image_id"]: row["caption"] for row in reader}


class with_captions:  # noqa: N801 - used like a function
    """A dataset view whose items carry fine-grained captions from a CSV (``image_id,caption``).

    ``extract(..., variants=["fine"])`` and ``Technique("fine", prompt="fine")`` then read the
    user's captions: ``ds = with_captions(load_dataset("spair", root), "captions.csv")``.
    Items become dicts (``image_id``, ``image``, ``caption``, ``fine_caption`` and the item's
    other fields); an image without a caption is an error naming it. The cache keys these
    features ``fine``: keep one caption file per cache folder."""

    def __init__(self, dataset, path: str | os.PathLike):
        self.dataset, self.path = dataset, str(path)
        self.captions = read_captions(path)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict:
        s = self.dataset[i]
        d = dict(s) if isinstance(s, dict) else {k: getattr(s, k) for k in s.__dataclass_fields__}
        if "caption" not in d:
            d["caption"] = None
        iid = str(d["image_id"])
        if iid not in self.captions:
            raise DifstudyError(f"image {iid!r} has no caption in {self.path!r}; add a row '{iid},<caption>'")
        d["fine_caption"] = self.captions[iid]
        return d
