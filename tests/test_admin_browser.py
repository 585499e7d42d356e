"""The admin page in a real headless Chromium against `tokenomics serve`: create a key in the
Keys tab, read the token shown once, use it with the official openai SDK, see the request in
Analytics (live feed) and Sessions, revoke the key and see 401; screenshots at 1280x800 and
390x844; no severe console errors."""
import json
import os
import shutil
from pathlib import Path

import openai
import pytest

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
SHOTS = Path("/tmp/admin-shots")
ASSETS = Path(__file__).resolve().parent.parent / "tokenomics" / "admin" / "assets"


def _need_browser():
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing = "selenium is not installed (pip install -e '.[test]')"
    else:
        missing = next((f"{p} is missing (apt-get install chromium chromium-driver)"
                        for p in (CHROMIUM, CHROMEDRIVER) if not os.access(p, os.X_OK)), "")
    if missing:
        if os.environ.get("CI"):
            pytest.fail(missing)
        pytest.skip(missing)


@pytest.fixture
def browser(tmp_path):
    _need_browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-first-run", f"--user-data-dir={tmp_path / 'chrome-profile'}", "--window-size=1280,800"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def _severe(driver) -> list:
    return [e for e in driver.get_log("browser") if e.get("level") == "SEVERE"]


def test_admin_page_end_to_end(browser, cli, start_proxy, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait
    cli.token({"provider": "mock"}, "--label", "existing")
    proxy = start_proxy()
    wait = WebDriverWait(browser, 15)
    shots = tmp_path / "shots"
    shots.mkdir()

    def shot(name: str) -> None:
        path = shots / f"{name}.png"
        assert browser.save_screenshot(str(path)) and path.stat().st_size > 1000
        SHOTS.mkdir(exist_ok=True)
        shutil.copy(path, SHOTS / path.name)

    def texts(selector: str) -> list:
        """The visible text of every match, read in one script (re-rendered lists go stale)."""
        return browser.execute_script(
            "return Array.from(document.querySelectorAll(arguments[0])).map(e => e.innerText === undefined ? e.textContent : e.innerText)", selector)

    def tab(name: str) -> None:
        browser.find_element(By.ID, f"tab-{name}").click()
        wait.until(EC.visibility_of_element_located((By.ID, name)))

    browser.set_window_size(1280, 800)
    browser.get(proxy.url + "/admin")
    wait.until(lambda d: "up " in d.find_element(By.ID, "status").text or "updated" in d.find_element(By.ID, "status").text)
    paint = browser.execute_script(
        "return Object.fromEntries(performance.getEntriesByType('paint').map(e => [e.name, e.startTime]))")
    assert "first-contentful-paint" in paint
    print(f"\nfirst-contentful-paint {paint['first-contentful-paint']:.0f} ms; page bytes "
          f"{sum(p.stat().st_size for p in ASSETS.iterdir())}")

    # Keys: a bad policy is refused by the server, naming the field; a good one shows the token once.
    tab("keys")
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#key-list .key"))
    browser.find_element(By.ID, "key-new").click()
    browser.find_element(By.ID, "key-label").send_keys("browser-made")
    policy = browser.find_element(By.ID, "key-policy")
    policy.clear()
    policy.send_keys(json.dumps({"provider": "mock", "rules": [{"type": "nope"}]}))
    browser.find_element(By.ID, "key-save").click()
    wait.until(lambda d: "rules[0].type" in d.find_element(By.ID, "key-error").text)
    # Chromium logs the refused POST as a network error; that one is expected, nothing else is.
    expected = _severe(browser)
    assert [(e["source"], "/admin/api/keys" in e["message"] and "400" in e["message"]) for e in expected] \
        == [("network", True)], expected
    policy.clear()
    policy.send_keys(json.dumps({"provider": "mock", "budget": {"tokens": {"daily": 50000}}}))
    browser.find_element(By.ID, "key-save").click()
    wait.until(EC.visibility_of_element_located((By.ID, "key-token")))
    token = browser.find_element(By.ID, "key-token").text
    assert token.startswith("tkn_") and len(token) == 36
    wait.until(lambda d: any("browser-made" in t for t in texts("#key-list .key")))
    browser.find_element(By.ID, "key-copy").click()
    shot("keys-created-1280x800")
    browser.find_element(By.ID, "key-once-close").click()
    assert browser.find_element(By.ID, "key-token").text == ""       # shown once only
    assert token not in browser.page_source

    # The token works through the proxy with the official SDK.
    client = openai.OpenAI(base_url=proxy.url + "/v1", api_key=token, max_retries=0, timeout=10)
    answer = client.chat.completions.create(model="mock-1", messages=[{"role": "user", "content": "hi from the browser test"}])
    assert answer.choices[0].message.content and answer.usage.total_tokens > 0

    # Analytics: the live feed shows it, and the totals count it.
    tab("analytics")
    wait.until(lambda d: any("request.completed" in t and "mock-1" in t for t in texts("#feed tr")))
    wait.until(lambda d: "1\nrequests" in texts("#an-totals")[0])
    assert browser.find_elements(By.CSS_SELECTOR, "#ch-tokens svg circle")
    wait.until(lambda d: any("browser-made" in t for t in texts("#ch-token svg text")))
    shot("analytics-1280x800")

    # Sessions: the session, and its request in the drill-down.
    tab("sessions")
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#session-list tr"))
    browser.find_element(By.CSS_SELECTOR, "#session-list tr").click()
    wait.until(lambda d: any("mock-1" in t and "200" in t for t in texts("#request-list tr")))
    shot("sessions-1280x800")

    # Keys: spend is shown; revoke, and the SDK gets a 401.
    tab("keys")
    wait.until(lambda d: any("browser-made" in t and "1 requests" in t for t in texts("#key-list .key")))
    keys = browser.find_elements(By.CSS_SELECTOR, "#key-list .key")
    made = next(k for k in keys if "browser-made" in k.text)
    assert "1 requests" in made.text and "tokens daily" in made.text
    browser.execute_script("window.confirm = () => true;")
    made.find_element(By.CSS_SELECTOR, ".key-revoke").click()
    wait.until(lambda d: not any("browser-made" in t for t in texts("#key-list .key")))
    with pytest.raises(openai.AuthenticationError) as err:
        client.chat.completions.create(model="mock-1", messages=[{"role": "user", "content": "again"}])
    assert err.value.status_code == 401 and err.value.code == "invalid_token"

    # Phone size: the same page, no horizontal overflow.
    browser.set_window_size(390, 844)
    tab("analytics")
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#feed tr"))
    width = browser.execute_script("return [document.documentElement.scrollWidth, window.innerWidth]")
    assert width[0] <= width[1] + 1, width
    shot("analytics-390x844")
    tab("keys")
    shot("keys-390x844")
    tab("memory")
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#memory-list li"))
    shot("memory-390x844")

    assert _severe(browser) == []
