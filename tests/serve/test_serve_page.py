"""The page at /: a real headless Chromium uploads a file and reads the text off the page.

Debian's chromium and chromium-driver, driven by selenium; .ci/run installs them.
"""

import shutil
import urllib.parse

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

HANG_GUARD = 300  # seconds: a bound on waiting for the page, not a check
# a closed network makes Chromium wait on its background services without these
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.skip("needs Debian's chromium and chromium-driver (see .ci/run)")
    options = Options()
    options.binary_location = chromium
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    browser = webdriver.Chrome(service=Service(driver), options=options)
    yield browser
    browser.quit()


def _upload(browser, server, path) -> str:
    """Upload `path` on a fresh page; the status line once the answer is shown."""
    browser.get(server.url + "/")
    browser.find_element(By.ID, "file").send_keys(str(path))
    browser.find_element(By.ID, "go").click()
    status = browser.find_element(By.ID, "status")
    WebDriverWait(browser, HANG_GUARD).until(lambda _: status.text.startswith(("Done", "Error")))
    return status.text


def _download(browser, link_id: str) -> tuple[str, str]:
    link = browser.find_element(By.ID, link_id)
    href = link.get_attribute("href")
    prefix = "data:text/plain;charset=utf-8,"
    assert href.startswith(prefix)
    return link.get_attribute("download"), urllib.parse.unquote(href[len(prefix) :])


def test_the_page_shows_the_text_and_offers_subtitles(browser, server, expected, long_file):
    status = _upload(browser, server, long_file)
    assert status.startswith("Done"), status
    cli = expected[long_file.stem]
    assert browser.find_element(By.ID, "text").text == cli["json"]["text"]
    assert browser.find_element(By.ID, "downloads").is_displayed()
    # the page writes the subtitles from verbose_json's segments: the CLI's files exactly
    assert _download(browser, "srt") == ("long.srt", cli["srt"])
    assert _download(browser, "vtt") == ("long.vtt", cli["vtt"])


def test_the_page_shows_an_error_in_one_sentence(browser, server, tmp_path):
    notes = tmp_path / "notes.wav"
    notes.write_text("these are meeting notes, not audio\n")
    status = _upload(browser, server, notes)
    assert status.startswith("Error: Cannot load 'notes.wav': it is not audio"), status
    assert not browser.find_element(By.ID, "downloads").is_displayed()
    server.assert_healthy()
