"""The review app in a real headless browser (Debian's chromium + chromium-driver through Selenium,
WebGL on SwiftShader) on a stack started the way `atlasflow up` starts it, with real Triton and two
labelled cases of the bundled CT.

As a radiologist would: log in, open the top case (the median page load is printed), check that a
known liver voxel is drawn in the liver's colour where the label says and that the screen's left
is the patient's right, paint a stroke of spleen on the current axial slice, save; then read the
new label version over gRPC and check the changed voxels lie where the stroke was in patient mm;
the worklist order changes; a second user sees a leased case as taken and cannot open it.
Screenshots go to $ATLASFLOW_TEST_ARTIFACTS (else the test's tmp dir).
"""

from __future__ import annotations

import io
import os
import statistics
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
from PIL import Image
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

from atlasflow.cli.demo import DEMO_CT, send_cstore
from atlasflow.cli.demo_series import write_demo_series
from atlasflow.cli.local import LocalDeployment
from atlasflow.common.blobstore import LocalBlobStore
from atlasflow.common.nifti import from_nifti_bytes
from atlasflow.common.users import PASSWORDS_FILE
from atlasflow.gateway.web import HERE as WEB_DIR
from atlasflow.ingest.v1 import ingest_pb2, ingest_pb2_grpc
from atlasflow.labels.v1 import labels_pb2, labels_pb2_grpc
from atlasflow.ranking.v1 import ranking_pb2, ranking_pb2_grpc

pytestmark = pytest.mark.e2e

CHROMEDRIVER = "/usr/bin/chromedriver"
LIVER, SPLEEN = 5, 8
LIVER_RGB = (245, 130, 48)  # viewer.js ORGANS
LOADS = 5  # page loads timed for the median


# ---------------------------------------------------------------------------- stack
def _stubs(dep: LocalDeployment) -> tuple[Any, Any, Any]:
    def ch(service: str) -> Any:
        return dep.channel(service, dep.token_source("admin", "browser-test-operator"))

    return (
        ingest_pb2_grpc.IngestServiceStub(ch("ingest")),
        labels_pb2_grpc.LabelServiceStub(ch("labels")),
        ranking_pb2_grpc.RankingServiceStub(ch("ranking")),
    )


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalDeployment, list[str]]]:
    """The whole stack (Triton, four services, gateway) with two labelled, ranked cases."""
    assert (WEB_DIR / "build" / "app.js").is_file(), "the review app is not built: run scripts/bootstrap.sh"
    root = tmp_path_factory.mktemp("browser")
    dep = LocalDeployment.create(root / "state", auto_ports=True, quiet_period_s=2.0)
    dep.start()
    try:
        dep.wait_healthy(400)
        for seed in ("browser-one", "browser-two"):
            files = write_demo_series(DEMO_CT, root / seed, seed_name=seed)
            send_cstore(files, dep.ports["dicom"], "ATLASFLOW")
        ingest, labels, ranking = _stubs(dep)
        deadline = time.monotonic() + 900
        cases: list[str] = []
        while time.monotonic() < deadline:
            series = ingest.ListSeries(ingest_pb2.ListSeriesRequest()).series
            ready = []
            for s in series:
                versions = labels.ListLabelVersions(labels_pb2.ListLabelVersionsRequest(case_id=s.case_id)).versions
                if versions:
                    try:
                        ranking.GetWorklistItem(ranking_pb2.GetWorklistItemRequest(case_id=s.case_id))
                        ready.append(s.case_id)
                    except Exception:  # noqa: BLE001 - not ranked yet
                        pass
            if len(ready) == 2:
                cases = ready
                break
            time.sleep(1)
        assert len(cases) == 2, "the two cases were not labelled and ranked in time"
        yield dep, cases
    finally:
        dep.stop()


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    env = os.environ.get("ATLASFLOW_TEST_ARTIFACTS")
    out = Path(env) / "browser" if env else tmp_path_factory.mktemp("browser-artifacts")
    out.mkdir(parents=True, exist_ok=True)
    return out


