"""The chat page at / (runtime/serve/web), in a real headless Chromium driven by selenium, against a
real slim serve of SmolLM2: a streamed reply appears token by token, Esc stops it and frees the
server's sequence, conversations survive a reload, the model picker switches models, an API key
is asked for once; and the page's own JS tests (tests/web, under node). The browser tests need
Debian's chromium and chromium-driver (`make test` installs them where apt-get can) and are
skipped without them."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers import serving

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
KEY = "page-key"
REPO = Path(__file__).resolve().parents[1]
MODEL_COUNT = "return document.querySelectorAll('#model option').length"
LAST_REPLY = (
    "const e = [...document.querySelectorAll('.message.assistant .content')].pop(); return e ? e.textContent : null"
)


def wait_for(condition: Callable[[], Any], timeout: float = 60.0, what: str = "the page") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def base(smollm2_gguf: Path) -> Iterator[str]:
    with serving({"smollm2-135m": smollm2_gguf, "second": smollm2_gguf}, ctx=1024) as url:
        yield url


@pytest.fixture(scope="module")
def keyed_base(smollm2_gguf: Path) -> Iterator[str]:
    with serving({"smollm2-135m": smollm2_gguf}, api_key=KEY, parallel=1) as url:
        yield url


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip("no chromium and chromedriver here (apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1200,900",
    ):
        options.add_argument(argument)
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def page(browser: Any, base: str) -> Any:
    """The page, fresh: nothing stored from an earlier test."""
    browser.get(base + "/")
    browser.execute_script("localStorage.clear(); sessionStorage.clear();")
    browser.get(base + "/")
    wait_for(lambda: browser.execute_script(MODEL_COUNT), what="the models")
    return browser


def element(driver: Any, css: str) -> Any:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.CSS_SELECTOR, css)


def send(driver: Any, text: str) -> None:
    from selenium.webdriver.common.keys import Keys

    box = element(driver, "#prompt")
    box.clear()
    box.send_keys(text, Keys.ENTER)


def running(driver: Any) -> bool:
    return element(driver, "#stop").is_displayed()


def reply_done(driver: Any) -> str:
    wait_for(lambda: driver.execute_script(LAST_REPLY) is not None, what="the reply to start")
    wait_for(lambda: not running(driver), 120, "the reply to end")
    return driver.execute_script(LAST_REPLY)


def set_field(driver: Any, css: str, value: str) -> None:
    if not element(driver, "#settings").is_displayed():
        element(driver, "#settings-toggle").click()
    field = element(driver, css)
    field.clear()
    field.send_keys(value)
    driver.execute_script("arguments[0].dispatchEvent(new Event('change'))", field)


def test_a_reply_streams_in_token_by_token(page: Any) -> None:
    set_field(page, "#max-tokens", "48")
    send(page, "Tell me about the moon.")
    lengths: list[int] = []
    while not lengths or running(page) or lengths[-1] == 0:
        text = page.execute_script(LAST_REPLY) or ""
        if not lengths or lengths[-1] != len(text):
            lengths.append(len(text))
        time.sleep(0.01)
    assert lengths == sorted(lengths) and len(lengths) >= 6, lengths  # it grew, many times, never shrank
    stats = element(page, ".message.assistant .stats").text
    assert "48 tokens" in stats and "tokens/s" in stats and "context" in stats, stats
    assert element(page, "#conversations li .title").text == "Tell me about the moon."
    assert element(page, ".message.user .content").text == "Tell me about the moon."


def test_esc_stops_a_long_reply_and_frees_the_sequence(page: Any, base: str) -> None:
    from selenium.webdriver.common.keys import Keys

    send(page, "Write a very long story about a dragon.")
    wait_for(lambda: len(page.execute_script(LAST_REPLY) or "") > 20, what="some of the reply")
    assert httpx.get(base + "/health").json()["running"] == 1
    element(page, "body").send_keys(Keys.ESCAPE)
    wait_for(lambda: not running(page), 10, "the page to stop")
    wait_for(lambda: httpx.get(base + "/health").json()["running"] == 0, 10, "the server to free the sequence")
    stopped = page.execute_script(LAST_REPLY)
    time.sleep(0.5)
    assert page.execute_script(LAST_REPLY) == stopped  # nothing more arrives
    assert "stopped" in element(page, ".message.assistant .stats").text
    assert len(stopped) < 2000  # far short of the 1024-token context


def test_conversations_survive_a_reload_and_are_searched_renamed_and_deleted(page: Any, base: str) -> None:
    set_field(page, "#max-tokens", "8")
    set_field(page, "#temperature", "0")
    send(page, "Name a fruit.")
    first = reply_done(page)
    element(page, "#new-chat").click()
    send(page, "Name a colour.")
    reply_done(page)
    page.get(base + "/")
    titles = wait_for(lambda: [e.text for e in page.find_elements("css selector", "#conversations .title")])
    assert titles == ["Name a colour.", "Name a fruit."]
    page.find_elements("css selector", "#conversations .title")[1].click()
    assert page.execute_script(LAST_REPLY) == first
    assert element(page, "#temperature").get_attribute("value") == "0"  # the conversation's own settings

    search = element(page, "#search")
    search.send_keys("fruit")
    assert [e.text for e in page.find_elements("css selector", "#conversations .title")] == ["Name a fruit."]
    search.clear()
    page.execute_script("arguments[0].dispatchEvent(new Event('input'))", search)

    from selenium.webdriver.common.keys import Keys

    element(page, "#conversations li.current button.rename").click()
    field = element(page, "#conversations li.current .title input")
    field.send_keys(Keys.CONTROL, "a")
    field.send_keys("Fruit", Keys.ENTER)
    page.get(base + "/")
    wait_for(lambda: "Fruit" in [e.text for e in page.find_elements("css selector", "#conversations .title")])
    colour = next(li for li in page.find_elements("css selector", "#conversations li") if "colour" in li.text)
    colour.find_element("css selector", "button.delete").click()
    page.switch_to.alert.accept()
    assert [e.text for e in page.find_elements("css selector", "#conversations .title")] == ["Fruit"]


def test_regenerate_and_edit_the_last_message(page: Any) -> None:
    set_field(page, "#max-tokens", "6")
    send(page, "Say hello.")
    reply_done(page)
    element(page, ".message.assistant button.regenerate").click()
    reply_done(page)
    assert len(page.find_elements("css selector", ".message")) == 2  # the reply was replaced, not added
    element(page, ".message.user button.edit").click()
    assert element(page, "#prompt").get_attribute("value") == "Say hello."
    assert page.find_elements("css selector", ".message") == []
    from selenium.webdriver.common.keys import Keys

    element(page, "#prompt").send_keys(Keys.END, " Say goodbye.", Keys.ENTER)
    reply_done(page)
    assert element(page, ".message.user .content").text == "Say hello. Say goodbye."


def test_the_model_picker_switches_models(page: Any, base: str) -> None:
    from selenium.webdriver.support.select import Select

    picker = Select(element(page, "#model"))
    assert [o.get_attribute("value") for o in picker.options] == ["smollm2-135m", "second"]
    picker.select_by_value("second")
    set_field(page, "#max-tokens", "4")
    send(page, "Hi.")
    reply_done(page)
    models = {m["id"]: m["state"] for m in httpx.get(base + "/v1/models").json()["data"]}
    assert models["second"] == "loaded"
    wait_for(lambda: Select(element(page, "#model")).first_selected_option.text == "second", what="the picker")


def test_an_api_key_is_asked_for_once(browser: Any, keyed_base: str) -> None:
    browser.get(keyed_base + "/")
    browser.execute_script("localStorage.clear(); sessionStorage.clear();")
    browser.get(keyed_base + "/")
    wait_for(lambda: element(browser, "#key-dialog").is_displayed(), what="the key dialog")
    element(browser, "#key").send_keys(KEY + "\n")
    wait_for(lambda: browser.execute_script(MODEL_COUNT))
    set_field(browser, "#max-tokens", "4")
    send(browser, "Hi.")
    assert reply_done(browser)
    browser.get(keyed_base + "/")  # the same tab: the key is kept
    wait_for(lambda: browser.execute_script(MODEL_COUNT))
    assert not element(browser, "#key-dialog").is_displayed()


def test_markdown_replies_and_a_phone_width_window(page: Any, base: str) -> None:
    """A stored reply with code and a table renders as markup, with its raw HTML left as text."""
    conversation = {
        "id": "demo",
        "title": "Markdown",
        "created": 1,
        "updated": 2,
        "model": "smollm2-135m",
        "system": "",
        "temperature": 0.8,
        "maxTokens": None,
        "messages": [
            {"role": "user", "content": "Show me."},
            {
                "role": "assistant",
                "content": "```python\nprint('<b>')\n```\n\n"
                "| a | b |\n|---|---|\n| 1 | 2 |\n\n<img src=x onerror=alert(1)>",
            },
        ],
    }
    page.execute_script("localStorage.setItem('slim.conversation.demo', arguments[0])", json.dumps(conversation))
    page.get(base + "/")
    wait_for(lambda: page.find_elements("css selector", ".message.assistant .code"))
    assert element(page, ".message.assistant pre code").text == "print('<b>')"
    assert [e.text for e in page.find_elements("css selector", ".message.assistant td")] == ["1", "2"]
    assert page.find_elements("css selector", ".message.assistant img") == []
    assert "<img src=x" in element(page, ".message.assistant .content").text
    try:
        page.set_window_size(390, 844)
        assert not element(page, "#sidebar").is_displayed() or element(page, "#sidebar").rect["x"] < 0
        element(page, "#toggle-sidebar").click()
        wait_for(lambda: element(page, "#sidebar").rect["x"] >= 0, 5, "the sidebar to open")
    finally:
        page.set_window_size(1200, 900)


def test_page_files_headers_and_no_ui(smollm2_gguf: Path, base: str) -> None:
    page = httpx.get(base + "/", headers={"Accept": "text/html"})
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert httpx.get(base + "/").text == "slim is running"  # Ollama's clients ask without text/html
    script = httpx.get(base + "/ui/app.js")
    assert script.status_code == 200 and script.headers["content-type"].startswith("text/javascript")
    for name in ("../routes.py", "%2e%2e%2froutes.py", "web_ui.py", ".hidden.js", "missing.js"):
        assert httpx.get(f"{base}/ui/{name}").status_code == 404, name
    from slim.runtime import serve

    pool = serve.ModelPool([serve.ModelSpec(["m"], smollm2_gguf)], parallel=1, ctx=256, n_threads=1)
    server = serve.Server(pool, ui=False)
    host, port = server.start("127.0.0.1", 0)
    try:
        assert httpx.get(f"http://{host}:{port}/", headers={"Accept": "text/html"}).text == "slim is running"
        assert httpx.get(f"http://{host}:{port}/ui/app.js").status_code == 404
    finally:
        server.shutdown()


def test_the_page_files_need_no_api_key(keyed_base: str) -> None:
    assert httpx.get(keyed_base + "/ui/style.css").status_code == 200
    assert httpx.get(keyed_base + "/v1/models").status_code == 401


@pytest.mark.skipif(shutil.which("node") is None, reason="no node here to run the page's JS tests")
def test_the_page_logic_under_node() -> None:
    """The stream parser, the Markdown renderer and the conversation store (tests/web/*.test.mjs)."""
    done = subprocess.run(["node", "--test", "tests/web/"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]


def test_serve_open_hands_the_page_to_the_browser(smollm2_gguf: Path, tmp_path: Path) -> None:
    """`slim serve --open` opens the page's address with the user's browser (here BROWSER, which
    Python's webbrowser honours, is a command that writes the address down)."""
    import os
    import signal
    import sys

    opened = tmp_path / "opened"
    env = {**os.environ, "BROWSER": f"sh -c 'echo %s > {opened}'"}
    slim = [sys.executable, "-m", "slim.runtime.cli"]
    with subprocess.Popen(
        [*slim, "serve", str(smollm2_gguf), "--port", "0", "--open", "--ctx", "256", "--threads", "1"],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    ) as server:
        try:
            url = wait_for(lambda: opened.exists() and opened.read_text().strip(), 120, "the browser to be asked")
            assert url.startswith("http://127.0.0.1:") and url.endswith("/")
            page = httpx.get(url, headers={"Accept": "text/html"})
            assert '<script type="module" src="/ui/app.js">' in page.text
        finally:
            server.send_signal(signal.SIGINT)
            _, errors = server.communicate(timeout=30)
    assert f"chat page: {url}" in errors


def test_chat_web_takes_the_system_message_from_the_page() -> None:
    from helpers import run_slim

    done = run_slim("chat", "--web", "--system", "be brief")
    assert done.returncode == 2
    assert done.stderr.strip() == (
        "error: with --web, the system message is set in the page's Settings; leave out --system"
    )
