"""`maisi2 serve`'s API through FastAPI's TestClient: token, uploads, imports, phantoms, viewer slices,
generation jobs (progress, cancel, queue, server stop), results and downloads, and every refusal.

Generation runs the tiny preset with random weights (a 32^3 mask of 8 mm: about a second a job).
"""

import dataclasses
import time

import nibabel as nib
import numpy as np
import pytest
import torch

pytest.importorskip("fastapi", reason="the web app needs fastapi (pip install -e .)")
pytest.importorskip("httpx", reason="FastAPI's TestClient needs httpx (pip install -e '.[test]')")

from fastapi.testclient import TestClient  # noqa: E402

from maisi2 import models, nets, volume_io  # noqa: E402
from maisi2.config import get_config  # noqa: E402
from maisi2.generate import phantom_mask  # noqa: E402
from maisi2.labels import label_id  # noqa: E402
from maisi2.web.app import COOKIE, HEADER, create_app  # noqa: E402
from maisi2.web.workspace import GenerationSettings, Workspace  # noqa: E402

TOKEN = "test-token"
AUTH = {HEADER: TOKEN}
SMALL = {"shape": [32, 32, 32], "spacing": [8.0, 8.0, 8.0]}  # the tiny model's cheapest mask


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A tiny-preset model folder with random weights (non-zero output layers, so outputs vary)."""
    cfg = get_config("tiny")
    torch.manual_seed(0)
    vae, unet, controlnet = nets.build_vae(cfg), nets.build_unet(cfg), nets.build_controlnet(cfg)
    with torch.no_grad():
        for net in (unet, controlnet):
            for p in net.parameters():
                if p.abs().sum() == 0:
                    p.normal_(0, 0.05)
    fov = {"fov_mm": {"min": [128.0] * 3, "max": [320.0] * 3}}
    return str(models.save_model_folder(tmp_path_factory.mktemp("model"), cfg, vae, unet, controlnet, 0.8, fov))


@pytest.fixture
def workspace(tmp_path, tiny_model):
    ws = Workspace(tmp_path / "out", {"tiny": tiny_model}, max_upload_bytes=2**20)
    yield ws
    ws.close()


@pytest.fixture
def client(workspace):
    with TestClient(create_app(workspace, TOKEN), headers=AUTH) as c:
        yield c


def nifti_bytes(volume: volume_io.Volume, tmp_path, name="mask.nii.gz") -> bytes:
    path = tmp_path / name
    volume_io.save_label_map(path, volume)
    return path.read_bytes()


def phantom(client, **extra) -> dict:
    response = client.post("/api/masks/phantom", json={**SMALL, **extra})
    assert response.status_code == 200, response.text
    return response.json()


def wait_for(client, job_id, states=("done", "failed", "cancelled"), timeout=120.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = next(j for j in client.get("/api/jobs").json() if j["id"] == job_id)
        if job["state"] in states:
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not reach {states} in {timeout} s: {job}")


def leftovers(workspace) -> list[str]:
    """Staging folders or uploads still on disk (there must be none once a request has finished)."""
    return [p.name for area in ("masks", "results", "uploads") for p in (workspace.root / area).iterdir()
            if p.name.startswith(".") or area == "uploads"]


# -- access -----------------------------------------------------------------------------------------

def test_every_api_route_and_the_page_need_the_token(workspace):
    with TestClient(create_app(workspace, TOKEN)) as anonymous:
        for path in ("/api/options", "/api/masks", "/api/jobs", "/api/results", "/"):
            response = anonymous.get(path)
            assert response.status_code == 401 and "token" in response.json()["error"]
        assert anonymous.get("/api/options", headers={HEADER: "wrong"}).status_code == 401
        assert anonymous.get("/api/options?token=wrong").status_code == 401
        assert anonymous.post("/api/masks/phantom", json=SMALL).status_code == 401
        assert anonymous.get("/static/app.js").status_code == 200  # the page's own code is public
        # The printed URL: its token becomes a strict same-site cookie and leaves the address bar.
        opened = anonymous.get(f"/?token={TOKEN}", follow_redirects=False)
        assert opened.status_code == 303 and opened.headers["location"] == "/"
        cookie = opened.headers["set-cookie"]
        assert f"{COOKIE}={TOKEN}" in cookie and "samesite=strict" in cookie.lower() and "httponly" in cookie.lower()
        assert anonymous.get("/api/options", cookies={COOKIE: TOKEN}).status_code == 200
        assert "<canvas" in anonymous.get("/", cookies={COOKIE: TOKEN}).text
    assert list((workspace.root / "masks").iterdir()) == []  # the refused phantom was never made


# -- masks in ---------------------------------------------------------------------------------------

def test_an_uploaded_label_map_becomes_a_mask_and_its_slices_are_its_voxels(client, workspace, tmp_path):
    volume = phantom_mask((32, 32, 32), (8.0, 8.0, 8.0), seed=3)
    upload = client.post("/api/uploads?name=my%20scan.nii.gz", content=nifti_bytes(volume, tmp_path))
    assert upload.status_code == 200, upload.text
    mask = client.post("/api/masks/import", json={"label_map": upload.json()["upload"]}).json()
    assert mask["source"] == "upload" and mask["name"] == "my_scan.nii.gz"
    assert [m["id"] for m in client.get("/api/masks").json()] == [mask["id"]]
    info = client.get(f"/api/view/mask/{mask['id']}").json()
    assert info["shape"] == [32, 32, 32] and info["spacing"] == [8.0, 8.0, 8.0] and not info["has_ct"]
    legend = {entry["name"]: entry for entry in info["legend"]}
    assert legend["liver"]["id"] == label_id("liver")
    assert legend["liver"]["voxels"] == int((volume.array == label_id("liver")).sum())
    for axis, index in ((0, 10), (1, 16), (2, 20)):
        response = client.get(f"/api/view/mask/{mask['id']}/slice?layer=labels&axis={axis}&index={index}")
        shape = tuple(int(n) for n in response.headers["x-shape"].split(","))
        got = np.frombuffer(response.content, dtype=np.uint8).reshape(shape)
        np.testing.assert_array_equal(got, np.take(volume.array, index, axis=axis))
    download = client.get(f"/api/masks/{mask['id']}/download")
    assert np.array_equal(np.asarray(nib.Nifti1Image.from_bytes(_gunzip(download.content)).dataobj), volume.array)
    assert leftovers(workspace) == []  # the upload was consumed


def test_upload_refusals_are_one_clear_line_and_leave_nothing(client, workspace, tmp_path):
    refusals = [
        ("/api/uploads?name=notes.txt", b"hello", 400, "not a NIfTI file"),
        ("/api/uploads?name=big.nii.gz", b"x" * (2**20 + 1), 413, "upload limit of 1 MiB"),
        ("/api/uploads?name=empty.nii.gz", b"", 400, "empty"),
    ]
    for path, content, status, message in refusals:
        response = client.post(path, content=content)
        assert response.status_code == status and message in response.json()["error"], response.text
    # A file that is not a label map, and one with ids that are not MAISI's: refused at the import,
    # named as the user named it (not by our copy's path).
    garbage = client.post("/api/uploads?name=broken.nii.gz", content=b"\x1f\x8b not really gzip").json()["upload"]
    response = client.post("/api/masks/import", json={"label_map": garbage})
    assert response.status_code == 400 and "broken.nii.gz" in response.json()["error"]
    assert str(workspace.root) not in response.json()["error"]
    foreign = volume_io.Volume(np.full((8, 8, 8), 250, dtype=np.int16), volume_io.ras_affine((1, 1, 1)))
    upload = client.post("/api/uploads?name=foreign.nii.gz", content=nifti_bytes(foreign, tmp_path)).json()["upload"]
    response = client.post("/api/masks/import", json={"label_map": upload})
    assert response.status_code == 400 and "not MAISI ids: 250" in response.json()["error"]
    assert client.post("/api/masks/import", json={"label_map": upload}).status_code == 404  # used once
    assert client.post("/api/masks/import", json={}).status_code == 400
    assert client.get("/api/masks").json() == [] and leftovers(workspace) == []


def test_a_totalsegmentator_map_is_imported_with_maisi_ids(client, tmp_path):
    from maisi2.totalseg import TOTALSEG_CLASSES

    ts = {name: idx for idx, name in TOTALSEG_CLASSES.items()}
    seg = np.zeros((40, 40, 30), dtype=np.int16)
    seg[5:20, 8:30, 5:25] = ts["liver"]
    seg[22:35, 10:20, 8:20] = ts["spleen"]
    body = volume_io.Volume(seg, volume_io.ras_affine((4.0, 4.0, 4.0)))
    upload = client.post("/api/uploads?name=seg.nii.gz", content=nifti_bytes(body, tmp_path)).json()["upload"]
    undecided = client.post("/api/masks/import", json={"totalseg": upload})
    assert undecided.status_code == 400 and "v1 from v2" in undecided.json()["error"]  # no sided organs here
    content = (tmp_path / "mask.nii.gz").read_bytes()
    upload = client.post("/api/uploads?name=seg.nii.gz", content=content).json()["upload"]
    mask = client.post("/api/masks/import", json={"totalseg": upload, "version": "v2"})
    assert mask.status_code == 200, mask.text
    assert mask.json()["source"] == "totalseg" and "import" in mask.json()["change"]
    names = {entry["name"] for entry in client.get(f"/api/view/mask/{mask.json()['id']}").json()["legend"]}
    assert {"liver", "spleen", "body"} <= names


def test_a_totalsegmentator_map_with_its_ct_takes_the_body_outline_from_the_ct(client, workspace, tmp_path):
    """The page's "its CT" upload: the body envelope is the CT's tissue, not a guess from the labels;
    a CT on another grid is refused naming both files as uploaded, and both uploads are used up."""
    from maisi2.totalseg import TOTALSEG_CLASSES

    ts = {name: idx for idx, name in TOTALSEG_CLASSES.items()}
    seg = np.zeros((40, 40, 30), dtype=np.int16)
    seg[12:22, 12:26, 8:22] = ts["liver"]
    hu = np.full(seg.shape, -1000, dtype=np.int16)
    hu[4:36, 4:36, 2:28] = 40  # a body much larger than the organs in it
    affine = volume_io.ras_affine((4.0, 4.0, 4.0))
    seg_bytes = nifti_bytes(volume_io.Volume(seg, affine), tmp_path, "seg.nii.gz")
    ct_path = tmp_path / "ct.nii.gz"
    volume_io.save_ct(ct_path, volume_io.Volume(hu, affine))

    def import_pair(ct_bytes):
        seg_id = client.post("/api/uploads?name=patient%20seg.nii.gz", content=seg_bytes).json()["upload"]
        ct_id = client.post("/api/uploads?name=patient%20ct.nii.gz", content=ct_bytes).json()["upload"]
        return client.post("/api/masks/import", json={"totalseg": seg_id, "ct": ct_id, "version": "v2"})

    response = import_pair(ct_path.read_bytes())
    assert response.status_code == 200, response.text
    mask = response.json()
    assert mask["source"] == "totalseg" and "CT (HU threshold)" in mask["change"]["import"]
    labels = volume_io.load_label_map(workspace.mask_path(mask["id"])).array
    assert (labels == label_id("liver")).sum() == (seg == ts["liver"]).sum()
    assert np.array_equal(labels > 0, hu > -500)  # the body is the CT's tissue, organs inside it

    other = tmp_path / "other_ct.nii.gz"
    volume_io.save_ct(other, volume_io.Volume(hu[:, :, :20], affine))
    refused = import_pair(other.read_bytes())
    error = refused.json()["error"]
    assert refused.status_code == 400 and "is not on the grid of label map" in error, error
    assert "patient_ct.nii.gz" in error and "patient_seg.nii.gz" in error and str(workspace.root) not in error
    assert [m["id"] for m in client.get("/api/masks").json()] == [mask["id"]] and leftovers(workspace) == []


def test_phantoms_with_tumors_and_their_refusals(client):
    mask = phantom(client, tumors=["hepatic:1"], seed=2)
    tumors = client.get(f"/api/view/mask/{mask['id']}").json()["tumors"]
    assert [t["name"] for t in tumors] == ["hepatic tumor"] and tumors[0]["volume_ml"] > 0
    for body, message in (({**SMALL, "tumors": ["spleen:1"]}, "unknown tumour kind 'spleen'"),
                          ({"shape": [512, 512, 512], "spacing": [1, 1, 1]}, "at most"),
                          ({"shape": [32, 32, 32], "spacing": [0, 8, 8]}, "spacing"),
                          ({"shape": [32, 32], "spacing": [8, 8, 8]}, "shape must have 3 values")):
        response = client.post("/api/masks/phantom", json=body)
        assert response.status_code == 400 and message in response.json()["error"], response.text


def test_tumor_edits_make_new_masks_with_the_tumor_inside_its_organ(client, workspace):
    from scipy import ndimage


    mask = phantom(client)
    labels = volume_io.load_label_map(workspace.mask_path(mask["id"])).array
    depth = ndimage.distance_transform_edt(labels == label_id("liver"))
    at = [int(i) for i in np.unravel_index(np.argmax(depth), depth.shape)]
    response = client.post(f"/api/masks/{mask['id']}/edit", json={"op": "add", "kind": "hepatic", "radius_mm": 12, "at": at})
    assert response.status_code == 200, response.text
    added = response.json()
    assert added["source"] == "edit" and added["parent"] == mask["id"] and "hepatic 12 mm" in added["name"]
    change = added["change"]["changes"][0]
    edited = volume_io.load_label_map(workspace.mask_path(added["id"])).array
    tumor = edited == label_id("hepatic tumor")
    assert tumor[tuple(at)] and change["action"] == "added" and change["parent_organ"] == "liver"
    assert change["voxels"] == tumor.sum() and np.all(labels[tumor] == label_id("liver"))
    np.testing.assert_array_equal(volume_io.load_label_map(workspace.mask_path(mask["id"])).array, labels)  # kept
    listed = client.get(f"/api/view/mask/{added['id']}").json()["tumors"]
    assert [(t["kind"], t["voxels"]) for t in listed] == [("hepatic", int(tumor.sum()))]

    grown = client.post(f"/api/masks/{added['id']}/edit", json={"op": "scale", "kind": "hepatic", "factor": 1.5}).json()
    bigger = volume_io.load_label_map(workspace.mask_path(grown["id"])).array == label_id("hepatic tumor")
    assert bigger.sum() > tumor.sum() and grown["parent"] == added["id"]
    removed = client.post(f"/api/masks/{grown['id']}/edit", json={"op": "remove", "kind": "hepatic"}).json()
    np.testing.assert_array_equal(volume_io.load_label_map(workspace.mask_path(removed["id"])).array, labels)
    assert client.get(f"/api/view/mask/{removed['id']}").json()["tumors"] == []

    before = len(client.get("/api/masks").json())
    for body, message in (({"op": "add", "kind": "hepatic", "radius_mm": 8, "at": [0, 0, 0]}, "liver"),
                          ({"op": "add", "kind": "hepatic", "radius_mm": 8}, "position"),
                          ({"op": "add", "kind": "gallbladder", "radius_mm": 8, "at": at}, "unknown tumour kind"),
                          ({"op": "scale", "kind": "hepatic", "factor": 10}, "between 0.1 and 4"),
                          ({"op": "twist", "kind": "hepatic"}, "unknown tumour edit 'twist'")):
        response = client.post(f"/api/masks/{added['id']}/edit", json=body)
        assert response.status_code == 400 and message in response.json()["error"], (body, response.text)
    assert len(client.get("/api/masks").json()) == before and leftovers(workspace) == []


def test_one_tumor_is_removed_or_resized_by_a_click_on_it_and_its_neighbour_kept(client, workspace):
    from scipy import ndimage

    mask = phantom(client, shape=[64, 64, 48], spacing=[5.0, 5.0, 5.0], tumors=["lung:2"])
    labels = volume_io.load_label_map(workspace.mask_path(mask["id"])).array
    listed = client.get(f"/api/view/mask/{mask['id']}").json()["tumors"]
    assert [t["kind"] for t in listed] == ["lung", "lung"], listed
    first, second = listed
    tumor = label_id("lung tumor")
    components, _ = ndimage.label(labels == tumor)
    first_mask, second_mask = (components == components[tuple(t["at"])] for t in (first, second))

    response = client.post(f"/api/masks/{mask['id']}/edit", json={"op": "remove", "at": first["at"]})
    assert response.status_code == 200, response.text
    removed = response.json()
    edited = volume_io.load_label_map(workspace.mask_path(removed["id"])).array
    assert not np.any(edited[first_mask] == tumor) and np.all(edited[second_mask] == tumor)
    assert np.array_equal(edited[~first_mask], labels[~first_mask])  # the rest untouched
    assert removed["change"]["changes"][0]["voxels"] == first["voxels"] and "removed" in removed["name"]
    assert [t["at"] for t in client.get(f"/api/view/mask/{removed['id']}").json()["tumors"]] == [second["at"]]

    grown = client.post(f"/api/masks/{removed['id']}/edit", json={"op": "scale", "at": second["at"], "factor": 2})
    assert grown.status_code == 200, grown.text
    [change] = grown.json()["change"]["changes"]
    assert change["action"] == "scaled" and change["voxels"] > second["voxels"]
    assert "x2" in grown.json()["name"]

    before = len(client.get("/api/masks").json())
    corner = [0, 0, 0]
    for body, message in (({"op": "remove", "at": corner}, "no tumour within 10 mm of voxel [0, 0, 0]"),
                          ({"op": "scale", "at": second["at"]}, "needs a factor"),
                          ({"op": "remove", "at": second["at"], "kind": "hepatic"}, "no hepatic tumour"),
                          ({"op": "remove", "at": [0, 0, 999]}, "outside the mask")):
        response = client.post(f"/api/masks/{removed['id']}/edit", json=body)
        assert response.status_code == 400 and message in response.json()["error"], (body, response.text)
    assert len(client.get("/api/masks").json()) == before and leftovers(workspace) == []


def test_masks_from_the_library_and_by_request(client, workspace):
    entries = client.get("/api/library").json()
    files = [e["file"] for e in entries]
    assert len(files) >= 3 and all(e["summary"] for e in entries)
    picked = client.post("/api/masks/library", json={"file": files[0]}).json()
    assert picked["source"] == "library" and files[0] in picked["name"]
    assert client.get(f"/api/view/mask/{picked['id']}").json()["legend"]
    assert client.post("/api/masks/library", json={"file": "../../secret.nii.gz"}).status_code == 404

    wanted = {"region": "abdomen", "anatomy": ["liver", "hepatic tumor"], "size": [96, 96, 64], "spacing": [4, 4, 4]}
    response = client.post("/api/masks/request", json=wanted)
    assert response.status_code == 200, response.text
    made = response.json()
    volume = volume_io.load_label_map(workspace.mask_path(made["id"]))
    assert made["source"] == "request" and volume.shape == (96, 96, 64) and np.allclose(volume.spacing, 4)
    assert (volume.array == label_id("hepatic tumor")).any() and (volume.array == label_id("liver")).any()
    assert made["change"]["selected"]["kept"] is True
    for body, message in (({**wanted, "anatomy": ["livr"]}, "did you mean 'liver'"),
                          ({**wanted, "size": [100, 96, 64]}, "multiples of 16"),
                          ({**wanted, "region": "head", "anatomy": ["liver"]}, "no mask in")):
        response = client.post("/api/masks/request", json=body)
        assert response.status_code == 400 and message in response.json()["error"], (body, response.text)


def test_a_library_of_ones_own(tmp_path, tiny_model):
    folder = tmp_path / "library"
    volume_io.save_label_map(folder / "mine.nii.gz", phantom_mask((32, 32, 32), (8.0, 8.0, 8.0), seed=5))
    ws = Workspace(tmp_path / "out", {"tiny": tiny_model}, library=folder)
    try:
        assert [e["file"] for e in ws.library_entries()] == ["mine.nii.gz"]
        assert ws.add_from_library("mine.nii.gz").source == "library"
    finally:
        ws.close()


def test_ids_that_are_not_ours_are_not_found(client, workspace):
    mask = phantom(client)
    secret = workspace.root.parent / "secret.txt"
    secret.write_text("not yours")
    for path in ("/api/results/..%2F..%2Fsecret.txt/files/ct", "/api/results/../../secret.txt/files/ct",
                 f"/api/masks/{'0' * 12}/download", "/api/masks/..%2Fsecret.txt/download",
                 f"/api/view/mask/{mask['id']}x/slice?layer=labels&axis=0&index=0",
                 f"/api/results/{mask['id']}/files/ct", "/api/jobs/nope/cancel"):
        response = client.request("POST" if path.endswith("cancel") else "GET", path)
        assert response.status_code == 404, (path, response.status_code)
        assert b"not yours" not in response.content
    bad_slice = client.get(f"/api/view/mask/{mask['id']}/slice?layer=labels&axis=2&index=99")
    assert bad_slice.status_code == 400 and "outside 0..31" in bad_slice.json()["error"]
    assert client.get(f"/api/view/mask/{mask['id']}/slice?layer=ct&axis=2&index=0").status_code == 400


# -- generation -------------------------------------------------------------------------------------

def test_a_job_runs_reports_progress_and_its_result_downloads(client, workspace):
    mask = phantom(client, tumors=["hepatic:1"])
    seen = []
    job = client.post("/api/jobs", json={"mask": mask["id"], "steps": 30, "seed": 4, "model": "tiny"}).json()
    assert job["state"] in ("queued", "running") and job["details"]["settings"]["steps"] == 30
    while (job := next(j for j in client.get("/api/jobs").json() if j["id"] == job["id"]))["state"] != "done":
        assert job["state"] in ("queued", "running"), job
        seen.append(job["progress"])
        time.sleep(0.01)
    steps = [p["step"] for p in seen if p.get("phase") == "sampling"]
    assert steps and steps == sorted(steps) and all(p["steps"] == 30 for p in seen if "steps" in p)
    result = client.get(f"/api/results/{job['result']}").json()
    assert [r["id"] for r in client.get("/api/results").json()] == [result["id"]]
    assert result["mask"]["id"] == mask["id"] and result["seed"] == 4 and result["settings"]["model"] == "tiny"
    assert set(result["files"]) == {"ct", "label", "report", "preview"}
    assert isinstance(result["quality"]["passed"], bool) and "liver" in result["quality"]["organs"]
    ct = client.get(f"/api/results/{result['id']}/files/ct")
    assert ct.status_code == 200 and "attachment" in ct.headers["content-disposition"]
    image = nib.Nifti1Image.from_bytes(_gunzip(ct.content))
    assert image.shape == (32, 32, 32) and image.get_data_dtype() == np.int16
    np.testing.assert_array_equal(np.asarray(image.dataobj), np.asarray(nib.load(workspace.result_file(result["id"], "ct")).dataobj))
    report = client.get(f"/api/results/{result['id']}/files/report").json()
    assert report["settings"]["steps"] == 30 and report["quality"]["passed"] == result["quality"]["passed"]
    # The viewer reads the CT's HU and the label map of the result.
    axial = client.get(f"/api/view/result/{result['id']}/slice?layer=ct&axis=2&index=16")
    hu = np.frombuffer(axial.content, dtype="<i2").reshape(32, 32)
    np.testing.assert_array_equal(hu, np.asarray(image.dataobj)[:, :, 16])
    assert client.get(f"/api/view/result/{result['id']}").json()["has_ct"] is True
    assert leftovers(workspace) == []


def test_results_survive_a_restart_and_staging_left_by_a_killed_server_is_removed(client, workspace, tiny_model):
    mask = phantom(client)
    job = wait_for(client, client.post("/api/jobs", json={"mask": mask["id"], "steps": 1, "model": "tiny"}).json()["id"])
    (workspace.root / "results" / ".new-0123456789ab").mkdir()  # as a killed server leaves it
    again = Workspace(workspace.root, {"tiny": tiny_model})
    try:
        assert [r["id"] for r in again.results()] == [job["result"]] and [m.id for m in again.masks()] == [mask["id"]]
        assert not (workspace.root / "results" / ".new-0123456789ab").exists()
    finally:
        again.close()


def test_generation_refusals_come_back_as_the_clis_messages(client):
    mask = phantom(client)
    for body, status, message in (
        ({"steps": 0}, 400, "steps (--steps) must be a finite number from 1 to 1000"),
        ({"seed": -1}, 400, "seed (--seed) must be a finite number from 0 to"),
        ({"precision": "fp8"}, 400, "precision must be one of auto, fp32, bf16, got 'fp8'"),
        ({"precision": "fp16"}, 400, "precision must be one of auto, fp32, bf16"),  # not a CLI choice
        ({"qc_retries": 500}, 400, "qc_retries (--qc-retries) must be a finite number from 0 to 100"),
        # what the page sends for an empty or unreadable number field, and a spacing of two values
        ({"steps": None}, 400, "steps must be a whole number, got nothing"),
        ({"steps": "ten"}, 400, "steps must be a whole number, got 'ten'"),
        ({"seed": 1.5}, 400, "seed must be a whole number, got 1.5"),
        ({"spacing": [1, 1]}, 400, "spacing must have 3 values, got 2"),
        ({"spacing": [1, None, 1]}, 400, "spacing value 2 must be a number, got nothing"),
        ({"model": "huge"}, 400, "unknown model 'huge'; this server offers tiny"),
        ({"spacing": [1, 1, -1]}, 400, "spacing (--spacing) must be three finite voxel sizes"),
    ):
        response = client.post("/api/jobs", json={"mask": mask["id"], "model": "tiny", **body})
        assert response.status_code == status and message in response.json()["error"], (body, response.text)
    assert client.post("/api/jobs", json={"mask": "0" * 12}).status_code == 404
    assert client.get("/api/jobs").json() == []  # nothing was queued


def test_out_of_domain_requests_are_refused_unless_forced_or_fitted_and_a_forced_result_says_so(client, workspace):
    # a field of view the model was not trained on (1280 mm; the tiny model knows 128-320 mm): refused
    # when submitted, with generate's one line naming the nearest valid request and both switches
    far = phantom(client, shape=[32, 32, 32], spacing=[40.0, 40.0, 40.0])
    response = client.post("/api/jobs", json={"mask": far["id"], "model": "tiny"})
    error = response.json()["error"]
    assert response.status_code == 400 and "field of view" in error and "trained on" in error, response.text
    assert "--force" in error and "--fit-to-model" in error
    assert client.get("/api/jobs").json() == [] and client.get("/api/results").json() == []

    forced = client.post("/api/jobs", json={"mask": far["id"], "model": "tiny", "steps": 2, "force": True})
    assert forced.status_code == 200 and forced.json()["details"]["settings"]["force"] is True, forced.text
    job = wait_for(client, forced.json()["id"])
    assert job["state"] == "done", job
    result = client.get(f"/api/results/{job['result']}").json()
    assert result["out_of_domain"] and any("field of view" in reason for reason in result["out_of_domain"])
    assert result["fitted"] == [] and result["settings"]["force"] is True
    report = client.get(f"/api/results/{job['result']}/files/report").json()
    assert report["domain"]["out_of_domain"] == result["out_of_domain"]

    # too small a field of view (16 mm): fit_to_model pads the networks' input up to the trained one
    small = phantom(client, shape=[16, 16, 16], spacing=[1.0, 1.0, 1.0])
    assert client.post("/api/jobs", json={"mask": small["id"], "model": "tiny"}).status_code == 400
    fitted = client.post("/api/jobs", json={"mask": small["id"], "model": "tiny", "steps": 2, "fit_to_model": True})
    assert fitted.status_code == 200, fitted.text
    job = wait_for(client, fitted.json()["id"])
    assert job["state"] == "done", job
    result = client.get(f"/api/results/{job['result']}").json()
    assert result["fitted"] and result["out_of_domain"] == [] and result["shape"] == [16, 16, 16]


def test_what_generate_refuses_once_it_reads_the_voxels_fails_the_job_with_the_clis_message(
        tmp_path, tiny_model, workspace):
    """A refusal that needs the mask's voxels (labels the model never saw) comes when the job runs:
    the job fails with generate's one line, naming the mask as the page does, and writes nothing."""
    import json
    import shutil

    narrow = tmp_path / "liver_only_model"
    shutil.copytree(tiny_model, narrow)
    spec = json.loads((narrow / "model.json").read_text())
    spec["metadata"]["domain"] = {"labels_seen": [label_id("liver")]}
    (narrow / "model.json").write_text(json.dumps(spec))
    ws = Workspace(tmp_path / "out2", {"tiny": tiny_model, "liver only": str(narrow)})
    try:
        with TestClient(create_app(ws, TOKEN), headers=AUTH) as client:
            mask = phantom(client)
            submitted = client.post("/api/jobs", json={"mask": mask["id"], "model": "liver only", "steps": 2})
            assert submitted.status_code == 200, submitted.text  # the header passes; the voxels do not
            job = wait_for(client, submitted.json()["id"])
            assert job["state"] == "failed" and "labels the model never saw in training" in job["error"], job
            assert "--fit-to-model" in job["error"] and "--force" in job["error"]
            assert mask["name"] in job["error"] and str(ws.root) not in job["error"]
            assert client.get("/api/results").json() == [] and list((ws.root / "results").iterdir()) == []
            fitted = wait_for(client, client.post("/api/jobs", json={"mask": mask["id"], "model": "liver only",
                                                                      "steps": 2, "fit_to_model": True}).json()["id"])
            assert fitted["state"] == "done", fitted
    finally:
        ws.close()


