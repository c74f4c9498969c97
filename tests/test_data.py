"""Datalists, the CT dataset, size buckets and samplers (synthetic NIfTI files in tmp_path)."""

import json
from collections import Counter

import nibabel as nib
import numpy as np
import pytest
import torch

from maisi2 import volume_io
from maisi2.data import (
    BucketBatchSampler,
    CTDataset,
    DataItem,
    DatalistSource,
    bucket_by_size,
    center_pad_or_crop,
    collate_samples,
    hu_to_unit,
    read_datalist,
    scan_shape,
    shape_per_item,
    unit_to_hu,
    weighted_source_sampler,
    write_datalist,
)
from maisi2.labels import BODY, label_id


# -- helpers -------------------------------------------------------------------------------

def _phantom(shape, spacing):
    """A body ellipsoid (0 HU) in air with a 'liver' blob (60 HU), and its label map."""
    grids = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    body = sum(g**2 for g in grids) < 0.8
    liver = sum((g - 0.2) ** 2 for g in grids) < 0.1
    ct = np.where(body, 0.0, -1000.0).astype(np.float32)
    ct[liver] = 60.0
    ct[0, 0, 0] = 3000.0  # metal-bright voxel: must clip to 1
    labels = np.where(body, BODY, 0).astype(np.int16)
    labels[liver] = label_id("liver")
    return ct, labels


def _write_scan(folder, name, shape=(12, 10, 8), spacing=(2.0, 2.0, 3.0), with_label=True):
    ct, labels = _phantom(shape, spacing)
    affine = volume_io.ras_affine(spacing, origin=(-10.0, 5.0, 20.0))
    image = folder / f"{name}_ct.nii.gz"
    volume_io.save_ct(image, volume_io.Volume(ct, affine))
    label = None
    if with_label:
        label = folder / f"{name}_label.nii.gz"
        volume_io.save_label_map(label, volume_io.Volume(labels, affine))
    return image, label


@pytest.fixture
def scans(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    a = _write_scan(data, "a")
    b = _write_scan(data, "b", shape=(9, 9, 6), spacing=(1.0, 1.0, 1.0), with_label=False)
    return data, a, b


# -- intensity convention -------------------------------------------------------------------

def test_hu_unit_round_trip_and_clipping():
    hu = np.array([-2000.0, -1000.0, 0.0, 500.0, 1000.0, 3000.0])
    unit = hu_to_unit(hu)
    assert np.allclose(unit, [0, 0, 0.5, 0.75, 1, 1])
    assert np.allclose(unit_to_hu(unit), np.clip(hu, -1000, 1000))
    assert np.allclose(unit_to_hu(np.array([-0.1, 1.2])), [-1000, 1000])  # decoder overshoot
    t = torch.tensor(hu)
    assert torch.allclose(hu_to_unit(t), torch.tensor(unit)) and torch.allclose(unit_to_hu(hu_to_unit(t)), t.clamp(-1000, 1000))


# -- datalists ------------------------------------------------------------------------------

@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".json"])
def test_datalist_round_trip_with_relative_paths(scans, tmp_path, suffix):
    data, (img_a, lab_a), (img_b, _) = scans
    items = [
        DataItem(img_a, lab_a, spacing=(1.5, 1.5, 2.25), modality="ct_contrast", source="hospital-a", fold=2),
        DataItem(img_b, None, source="hospital-b"),
    ]
    path = tmp_path / f"list{suffix}"
    write_datalist(path, items)
    assert read_datalist(path) == items
    text = path.read_text()
    assert "data/a_ct.nii.gz" in text and str(tmp_path) not in text, "paths are stored relative"
    # Moving the whole folder keeps the datalist valid: paths resolve from the datalist's folder.
    moved = tmp_path / "moved"
    moved.mkdir()
    for name in ("data", f"list{suffix}"):
        (tmp_path / name).rename(moved / name)
    again = read_datalist(moved / f"list{suffix}")
    assert again[0].image == moved / "data" / "a_ct.nii.gz" and again[0].spacing == (1.5, 1.5, 2.25)
    assert again[0].modality_id == 3 and again[1].modality_id == 1


