"""Take the README's screenshots of the chat page (docs/chat-light.png, docs/chat-dark.png) in
headless Chromium, over a real slim serve of the default model.

The conversation shown is written here, not generated, so that one picture shows what the page
renders (a folded thought, code with its copy button, a table); the last reply is the model's own,
generated while the script runs.

    python docs/screenshots.py        # needs chromium and chromium-driver (Debian's packages)
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys

from slim.runtime import serve, store

DOCS = Path(__file__).resolve().parent
SHOWN = {
    "id": "tour",
    "title": "Q4_K in numpy",
    "created": 1,
    "updated": 2,
    "model": "smollm2-135m",
    "system": "",
    "temperature": 0.2,
    "maxTokens": 64,
    "messages": [
        {"role": "user", "content": "How big is a Q4_K block, and how do I read its scales?"},
        {
            "role": "assistant",
            "thinking": "A Q4_K super-block holds 256 weights: two fp16 factors, 12 bytes of 6-bit scales and mins, "
            "128 bytes of 4-bit quants.",
            "content": "A Q4_K super-block covers **256 weights** in 144 bytes:\n\n"
            "| Field | Bytes | Holds |\n|---|---:|---|\n| `d`, `dmin` | 4 | fp16 super-block scale and min |\n"
            "| `scales` | 12 | eight 6-bit scales and mins |\n| `qs` | 128 | 256 four-bit quants |\n\n"
            "Reading the scales of sub-block `j`:\n\n```python\ndef scale_min(j, q):\n    if j < 4:\n"
            "        return q[j] & 63, q[j + 4] & 63\n    return ((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),\n"
            "            (q[j + 4] >> 4) | ((q[j] >> 6) << 4))\n```\n\nThat is **4.5 bits** per weight.",
            "stats": {"completionTokens": 151, "tokensPerSecond": 41.7, "contextUsed": 186, "contextLength": 2048},
        },
    ],
}


def main() -> None:
    pool = serve.ModelPool([serve.ModelSpec(["smollm2-135m"], store.resolve("smollm2-135m"))], parallel=1, ctx=2048)
    server = serve.Server(pool)
    host, port = server.start("127.0.0.1", 0)
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1280,1080", "--hide-scrollbars"):
        options.add_argument(argument)
    driver = webdriver.Chrome(options=options, service=Service("/usr/bin/chromedriver"))
    try:
        base = f"http://{host}:{port}/"
        driver.get(base)
        driver.execute_script(
            "localStorage.clear(); localStorage.setItem('slim.conversation.tour', arguments[0]);", json.dumps(SHOWN)
        )
        driver.get(base)
        time.sleep(1)
        driver.find_element(By.CSS_SELECTOR, "details.thinking").click()
        driver.find_element(By.ID, "prompt").send_keys("And Q8_0, in one sentence?", Keys.ENTER)
        time.sleep(0.5)
        while driver.find_element(By.ID, "stop").is_displayed():
            time.sleep(0.1)
        time.sleep(0.5)
        driver.execute_script("document.querySelector('#messages').scrollTop = 0")
        for theme in ("light", "dark"):
            driver.execute_script("localStorage.setItem('slim.theme', arguments[0]);", theme)
            driver.get(base)
            time.sleep(1)
            driver.find_element(By.CSS_SELECTOR, "details.thinking").click()
            driver.execute_script("document.querySelector('#messages').scrollTop = 0")
            driver.save_screenshot(str(DOCS / f"chat-{theme}.png"))
            print(DOCS / f"chat-{theme}.png")
    finally:
        driver.quit()
        server.shutdown()


if __name__ == "__main__":
    main()
