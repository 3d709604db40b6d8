"""The inspection page in a real browser: `defectscope serve`'s app under uvicorn on a free port,
opened in headless Chromium (Debian's chromium + chromium-driver, driven by Selenium); an image
is picked, the score, verdict and overlay must appear; then /docs (Swagger UI from local files)
must list the operations. A screenshot is saved under the test's
tmp_path; with DEFECTSCOPE_UPDATE_SCREENSHOT=1 it is also copied to docs/server_screenshot.png
(the README shows it; a normal test run leaves the repository unchanged)."""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the server needs the 'serve' extra: pip install 'defectscope[serve]'")
pytest.importorskip("uvicorn", reason="the server needs the 'serve' extra: pip install 'defectscope[serve]'")
pytest.importorskip("onnxruntime", reason="the exported model needs onnxruntime: pip install 'defectscope[export]'")
pytest.importorskip("selenium", reason="the browser test needs selenium (the 'test' extra)")

from _server_helpers import make_model

CHROMIUM = next((p for p in ("/usr/bin/chromium", "/usr/bin/chromium-browser") if Path(p).exists()), None)
DRIVER = next((p for p in ("/usr/bin/chromedriver",) if Path(p).exists()), None) or shutil.which("chromedriver")
REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium binary (/usr/bin/chromium): apt-get install -y chromium "
                                             "chromium-driver (.ci/run does)")
@pytest.mark.timeout(120)
def test_the_page_scores_a_picked_image_in_headless_chromium(tmp_path):
    if DRIVER is None:
        pytest.fail("Chromium is installed but chromedriver is not: apt-get install -y chromium-driver")
    import uvicorn
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    from defectscope.deploy.server import create_app

    model = make_model(tmp_path / "work")
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(model["onnx"], api_key=""), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started, "uvicorn did not start"
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1100,760"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=DRIVER), options=options)
    try:
        driver.get(f"http://127.0.0.1:{port}/")
        wait = WebDriverWait(driver, 30)
        wait.until(lambda d: "threshold" in d.find_element(By.ID, "model").text)
        defect = next(p for p in model["images"] if p.parent.name != "good")
        for image in (model["images"][0], defect):
            driver.find_element(By.ID, "file").send_keys(str(image))
            wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#recent li")) >= 1)
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#recent li")) == 2)
        wait.until(ec.visibility_of_element_located((By.ID, "overlay")))
        score = driver.find_element(By.ID, "score").text
        assert float(score) >= 0, score
        assert driver.find_element(By.ID, "verdict").text in ("good", "defect")
        assert float(driver.find_element(By.ID, "threshold").text) > 0
        overlay = driver.find_element(By.ID, "overlay")
        assert overlay.get_attribute("src").startswith("data:image/png;base64,")
        assert driver.execute_script("return arguments[0].naturalWidth", overlay) > 0  # decoded, drawn
        assert driver.find_element(By.ID, "error").text == ""
        shot = tmp_path / "server_screenshot.png"
        assert driver.save_screenshot(str(shot))
        if os.environ.get("DEFECTSCOPE_UPDATE_SCREENSHOT") == "1":
            (REPO / "docs").mkdir(exist_ok=True)
            shutil.copyfile(shot, REPO / "docs" / "server_screenshot.png")
        # /docs: Swagger UI from the server's own files (fastapi-offline) renders the operations.
        if importlib.util.find_spec("fastapi_offline") is not None:
            driver.get(f"http://127.0.0.1:{port}/docs")
            wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".opblock-summary-path"))
            paths = [e.text.replace("\u200b", "") for e in
                     driver.find_elements(By.CSS_SELECTOR, ".opblock-summary-path")]
            assert "/predict" in paths and "/predict/batch" in paths and "/health" in paths, paths
            assert driver.find_elements(By.CSS_SELECTOR, ".swagger-ui .info .title")
            assert driver.save_screenshot(str(tmp_path / "docs_screenshot.png"))
    finally:
        driver.quit()
        server.should_exit = True
        thread.join(10)