def test_decathlon_json_paths_are_joined_as_monai_joins_them(scans, tmp_path):
    from monai.data import load_decathlon_datalist

    data, (img_a, lab_a), (img_b, _) = scans
    (tmp_path / "lists").mkdir()
    datalist = tmp_path / "lists" / "dataset.json"
    datalist.write_text(json.dumps({
        "name": "two scans", "labels": {"0": "background"}, "numTraining": 1,
        "training": [{"image": "./data/a_ct.nii.gz", "label": "./data/a_label.nii.gz", "fold": 1,
                      "dim": [12, 10, 8], "spacing": [2.0, 2.0, 3.0]}],  # dim: a MAISI-release key, not used
        "validation": [{"image": "data/b_ct.nii.gz"}],
        "test": ["data/b_ct.nii.gz"],
    }))
    source = DatalistSource(datalist, data_root=tmp_path)  # paths relative to a data root, not the file
    items = read_datalist(source)
    monai_rows = load_decathlon_datalist(datalist, data_list_key="training", base_dir=tmp_path)
    assert [str(i.image) for i in items] == [r["image"] for r in monai_rows] == [str(img_a)]
    assert [str(i.label) for i in items] == [r["label"] for r in monai_rows]
    assert items[0].fold == 1 and items[0].spacing == (2.0, 2.0, 3.0)
    assert [i.image for i in read_datalist(DatalistSource(datalist, "validation", tmp_path))] == [img_b]
    assert [i.image for i in read_datalist(DatalistSource(datalist, "test", tmp_path))] == [img_b]
    with pytest.raises(FileNotFoundError, match="relative paths start at the datalist's folder"):
        read_datalist(datalist)  # relative to lists/, where data/ is not
    with pytest.raises(ValueError, match="has no 'testing' list \\(lists: training, validation, test\\)"):
        read_datalist(DatalistSource(datalist, "testing", tmp_path))
    with pytest.raises(FileNotFoundError, match="data root .* is not an existing folder"):
        read_datalist(DatalistSource(datalist, data_root=tmp_path / "nowhere"))
    write_datalist(tmp_path / "l.jsonl", items)
    with pytest.raises(ValueError, match="applies to decathlon-style .json datalists only"):
        read_datalist(DatalistSource(tmp_path / "l.jsonl", key="training"))


def test_every_datalist_command_takes_decathlon_json(scans, tmp_path, monkeypatch):
    """train-vae, encode, generate --datalist and the evaluate tools pass --datalist-key and
    --data-root on (train-flow and train-controlnet read the latent cache that encode builds)."""
    import importlib

    from maisi2 import cli, encode, generate, train_vae

    diversity, qcrate, seg = (importlib.import_module(f"maisi2.evaluate.{m}") for m in ("diversity", "qcrate", "seg"))

    data, (img_a, lab_a), _ = scans
    datalist = tmp_path / "elsewhere.json"
    datalist.write_text(json.dumps({"validation": [{"image": "data/a_ct.nii.gz", "label": "data/a_label.nii.gz"}]}))
    seen = {}

    def capture(name):
        def record(*args, **kwargs):
            seen[name] = args
            raise SystemExit(0)
        return record

    monkeypatch.setattr(train_vae, "train_vae", capture("train-vae"))
    monkeypatch.setattr(encode, "encode_datalist", capture("encode"))
    monkeypatch.setattr(generate, "generate_batch", capture("generate"))
    monkeypatch.setattr(seg, "train_segmenter", capture("train-segmenter"))
    monkeypatch.setattr(qcrate, "qc_rate_files", capture("qc-rate"))
    monkeypatch.setattr(diversity, "diversity", capture("diversity"))
    options = ["--datalist-key", "validation", "--data-root", str(tmp_path)]
    for argv in (["train-vae", str(datalist), "--out", str(tmp_path / "v")],
                 ["encode", str(datalist), "--vae", "x.pt", "--out", str(tmp_path / "c")],
                 ["generate", "--datalist", str(datalist), "--out-dir", str(tmp_path / "g")],
                 ["evaluate", "train-segmenter", "--data", str(datalist), "--out", str(tmp_path / "s.pt")],
                 ["evaluate", "qc-rate", str(datalist)], ["evaluate", "diversity", str(datalist)]):
        with pytest.raises(SystemExit):
            cli.main(argv + options)
    assert read_datalist(seen["train-vae"][0]) == read_datalist(seen["encode"][0]) == [DataItem(img_a, lab_a)]
    assert [(i.mask, i.out.name) for i in seen["generate"][0]] == [(lab_a, "a_label_ct.nii.gz")]
    assert seen["train-segmenter"][0] == seen["qc-rate"][0] == [(img_a, lab_a)]
    assert seen["diversity"][0] == [img_a]


