"""report.html in a real browser: headless Chromium (Debian's chromium package, driven by
Playwright) opens a real run's report offline, with no console error, every image loaded and
every section present, and saves a screenshot."""

from __future__ import annotations

import shutil

import pytest

import forgeml

pytestmark = pytest.mark.slow

RECIPE = {
    "name": "browser",
    "data": {"source": "breast-cancer"},
    "model": {"name": "mlp", "hidden_sizes": [16]},
    "train": {"max_steps": 30, "global_batch_size": 32, "lr": 1e-2, "eval_every": 10, "seed": 0},
    "compress": {"methods": ["quantize"], "latency_runs": 10, "throughput_batches": 1},
    "explain": {"n": 4, "lime_samples": 100, "shap_evals": 80, "shap_background": 20, "ig_steps": 8},
}
SECTIONS = ("diagnosis", "recipe", "data-audit", "data", "training", "evaluation", "tuning", "compression",
            "explanations", "benchmarks")  # fmt: skip


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.skip("no chromium on PATH: install Debian's chromium package (.ci/run does) to run the browser test")
    return path


def test_the_report_opens_offline_with_every_image_loaded(tmp_path):
    playwright = pytest.importorskip("playwright.sync_api", reason="playwright is a dev extra: pip install -e .[dev]")
    browser_path = chromium()
    run = tmp_path / "run"
    forgeml.run(RECIPE, run)
    report = run / "report.html"
    problems: list[str] = []
    with playwright.sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=browser_path, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        page.route("**/*", lambda route: route.continue_() if route.request.url.startswith("file:") else route.abort())
        page.on("console", lambda message: problems.append(f"console {message.type}: {message.text}"))
        page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
        page.on("requestfailed", lambda request: problems.append(f"request failed: {request.url}"))
        page.goto(report.as_uri(), wait_until="load")
        images = page.evaluate("Array.from(document.images).map(i => [i.alt, i.complete && i.naturalWidth > 0])")
        sections = page.evaluate("Array.from(document.querySelectorAll('section')).map(s => s.id)")
        page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
        browser.close()
    assert problems == []
    assert len(images) >= 8 and all(loaded for _, loaded in images), images
    assert sections == list(SECTIONS)
    assert (tmp_path / "report.png").read_bytes().startswith(b"\x89PNG")