def test_a_running_job_shows_which_tile_it_decodes(client, monkeypatch):
    """generate's decoding events reach the job's progress (forced to 2 tiles: the tiny latent fits
    whole). The first tile's report is held until the test has read it, so no poll can miss it."""
    import threading

    from maisi2 import autoencoder
    from maisi2 import generate as G
    from maisi2.autoencoder import tiles

    real_plan, real_decode, seen = autoencoder.plan_tiles, G.decode_tiled, threading.Event()

    def two_tiles(latent, cfg, budget, **kwargs):
        whole = real_plan(latent, cfg, budget, **kwargs)
        return dataclasses.replace(whole, tile=(6, *latent[1:]), starts=(tiles.axis_starts(latent[0], 6, 4), (0,), (0,)),
                                   halo=1, ramp=2)

    def held_decode(*args, progress, **kwargs):
        def hold(done, total):
            progress(done, total)
            if done == 1:
                seen.wait(60)
        return real_decode(*args, progress=hold, **kwargs)

    monkeypatch.setattr(autoencoder, "plan_tiles", two_tiles)
    monkeypatch.setattr(G, "decode_tiled", held_decode)
    job = client.post("/api/jobs", json={"mask": phantom(client)["id"], "steps": 2, "model": "tiny"}).json()
    deadline = time.monotonic() + 60
    while (progress := next(j for j in client.get("/api/jobs").json() if j["id"] == job["id"])["progress"]).get(
            "phase") != "decoding" or "done" not in progress:
        assert time.monotonic() < deadline, progress
        time.sleep(0.01)
    seen.set()
    assert progress["phase"] == "decoding" and progress["attempt"] == 1 and progress["tiles"] == 2
    assert progress["done"] == 1 and progress["total"] % 2 == 0 and progress["total"] > 2  # statistics passes too
    assert wait_for(client, job["id"])["state"] == "done"