def test_write_refuses_to_overwrite(scans, tmp_path):
    _, (img, _), _ = scans
    path = write_datalist(tmp_path / "l.jsonl", [DataItem(img)])
    with pytest.raises(FileExistsError):
        write_datalist(path, [DataItem(img)])
    write_datalist(path, [DataItem(img, source="x")], overwrite=True)
    assert read_datalist(path)[0].source == "x"
    with pytest.raises(ValueError, match="jsonl"):
        write_datalist(tmp_path / "l.txt", [DataItem(img)])


def test_csv_defaults_and_quoted_spacing(scans, tmp_path):
    path = tmp_path / "l.csv"
    path.write_text('image,label,spacing,source\ndata/a_ct.nii.gz,data/a_label.nii.gz,"1,1,2.5",s1\ndata/b_ct.nii.gz,,,\n')
    first, second = read_datalist(path)
    assert first.spacing == (1.0, 1.0, 2.5) and first.label == tmp_path / "data" / "a_label.nii.gz"
    assert second == DataItem(tmp_path / "data" / "b_ct.nii.gz")  # empty cells take the defaults


@pytest.mark.parametrize("suffix, body, message", [
    (".jsonl", '{"image": "data/a_ct.nii.gz"}\n\n{"label": "data/a_label.nii.gz"}\n', r"line 3: missing 'image'"),
    (".jsonl", '{"image": "data/a_ct.nii.gz", "modality": "pet"}\n', r"line 1: unknown modality 'pet'"),
    (".jsonl", '{"image": "data/a_ct.nii.gz"}\n{"image": "data/a_ct.nii.gz", "mask": "x"}\n', r"line 2: unknown field.*'mask'"),
    (".jsonl", '{"image": "data/a_ct.nii.gz"}\n{"image": "data/nope.nii.gz"}\n', r"line 2: .*nope.nii.gz does not exist"),
    (".jsonl", '{"image": "data/a_ct.nii.gz", "spacing": [1, 2]}\n', r"line 1: spacing must be three"),
    (".jsonl", '{"image": "data/a_ct.nii.gz", "fold": 1.5}\n', r"line 1: fold must be an integer"),
    (".jsonl", '{"image": "data/a_ct.nii.gz"\n', r"line 1: not valid JSON"),
    (".csv", "image,mask\ndata/a_ct.nii.gz,x\n", r"line 1: unknown column.*'mask'"),
    (".csv", "image,modality\ndata/a_ct.nii.gz,ct\ndata/b_ct.nii.gz,xray\n", r"line 3: unknown modality 'xray'"),
    (".csv", "image,label\ndata/a_ct.nii.gz,data/missing.nii.gz\n", r"line 2: .*missing.nii.gz does not exist"),
    (".csv", "label,image\ndata/a_label.nii.gz,\n", r"line 2: missing 'image'"),
    (".csv", "image,spacing\ndata/a_ct.nii.gz,1,1,1\n", r"line 2: more cells than columns"),
])
def test_bad_rows_name_their_line(scans, tmp_path, suffix, body, message):
    path = tmp_path / f"list{suffix}"
    path.write_text(body)
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        read_datalist(path)


