"""The page's tumour edits, as calls to `maisi2.masks` (the one implementation of tumour editing).

An edit is a small dict from the page; `apply_edit` checks it and calls the matching function.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

__all__ = ["apply_edit"]


def apply_edit(labels: np.ndarray, spacing: Sequence[float], edit: dict) -> tuple[np.ndarray, dict]:
    """(new labels, record of the change with a one-line "summary") for one edit of the page."""
    try:
        from maisi2 import masks  # noqa: F401
    except ImportError:
        raise RuntimeError("tumour editing needs maisi2.masks (the mask tools), which this installation "
                           "does not have yet") from None
    raise RuntimeError("tumour editing is not wired to maisi2.masks yet")