def test_cancel_stops_a_running_job_and_drops_a_queued_one_leaving_nothing(client, workspace):
    mask = phantom(client)
    running = client.post("/api/jobs", json={"mask": mask["id"], "steps": 1000, "model": "tiny"}).json()
    queued = client.post("/api/jobs", json={"mask": mask["id"], "steps": 1, "model": "tiny"}).json()
    wait_for(client, running["id"], states=("running",))
    listed = {j["id"]: j for j in client.get("/api/jobs").json()}
    assert listed[queued["id"]]["state"] == "queued" and listed[queued["id"]]["position"] == 1
    assert client.post(f"/api/jobs/{queued['id']}/cancel").json()["state"] == "cancelled"
    deadline = time.monotonic() + 60
    while client.get("/api/jobs").json()[-1]["progress"].get("step", 0) < 2:  # it is sampling
        assert time.monotonic() < deadline
        time.sleep(0.02)
    client.post(f"/api/jobs/{running['id']}/cancel")
    job = wait_for(client, running["id"])
    assert job["state"] == "cancelled" and job["progress"]["step"] < 1000 and job["result"] is None
    assert wait_for(client, queued["id"])["started"] is None  # it never ran
    assert client.get("/api/results").json() == [] and leftovers(workspace) == []
    assert list((workspace.root / "results").iterdir()) == []