# -- dataset --------------------------------------------------------------------------------

def test_dataset_sample_shapes_dtypes_and_ranges(scans):
    _, (img, lab), (img_b, _) = scans
    ds = CTDataset([DataItem(img, lab, source="s"), DataItem(img_b, modality="ct_wo_contrast")], divisor=4)
    sample = ds[0]
    assert sample["image"].shape == (1, 12, 12, 8) and sample["image"].dtype == torch.float32
    assert sample["label"].shape == (1, 12, 12, 8) and sample["label"].dtype == torch.int16
    assert 0.0 <= sample["image"].min() and sample["image"].max() == 1.0  # the 3000 HU voxel clipped
    assert torch.equal(sample["spacing"], torch.tensor([2.0, 2.0, 3.0]))
    assert sample["modality"] == 1 and sample["source"] == "s"
    # Padding (y: 10 -> 12, one row each side) is air in the image and background in the label.
    assert torch.all(sample["image"][0, :, 0] == 0) and torch.all(sample["image"][0, :, -1] == 0)
    assert torch.all(sample["label"][0, :, 0] == 0)
    liver = sample["label"] == label_id("liver")
    assert liver.any() and torch.allclose(sample["image"][liver], torch.tensor(hu_to_unit(60.0), dtype=torch.float32))
    other = ds[1]
    assert other["label"] is None and other["image"].shape == (1, 12, 12, 8) and other["modality"] == 2


def test_dataset_resamples_and_pads_or_crops_to_a_shape(scans):
    _, (img, lab), _ = scans
    ds = CTDataset([DataItem(img, lab)], spacing=(1.0, 1.0, 1.5), shape=(16, 24, 16), divisor=8)
    sample = ds[0]
    # 12 x 10 x 8 voxels of 2 x 2 x 3 mm -> 24 x 20 x 16 at 1 x 1 x 1.5 mm, then x cropped to 16, y padded to 24.
    assert sample["image"].shape == (1, 16, 24, 16) and sample["label"].shape == (1, 16, 24, 16)
    assert torch.equal(sample["spacing"], torch.tensor([1.0, 1.0, 1.5]))
    assert set(torch.unique(sample["label"]).tolist()) <= {0, label_id("liver"), BODY}
    with pytest.raises(ValueError, match="multiples of divisor=8"):
        CTDataset([DataItem(img)], shape=(16, 20, 16), divisor=8)


def test_datalist_spacing_replaces_the_header(scans):
    _, (img, lab), _ = scans
    sample = CTDataset([DataItem(img, lab, spacing=(1.0, 1.0, 1.0))], spacing=(2.0, 2.0, 2.0))[0]
    assert sample["image"].shape == (1, 6, 5, 4)  # 12 x 10 x 8 voxels of 1 mm (not the header's 2 x 2 x 3)
    assert torch.equal(sample["spacing"], torch.tensor([2.0, 2.0, 2.0]))


def test_label_on_another_grid_is_refused(scans, tmp_path):
    _, (img, _), (_, _) = scans
    other = tmp_path / "small_label.nii.gz"
    volume_io.save_label_map(other, volume_io.Volume(np.zeros((12, 10, 7), np.int16), volume_io.ras_affine((2.0, 2.0, 3.0))))
    with pytest.raises(ValueError, match="not on the grid of its image"):
        CTDataset([DataItem(img, other)])[0]


def test_center_pad_or_crop():
    a = np.arange(5)[:, None, None] * np.ones((5, 2, 3))
    out = center_pad_or_crop(a, (3, 4, 3), fill=-1)
    assert out.shape == (3, 4, 3)
    assert np.array_equal(out[:, 1, 0], [1, 2, 3])  # centre rows kept
    assert np.all(out[:, 0] == -1) and np.all(out[:, 3] == -1)


