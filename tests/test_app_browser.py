"""The web app end to end in a real headless browser (#18): Debian's Chromium driven by Playwright.

The server runs as a user starts it (`python -m diffusers_dreambooth.app`), pointed at the test suite's local Hub.
The first test uploads the bundled photos (and a crafted name and an unreadable file), trains a short run on the toy
model, watches the progress and the curves, sees the grid, generates, pushes, and saves screenshots (`APP_SCREENSHOTS`
names a folder to keep them in, as the README's are made). The second stops a run as it trains and resumes it.
"""

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hub_server import LocalHub

from diffusers_dreambooth.checkpoints import list_checkpoints
from diffusers_dreambooth.toy import SUBJECT_PHOTOS_DIR

playwright = pytest.importorskip("playwright.sync_api", reason='the app extra: pip install -e ".[app]"')
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(CHROMIUM is None, reason="no Chromium: apt-get install chromium (.ci/run installs it)"),
]

STEPS = 20


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def hub(tmp_path):
    with LocalHub(tmp_path / "hub_storage") as hub:
        yield hub


@pytest.fixture
def server(hub, tmp_path):
    """The app on a free port, its work folder in `tmp_path/work`; yields (url, work folder)."""
    port, work = free_port(), tmp_path / "work"
    env = {key: value for key, value in os.environ.items() if not key.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(HF_ENDPOINT=hub.endpoint, HF_HOME=str(tmp_path / "hf_home"), HF_HUB_DISABLE_XET="1")
    log = (tmp_path / "server.log").open("w")
    command = [sys.executable, "-m", "diffusers_dreambooth.app", "--port", str(port), "--work_dir", str(work)]
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            assert process.poll() is None, (tmp_path / "server.log").read_text()
            time.sleep(0.5)
    yield url, work
    process.terminate()
    process.wait(30)
    log.close()


def screenshot(page, tmp_path: Path, name: str, element: str | None = None) -> None:
    """The page's viewport (scrolled to `element`), as the README shows it."""
    if element is not None:
        page.locator(element).scroll_into_view_if_needed()
    page.screenshot(path=str(tmp_path / f"{name}.png"))
    if os.environ.get("APP_SCREENSHOTS"):
        Path(os.environ["APP_SCREENSHOTS"]).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(tmp_path / f"{name}.png", Path(os.environ["APP_SCREENSHOTS"]) / f"{name}.png")


def set_option(page, name: str, value: str) -> None:
    """Type `value` into the advanced option `name`."""
    box = page.locator(f"#option-{name} textarea, #option-{name} input").first
    box.fill(value)
    box.press("Tab")


def set_options(page, options: dict[str, str], uncheck: tuple[str, ...] = ()) -> None:
    """Open the advanced section, type each option, untick those of `uncheck`, and close it again (the progress
    shows below)."""
    page.get_by_text("Advanced: every other option").click()
    for name, value in options.items():
        set_option(page, name, value)
    for name in uncheck:
        page.locator(f"#option-{name} input[type=checkbox]").uncheck()
    page.get_by_text("Advanced: every other option").click()


def progress_text(page) -> str:
    return page.locator("#progress").inner_text()


def test_photos_in_a_subject_trained_watched_sampled_generated_and_pushed(server, hub, tmp_path):
    url, work = server
    crafted = tmp_path / "crafted"
    crafted.mkdir()
    (crafted / "broken.png").write_bytes(b"not a png")
    photos = sorted(str(path) for path in SUBJECT_PHOTOS_DIR.iterdir())
    escape = {"name": "../../escape.png", "mimeType": "image/png", "buffer": Path(photos[0]).read_bytes()}

    with playwright.sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 1600})
        page.goto(url)
        page.locator("#run-name textarea, #run-name input").first.fill("e2e-star")
        page.locator("#photos input[type=file]").set_input_files([*photos, str(crafted / "broken.png")])
        page.locator("#review").get_by_text("broken.png").first.wait_for(timeout=30_000)
        review = page.locator("#review").inner_text()
        assert f"{len(photos)} photo(s) to train on" in review and "is not a readable image" in review

        options = {"num_class_images": "8", "validation_steps": "10", "checkpointing_steps": "10"}
        set_options(page, {"max_train_steps": str(STEPS), **options})
        page.locator("#start").click()
        page.locator("#progress").get_by_text("running").wait_for(timeout=60_000)

        other_tab = browser.new_page()  # a reload, or another tab, shows the running job
        other_tab.goto(url)
        other_tab.locator("#progress").get_by_text("e2e-star").wait_for(timeout=30_000)
        assert other_tab.locator("#run-name textarea, #run-name input").first.input_value() == "e2e-star"
        other_tab.close()

        page.locator("#start").click()  # one run at a time per server
        page.get_by_text("The server is busy training `e2e-star`").first.wait_for(timeout=30_000)

        page.locator("#progress").get_by_text(f"finished, step {STEPS}/{STEPS}").wait_for(timeout=400_000)
        assert "Saved the trained subject" in page.locator("#log textarea").input_value()
        for plot in ("#binding", "#metrics"):  # binding and drift; DINO, CLIP-I, CLIP-T and PRES (the toy checker's)
            page.locator(plot).locator("svg.marks").first.wait_for(timeout=60_000)  # vega drew data
        screenshot(page, tmp_path, "app-training", "#start")

        page.get_by_role("tab", name="Result").click()
        page.locator("#show-result").click()
        page.locator("#grid img").wait_for(timeout=30_000)
        page.locator("#generate").click()
        page.locator("#generated img").wait_for(timeout=120_000)
        page.locator("#repo-id textarea, #repo-id input").first.fill("user/e2e-star")
        page.locator("#push-token input").fill(hub.token)
        page.locator("#push").click()
        page.locator("#pushed").get_by_text("user/e2e-star").wait_for(timeout=120_000)
        assert page.locator("#push-token input").input_value() == ""  # never shown back
        screenshot(page, tmp_path, "app-result", "#show-result")
        sample = page.locator("#card img").first  # the card's samples, served from the run's folder
        sample.wait_for(timeout=30_000)
        assert sample.evaluate("image => image.complete && image.naturalWidth > 0")
        assert page.request.get(f"{url}gradio_api/file=/etc/passwd").status == 403

        # An upload whose name climbs out of the work folder lands inside it, or nowhere.
        page.get_by_role("tab", name="Train").click()
        page.locator("#run-name textarea, #run-name input").first.fill("escape-attempt")
        page.locator("#photos input[type=file]").set_input_files([escape])
        page.locator("#review").get_by_text("photo(s) to train on").wait_for(timeout=30_000)
        browser.close()

    run = work / "runs" / "e2e-star"
    assert sorted(p.name for p in (run / "photos").iterdir()) == sorted(Path(p).name for p in photos)
    assert (run / "output" / "samples" / "grid.png").is_file()
    assert "user/e2e-star" in hub.repos
    outside = [path for path in tmp_path.rglob("escape.png") if not path.resolve().is_relative_to(work.resolve())]
    assert outside == [] and not (tmp_path.parent / "escape.png").exists()
    written = [path for path in work.rglob("*") if path.is_file() and path.suffix in (".json", ".log", ".md", ".txt")]
    assert written and not [path for path in written if hub.token in path.read_text(errors="replace")]