def test_a_cancel_takes_effect_at_the_next_event_of_any_phase_and_leaves_nothing(client, workspace, monkeypatch):
    """Cancel at each of generate's events, from reading the weights to writing the files: the job
    stops at that event (nothing after it runs: no more networks are built, no step is taken), ends
    cancelled, and no result, staging folder or partial file is left."""
    from maisi2 import checkpoint
    from maisi2 import generate as G

    real_generate, real_load = G.generate, checkpoint.load_weights
    built = []

    def cancelled_at(target):
        def generate(*args, on_progress, **kwargs):
            def hook(event):
                if not stopped and target(event):
                    job = workspace.cancel(workspace.queue.jobs()[0].id)  # as the page's cancel button does
                    stopped.append(event)
                    cancelling.append(job.to_dict()["cancelling"])  # what the page shows until it stops
                on_progress(event)
            return real_generate(*args, on_progress=hook, **kwargs)
        stopped: list[dict] = []
        return generate, stopped

    def counted_load(net, *args, **kwargs):
        built.append(net)
        return real_load(net, *args, **kwargs)

    cancelling: list[bool] = []
    monkeypatch.setattr(checkpoint, "load_weights", counted_load)
    mask = phantom(client)
    targets = {
        "loading, before the weights are read": lambda e: e == {"phase": "loading"},
        "loading, after the first network": lambda e: e["phase"] == "loading" and e.get("done") == 2,
        "the denoising loop's start": lambda e: e.get("step") == 0,
        "the first step": lambda e: e.get("step") == 1,
        "the decode's start": lambda e: e == {"phase": "decoding", "attempt": 1},
        "within the decode": lambda e: e["phase"] == "decoding" and "done" in e,
        "the quality check": lambda e: e["phase"] == "checking",
        "writing": lambda e: e["phase"] == "writing",
    }
    for name, target in targets.items():
        generate, stopped = cancelled_at(target)
        monkeypatch.setattr(G, "generate", generate)
        built.clear()
        job = wait_for(client, client.post("/api/jobs", json={"mask": mask["id"], "steps": 3, "model": "tiny"}).json()["id"])
        assert job["state"] == "cancelled" and job["result"] is None and job["error"] is None, (name, job)
        assert stopped and job["progress"] == stopped[0], (name, job["progress"])  # nothing ran after it
        assert len(built) == {"loading, before the weights are read": 0, "loading, after the first network": 1}.get(name, 3)
        assert list((workspace.root / "results").iterdir()) == [] and leftovers(workspace) == [], name
    assert client.get("/api/results").json() == [] and cancelling == [True] * len(targets)


