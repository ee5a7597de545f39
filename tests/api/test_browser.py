"""The plan page in real headless Chromium (Playwright), served by a real `foldplan serve`."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import REPO, fake_plan_answer, free_port, start_server, store_plan

pytestmark = pytest.mark.slow
CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = REPO / "tests" / "artifacts"


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} missing: run tests/api/install_system_deps.sh")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        yield b
        b.close()


@pytest.fixture
def server(tmp_path, db_url):
    plan = fake_plan_answer()
    store_plan(db_url, plan)
    port = free_port()
    proc = start_server(db_url, port, tmp_path, env={"FOLDPLAN_PLAN_TIME_LIMIT_S": "20"})
    yield f"http://127.0.0.1:{port}", plan
    proc.terminate()
    proc.wait(10)


def test_plan_page_reads_well(browser, server):
    base, plan = server
    ctx = browser.new_context(viewport={"width": 1360, "height": 900})
    external: list[str] = []
    page = ctx.new_page()
    page.on("request", lambda req: None if req.url.startswith(base) else external.append(req.url))
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(f"{base}/plans/{plan['id']}")
    assert "mixtral-8x22b" in page.locator("#plan-title").inner_text()
    # Candidates side by side: one column per candidate, best first.
    headers = page.locator("#candidates thead th")
    assert headers.count() == 1 + len(plan["candidates"])
    best_time = plan["candidates"][0]["estimate"]["step_time_s"]
    assert f"{best_time:.3f} s" in page.locator("#candidates td.step-time").first.inner_text()
    # Charts: one bar row per candidate, one rect per non-zero component.
    nonzero = sum(1 for v in plan["candidates"][0]["estimate"]["breakdown"].values() if v > 0)
    assert page.locator("#time-chart g").first.locator("rect").count() == nonzero
    assert page.locator("#memory-chart line").count() == len(plan["candidates"])
    # Layout grid: 16 nodes x 8 GPUs, tp groups shown first; switching to ep shows ep groups.
    shown = page.locator(".layout-kind.shown")
    assert shown.get_attribute("data-kind") == "tp"
    assert shown.locator("rect").count() == 128
    page.locator("#layout-tabs input[value=ep]").check()
    assert page.locator(".layout-kind.shown").get_attribute("data-kind") == "ep"
    # Megatron args and the copy button.
    assert "--tensor-model-parallel-size" in page.locator("#megatron-args").inner_text()
    page.locator("#copy-args").click()
    page.wait_for_function("document.getElementById('copy-status').textContent.length > 0")
    assert page.locator("#run-form").is_visible()
    page.locator("#layout-tabs input[value=tp]").check()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "plan_page.png"), full_page=True)
    assert not errors, errors
    assert not external, external  # nothing from a CDN
    # Choosing another candidate's layout from the table.
    page.goto(f"{base}/plans/{plan['id']}?c=1")
    assert "candidate #2" in page.locator("#layout").inner_text()
    ctx.close()


def test_index_lists_plans_and_form_creates_one(browser, server):
    from conftest import planner_ready

    base, plan = server
    ctx = browser.new_context(viewport={"width": 1280, "height": 800})
    page = ctx.new_page()
    page.goto(base + "/")
    assert page.locator("#plans tbody tr").count() == 1
    page.locator("#plans a").first.click()
    page.wait_for_url(f"**/plans/{plan['id']}")
    page.goto(base + "/")
    page.screenshot(path=str(ARTIFACTS / "index_page.png"), full_page=True)
    if planner_ready():
        # The form's defaults: Mixtral-8x22B on 16 x 8 H100.
        page.click("#f-submit")
        page.wait_for_url(lambda url: "/plans/" in url and plan["id"] not in url, timeout=60_000)
        assert "mixtral-8x22b on 16 × 8" in page.locator("#plan-title").inner_text()
        assert page.locator("#candidates thead th").count() >= 2
        page.screenshot(path=str(ARTIFACTS / "plan_page_planner.png"), full_page=True)
    ctx.close()


def test_run_form_starts_a_real_run(browser, server, db_url):
    """The page's run form: POST a run of tiny-moe on 2 CPU ranks, poll until it succeeds."""
    pytest.importorskip("torch")
    from test_cli import TINY

    base, _ = server
    tiny = fake_plan_answer([{"tp": 1, "pp": 1, "ep": 2}], TINY)
    store_plan(db_url, tiny)
    ctx = browser.new_context(viewport={"width": 1280, "height": 900})
    page = ctx.new_page()
    page.goto(f"{base}/plans/{tiny['id']}")
    page.fill("#r-steps", "2")
    page.click("#r-submit")
    page.wait_for_function(
        "/succeeded|failed/.test(document.getElementById('run-status').textContent)",
        timeout=180_000)
    text = page.locator("#run-status").inner_text()
    assert "succeeded" in text and "measured" in text, text
    page.reload()
    assert page.locator("#runs tbody tr").count() == 1
    assert "succeeded" in page.locator("#runs").inner_text()
    page.screenshot(path=str(ARTIFACTS / "plan_page_run.png"), full_page=True)
    ctx.close()


def _try_operation(page, op_id: str) -> str:
    """Expand an operation in Swagger UI, execute its first example, return the status shown."""
    block = page.locator(f"#{op_id}")
    block.locator(".opblock-summary").first.click()
    block.locator("button.execute").click()
    status = block.locator(".live-responses-table tbody .response-col_status").first
    status.wait_for(timeout=90_000)
    return status.inner_text().strip()


def test_docs_served_locally_and_examples_work(browser, server):
    from conftest import planner_ready

    base, _ = server
    ctx = browser.new_context(viewport={"width": 1280, "height": 900})
    page = ctx.new_page()
    external: list[str] = []
    page.on("request", lambda req: None if req.url.startswith(base) else external.append(req.url))
    page.goto(base + "/docs")
    page.locator(".opblock").first.wait_for(timeout=30_000)
    assert page.locator(".opblock").count() >= 10
    assert _try_operation(page, "operations-estimate-post_estimate_v1_estimate_post") == "200"
    if planner_ready():
        assert _try_operation(page, "operations-plans-create_plan_v1_plans_post") == "201"
    page.screenshot(path=str(ARTIFACTS / "docs_page.png"), full_page=False)
    assert not external, external
    ctx.close()
