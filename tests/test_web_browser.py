"""The real page of `maisi2 serve`, driven in headless Chromium as a user clicks: load a mask, add a
tumour by clicking on it, generate with the bundled model at a small size, look at the result's
slices, download the CT and check the file.

Needs Chromium from the system (Debian: `apt-get install -y chromium`) and the `playwright` package;
playwright's own browser download is never used. Skips, naming what is missing, without them.

Screenshots: `MAISI2_WEB_SCREENSHOTS=docs/img python -m pytest tests/test_web_browser.py` writes the
README's pictures of the page (docs/img/web_*.png); otherwise they go to the test's temporary folder.
"""

import os
import shutil
import socket
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None:
    pytest.skip("no chromium on PATH (Debian: apt-get install -y chromium)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e '.[test]')")
uvicorn = pytest.importorskip("uvicorn", reason="uvicorn is not installed (pip install -e .)")

from maisi2 import volume_io  # noqa: E402
from maisi2.generate import phantom_mask  # noqa: E402
from maisi2.labels import label_id  # noqa: E402
from maisi2.web.app import create_app  # noqa: E402
from maisi2.web.workspace import Workspace  # noqa: E402

SHAPE, SPACING = (96, 96, 64), (4.0, 4.0, 4.0)  # 384 x 384 x 256 mm: inside the bundled model's range
BROWSER_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A real uvicorn server with the bundled model on a free port; yields (url with token, workspace)."""
    workspace = Workspace(tmp_path_factory.mktemp("web") / "out")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    token = "browser-test-token"
    config = uvicorn.Config(create_app(workspace, token), host="127.0.0.1", port=port, log_level="warning")
    instance = uvicorn.Server(config)
    thread = threading.Thread(target=instance.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not instance.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}/?token={token}", workspace
    instance.should_exit = True  # runs the app's shutdown: jobs cancelled, workspace closed
    thread.join(60)


@pytest.fixture(scope="module")
def page(server):
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS)
        context = browser.new_context(viewport={"width": 1500, "height": 980}, accept_downloads=True)
        page = context.new_page()
        page.set_default_timeout(180_000)  # the page's own calls run on a loaded 2-core machine
        page.goto(server[0])
        page.wait_for_selector("body[data-ready='1']")
        yield page
        browser.close()


@pytest.fixture(scope="module")
def mask_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("mask") / "torso.nii.gz"
    volume_io.save_label_map(path, phantom_mask(SHAPE, SPACING, seed=0))
    return path


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory) -> Path:
    folder = os.environ.get("MAISI2_WEB_SCREENSHOTS")
    return Path(folder) if folder else tmp_path_factory.mktemp("screenshots")


def click_voxel(page, view: str, voxel) -> None:
    """Click where `voxel` is drawn in one of the three views (the viewer says where that is)."""
    point = page.evaluate("([v, x]) => window.maisi2Viewer.canvasPoint(v, x)", [view, list(map(int, voxel))])
    box = page.locator(f"canvas[data-view='{view}']").bounding_box()
    page.mouse.click(box["x"] + point["x"], box["y"] + point["y"])


def deep_liver_voxel(labels: np.ndarray) -> tuple[int, int, int]:
    depth = ndimage.distance_transform_edt(labels == label_id("liver"))
    return tuple(int(i) for i in np.unravel_index(np.argmax(depth), depth.shape))


def test_a_refusal_is_shown_in_the_page(page, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("not an image")
    page.locator("#upload-panel summary").click()
    page.set_input_files("#upload-file", str(notes))
    page.click("#upload-form button[type=submit]")
    page.wait_for_selector("#error:not([hidden])")
    assert "not a NIfTI file" in page.inner_text("#error-text")
    page.click("#error-close")


def test_load_a_mask_add_a_tumor_by_clicking_generate_view_and_download(page, server, mask_file, screenshots, tmp_path):
    url, workspace = server
    # 1. load a mask: upload a label map file
    page.set_input_files("#upload-file", str(mask_file))
    page.click("#upload-form button[type=submit]")
    page.wait_for_selector("body[data-showing^='mask:']")
    assert page.is_hidden("#error")
    assert "liver" in page.inner_text("#legend") and "none" in page.inner_text("#tumors")

    # 2. a tumour where the user clicks: bring the liver's slice up (click the coronal view), then
    #    click the liver in the axial view with the "add tumour" tool
    labels = volume_io.load_label_map(mask_file).array
    target = deep_liver_voxel(labels)
    click_voxel(page, "coronal", target)
    page.check("input[name=tool][value=add]")
    page.select_option("#tumor-kind", "hepatic")
    page.fill("#tumor-radius", "14")
    before = page.get_attribute("body", "data-showing")
    click_voxel(page, "axial", target)
    page.wait_for_function(f"document.body.dataset.showing !== '{before}'")
    assert page.is_hidden("#error"), page.inner_text("#error-text")
    assert "hepatic tumor" in page.inner_text("#tumors")
    edited_id = page.get_attribute("body", "data-showing").split(":")[1]
    edited = volume_io.load_label_map(workspace.mask_path(edited_id)).array
    tumor = edited == label_id("hepatic tumor")
    assert tumor[target] and tumor.sum() > 20  # centred where the user clicked
    assert np.all(labels[tumor] == label_id("liver"))  # inside its organ
    page.check("input[name=tool][value=navigate]")
    page.screenshot(path=str(screenshots / "web_mask.png"))

    # 3. generate with the bundled model, 2 steps
    page.fill("#generate-form input[name=steps]", "2")
    page.click("#generate")
    page.wait_for_selector("#job-list li.state-running, #job-list li.state-done")
    page.wait_for_selector("body[data-showing^='result:']", timeout=600_000)
    result_id = page.get_attribute("body", "data-showing").split(":")[1]
    item = page.locator(f"li[data-result='{result_id}']")
    qc = item.locator(".qc").inner_text()
    report = workspace.result(result_id)
    assert ("passed" in qc) == report["quality"]["passed"]
    if not report["quality"]["passed"]:  # a failed check is shown, with the failing organs
        assert "FAILED" in qc and all(organ in qc for organ in report["quality"]["failed"])

    label_map = np.asarray(nib.load(workspace.result_file(result_id, "label")).dataobj)
    np.testing.assert_array_equal(label_map, edited)  # the edited mask is what was generated

    # 4. the result's slices: HU under the crosshair, and the view moves with the wheel
    readout = page.inner_text("#readout")
    ct_path = workspace.result_file(result_id, "ct")
    ct = np.asarray(nib.load(ct_path).dataobj)
    assert f"voxel ({target[0]}, {target[1]}, {target[2]})" in readout and f"{ct[target]} HU" in readout
    axial = page.locator("canvas[data-view='axial']")
    pixels = page.evaluate("""() => { const c = document.querySelector("canvas[data-view='axial']");
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        const seen = new Set(); for (let i = 0; i < d.length; i += 4) seen.add(d[i]); return seen.size; }""")
    assert pixels > 20  # a CT, not a blank canvas
    page.click("button[data-window='lung']")
    axial.hover()
    page.mouse.wheel(0, 100)
    page.wait_for_function(f"document.querySelector(\"canvas[data-view='axial']\").dataset.index === '{target[2] + 1}'")
    page.mouse.wheel(0, -100)
    page.wait_for_function(f"document.querySelector(\"canvas[data-view='axial']\").dataset.index === '{target[2]}'")
    page.click("button[data-window='soft tissue']")
    page.screenshot(path=str(screenshots / "web_result.png"))

    # 5. download the CT and check the file
    with page.expect_download() as download_info:
        item.locator("a[data-file='ct']").click()
    saved = tmp_path / download_info.value.suggested_filename
    download_info.value.save_as(saved)
    image = nib.load(saved)
    assert saved.name.endswith("ct.nii.gz") and image.shape == SHAPE
    assert image.get_data_dtype() == np.int16
    np.testing.assert_allclose(np.linalg.norm(image.affine[:3, :3], axis=0), SPACING)
    np.testing.assert_array_equal(np.asarray(image.dataobj), ct)
    assert np.all(ct[edited == 0] == -1000) and np.ptp(ct[edited > 0]) > 0


def test_remove_one_tumor_by_clicking_on_it(page, server, mask_file):
    url, workspace = server
    # the mask with the tumour the test above added, from the page's list of masks
    edited = next(m for m in workspace.masks() if m.source == "edit" and m.change["edit"]["op"] == "add")
    page.click(f"li[data-mask='{edited.id}'] button")
    page.wait_for_selector(f"body[data-showing='mask:{edited.id}']")
    labels = volume_io.load_label_map(workspace.mask_path(edited.id)).array
    tumor = labels == label_id("hepatic tumor")
    target = tuple(int(v) for v in edited.change["edit"]["at"])
    click_voxel(page, "coronal", target)  # the axial view at the tumour's slice
    page.check("input[name=tool][value=remove]")
    click_voxel(page, "axial", target)
    page.wait_for_function(f"document.body.dataset.showing !== 'mask:{edited.id}'")
    assert page.is_hidden("#error"), page.inner_text("#error-text")
    assert "none" in page.inner_text("#tumors")
    removed = volume_io.load_label_map(workspace.mask_path(page.get_attribute("body", "data-showing")[5:])).array
    assert np.all(removed[tumor] == label_id("liver")) and np.array_equal(removed[~tumor], labels[~tumor])
    page.check("input[name=tool][value=navigate]")


def test_an_out_of_domain_request_is_refused_in_the_page_and_marked_when_forced(page, server):
    url, workspace = server
    # a 16 mm phantom: far below the smallest field of view the bundled model was trained on
    if not page.is_visible("#phantom-form"):
        page.locator("#phantom-panel summary").click()
    for name, value in zip(("sx", "sy", "sz", "px", "py", "pz"), ("16", "16", "16", "1", "1", "1")):
        page.fill(f"#phantom-form input[name={name}]", value)
    before = page.get_attribute("body", "data-showing")
    page.click("#make-phantom")
    page.wait_for_function(f"document.body.dataset.showing !== '{before}'")
    page.fill("#generate-form input[name=steps]", "2")
    page.click("#generate")
    page.wait_for_selector("#error:not([hidden])")
    message = page.inner_text("#error-text")
    assert "Nearest valid request" in message and "--force" in message and "--fit-to-model" in message
    page.click("#error-close")
    results = len(workspace.results())
    page.check("#generate-form input[name=force]")
    page.click("#generate")
    page.wait_for_function(f"document.querySelectorAll('#result-list li').length > {results}", timeout=600_000)
    page.uncheck("#generate-form input[name=force]")
    newest = workspace.results()[0]
    assert newest["out_of_domain"] and newest["settings"]["force"] is True
    marking = page.locator(f"li[data-result='{newest['id']}'] .out-of-domain").inner_text()
    assert "OUT OF DOMAIN" in marking and newest["out_of_domain"][0] in marking
    page.wait_for_selector(f"body[data-showing='result:{newest['id']}']")  # the page opens a new result itself


def shown_mask(page, workspace, before: str):
    """The mask the page shows once it has moved on from `before` (its record)."""
    page.wait_for_function("(before) => (document.body.dataset.showing || null) !== before"
                           " || !document.querySelector('#error').hidden", arg=before)
    assert page.is_hidden("#error"), page.inner_text("#error-text")
    showing = page.get_attribute("body", "data-showing")
    assert showing.startswith("mask:"), showing
    return workspace.mask(showing[5:])


def open_panel(page, panel: str) -> None:
    if page.get_attribute(f"#{panel}", "open") is None:
        page.locator(f"#{panel} summary").click()


def test_every_mask_source_is_reachable_in_the_page(page, server, tmp_path):
    """Phantom (with a tumour), the library's list, a request by region / anatomy / size / spacing,
    and a TotalSegmentator map with its CT: each made by the page's own controls."""
    from maisi2.totalseg import TOTALSEG_CLASSES

    url, workspace = server
    open_panel(page, "phantom-panel")
    for name, value in zip(("sx", "sy", "sz", "px", "py", "pz", "seed"), ("64", "64", "48", "6", "6", "6", "1")):
        page.fill(f"#phantom-form input[name={name}]", value)
    page.fill("#phantom-form input[name=tumors]", "hepatic:1")
    before = page.get_attribute("body", "data-showing")
    page.click("#make-phantom")
    mask = shown_mask(page, workspace, before)
    assert mask.source == "phantom" and "hepatic:1" in mask.name and "hepatic tumor" in page.inner_text("#tumors")

    open_panel(page, "library-panel")
    first = page.locator("#library-list li").first
    file = first.get_attribute("data-library")
    before = page.get_attribute("body", "data-showing")
    first.locator("button").click()
    mask = shown_mask(page, workspace, before)
    assert mask.source == "library" and file in mask.name and page.inner_text("#legend")

    form = "#request-form"
    page.fill(f"{form} input[name=region]", "abdomen")
    page.fill(f"{form} input[name=anatomy]", "liver, hepatic tumor")
    for name, value in zip(("sx", "sy", "sz", "px", "py", "pz"), ("96", "96", "64", "4", "4", "4")):
        page.fill(f"{form} input[name={name}]", value)
    before = page.get_attribute("body", "data-showing")
    page.click("#request-mask")
    mask = shown_mask(page, workspace, before)
    volume = volume_io.load_label_map(workspace.mask_path(mask.id))
    assert mask.source == "request" and volume.shape == (96, 96, 64) and np.allclose(volume.spacing, 4)
    assert "hepatic tumor" in page.inner_text("#tumors")

    ts = {name: idx for idx, name in TOTALSEG_CLASSES.items()}
    seg = np.zeros((40, 40, 30), dtype=np.int16)
    seg[12:22, 12:26, 8:22] = ts["liver"]
    hu = np.full(seg.shape, -1000, dtype=np.int16)
    hu[4:36, 4:36, 2:28] = 40
    affine = volume_io.ras_affine((4.0, 4.0, 4.0))
    volume_io.save_label_map(tmp_path / "seg.nii.gz", volume_io.Volume(seg, affine), tables=False)
    volume_io.save_ct(tmp_path / "ct.nii.gz", volume_io.Volume(hu, affine))
    open_panel(page, "totalseg-panel")
    page.set_input_files("#totalseg-file", str(tmp_path / "seg.nii.gz"))
    page.set_input_files("#totalseg-ct", str(tmp_path / "ct.nii.gz"))
    page.select_option("#totalseg-version", "v2")
    before = page.get_attribute("body", "data-showing")
    page.click("#totalseg-form button[type=submit]")
    mask = shown_mask(page, workspace, before)
    assert mask.source == "totalseg" and "CT (HU threshold)" in mask.change["import"]
    assert "liver" in page.inner_text("#legend") and "body" in page.inner_text("#legend")


