"""The names-and-colours files beside every label map, parsed back by readers written to each
format's published description (no maintained Python library reads either format):

- 3D Slicer colour table (Slicer developer guide, "Color table file format (.txt, .ctbl)"): header
  lines start with '#', the first is "# Color table file ..."; each data line is
  ``index name R G B A``, space separated, the name without spaces, components integers 0-255.
- ITK-SNAP label description file: '#' comment lines, then ``IDX R G B A VIS MSH "LABEL"`` with
  R, G, B integers 0-255, A a number in 0..1, VIS and MSH 0 or 1, the label in double quotes.
"""

import re

import numpy as np
import pytest

from maisi2 import volume_io
from maisi2.label_tables import (
    colours_of,
    itksnap_label_description,
    slicer_colour_table,
    table_paths,
    write_label_tables,
)
from maisi2.labels import BODY, ID_TO_NAME


def parse_slicer_colour_table(text: str) -> dict[int, tuple[str, tuple[int, int, int, int]]]:
    lines = text.splitlines()
    assert lines[0].startswith("# Color table file"), "a discrete colour table starts with '# Color table file'"
    table = {}
    for line in lines[1:]:
        if line.startswith("#") or not line.strip():
            continue
        fields = line.split(" ")
        assert len(fields) == 6, f"six space-separated fields expected: {line!r}"
        index, name, *rgba = fields
        values = tuple(int(v) for v in rgba)
        assert all(0 <= v <= 255 for v in values) and int(index) >= 0 and name
        assert int(index) not in table, f"index {index} twice"
        table[int(index)] = (name, values)
    return table


_ITKSNAP_LINE = re.compile(r'^\s*(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+([0-9]*\.?[0-9]+)\s+([01])\s+([01])\s+"([^"]*)"\s*$')


def parse_itksnap_label_description(text: str) -> dict[int, tuple[str, tuple[int, int, int], float, int, int]]:
    table = {}
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        match = _ITKSNAP_LINE.match(line)
        assert match, f"not an ITK-SNAP label line: {line!r}"
        idx, r, g, b, alpha, vis, mesh, label = match.groups()
        rgb = (int(r), int(g), int(b))
        assert all(0 <= v <= 255 for v in rgb) and 0.0 <= float(alpha) <= 1.0
        assert int(idx) not in table
        table[int(idx)] = (label, rgb, float(alpha), int(vis), int(mesh))
    return table


def test_slicer_table_names_and_colours_every_label():
    table = parse_slicer_colour_table(slicer_colour_table())
    assert set(table) == {0, *ID_TO_NAME}
    for idx, name in ID_TO_NAME.items():
        assert table[idx][0] == name.replace(" ", "_")
        assert table[idx][1][:3] == tuple(colours_of(np.array(idx)))
    assert table[0] == ("background", (0, 0, 0, 0))
    assert 0 < table[BODY][1][3] < 255  # the body lets the CT show through


def test_itksnap_description_names_and_colours_every_label():
    table = parse_itksnap_label_description(itksnap_label_description())
    slicer = parse_slicer_colour_table(slicer_colour_table())
    assert set(table) == set(slicer)
    for idx, (label, rgb, alpha, vis, mesh) in table.items():
        assert label == (ID_TO_NAME[idx] if idx else "background")
        assert rgb == slicer[idx][1][:3] and round(alpha * 255) == slicer[idx][1][3]
        assert vis == mesh == (0 if idx == 0 else 1)


def test_colours_of_neighbouring_labels_are_distinct():
    rgb = colours_of(np.arange(1, 133)).astype(int)
    assert np.all(np.abs(np.diff(rgb, axis=0)).sum(axis=1) > 60)


def test_tables_go_beside_each_saved_label_map_and_obey_overwrite(tmp_path):
    path = tmp_path / "case_label.nii.gz"
    volume = volume_io.Volume(np.zeros((4, 4, 2), np.int16), np.eye(4))
    volume_io.save_label_map(path, volume)
    slicer, itksnap = table_paths(path)
    assert (slicer.name, itksnap.name) == ("case_label.ctbl", "case_label.itksnap.txt")
    assert slicer.read_text() == slicer_colour_table() and itksnap.read_text() == itksnap_label_description()
    other = tmp_path / "other.nii.gz"
    table_paths(other)[1].write_text("mine")
    with pytest.raises(FileExistsError, match="other.itksnap.txt already exists"):
        volume_io.save_label_map(other, volume)
    assert not other.exists(), "checked before anything is written"
    volume_io.save_label_map(other, volume, overwrite=True)
    assert write_label_tables(other, overwrite=True) == table_paths(other)
