"""The dashboard in a real headless browser (Debian's chromium, driven by Playwright), against a
real ``serve`` process with a tiny model: what a user sees and does, clicked and typed.

Chromium is a system package (.ci/run installs it). Without it these tests skip, unless
GPT_FINETUNE_REQUIRE_BROWSER is set (CI sets it), when they fail instead.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path

import httpx
import pytest
from conftest import toy_examples, write_jsonl
from test_server import Server, wait_job

CHROMIUM = os.environ.get("GPT_FINETUNE_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
if not Path(CHROMIUM).exists():
    if os.environ.get("GPT_FINETUNE_REQUIRE_BROWSER"):
        raise RuntimeError(f"no chromium at {CHROMIUM}: apt-get install chromium (GPT_FINETUNE_REQUIRE_BROWSER is set)")
    pytest.skip("Debian's chromium is not installed (apt-get install chromium)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api")

# as root, on a machine with no outside network: no sandbox, and none of chromium's own calls home
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
HOSTILE = "<img src=x onerror=alert(1)>.jsonl"
WAIT_MS = 120_000  # a job's worker imports torch first: slow on 2 busy cores


def until(page, test: str, timeout_ms: int = 30_000) -> None:
    """Wait until the expression ``test`` holds in the page. Polled from here: Playwright's own
    wait_for_function evaluates strings in the page, which its CSP (no 'unsafe-eval') refuses."""
    deadline = time.monotonic() + timeout_ms / 1000
    while not page.evaluate(test):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {test}")
        page.wait_for_timeout(100)


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        yield b
        b.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model_dir):
    home = tmp_path_factory.mktemp("dashboard") / "home"
    s = Server(home, tiny_model_dir, env={"GPT_FINETUNE_TRAINING_TYPE": "full"})
    yield s
    s.stop()


class Watched:
    """A page whose dialogs, script errors and requests to anywhere but the server are recorded."""

    def __init__(self, browser, url: str, **context) -> None:
        self.context = browser.new_context(**context)
        self.page = self.context.new_page()
        self.page.set_default_timeout(30_000)
        self.url = url
        self.dialogs: list[str] = []
        self.errors: list[str] = []
        self.foreign: list[str] = []
        self.chat_bodies: list[str] = []
        self.accept_dialogs = False
        self.page.on("dialog", self._dialog)
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("console", lambda m: m.type == "error" and self.errors.append(m.text))
        self.page.on("request", self._request)

    def _dialog(self, dialog) -> None:
        self.dialogs.append(dialog.message)
        dialog.accept() if self.accept_dialogs else dialog.dismiss()

    def _request(self, request) -> None:
        if not request.url.startswith(self.url) and not request.url.startswith(("data:", "blob:")):
            self.foreign.append(request.url)
        if request.url.endswith("/v1/chat/completions"):
            self.chat_bodies.append(request.post_data or "")

    def goto(self, hash_: str = "#/jobs") -> None:
        self.page.goto(f"{self.url}/dashboard/{hash_}")
        self.wait_rendered()

    def wait_rendered(self) -> None:
        """Until the view of the address bar's hash is on screen (a hash change renders anew)."""
        until(self.page, "document.body.dataset.rendered === location.hash")

    def status(self) -> str | None:
        return self.page.get_attribute("h1 + span[data-status], dd [data-status]", "data-status")

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def watched(browser, server):
    w = Watched(browser, server.url)
    yield w
    assert w.errors == [], w.errors  # no script error, no refused resource (CSP reports are errors)
    assert w.foreign == [], w.foreign  # nothing from a CDN or anywhere else
    w.close()


@pytest.fixture(scope="module")
def finished_job(server, tmp_path_factory):
    """A job created through the SDK, with a hostile file name and metadata, trained to the end."""
    client = server.client()
    tmp = tmp_path_factory.mktemp("files")
    train = client.files.create(
        file=(HOSTILE, open(write_jsonl(tmp / "t.jsonl", toy_examples(16)), "rb")), purpose="fine-tune"
    )
    job = client.fine_tuning.jobs.create(
        model="tiny-llama",
        training_file=train.id,
        suffix="sdk",
        metadata={"team": "net"},
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2, "batch_size": 4}}},
    )
    done = wait_job(client, job.id)
    assert done.status == "succeeded", done.error
    return done