def test_bad_numbers_and_refused_requests_are_shown_in_the_page_as_the_clis_lines(page, server):
    url, workspace = server
    masks, jobs = len(workspace.masks()), len(workspace.jobs())
    steps = "#generate-form input[name=steps]"
    for value, message in (("", "steps must be a whole number, got nothing"),
                           ("5000", "steps (--steps) must be a finite number from 1 to 1000, got 5000"),
                           ("2.5", "steps must be a whole number, got 2.5")):
        page.fill(steps, value)
        page.click("#generate")
        page.wait_for_selector("#error:not([hidden])")
        assert page.inner_text("#error-text") == message
        page.click("#error-close")
    page.fill(steps, "2")
    page.fill("#generate-form input[name=px]", "2")  # one spacing of three
    page.click("#generate")
    page.wait_for_selector("#error:not([hidden])")
    assert "give all three spacings" in page.inner_text("#error-text")
    page.click("#error-close")
    page.fill("#generate-form input[name=px]", "")

    open_panel(page, "library-panel")
    page.fill("#request-form input[name=anatomy]", "livr")
    page.click("#request-mask")
    page.wait_for_selector("#error:not([hidden])")
    assert "did you mean 'liver'" in page.inner_text("#error-text")
    page.click("#error-close")
    page.fill("#request-form input[name=anatomy]", "liver")
    page.fill("#request-form input[name=sx]", "100")
    page.click("#request-mask")
    page.wait_for_selector("#error:not([hidden])")
    assert "multiples of 16" in page.inner_text("#error-text")
    page.click("#error-close")
    assert len(workspace.masks()) == masks and len(workspace.jobs()) == jobs  # nothing made, nothing queued


def test_a_running_job_is_cancelled_from_the_page_and_leaves_nothing(page, server):
    url, workspace = server
    results = len(workspace.results())
    page.fill("#generate-form input[name=steps]", "1000")
    page.click("#generate")
    running = page.locator("#job-list li.state-running").first
    running.wait_for()  # cancelled at once: while it loads the model or at its first steps
    job_id = running.get_attribute("data-job")
    running.locator("button", has_text="cancel").click()
    page.wait_for_selector(f"#job-list li[data-job='{job_id}'].state-cancelled")
    assert page.is_hidden("#error")
    job = workspace.queue.get(job_id)
    assert job.state == "cancelled" and job.progress.get("step", 0) < 1000
    page.fill("#generate-form input[name=steps]", "2")
    assert len(workspace.results()) == results
    assert not [p for p in (workspace.root / "results").iterdir() if p.name.startswith(".")]