def test_stopping_the_server_cancels_its_jobs_and_leaves_nothing_half_written(workspace):
    mask = workspace.add_phantom(SMALL["shape"], SMALL["spacing"])
    jobs = [workspace.submit(mask.id, GenerationSettings(steps=1000, model="tiny")) for _ in range(2)]
    deadline = time.monotonic() + 60
    while jobs[0].progress.get("step", 0) < 1:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    workspace.close()  # what the server's shutdown runs
    assert [job.state for job in jobs] == ["cancelled", "cancelled"]
    assert list((workspace.root / "results").iterdir()) == []


def _gunzip(data: bytes) -> bytes:
    import gzip

    return gzip.decompress(data)


def test_serve_listens_on_this_machine_only_and_prints_a_url_with_a_fresh_token(tmp_path, capsys, monkeypatch):
    """`maisi2 serve` as a user starts it (uvicorn.run stood in for): bound to 127.0.0.1, the
    printed URL carries a random token (a new one each start), and only that token opens the app."""
    import re
    import socket

    import uvicorn

    from maisi2 import cli

    started = []
    monkeypatch.setattr(cli, "COMMAND_MODULES", ["maisi2.cli.serve_cmd"])
    monkeypatch.setattr(uvicorn, "run", lambda app, host, port, **kw: started.append((app, host, port)))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    tokens = []
    for _ in range(2):
        assert cli.main(["serve", "--port", str(port), "--out", str(tmp_path / "web")]) == 0
        url = re.search(r"http://\S+", capsys.readouterr().out).group(0)
        assert url.startswith(f"http://127.0.0.1:{port}/?token=")
        tokens.append(url.split("token=")[1])
    app, host, _ = started[-1]
    assert host == "127.0.0.1" and [h for _, h, _ in started] == ["127.0.0.1"] * 2
    assert tokens[0] != tokens[1] and all(len(t) >= 32 for t in tokens)
    with TestClient(app) as browser:
        assert browser.get("/api/options", headers={HEADER: tokens[0]}).status_code == 401  # the old start's
        assert browser.get("/api/options", headers={HEADER: tokens[1]}).status_code == 200
        assert browser.get(f"/?token={tokens[1]}").status_code == 200  # the printed URL opens the page


