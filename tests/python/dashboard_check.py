"""Drives the operator dashboard in headless Chromium (selenium 4).

Run by tests/tests/dashboard_ui.rs against the real control plane, proxy and
mock upstream; prints one `ok ...` line per check and exits non-zero on the
first failure. Environment:

  CLAW_DASHBOARD_URL   the control plane's HTTP base URL (the page is at /)
  CLAW_ADMIN_TOKEN     an admin token (its name is CLAW_ADMIN_NAME)
  CLAW_VIEWER_TOKEN    a viewer token (empty: the viewer checks are skipped)
  CLAW_PROXY_URL       a proxy's base URL, CLAW_CLIENT_KEY, CLAW_MODEL: a chat
                       request sent there reaches the upstream that answers 429
  CLAW_COOL_BACKEND    name of the backend that 429 cools
  CLAW_DISABLE_BACKEND name of the backend the admin disables from the page
  CLAW_PROXY_NODE      node id of a connected proxy
  CLAW_AGENT           id of an agent
  CLAW_AUDIT           "1" when the audit log is implemented
  CLAW_SCREENSHOT_DIR  when set, screenshots are written there
  CLAW_CHROMIUM, CLAW_CHROMEDRIVER  binaries (default /usr/bin/chromium, /usr/bin/chromedriver)
"""

import json
import os
import sys
import tempfile
import time
import urllib.error
import urllib.request

from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException, TimeoutException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

BASE = os.environ["CLAW_DASHBOARD_URL"].rstrip("/")
ADMIN = os.environ["CLAW_ADMIN_TOKEN"]
ADMIN_NAME = os.environ.get("CLAW_ADMIN_NAME", "bootstrap")
VIEWER = os.environ.get("CLAW_VIEWER_TOKEN", "")
PROXY_URL = os.environ.get("CLAW_PROXY_URL", "")
CLIENT_KEY = os.environ.get("CLAW_CLIENT_KEY", "")
MODEL = os.environ.get("CLAW_MODEL", "chat")
COOL = os.environ.get("CLAW_COOL_BACKEND", "primary")
DISABLE = os.environ.get("CLAW_DISABLE_BACKEND", "fallback")
NODE = os.environ.get("CLAW_PROXY_NODE", "")
AGENT = os.environ.get("CLAW_AGENT", "")
AUDIT = os.environ.get("CLAW_AUDIT", "") == "1"
SHOTS = os.environ.get("CLAW_SCREENSHOT_DIR", "")
FAKE_COOL_URL = os.environ.get("CLAW_FAKE_COOL_URL", "")  # the page's own dev server only
# Generous: these are deadlines for things to appear, not timing assertions.
WAIT = 30

# Console errors the script causes on purpose (the browser logs a failed
# response as an error): the bad-token sign-in and the forged viewer write.
expected_errors = []
if not AUDIT:
    # This build answers the audit endpoint 501 (the page shows the error).
    expected_errors.append("/api/v1/audit")


def fail(msg):
    print(f"FAIL {msg}", flush=True)
    sys.exit(1)


def ok(msg):
    print(f"ok {msg}", flush=True)


def start_driver():
    opts = webdriver.ChromeOptions()
    opts.binary_location = os.environ.get("CLAW_CHROMIUM", "/usr/bin/chromium")
    profile = tempfile.mkdtemp(prefix="claw-dash-chrome-")
    for flag in [
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--window-size=1280,900",
        f"--user-data-dir={profile}",
    ]:
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(executable_path=os.environ.get("CLAW_CHROMEDRIVER", "/usr/bin/chromedriver"))
    return webdriver.Chrome(service=service, options=opts)


d = start_driver()


def wait_for(cond, what, timeout=WAIT):
    try:
        return WebDriverWait(d, timeout, poll_frequency=0.1, ignored_exceptions=(StaleElementReferenceException,)).until(
            lambda _: cond()
        )
    except TimeoutException:
        fail(f"timed out waiting for {what}; page text:\n{page_text()}")