def test_scan_shape_matches_the_dataset_for_a_non_ras_file(tmp_path):
    ct, _ = _phantom((7, 9, 11), (1.3, 0.7, 2.0))
    # Stored as (z, x, y) with a flipped x axis: the header shape is not the canonical one.
    affine = np.array([[0, -1.3, 0, 5], [0, 0, 0.7, 0], [2.0, 0, 0, 0], [0, 0, 0, 1]])
    path = tmp_path / "odd.nii.gz"
    nib.save(nib.Nifti1Image(np.transpose(ct, (2, 0, 1)), affine), path)
    item = DataItem(path)
    assert scan_shape(item) == (7, 9, 11)
    for spacing in [(1.0, 1.0, 1.0), (2.0, 0.9, 3.1)]:
        assert scan_shape(item, spacing) == tuple(CTDataset([item], spacing=spacing)[0]["image"].shape[1:])


# -- buckets and samplers ---------------------------------------------------------------------

SHAPES = [(10, 10, 5), (10, 10, 5), (12, 10, 5), (30, 30, 30), (31, 30, 29), (64, 64, 80), (20, 20, 20)]


@pytest.mark.parametrize("kwargs", [{}, {"num_buckets": 3}, {"bucket_edges": [16, 32, 64]},
                                    {"bucket_edges": [[16, 32], [16, 32], [8, 32, 96]]}])
def test_buckets_hold_one_shape_each(kwargs):
    buckets = bucket_by_size(SHAPES, divisor=4, **kwargs)
    assert sorted(i for v in buckets.values() for i in v) == list(range(len(SHAPES)))
    for shape, indices in buckets.items():
        assert all(s % 4 == 0 for s in shape)
        for i in indices:
            if "bucket_edges" not in kwargs:  # edges may crop; otherwise every member fits its bucket
                assert all(b >= s for b, s in zip(shape, SHAPES[i]))
    if kwargs.get("num_buckets"):
        assert len(buckets) == 3
    assert shape_per_item(buckets)[3] in buckets


def test_bucket_rules():
    assert bucket_by_size(SHAPES)[(10, 10, 5)] == [0, 1]
    edges = bucket_by_size(SHAPES, bucket_edges=[16, 32, 64])
    assert edges[(16, 16, 16)] == [0, 1, 2] and edges[(32, 32, 32)] == [3, 4, 6]
    assert edges[(64, 64, 64)] == [5]  # 80 is above the largest edge: cropped to it
    with pytest.raises(ValueError, match="not both"):
        bucket_by_size(SHAPES, bucket_edges=[16], num_buckets=2)


def test_bucket_by_size_reads_item_headers(scans):
    _, (img_a, _), (img_b, _) = scans
    items = [DataItem(img_a), DataItem(img_b), DataItem(img_a)]
    assert bucket_by_size(items) == {(9, 9, 6): [1], (12, 10, 8): [0, 2]}
    assert bucket_by_size(items, divisor=4) == {(12, 12, 8): [0, 1, 2]}
    # Resampled sizes: a is 24 x 20 x 24 mm, b 9 x 9 x 6 mm.
    assert bucket_by_size(items, spacing=(3.0, 3.0, 3.0)) == {(3, 3, 2): [1], (8, 7, 8): [0, 2]}


BUCKETS = {(8, 8, 8): list(range(0, 10)), (16, 16, 16): list(range(10, 15)), (32, 32, 32): list(range(15, 17))}
SIZES = {(8, 8, 8): 4, (16, 16, 16): 2, (32, 32, 32): 1}


def _bucket_of(index):
    return next(k for k, v in BUCKETS.items() if index in v)


def test_sampler_batches_come_from_one_bucket_with_its_batch_size():
    sampler = BucketBatchSampler(BUCKETS, SIZES, seed=3)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 3 + 3 + 2
    for batch in batches:
        (key,) = {_bucket_of(i) for i in batch}
        assert len(batch) <= SIZES[key]
    assert sorted(i for b in batches for i in b) == list(range(17))
    full = [b for b in batches if _bucket_of(b[0]) == (8, 8, 8)]
    assert sorted(map(len, full)) == [2, 4, 4]
    dropped = list(BucketBatchSampler(BUCKETS, SIZES, drop_last=True))
    assert all(len(b) == SIZES[_bucket_of(b[0])] for b in dropped) and len(dropped) == 2 + 2 + 2