def test_serve_command_refuses_bad_settings_before_starting(tmp_path, capsys, monkeypatch):
    import socket

    from maisi2 import cli

    monkeypatch.setattr(cli, "COMMAND_MODULES", ["maisi2.cli.serve_cmd"])
    out = str(tmp_path / "web")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert cli.main(["serve", "--port", str(port), "--out", out]) == 1
        assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err
    assert cli.main(["serve", "--port", "70000", "--out", out]) == 1
    assert "--port must be between 1 and 65535" in capsys.readouterr().err
    assert cli.main(["serve", "--model", str(tmp_path), "--out", out]) == 1
    assert "is not a model folder" in capsys.readouterr().err
    assert not (tmp_path / "web").exists()  # nothing was made


def test_the_page_offers_the_clis_precision_choices_and_each_reaches_the_compute_plan(client):
    """The page's precision is `generate --precision auto|fp32|bf16`, nothing else; each value reaches
    GenerateOptions as the CLI passes it (fp32: float32 in the decoder too, as --fp32)."""
    from maisi2 import compute
    from maisi2.cli.generate_cmd import _options
    from maisi2.web.workspace import PRECISIONS

    offered = client.get("/api/options").json()
    assert tuple(offered["precisions"]) == PRECISIONS == compute.PRECISIONS
    assert offered["defaults"]["precision"] == "auto"
    for precision in PRECISIONS:
        page = GenerationSettings(precision=precision).options()
        cli = _options(_generate_args("--precision", precision))
        assert page.precision == cli.precision == precision
        assert page.half_precision == (False if precision == "fp32" else None)
    assert _options(_generate_args("--fp32")).half_precision is False