def test_the_pages_carry_the_security_headers_and_need_no_key_to_load(server):
    for path in ("/dashboard/", "/dashboard/app.js", "/docs", "/docs-assets/swagger-ui-bundle.js"):
        r = httpx.get(server.url + path)
        assert r.status_code == 200, path
        policy = r.headers["content-security-policy"]
        assert "script-src 'self'" in policy and "frame-ancestors 'none'" in policy
        assert "'unsafe-inline'" not in policy.split("script-src")[1].split(";")[0]  # no inline script anywhere
        assert r.headers["x-content-type-options"] == "nosniff" and r.headers["x-frame-options"] == "DENY"
    assert httpx.get(server.url + "/").headers["location"] == "/dashboard/"
    assert "cdn" not in httpx.get(server.url + "/docs").text


def test_the_jobs_list_shows_an_sdk_job_and_a_hostile_file_name_stays_text(server, finished_job, watched):
    page = watched.page
    watched.goto("#/jobs")
    row = page.locator("tr", has=page.locator(f"a:text-is('{finished_job.id}')"))
    assert row.locator("[data-status]").get_attribute("data-status") == "succeeded"
    assert finished_job.fine_tuned_model in row.inner_text() and "team=net" in row.inner_text()
    # filters: by status, and by metadata through the API's metadata[key] query
    page.select_option("#status-filter", "failed")
    page.click("text=Filter")
    watched.wait_rendered()
    page.wait_for_selector("text=No jobs match these filters")
    page.select_option("#status-filter", "")
    page.fill("#metadata-filter", "team=net")
    page.click("text=Filter")
    page.wait_for_selector(f"a:text-is('{finished_job.id}')")
    page.fill("#metadata-filter", "team=other")
    page.click("text=Filter")
    page.wait_for_selector("text=No jobs match these filters")

    watched.goto("#/files")
    names = page.locator(".filename").all_inner_texts()
    assert HOSTILE in names  # shown as the name it is
    assert page.locator("main img").count() == 0
    page.wait_for_timeout(300)
    assert watched.dialogs == []  # its onerror never ran

    # the job page: facts, hyperparameters, plan, curves, checkpoints, events, result file
    watched.goto(f"#/jobs/{finished_job.id}")
    assert watched.status() == "succeeded"
    assert page.locator("#hyperparameters").inner_text().count("n_epochs") == 1
    assert "Memory plan: micro-batches" in page.inner_text("#plan")
    assert int(page.get_attribute("#loss-chart", "data-points")) >= 2
    assert "Fine-tuning job started" in page.inner_text("#events")
    assert page.locator("text=Try in the playground").count() >= 1
    with page.expect_download() as download:
        page.click("text=Download result file")
    assert download.value.path().read_text().startswith("step,")

    watched.goto("#/models")
    model_row = page.locator(f"tr:has(td:first-child:text-is('{finished_job.fine_tuned_model}'))")
    assert "fine-tuned" in model_row.inner_text() and "tiny-llama" in model_row.inner_text()
    assert ":ckpt-step-" in model_row.inner_text()  # its checkpoints, listed with it


def test_a_job_started_from_the_page_trains_its_chart_grows_and_pause_resume_cancel_reach_it(server, watched, tmp_path):
    page = watched.page
    bad = write_jsonl(tmp_path / "bad.jsonl", [*toy_examples(3), {"messages": [{"role": "user", "content": "x"}]}])
    good = write_jsonl(tmp_path / "good.jsonl", toy_examples(200))
    watched.goto("#/new")
    page.set_input_files("#training-upload", str(bad))  # validate's findings, with their line
    page.wait_for_selector("[data-check=failed]")
    assert re.search(r"error: line 4\b", page.inner_text("#checks"))
    page.set_input_files("#training-upload", str(good))
    page.wait_for_selector("[data-check=ok]")
    checks = page.inner_text("#checks")
    assert "Examples\n200" in checks or "Examples\t200" in checks
    assert "OpenAI would have billed (gpt-4o-mini)" in checks and "red" in checks  # cost and labels
    page.fill("input[name=model]", "tiny-llama")
    page.fill("input[name=n_epochs]", "30")
    page.fill("input[name=batch_size]", "1")
    page.fill("input[name=suffix]", "page")
    page.click("#start-job")
    page.wait_for_selector("h1:has-text('Job ftjob-')")
    job_id = page.inner_text("h1").split()[-1]

    chart = "#loss-chart"
    until(page, f"Number(document.querySelector('{chart}')?.dataset.points) >= 2", WAIT_MS)
    first = int(page.get_attribute(chart, "data-points"))
    until(page, f"Number(document.querySelector('{chart}')?.dataset.points) > {first}", WAIT_MS)
    assert watched.status() == "running"  # it grew while the job ran, without a reload
    drawn = page.locator(f"{chart} circle").count()  # a dot per point, and a line through them
    assert drawn >= first + 1 and page.locator(f"{chart} polyline").count() >= 1
    client = server.client(strict=False)  # the SDK's typed status does not list "paused" (tests/test_server.py)
    page.click("button[data-action=pause]")  # the job stops at a step, with a checkpoint of it
    page.wait_for_selector("dd [data-status=paused]", timeout=WAIT_MS)
    assert client.fine_tuning.jobs.retrieve(job_id).status == "paused"
    assert page.locator("button[data-action=pause]").count() == 0
    steps = len(client.fine_tuning.jobs.list_events(job_id, limit=1000).data)
    page.click("button[data-action=resume]")  # and goes on from that checkpoint
    page.wait_for_selector("dd [data-status=running]", timeout=WAIT_MS)
    deadline = time.time() + WAIT_MS / 1000  # the resumed training says where it starts from
    while not any(
        e.message.startswith("Resuming from checkpoint")
        for e in client.fine_tuning.jobs.list_events(job_id, limit=1000).data
    ):
        assert time.time() < deadline, "the resumed job did not start from its checkpoint"
        time.sleep(0.5)
    assert len(client.fine_tuning.jobs.list_events(job_id, limit=1000).data) > steps
    page.click("button[data-action=cancel]")
    page.wait_for_selector("dd [data-status=cancelled]", timeout=WAIT_MS)
    assert server.client().fine_tuning.jobs.retrieve(job_id).status == "cancelled"
    assert page.locator("button[data-action=cancel]").count() == 0