def page_text():
    try:
        return d.find_element(By.TAG_NAME, "body").text[:3000]
    except Exception as e:  # noqa: BLE001 - diagnostics only
        return f"<no page text: {e}>"


def q(testid):
    # Live updates re-render the views: an element found a moment ago may be gone.
    try:
        els = d.find_elements(By.CSS_SELECTOR, f'[data-testid="{testid}"]')
        return els[0] if els and els[0].is_displayed() else None
    except StaleElementReferenceException:
        return None


def click(testid):
    for _ in range(20):
        el = q(testid)
        if el is None:
            break
        try:
            el.click()
            return
        except StaleElementReferenceException:
            time.sleep(0.05)
    fail(f"cannot click {testid}; page text:\n{page_text()}")


def text(testid):
    return d.execute_script(
        "const e = document.querySelector(`[data-testid=\"${arguments[0]}\"]`); return e ? e.textContent : null", testid
    )


def attr(testid, name):
    return d.execute_script(
        "const e = document.querySelector(`[data-testid=\"${arguments[0]}\"]`); return e ? e.getAttribute(arguments[1]) : null",
        testid,
        name,
    )


def q_all(selector):
    try:
        return [e for e in d.find_elements(By.CSS_SELECTOR, selector) if e.is_displayed()]
    except StaleElementReferenceException:
        return q_all(selector)


def shot(name):
    if not SHOTS:
        return
    os.makedirs(SHOTS, exist_ok=True)
    # Let charts and fonts settle into the layout before capturing.
    d.execute_script("return document.fonts ? document.fonts.ready : null")
    path = os.path.join(SHOTS, f"{name}.png")
    # The whole page: grow the window to the document's height.
    w = d.execute_script("return window.innerWidth")
    height = d.execute_script("return Math.max(document.documentElement.scrollHeight, 600)")
    size = d.get_window_size()
    d.set_window_size(size["width"], min(height + (size["height"] - d.execute_script("return window.innerHeight")), 2400))
    d.save_screenshot(path)
    d.set_window_size(size["width"], size["height"])
    ok(f"screenshot {name} ({w}px)")


def check_console(stage):
    bad = []
    for entry in d.get_log("browser"):
        if entry.get("level") != "SEVERE":
            continue
        msg = entry.get("message", "")
        if any(e in msg for e in expected_errors):
            continue
        bad.append(msg)
    if bad:
        fail(f"browser console errors ({stage}):\n" + "\n".join(bad))
    ok(f"no console errors ({stage})")


def tab(name):
    d.find_element(By.CSS_SELECTOR, f'[data-testid="tab-{name}"]').click()
    wait_for(lambda: q(f"view-{name}") is not None, f"the {name} view")


def sign_in(token, role):
    wait_for(lambda: q("login-token") is not None, "the login form")
    field = q("login-token")
    field.clear()
    field.send_keys(token)
    click("login-submit")
    wait_for(lambda: text("whoami-role") == role, f"signed in as {role}")


def sign_out():
    click("signout")
    wait_for(lambda: q("login-token") is not None, "the login form after sign-out")


def badge_state(name):
    return attr(f"backend-state-{name}", "data-state")


def trigger_429():
    if FAKE_COOL_URL:
        urllib.request.urlopen(urllib.request.Request(FAKE_COOL_URL, data=b"{}", method="POST"), timeout=30)
        return
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "cool it"}], "max_tokens": 8}).encode()
    req = urllib.request.Request(
        f"{PROXY_URL.rstrip('/')}/v1/chat/completions",
        data=body,
        method="POST",
        headers={"Authorization": f"Bearer {CLIENT_KEY}", "Content-Type": "application/json"},
    )
    # The proxy retries on another backend, so the answer may well be 200.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(req, timeout=60) as res:
            res.read()
    except urllib.error.HTTPError as e:
        e.read()