def _generate_args(*argv):
    import argparse

    from maisi2.cli import generate_cmd

    parser = argparse.ArgumentParser()
    generate_cmd.register(parser.add_subparsers())
    return parser.parse_args(["generate", "--mask", "m.nii.gz", "--out", "ct.nii.gz", *argv])


def test_malformed_requests_are_one_line_naming_the_field(client):
    """What pydantic refuses comes back as 400 with one line, as the CLI's argparse names an option."""
    for path, body, message in (
        ("/api/masks/phantom", {**SMALL, "seed": None}, "seed must be a whole number, got nothing"),
        ("/api/masks/phantom", {**SMALL, "shape": [32, 32]}, "shape must have 3 values, got 2"),
        ("/api/masks/phantom", {**SMALL, "spacing": [8, "x", 8]}, "spacing value 2 must be a number, got 'x'"),
        ("/api/masks/request", {"size": [96, 96, 64, 1]}, "size must have 3 values, got 4"),
        ("/api/masks/library", {}, "file is required"),
        ("/api/jobs", {"steps": 2}, "mask is required"),
    ):
        response = client.post(path, json=body)
        assert response.status_code == 400 and response.json() == {"error": message}, (path, body, response.text)
    response = client.post("/api/masks/phantom", content=b"{not json", headers={"Content-Type": "application/json"})
    assert response.status_code == 400 and response.json()["error"] == "the request is not valid JSON"
    assert client.post("/api/uploads", content=b"x").json() == {"error": "name is required"}
    assert client.get("/api/masks").json() == [] and client.get("/api/jobs").json() == []