def test_the_playground_streams_compares_and_gives_a_labels_confidence(server, finished_job, watched):
    page = watched.page
    model = finished_job.fine_tuned_model
    watched.goto(f"#/playground?model={model}&compare=tiny-llama")
    page.fill("#prompt", "thing 1")
    page.fill("#max-tokens", "12")
    page.click("#send")
    for name in (model, "tiny-llama"):
        page.wait_for_selector(f".answer[data-model='{name}'][data-chunks]", timeout=WAIT_MS)
    page.wait_for_selector("text=/chunks in/")
    # it streamed: the request asked for it and an answer arrived in more than one piece
    assert all('"stream":true' in body for body in watched.chat_bodies) and len(watched.chat_bodies) == 2
    counts = [int(page.get_attribute(f".answer[data-model='{n}']", "data-chunks")) for n in (model, "tiny-llama")]
    assert max(counts) > 1

    # a classification model: its label-constrained answer and how sure it is
    page.select_option("#model-b", "")
    page.check("#constrained")
    page.click("#send")
    page.wait_for_selector(".confidence", timeout=WAIT_MS)
    answer = page.inner_text(f".answer[data-model='{model}']")
    assert answer in ("red", "blue", "green", "gold")
    assert re.fullmatch(r"confidence \d+\.\d%", page.inner_text(".confidence"))
    assert '"structured_outputs"' in watched.chat_bodies[-1]
    page.select_option("#model-a", "tiny-llama")  # a base model has no labels to choose among
    assert page.is_hidden("#constrained")


def test_a_key_protected_server_refuses_the_dashboard_until_a_key_is_entered(browser, tmp_path, tiny_model_dir):
    key = "sk-dash-0123456789abcdef"
    s = Server(tmp_path / "home", tiny_model_dir, "--api-key", key)
    w = Watched(browser, s.url)
    try:
        page = w.page
        w.goto("#/jobs")
        assert page.is_visible("#key-panel") and "asks for an API key" in page.inner_text("#key-reason")
        assert "Could not load" in page.inner_text("main h1")
        page.fill("#key-input", "sk-wrong-000000000000")
        page.press("#key-input", "Enter")
        page.wait_for_selector("text=refused this API key")
        page.fill("#key-input", key)
        page.press("#key-input", "Enter")
        page.wait_for_selector("text=No jobs yet")
        assert not page.is_visible("#key-panel")
        assert key not in page.url and page.evaluate("sessionStorage.length") == 1
        assert page.evaluate("localStorage.length") == 0  # kept for the tab, not on disk
        w.goto("#/models")  # the key stays for the tab's session
        page.wait_for_selector("td:text-is('tiny-llama')")
    finally:
        w.close()
        s.stop()
    assert key not in s.log.read_text()
    assert [e for e in w.errors if "401" not in e] == []  # the refused calls, and nothing else


def test_every_page_fits_a_phone_and_dark_mode_is_readable(server, finished_job, browser):
    w = Watched(browser, server.url, viewport={"width": 390, "height": 844}, color_scheme="dark", is_mobile=True)
    try:
        for hash_ in ("#/jobs", f"#/jobs/{finished_job.id}", "#/new", "#/files", "#/models", "#/playground"):
            w.goto(hash_)
            w.page.wait_for_timeout(200)
            overflow = w.page.evaluate("document.documentElement.scrollWidth - document.documentElement.clientWidth")
            assert overflow <= 1, f"{hash_} is {overflow}px wider than a phone"
        background = w.page.evaluate("getComputedStyle(document.body).backgroundColor")
        text = w.page.evaluate("getComputedStyle(document.body).color")
        assert background == "rgb(21, 24, 28)" and text == "rgb(228, 232, 236)"  # the dark palette
        assert w.errors == [] and w.foreign == []
    finally:
        w.close()