def test_sampler_is_deterministic_per_seed_and_epoch():
    a, b = BucketBatchSampler(BUCKETS, SIZES, seed=7), BucketBatchSampler(BUCKETS, SIZES, seed=7)
    assert list(a) == list(b)
    first = list(a)
    a.set_epoch(1)
    assert list(a) != first
    assert list(BucketBatchSampler(BUCKETS, SIZES, seed=8)) != first


@pytest.mark.parametrize("world_size", [2, 3, 5])
def test_sampler_splits_buckets_between_ranks(world_size):
    samplers = [BucketBatchSampler(BUCKETS, SIZES, seed=1, rank=r, world_size=world_size) for r in range(world_size)]
    assert len({len(s) for s in samplers}) == 1, "every rank takes the same number of steps"
    seen = [set(i for b in s for i in b) for s in samplers]
    assert set().union(*seen) == set(range(17)), "every item is served by some rank"
    for r, s in enumerate(samplers):
        for batch in s:
            assert len({_bucket_of(i) for i in batch}) == 1
    if world_size <= len(BUCKETS):  # whole buckets per rank: no item on two ranks
        assert sum(len(x) for x in seen) == 17
    else:  # shared buckets are split into disjoint shards
        for k in BUCKETS:
            owners = [r for r in range(world_size) if seen[r] & set(BUCKETS[k])]
            shards = [seen[r] & set(BUCKETS[k]) for r in owners]
            assert sum(map(len, shards)) == len(BUCKETS[k])


def test_sampler_rejects_bad_arguments():
    with pytest.raises(ValueError, match="rank"):
        BucketBatchSampler(BUCKETS, 2, rank=2, world_size=2)
    with pytest.raises(ValueError, match="no batch"):
        BucketBatchSampler({(8, 8, 8): [0, 1]}, 1, rank=2, world_size=3)


def test_dataloader_with_bucket_sampler(scans):
    _, (img_a, lab_a), (img_b, _) = scans
    items = [DataItem(img_a, lab_a), DataItem(img_a, lab_a), DataItem(img_b, None)]
    buckets = bucket_by_size(items, spacing=(2.0, 2.0, 2.0), divisor=4)
    ds = CTDataset(items, spacing=(2.0, 2.0, 2.0), shape=shape_per_item(buckets), divisor=4)
    loader = torch.utils.data.DataLoader(ds, batch_sampler=BucketBatchSampler(buckets, 2), collate_fn=collate_samples)
    batches = list(loader)
    assert len(batches) == 2
    for batch in batches:
        assert batch["image"].ndim == 5 and batch["spacing"].shape == (len(batch["source"]), 3)
    with pytest.raises(ValueError, match="different shapes"):
        collate_samples([ds[0], CTDataset(items[2:], divisor=1)[0]])


def test_weighted_source_sampler_matches_the_weights():
    items = ["big"] * 90 + ["small"] * 10
    sampler = weighted_source_sampler(items, {"big": 1.0, "small": 3.0}, num_samples=20000, seed=0)
    drawn = Counter(items[i] for i in sampler)
    assert abs(drawn["small"] / 20000 - 0.75) < 0.02
    again = weighted_source_sampler(items, {"big": 1.0, "small": 3.0}, num_samples=50, seed=0)
    assert list(again) == list(weighted_source_sampler(items, {"big": 1.0, "small": 3.0}, num_samples=50, seed=0))
    with pytest.raises(ValueError, match="missing: \\['small'\\]"):
        weighted_source_sampler(items, {"big": 1.0})
    with pytest.raises(ValueError, match="not in the datalist: \\['typo'\\]"):
        weighted_source_sampler(items, {"big": 1.0, "small": 1.0, "typo": 1.0})
    only_big = weighted_source_sampler(items, {"big": 1.0, "small": 0.0}, num_samples=500)
    assert all(i < 90 for i in only_big)