@pytest.fixture(scope="module")
def browser() -> Iterator[WebDriver]:
    assert Path(CHROMEDRIVER).exists(), "chromium-driver is required (scripts/bootstrap.sh --test installs it)"
    opts = webdriver.ChromeOptions()
    binary = Path("/usr/lib/chromium/chromium")
    if binary.exists():
        opts.binary_location = str(binary)
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--use-angle=swiftshader",  # WebGL2 on the CPU
        "--enable-unsafe-swiftshader",
        "--ignore-gpu-blocklist",
        "--window-size=1400,900",
        "--force-device-scale-factor=1",
    ):
        opts.add_argument(arg)
    opts.accept_insecure_certs = True  # the stack's own CA
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.set_script_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def _passwords(dep: LocalDeployment) -> dict[str, str]:
    lines = (dep.auth_dir / PASSWORDS_FILE).read_text().splitlines()
    return {u: p for u, p, _roles in (line.split("\t") for line in lines if not line.startswith("#"))}


def _wait(driver: WebDriver, cond: Any, timeout: float = 60) -> Any:
    return WebDriverWait(driver, timeout, poll_frequency=0.2).until(cond)


def _login(driver: WebDriver, dep: LocalDeployment, user: str) -> None:
    driver.get(dep.gateway_url() + "/app/#/login")
    _wait(driver, lambda d: d.find_elements(By.ID, "username"))
    driver.find_element(By.ID, "username").send_keys(user)
    driver.find_element(By.ID, "password").send_keys(_passwords(dep)[user])
    driver.find_element(By.ID, "login-submit").click()
    _wait(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#worklist tbody tr"))


def _rows(driver: WebDriver) -> list[tuple[str, str]]:
    """(case id, status) of the worklist rows, in the displayed order."""
    return [
        (r.get_attribute("data-case") or "", r.find_element(By.CSS_SELECTOR, ".status").text)
        for r in driver.find_elements(By.CSS_SELECTOR, "#worklist tbody tr")
    ]


def _open(driver: WebDriver, case_id: str) -> None:
    n = driver.execute_script("return window.atlasflow.loadTimes.length")
    driver.find_element(By.CSS_SELECTOR, f'button[data-open="{case_id}"]').click()
    _wait(driver, lambda d: d.execute_script("return window.atlasflow.loadTimes.length") > n, 180)


def _back(driver: WebDriver) -> None:
    driver.find_element(By.ID, "leave").click()
    _wait(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#worklist tbody tr"))


def _canvas_png(driver: WebDriver) -> Image.Image:
    return Image.open(io.BytesIO(driver.find_element(By.ID, "gl").screenshot_as_png)).convert("RGB")


def _label_map(dep: LocalDeployment, version: labels_pb2.LabelVersion) -> tuple[np.ndarray, np.ndarray]:
    return from_nifti_bytes(LocalBlobStore(dep.blob_dir).get(version.label_map.digest))


def _mm(affine: np.ndarray, ijk: np.ndarray) -> np.ndarray:
    return (affine @ np.c_[ijk, np.ones(len(ijk))].T).T[:, :3]


# ---------------------------------------------------------------------------- the test
def test_review_in_the_browser(stack: tuple[LocalDeployment, list[str]], browser: WebDriver, artifacts: Path) -> None:
    dep, _cases = stack
    _ingest, labels, ranking = _stubs(dep)
    d = browser
    _login(d, dep, "dr.demo")
    before = _rows(d)
    pending = [c for c, s in before if s == "pending"]
    assert len(pending) >= 2, before
    top, second = pending[0], pending[1]
    d.save_screenshot(str(artifacts / "review-worklist.png"))

    # -- the page load, several times: open (lease) -> CT and overlays drawn -> back (release)
    for _ in range(LOADS):
        _open(d, top)
        _back(d)
    _open(d, top)
    times = d.execute_script("return window.atlasflow.loadTimes")
    assert len(times) == LOADS + 1
    print(
        f"\nreview page load (open case -> CT and overlays drawn), {len(times)} loads: median {statistics.median(times):.0f} ms, all {[round(t) for t in times]} ms"
    )

    # -- a known liver voxel: drawn in the liver's colour where the label says
    head = labels.ListLabelVersions(labels_pb2.ListLabelVersionsRequest(case_id=top)).versions[0]
    old, affine = _label_map(dep, head)
    liver = np.argwhere(old == LIVER)
    assert len(liver) > 100, "the case has no liver to look at"
    interior = [v for v in liver if (old[v[0] - 2 : v[0] + 3, v[1] - 2 : v[1] + 3, v[2] - 1 : v[2] + 2] == LIVER).all()]
    centre = liver.mean(axis=0)
    ijk = min(interior, key=lambda v: float(np.sum((v - centre) ** 2)))
    mm = _mm(affine, np.array([ijk]))[0]
    d.execute_script(
        "const v = window.atlasflow.viewer; v.setHeat(false); v.setLabelOpacity(1);"
        "for (let o = 1; o <= 9; o++) v.setOrganVisible(o, o === 5); v.setView('axial'); v.goToMM(arguments[0]); v.showCrosshair(false)",
        mm.tolist(),
    )
    time.sleep(0.5)
    shown = d.execute_script("return window.atlasflow.viewer.crosshairMM()")
    assert np.allclose(shown, mm, atol=1.6), (shown, mm.tolist())  # within half a 3 mm voxel
    at = d.execute_script("return window.atlasflow.viewer.screenOfMM(arguments[0])", mm.tolist())
    png = _canvas_png(d)
    png.save(artifacts / "liver-check.png")
    px = np.array(png.getpixel((round(at["x"]), round(at["y"]))))
    assert np.abs(px - LIVER_RGB).max() < 40, f"pixel at the liver voxel {mm.tolist()} is {px.tolist()}"
    # radiological convention: the patient's right (RAS+: larger x) is on the screen's left
    right = d.execute_script("return window.atlasflow.viewer.screenOfMM(arguments[0])", (mm + [30, 0, 0]).tolist())
    left = d.execute_script("return window.atlasflow.viewer.screenOfMM(arguments[0])", (mm - [30, 0, 0]).tolist())
    assert right["x"] < at["x"] < left["x"], (right, at, left)
    # the liver (patient's right) lies in the left half of the axial image
    tile = d.execute_script(
        "const nv = window.atlasflow.viewer.nv; return nv.screenSlices.find(s => s.axCorSag === 0).leftTopWidthHeight"
    )
    assert at["x"] < tile[0] + tile[2] / 2

    # -- revise the spleen: a stroke on this axial slice through the liver voxel, posterior -> anterior
    d.execute_script(
        "const v = window.atlasflow.viewer; for (let o = 1; o <= 9; o++) v.setOrganVisible(o, true);"
        "v.setLabelOpacity(0.5); v.showCrosshair(true)"
    )
    d.find_element(By.CSS_SELECTOR, 'button[data-revise="spleen"]').click()
    d.execute_script("window.atlasflow.viewer.setPenSize(3)")
    start_mm, end_mm = mm + [0, -12, 0], mm + [0, 12, 0]  # 24 mm posterior -> anterior
    a = d.execute_script("return window.atlasflow.viewer.screenOfMM(arguments[0])", start_mm.tolist())
    b = d.execute_script("return window.atlasflow.viewer.screenOfMM(arguments[0])", end_mm.tolist())
    canvas = d.find_element(By.ID, "gl")
    size = canvas.size
    chain = ActionChains(d, duration=50)
    chain.move_to_element_with_offset(canvas, round(a["x"] - size["width"] / 2), round(a["y"] - size["height"] / 2))
    chain.click_and_hold()
    steps = 8
    for _ in range(steps):
        chain.move_by_offset(round((b["x"] - a["x"]) / steps), round((b["y"] - a["y"]) / steps))
    chain.release().perform()
    time.sleep(0.5)
    d.save_screenshot(str(artifacts / "review-case.png"))
    # ... and accept, with its keyboard shortcut, an organ that makes the case's priority (attention
    # where the ensemble has no label): a human decision takes it out of the priority
    doc = d.execute_script("return window.atlasflow.state.caseCtx.doc")
    ask = [o["organ"] for o in doc["organs"] if o["attention_ml"] > 0 and o["organ"] not in doc["labelled_organs"]]
    assert ask, doc["organs"]
    d.find_element(By.CSS_SELECTOR, f'.organ[data-organ="{ask[0]}"] .name').click()
    ActionChains(d).send_keys("a").perform()
    assert "accepted" in d.find_element(By.CSS_SELECTOR, f'.organ[data-organ="{ask[0]}"]').text
    d.find_element(By.ID, "save").click()
    _wait(d, lambda d: d.execute_script("return window.atlasflow.lastSaved || null"), 60)
    _wait(d, lambda d: d.find_elements(By.CSS_SELECTOR, "#worklist tbody tr"))
    saved = d.execute_script("return window.atlasflow.lastSaved")

    # -- the new version over gRPC: the user is its author, the changed voxels lie on the stroke
    versions = labels.ListLabelVersions(labels_pb2.ListLabelVersionsRequest(case_id=top)).versions
    new = versions[0]
    assert new.version_id == saved["version_id"] and new.parent_version_id == head.version_id
    assert new.provenance.reviewer == "dr.demo"
    now, new_affine = _label_map(dep, new)
    assert np.allclose(new_affine, affine, atol=1e-4)
    added = np.argwhere((now == SPLEEN) & (old != SPLEEN))
    assert len(added) >= 5, "the stroke changed no voxel"
    assert not ((old == SPLEEN) & (now != SPLEEN)).any(), "a brush stroke removed spleen"
    added_mm = _mm(affine, added)
    assert np.all(np.abs(added_mm[:, 2] - mm[2]) < 1.6), "changed voxels off the painted axial slice"
    assert np.all(np.abs(added_mm[:, 0] - mm[0]) <= 3 * 3 + 0.1), added_mm[:, 0]  # pen radius <= 3 voxels
    assert added_mm[:, 1].min() >= start_mm[1] - 9.1 and added_mm[:, 1].max() <= end_mm[1] + 9.1
    assert np.ptp(added_mm[:, 1]) > 12, "the stroke's length is not in the changed voxels"
    assert (now[old != SPLEEN] != old[old != SPLEEN]).sum() == len(added)  # nothing else changed

    # -- the worklist order changes: the reviewed case falls below the other (ranking follows the
    # new version through the labels service's outbox: a few seconds)
    after: list[tuple[str, str]] = []
    for _ in range(60):
        d.refresh()
        _wait(d, lambda d: d.find_elements(By.CSS_SELECTOR, "#worklist tbody tr"))
        after = _rows(d)
        order = [c for c, _ in after]
        if order.index(second) < order.index(top):
            break
        time.sleep(1)
    assert order.index(second) < order.index(top) and dict(after)[top] == "revised", (before, after)
    item = ranking.GetWorklistItem(ranking_pb2.GetWorklistItemRequest(case_id=top)).item
    assert item.status == ranking_pb2.WORKLIST_STATUS_REVISED

    # -- a second user: the case dr.demo holds is shown taken and cannot be opened
    s = requests.Session()
    s.trust_env = False
    s.verify = str(dep.ca().ca_file)
    s.headers["Authorization"] = f"Bearer {dep.mint('reviewer', 'dr.demo')}"
    assert s.post(f"{dep.gateway_url()}/api/v1/cases/{second}/lease", json={"duration_s": 600}).status_code == 200
    d.find_element(By.ID, "logout").click()
    _wait(d, lambda d: d.find_elements(By.ID, "username"))
    _login(d, dep, "annotator")
    button = d.find_element(By.CSS_SELECTOR, f'button[data-open="{second}"]')
    assert not button.is_enabled() and "Taken by dr.demo" in button.text
    d.save_screenshot(str(artifacts / "review-worklist-taken.png"))
    d.get(f"{dep.gateway_url()}/app/#/case/{second}")
    err = _wait(d, lambda d: d.find_elements(By.ID, "case-error"))[0]
    assert "taken" in err.text.lower()
    lease = ranking.GetWorklistItem(ranking_pb2.GetWorklistItemRequest(case_id=second)).item.lease
    assert lease.reviewer == "dr.demo"