def tab_to(page, test: str, limit: int = 80) -> None:
    """Press Tab until the focused element passes ``test`` (JavaScript, given ``e``)."""
    for _ in range(limit):
        page.keyboard.press("Tab")
        if page.evaluate(f"(e => !!e && ({test}))(document.activeElement)"):
            return
    raise AssertionError(f"Tab never reached an element where {test}")


def test_the_main_actions_with_the_keyboard_alone(server, finished_job, watched):
    page = watched.page
    watched.goto("#/jobs")
    tab_to(page, f"e.textContent === '{finished_job.id}'")  # open a job
    page.keyboard.press("Enter")
    page.wait_for_selector(f"h1:text-is('Job {finished_job.id}')")
    tab_to(page, "e.textContent === 'Try in the playground'")  # a checkpoint, in the playground
    page.keyboard.press("Enter")
    page.wait_for_selector("#prompt")
    assert ":ckpt-step-" in page.eval_on_selector("#model-a", "e => e.value")
    tab_to(page, "e.id === 'prompt'")
    page.keyboard.type("thing 2")
    tab_to(page, "e.id === 'send'")
    page.keyboard.press("Enter")
    page.wait_for_selector(".answer[data-chunks]", timeout=WAIT_MS)
    tab_to(page, "e.textContent === 'Files'")  # the nav, and a delete through its confirmation
    page.keyboard.press("Enter")
    page.wait_for_selector("main h1:text-is('Files')")
    before = len(page.locator(".filename").all_inner_texts())
    watched.accept_dialogs = True  # the confirmation a delete asks for
    tab_to(page, "(e.getAttribute('aria-label') || '').startsWith('Delete')")
    page.keyboard.press("Enter")
    until(page, f"document.querySelectorAll('.filename').length === {before - 1}")
    assert len(watched.dialogs) == 1 and watched.dialogs[0].startswith("Delete ")


def test_the_docs_page_works_offline(server, watched):
    page = watched.page
    page.route(re.compile(r"^(?!http://127\.0\.0\.1).*"), lambda route: route.abort())  # nothing else reachable
    page.goto(server.url + "/docs")
    page.wait_for_selector("text=OpenAI's fine-tuning API on your machine")
    page.wait_for_selector(".opblock-tag:has-text('extensions')")  # the extension endpoints, documented
    assert page.locator(".opblock-summary-description:text-is('Check File')").count() == 1


def test_the_extension_endpoints_answer_any_client(server, finished_job, tmp_path):
    client = server.client()
    path = write_jsonl(tmp_path / "bad.jsonl", toy_examples(12))
    path.write_text(path.read_text() + '{"messages": [{"role": "user", "content": "cut off"\n')
    bad = client.files.create(file=open(path, "rb"), purpose="fine-tune")
    check = httpx.get(f"{server.url}/v1/files/{bad.id}/check", params={"model": "gpt-4o", "n_epochs": "2"}).json()
    assert check["ok"] is False and check["stats"]["model"] == "gpt-4o" and check["stats"]["job"]["n_epochs"] == 2
    assert check["stats"]["labels"] == {"red": 3, "blue": 3, "green": 3, "gold": 3}
    error = next(f for f in check["findings"] if f["severity"] == "error")
    assert error["line"] == 13 and error["path"] == "bad.jsonl"  # the upload's name, not the server's path
    assert str(server.home) not in str(check)
    r = httpx.get(f"{server.url}/v1/files/{bad.id}/check", params={"n_epochs": "zero"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "n_epochs"
    array = client.files.create(file=("array.json", b'[{"messages": []}]'), purpose="fine-tune")
    r = httpx.get(f"{server.url}/v1/files/{array.id}/check")
    assert r.status_code == 400 and r.json()["error"]["message"].startswith("array.json:1: is a JSON array")
    details = httpx.get(f"{server.url}/v1/fine_tuning/jobs/{finished_job.id}/details").json()
    assert details["hyperparameters"]["n_epochs"] == 2 and details["plan"]["estimated_peak_bytes"] > 0
    assert details["labels"]["label_sets"] and details["plan_summary"].startswith("Memory plan")
    assert httpx.get(f"{server.url}/v1/fine_tuning/jobs/ftjob-nope/details").status_code == 404
