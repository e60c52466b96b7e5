"""See the fleet: `/metrics` on every daemon, and the web UI on the queen and the hive, driven in
Debian's Chromium by Playwright (never a browser Playwright downloads).

One queen (`--local-hive`, with a token) and one hive daemon (pointed at the fake HF server) serve
the whole module; each browser test has its own context (its own session storage) and saves a
screenshot under its temp dir.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from harness.fake_hf import FakeHub
from harness.helpers import (
    BIN,
    Daemon,
    daemon,
    gone,
    isolated_env,
    job_result,
    metric_samples,
    metric_total,
    wait_for,
)
from rbee_common.builtin import builtin_model_path

TOKEN = "observability-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
REPO = "ui-org/smol-GGUF"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeHub]:
    with FakeHub(tmp_path_factory.mktemp("hub")) as running:
        running.add_builtin(REPO, "smol.Q4_1.gguf")
        yield running


@pytest.fixture(scope="module")
def hive(tmp_path_factory: pytest.TempPathFactory, hub: FakeHub) -> Iterator[Daemon]:
    """A hive daemon of its own (no token, loopback), downloading from the fake HF server."""
    root = tmp_path_factory.mktemp("hive")
    env = {**isolated_env(root), "HF_ENDPOINT": hub.url, "RBEE_HIVE__CPU_THREADS": "1"}
    with daemon([str(BIN / "rbee-hive"), "--port", "0", "--hive-id", "ui-hive"], env=env) as running:
        yield running


@pytest.fixture(scope="module")
def queen(tmp_path_factory: pytest.TempPathFactory, hive: Daemon) -> Iterator[Daemon]:
    """A queen with a token; its in-process hive gives workers one thread and public /metrics, and
    the hive daemon above is its second hive, over HTTP."""
    root = tmp_path_factory.mktemp("queen")
    config = root / "config.toml"
    config.write_text(f'[hives.ui-hive]\nhost = "127.0.0.1"\nhive_port = {hive.url.rsplit(":", 1)[1]}\n')
    env = {**isolated_env(root), "RBEE_API_TOKEN": TOKEN, "RBEE_HIVE__CPU_THREADS": "1",
           "RBEE_HIVE__METRICS_PUBLIC": "true", "RBEE_HIVE__WORKER_CHECK_S": "0.5"}
    with daemon([str(BIN / "queen-rbee"), "--port", "0", "--local-hive", "--config", str(config)],
                env=env) as running:
        yield running


scrape = metric_samples
total = metric_total


def local_worker(queen: Daemon) -> dict[str, object]:
    """The queen's worker of the built-in model on its in-process hive, spawned when there is none:
    with two hives a cold start may land on either, and these tests scrape the local one."""
    workers = job_result(queen.url, {"operation": "worker_list_active", "model": "smollm2-135m"}, headers=AUTH)
    assert isinstance(workers, list)
    local = [worker for worker in workers if worker["hive_id"] == "localhost"]
    if local:
        return dict(local[0])
    spawned = job_result(queen.url, {"operation": "worker_spawn", "model": "smollm2-135m", "hive_id": "localhost"},
                         headers=AUTH)
    assert isinstance(spawned, dict)
    return spawned


def chat(queen: Daemon, content: str = "Why is the sky blue?", max_tokens: int = 12) -> dict[str, object]:
    response = httpx.post(f"{queen.url}/v1/chat/completions", headers=AUTH, timeout=120, json={
        "model": "smollm2-135m", "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens})
    assert response.status_code == 200, response.text
    body = response.json()
    assert isinstance(body, dict)
    return body


# --- /metrics ---------------------------------------------------------------------------------


def test_one_chat_moves_the_queens_request_token_and_ttft_series(queen: Daemon) -> None:
    assert httpx.get(f"{queen.url}/metrics").status_code == 401  # the token, as everywhere
    local_worker(queen)
    before = scrape(queen.url, AUTH)
    usage = chat(queen, max_tokens=12)["usage"]
    assert isinstance(usage, dict)
    after = scrape(queen.url, AUTH)

    def moved(name: str, **labels: str) -> float:
        return total(after, name, **labels) - total(before, name, **labels)

    route = {"route": "/v1/chat/completions", "method": "POST"}
    assert moved("rbee_queen_http_requests_total", status="200", **route) == 1
    assert moved("rbee_queen_http_request_duration_seconds_count", **route) == 1
    assert moved("rbee_queen_completion_tokens_total", model="smollm2-135m") == usage["completion_tokens"] > 0
    assert moved("rbee_queen_prompt_tokens_total", model="smollm2-135m") == usage["prompt_tokens"]
    assert moved("rbee_queen_time_to_first_token_seconds_count", model="smollm2-135m") == 1
    assert moved("rbee_queen_time_to_first_token_seconds_sum", model="smollm2-135m") > 0
    assert moved("rbee_queen_tokens_per_second_count", model="smollm2-135m") == 1
    assert moved("rbee_queen_inferences_total", model="smollm2-135m", outcome="completed") == 1
    assert total(after, "rbee_queen_workers", state="ready") == 1  # read from the registry when scraped
    # The in-process hive's series follow the queen's on the same page.
    assert total(after, "rbee_hive_device_memory_total_bytes", device="CPU-0", kind="cpu") > 0
    assert total(after, "rbee_hive_worker_spawns_total", outcome="completed") >= 1


def test_the_worker_and_the_hive_serve_their_own_metrics(queen: Daemon, hive: Daemon) -> None:
    worker = local_worker(queen)
    chat(queen, max_tokens=4)
    # The hive's metrics_public reaches its workers: a scraper needs no worker token.
    samples = scrape(str(worker["url"]))
    assert total(samples, "rbee_worker_inferences_total", outcome="completed") >= 1
    assert total(samples, "rbee_worker_time_to_first_token_seconds_count") >= 1
    assert total(samples, "rbee_worker_slots") == worker["slots_total"]
    assert total(samples, "rbee_worker_model_load_seconds") > 0
    assert wait_for(lambda: total(scrape(queen.url, AUTH), "rbee_hive_worker_health_checks_total",
                                  result="success") > 0, timeout=10)

    before = scrape(hive.url)
    job_result(hive.url, {"operation": "model_list"})
    after = scrape(hive.url)
    assert total(after, "rbee_hive_jobs_total", operation="model_list", outcome="completed") == \
        total(before, "rbee_hive_jobs_total", operation="model_list", outcome="completed") + 1
    assert 0 <= after[("rbee_hive_cpu_utilization_ratio", ())] <= 1  # present, and a ratio
    assert total(after, "rbee_hive_device_memory_free_bytes", device="CPU-0") > 0


def test_labels_stay_bounded_whatever_the_client_sends(queen: Daemon) -> None:
    """Paths and methods are a client's to choose: they reach the labels as the route's rule,
    `unmatched` or `other`, never as sent."""
    for index in range(3):
        httpx.request(f"BREW{index}", f"{queen.url}/v1/jobs", headers=AUTH)
        httpx.get(f"{queen.url}/no/such/path-{index}", headers=AUTH)
        httpx.get(f"{queen.url}/v1/jobs/job-{index}", headers=AUTH)
    labels = {value for (name, have) in scrape(queen.url, AUTH) for key, value in have
              if name.startswith("rbee_queen_http_") and key in ("route", "method")}
    assert not [value for value in labels if "BREW" in value or "path-" in value or "job-" in value], labels
    assert {"unmatched", "other", "/v1/jobs/<job_id>"} <= labels


def test_refused_credentials_are_counted_and_never_shown(queen: Daemon) -> None:
    wrong = "wrong-token-but-long-enough-123"
    before = scrape(queen.url, AUTH)
    assert httpx.get(f"{queen.url}/v1/jobs", headers={"Authorization": f"Bearer {wrong}"}).status_code == 401
    page = httpx.get(f"{queen.url}/metrics", headers=AUTH).text
    after = scrape(queen.url, AUTH)
    assert total(after, "rbee_queen_auth_failures_total", reason="invalid_token") == \
        total(before, "rbee_queen_auth_failures_total", reason="invalid_token") + 1
    assert wrong not in page and TOKEN not in page


# --- the web UI -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    if CHROMIUM is None:
        pytest.skip("the browser tests drive Debian's chromium: apt-get install chromium (.ci/run does)")
    from playwright.sync_api import sync_playwright

    # Playwright's sync API runs an asyncio loop of its own; trio-asyncio (imported with the queen's
    # SSH code) has made every new loop a trio one, which that cannot run in.
    policy = asyncio.get_event_loop_policy()
    asyncio.set_event_loop_policy(asyncio.DefaultEventLoopPolicy())
    with contextlib.ExitStack() as restore:
        restore.callback(asyncio.set_event_loop_policy, policy)
        playwright = restore.enter_context(sync_playwright())
        # Debian's Chromium, headless; --no-sandbox because CI runs as root.
        running = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        restore.callback(running.close)
        yield running


@pytest.fixture
def page(browser: object, tmp_path: Path) -> Iterator[object]:
    from playwright.sync_api import Browser

    assert isinstance(browser, Browser)
    context = browser.new_context(viewport={"width": 1440, "height": 960})
    opened = context.new_page()
    problems: list[str] = []
    opened.on("pageerror", lambda error: problems.append(f"page error: {error}"))
    opened.on("console", lambda message: problems.append(message.text) if message.type == "error"
              and "401" not in message.text else None)
    yield opened
    context.close()
    assert not problems, problems  # no script error and no failed load, but the expected 401s


def screenshot(page: object, tmp_path: Path, name: str) -> Path:
    path = tmp_path / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)  # type: ignore[attr-defined]
    print(f"screenshot: {path}")
    return path


def test_queen_dashboard_takes_the_token_once_and_chats_in_the_playground(
        queen: Daemon, hive: Daemon, page: object, tmp_path: Path) -> None:
    from playwright.sync_api import Page, expect

    assert isinstance(page, Page)
    local_worker(queen)  # where the playground's chat goes
    page.goto(queen.url + "/")
    token_form = page.locator("#token-form")
    expect(token_form).to_have_class(re.compile(r"\bopen\b"))  # the first call got 401: it asks
    token_form.locator("input").fill(TOKEN)
    token_form.locator("button[type=submit]").click()
    expect(page.locator("#hives tr[data-hive=localhost]")).to_contain_text("reachable")
    expect(page.locator("#hives tr[data-hive=localhost]")).to_contain_text("CPU-0")
    remote = page.locator("#hives tr[data-hive=ui-hive]")  # the hive daemon, over HTTP
    expect(remote).to_contain_text("reachable")
    expect(remote).to_contain_text("CPU-0")
    expect(remote).to_contain_text(str(httpx.get(f"{hive.url}/health").json()["version"]))
    assert page.evaluate("sessionStorage.getItem('rbee-token')") == TOKEN
    page.reload()  # kept for the session: no second prompt
    expect(page.locator("#hives tr[data-hive=localhost]")).to_contain_text("reachable")
    expect(token_form).not_to_have_class(re.compile(r"\bopen\b"))

    expect(page.locator("#playground select[name=model] option[value=smollm2-135m]")).to_have_count(1)
    page.locator("#playground textarea").fill("Tell me about bees.")
    page.locator("#playground input[name=max_tokens]").fill("48")
    page.locator("#playground button[type=submit]").click()
    answer = page.locator("#playground .message.assistant")
    # The stream arrives piece by piece: text shows while the answer is still streaming.
    page.wait_for_function(
        "() => { const a = document.querySelector('#playground .message.assistant');"
        " return a && a.classList.contains('streaming') && a.textContent.length > 0; }")
    expect(page.locator("#playground .stats")).to_have_attribute("data-completion-tokens", "48", timeout=60_000)
    expect(page.locator("#playground .stats")).to_contain_text("48 completion tokens")
    expect(page.locator("#playground .stats")).to_contain_text("first token after")
    assert len(answer.inner_text().split()) >= 5
    row = page.locator("#workers tr", has_text="smollm2-135m")
    expect(row).to_contain_text("ready")
    expect(row.locator("td").nth(6)).to_have_text(re.compile(r"^\d+\.\d$"))  # its tokens/s
    per_model = page.locator("#queues tr", has_text="smollm2-135m")  # its workers and its line
    expect(per_model.locator("td").nth(1)).to_have_text("1")
    expect(per_model.locator("td").nth(2)).to_have_text("0")
    screenshot(page, tmp_path, "queen-dashboard")


def test_queen_dashboard_stops_a_worker_and_shows_the_job(queen: Daemon, page: object, tmp_path: Path) -> None:
    from playwright.sync_api import Page, expect

    assert isinstance(page, Page)
    local_worker(queen)  # a worker to stop
    page.goto(queen.url + "/")
    page.evaluate(f"sessionStorage.setItem('rbee-token', {TOKEN!r})")
    page.reload()
    row = page.locator("#workers tr", has_text="smollm2-135m")
    expect(row).to_contain_text("ready")
    row.locator("button", has_text="Stop").click()
    expect(page.locator("#workers tr", has_text="smollm2-135m")).to_have_count(0, timeout=20_000)
    job = page.locator("#jobs .job", has_text="worker_stop")
    expect(job).to_contain_text("completed")
    expect(job.locator(".narration")).not_to_be_empty()  # its narration, as the page saw it
    screenshot(page, tmp_path, "queen-worker-stopped")


def test_hive_page_spawns_and_stops_a_worker(hive: Daemon, page: object, tmp_path: Path) -> None:
    from playwright.sync_api import Page, expect

    assert isinstance(page, Page)
    page.goto(hive.url + "/")
    expect(page.locator("#hive-id")).to_have_text("ui-hive")
    expect(page.locator("#devices")).to_contain_text("CPU-0")
    expect(page.locator("#models")).to_contain_text("smollm2-135m")
    page.locator("#workers select[name=model]").select_option("smollm2-135m")
    page.locator("#workers select[name=device]").select_option("CPU-0")
    page.locator("#workers button", has_text="Spawn worker").click()
    row = page.locator("#workers tr", has_text="smollm2-135m")
    expect(row).to_contain_text("ready", timeout=60_000)
    expect(page.locator("#workers ol.log")).to_contain_text("Preflight passed")
    screenshot(page, tmp_path, "hive-worker-spawned")
    pid = int(job_result(hive.url, {"operation": "worker_list"})[0]["pid"])  # type: ignore[index]
    row.locator("button", has_text="Stop").click()
    expect(page.locator("#workers tr", has_text="smollm2-135m")).to_have_count(0, timeout=20_000)
    assert wait_for(lambda: gone(pid), timeout=10)


def test_hive_page_downloads_a_model_with_a_progress_bar(
        hive: Daemon, hub: FakeHub, page: object, tmp_path: Path) -> None:
    from playwright.sync_api import Page, expect

    assert isinstance(page, Page)
    hub.rate = 40e6  # about 2.5 s for the 98 MB file: the bar moves in steps
    page.goto(hive.url + "/")
    page.locator("#models input[name=reference]").fill(f"hf:{REPO}")
    page.locator("#models button", has_text="Download").click()
    bar = page.locator("#models .progress")
    page.wait_for_function(
        "() => { const p = document.querySelector('#models .progress');"
        " const v = p && Number(p.getAttribute('aria-valuenow')); return v > 0 && v < 100; }")
    screenshot(page, tmp_path, "hive-download-under-way")
    expect(bar).to_have_attribute("aria-valuenow", "100", timeout=60_000)
    expect(bar).to_contain_text("100%")
    expect(page.locator("#models table")).to_contain_text("smol-q4_1")
    screenshot(page, tmp_path, "hive-download-done")
    samples = scrape(hive.url)
    size = os.path.getsize(str(builtin_model_path("smollm2-135m")))
    assert total(samples, "rbee_hive_download_bytes_total") == size
    assert total(samples, "rbee_hive_downloads_total", outcome="completed") == 1

    # A download started elsewhere (the queen, a script) shows with its progress too.
    hub.add_file("ui-org/other-GGUF", "other.Q4_K_M.gguf", os.urandom(12_000_000))
    hub.rate = 6e6
    created = httpx.post(f"{hive.url}/v1/jobs", json={"operation": "model_download", "model": "hf:ui-org/other-GGUF"})
    assert created.status_code == 201, created.text
    running = page.locator("#models .downloads .download")
    expect(running).to_contain_text("Downloading hf:ui-org/other-GGUF")
    expect(running.locator(".progress")).not_to_have_attribute("aria-valuenow", "0")
    screenshot(page, tmp_path, "hive-download-from-elsewhere")
    expect(page.locator("#models table")).to_contain_text("other-q4_k_m", timeout=30_000)
    expect(running).to_have_count(0)