def test_stop_saves_a_checkpoint_and_resume_finishes_the_run(server, tmp_path):
    """Stop while the run trains: it saves a checkpoint (as Ctrl-C does) and shows stopped; Resume continues from
    that checkpoint to the last step."""
    url, work = server
    steps = 200
    with playwright.sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 1600})
        page.goto(url)
        page.locator("#run-name textarea, #run-name input").first.fill("stop-resume")
        options = {"num_class_images": "8", "checkpointing_steps": "1000", "validation_steps": "1000"}
        set_options(page, {"max_train_steps": str(steps), "sample_prompts": "", **options}, uncheck=("evaluate",))
        page.locator("#start").click()
        page.wait_for_function(
            "() => /running, step ([3-9]|[0-9]{2,})\\//.test(document.querySelector('#progress').innerText)",
            timeout=300_000,
        )
        page.locator("#stop").click()
        page.locator("#message").get_by_text("Stopping stop-resume").wait_for(timeout=30_000)
        page.locator("#progress").get_by_text("stopped, step").wait_for(timeout=120_000)
        stopped_at = int(re.search(r"step (\d+)/", progress_text(page)).group(1))
        checkpoints = list_checkpoints(work / "runs" / "stop-resume" / "output")
        assert 3 <= stopped_at < steps and [path.name for path in checkpoints] == [f"checkpoint-{stopped_at}"]

        page.locator("#resume").click()
        page.locator("#message").get_by_text("Resumed stop-resume from its latest checkpoint").wait_for(timeout=30_000)
        page.locator("#progress").get_by_text(f"finished, step {steps}/{steps}").wait_for(timeout=400_000)
        log = page.locator("#log textarea").input_value()
        assert page.locator("#metrics svg.marks").count() == 0  # no `--evaluate`: no DINO/CLIP curves
        browser.close()
    assert "Saved the trained subject" in log
    assert (work / "runs" / "stop-resume" / "output" / "dreambooth.json").is_file()
    train_log = (work / "runs" / "stop-resume" / "train.log").read_text()
    assert f"Resuming from {checkpoints[0]}" in train_log  # from the checkpoint Stop saved
