"""The preview: slices through the largest tumour (or a requested label), a legend, the window stated."""

import numpy as np
import pytest

from maisi2 import label_tables
from maisi2.labels import BODY, label_id
from maisi2.preview import PREVIEW_WINDOW_HU, preview_centre, render_preview

LIVER, TUMOR, SPLEEN = label_id("liver"), label_id("hepatic tumor"), label_id("spleen")


def _mask():
    labels = np.full((40, 36, 30), BODY, dtype=np.int16)
    labels[:2] = 0
    labels[5:25, 5:25, 3:27] = LIVER
    labels[8:12, 8:12, 4:8] = TUMOR  # small tumour far from the middle
    labels[15:22, 16:23, 20:26] = TUMOR  # the largest one
    labels[28:34, 25:31, 10:16] = SPLEEN
    hu = np.where(labels == 0, -1000.0, 40.0).astype(np.float32)
    hu[labels == TUMOR] = 200.0
    return hu, labels


def test_centre_is_the_largest_tumor_or_the_requested_label():
    hu, labels = _mask()
    centre, what = preview_centre(labels)
    assert labels[centre] == TUMOR and 15 <= centre[0] < 22 and 20 <= centre[2] < 26
    assert "largest tumour (hepatic tumor)" in what
    centre, what = preview_centre(labels, "spleen")
    assert labels[centre] == SPLEEN and what == "centred on spleen"
    no_tumor = np.where(labels == TUMOR, LIVER, labels)
    assert preview_centre(no_tumor) == ((20, 18, 15), "mid-volume slices")
    assert labels[20, 18, 15] != TUMOR, "the middle of this mask misses both tumours"
    with pytest.raises(ValueError, match="does not hold"):
        preview_centre(labels, "pancreas")
    with pytest.raises(KeyError, match="did you mean"):
        preview_centre(labels, "hepatic tumour")


def test_preview_shows_the_tumor_a_legend_and_the_window():
    hu, labels = _mask()
    image = render_preview(hu, labels, (1.0, 1.0, 1.0), height=120)
    pixels = np.asarray(image.convert("RGB")).astype(int)
    tumor_rgb = label_tables.colours_of(np.array(TUMOR)).astype(int)
    panels = pixels[14:14 + 120]
    assert (np.abs(panels - tumor_rgb).sum(axis=2) == 0).sum() > 30, "tumour outlines are drawn in its colour"
    below = pixels[14 + 120:]
    for idx in (TUMOR, LIVER, BODY):  # legend swatches, the tumour first
        swatch = label_tables.colours_of(np.array(idx)).astype(int)
        assert (np.abs(below - swatch).sum(axis=2) == 0).sum() >= 60, idx
    assert image.height > 120 + 2 * 14 + 3 * 12


def test_window_is_the_one_stated():
    assert PREVIEW_WINDOW_HU == (-500.0, 500.0)
    hu, labels = _mask()
    hu[:] = 0.0  # the middle of the window: mid grey wherever no outline is drawn
    labels[:] = 0
    labels[20, 18, 15] = LIVER
    image = np.asarray(render_preview(hu, labels, (1.0, 1.0, 1.0), height=120).convert("L")).astype(int)
    assert np.median(image[14:134, :36]) in (127, 128)