def forged_write(backend_id):
    return d.execute_async_script(
        """
        const [id, done] = arguments;
        fetch(`/api/v1/backends/${id}/disable`, {
          method: "POST",
          headers: {Authorization: `Bearer ${sessionStorage.getItem("claw.token")}`, "Content-Type": "application/json"},
          body: "{}",
        }).then(r => done(r.status), e => done(String(e)));
        """,
        backend_id,
    )


def no_horizontal_scroll(stage):
    sizes = d.execute_script(
        """
        const de = document.documentElement, hd = document.getElementById("header");
        return {doc: de.scrollWidth, view: de.clientWidth, header: hd.scrollWidth, headerBox: hd.clientWidth};
        """
    )
    if sizes["doc"] > sizes["view"] or sizes["header"] > sizes["headerBox"]:
        fail(f"horizontal page scroll at {stage}: {sizes}")
    ok(f"no horizontal page scroll at {stage}")


try:
    d.set_script_timeout(30)
    d.get(BASE + "/")
    wait_for(lambda: q("login-token") is not None, "the login form")
    shot("login")

    # A bad token is refused inline.
    expected_errors.append("/api/v1/whoami")
    q("login-token").send_keys("not-a-token")
    click("login-submit")
    wait_for(lambda: q("login-error") is not None, "the login error")
    if text("login-error") != "Token not accepted":
        fail(f"login error says {text('login-error')!r}")
    ok("bad token refused")
    check_console("login")
    expected_errors.remove("/api/v1/whoami")

    role = "viewer" if VIEWER else "admin"
    sign_in(VIEWER or ADMIN, role)
    ok(f"signed in as {role}")
    wait_for(lambda: attr("live", "data-state") == "live", "the live indicator")
    ok("live")

    # Overview: the proxy is listed.
    if NODE:
        wait_for(lambda: q(f"proxy-row-{NODE}") is not None, f"proxy {NODE} on the overview")
        ok(f"overview lists proxy {NODE}")
    wait_for(lambda: q("card-requests") is not None, "the usage cards")
    shot("overview")

    # Agents: listed, with their run timeline.
    tab("agents")
    if AGENT:
        wait_for(lambda: q(f"agent-row-{AGENT}") is not None, f"agent {AGENT}")
        click(f"agent-row-{AGENT}")
        wait_for(lambda: f"Runs of {AGENT}" in (text("agent-detail") or ""), "the run timeline")
        if VIEWER and q(f"agent-run-{AGENT}") is not None:
            fail("a viewer sees the Run now button")
        ok(f"agents list {AGENT}")

    # Backends: listed, healthy; a viewer has no write controls.
    tab("backends")
    wait_for(lambda: q(f"backend-row-{COOL}") is not None, f"backend {COOL}")
    wait_for(lambda: q(f"backend-row-{DISABLE}") is not None, f"backend {DISABLE}")
    ok("backends listed")
    if VIEWER:
        writes = q_all('[data-testid^="backend-disable-"], [data-testid^="backend-enable-"], [data-testid^="agent-run-"], button.btn-danger')
        if writes:
            fail(f"a viewer sees write controls: {[w.get_attribute('data-testid') for w in writes]}")
        ok("viewer sees no write controls")
    else:
        print("skip viewer-only checks (no viewer token)", flush=True)
    wait_for(lambda: badge_state(COOL) == "healthy", f"{COOL} healthy")

    # A 429 at the upstream turns the badge to cooling, live (no reload).
    d.execute_script("window.__marker = 1;")
    trigger_429()
    wait_for(lambda: badge_state(COOL) == "cooling", f"{COOL} cooling")
    if d.execute_script("return window.__marker") != 1:
        fail("the page reloaded to show the cooldown")
    if not (text(f"backend-state-{COOL}") or "").startswith("cooling"):
        fail(f"badge text is {text(f'backend-state-{COOL}')!r}")
    ok(f"{COOL} turned cooling without a reload")
    click(f"backend-row-{COOL}")
    wait_for(lambda: "Cooldowns of" in (text("backend-detail") or ""), "the cooldown history")
    shot("backends")

    # A write forged from the viewer's page is refused.
    if VIEWER:
        expected_errors.append("/disable")
        bid = attr(f"backend-row-{DISABLE}", "data-id")
        status = forged_write(bid)
        if status != 403:
            fail(f"forged viewer write answered {status}, not 403")
        ok("forged viewer write refused (403)")
        check_console("viewer write")
        expected_errors.remove("/disable")
        d.refresh()
        wait_for(lambda: badge_state(DISABLE) not in (None,), f"{DISABLE} after reload")
        if badge_state(DISABLE) == "disabled":
            fail("the forged write disabled the backend")
        ok(f"{DISABLE} still enabled")

    tab("usage")
    wait_for(lambda: q("usage-tokens-chart") is not None or q_all("#view-usage .banner"), "the usage chart")
    if not q("usage-tokens-chart"):
        fail(f"usage failed: {page_text()}")
    ok("usage chart")
    shot("usage")

    tab("agents")
    if AGENT:
        wait_for(lambda: q(f"agent-row-{AGENT}") is not None, f"agent {AGENT}")
        if f"Runs of {AGENT}" not in (text("agent-detail") or ""):
            click(f"agent-row-{AGENT}")
        wait_for(lambda: f"Runs of {AGENT}" in (text("agent-detail") or ""), "the run timeline")
    shot("agents")

    tab("audit")
    if AUDIT:
        wait_for(lambda: q_all("#view-audit tbody tr") or q_all("#view-audit .empty"), "the audit table")
        ok("audit table")
    shot("audit")
    check_console("views")

    # Phone width: the header and nav wrap, the page does not scroll sideways.
    tab("overview")
    size = d.get_window_size()
    d.set_window_size(390, 844)
    wait_for(lambda: d.execute_script("return window.innerWidth") <= 400, "the phone width")
    no_horizontal_scroll("390px overview")
    shot("phone-overview")
    tab("backends")
    no_horizontal_scroll("390px backends")
    d.set_window_size(size["width"], size["height"])

    # Dark mode renders too.
    d.execute_cdp_cmd("Emulation.setEmulatedMedia", {"features": [{"name": "prefers-color-scheme", "value": "dark"}]})
    tab("overview")
    shot("overview-dark")
    d.execute_cdp_cmd("Emulation.setEmulatedMedia", {"features": []})

    # The admin disables a backend from the page (confirm dialog in-page).
    if VIEWER:
        sign_out()
        sign_in(ADMIN, "admin")
        ok("signed in as admin")
    tab("backends")
    wait_for(lambda: q(f"backend-disable-{DISABLE}") is not None, f"the Disable button of {DISABLE}")
    click(f"backend-disable-{DISABLE}")
    wait_for(lambda: q("confirm") is not None, "the confirm dialog")
    if DISABLE not in (text("confirm-text") or ""):
        fail(f"the dialog says {text('confirm-text')!r}")
    click("confirm-ok")
    wait_for(lambda: badge_state(DISABLE) == "disabled", f"{DISABLE} disabled")
    wait_for(lambda: q("confirm") is None, "the dialog to close")
    wait_for(lambda: q(f"backend-enable-{DISABLE}") is not None, f"the Enable button of {DISABLE}")
    ok(f"admin disabled {DISABLE}")
    if AUDIT:
        tab("audit")
        wait_for(lambda: ADMIN_NAME in d.execute_script("return [...document.querySelectorAll('[data-testid=audit-token]')].map(e => e.textContent)"), f"an audit record by {ADMIN_NAME}")
        ok(f"audit shows {ADMIN_NAME}")
    check_console("admin")
    print("done", flush=True)
finally:
    d.quit()
