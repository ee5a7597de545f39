"""The plan page in real headless Chromium (Playwright), served by a real `foldplan serve`."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
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


def _serve(tmp_path, db_url, env=None):
    plan = fake_plan_answer()
    store_plan(db_url, plan)
    port = free_port()
    proc = start_server(db_url, port, tmp_path,
                        env={"FOLDPLAN_PLAN_TIME_LIMIT_S": "20", **(env or {})})
    yield f"http://127.0.0.1:{port}", plan
    proc.terminate()
    proc.wait(10)


@pytest.fixture
def server(tmp_path, db_url):
    yield from _serve(tmp_path, db_url)


@pytest.fixture
def idle_scheduler_server(tmp_path, db_url):
    """A server whose run scheduler checks running jobs only once a minute: its first pass is
    over before a test writes a hand-made running row (no job behind it) that the scheduler
    would otherwise fail as lost."""
    yield from _serve(tmp_path, db_url, {"FOLDPLAN_RUN_POLL_S": "60"})


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
    assert "candidate #1" in page.locator("#layout").inner_text()  # the API's index
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


def _add_run(db_url: str, plan: dict, status: str, age_s: float, **fields) -> str:
    """A run row written straight into the database, as the runner would leave it."""
    from api.db import Database, RunRow, utcnow

    created = utcnow() - timedelta(seconds=age_s)
    fields = {"candidate": 0, "steps": 20, "backend": "local",
              "predicted": plan["candidates"][0]["estimate"], **fields}
    row = RunRow(id=uuid.uuid4().hex, plan_id=plan["id"], status=status, created_at=created,
                 started_at=created + timedelta(seconds=1), **fields)
    db = Database(db_url)
    with db.session() as s:
        s.add(row)
    db.dispose()
    return row.id


def _update_run(db_url: str, run_id: str, **fields) -> None:
    from api.db import Database, RunRow

    db = Database(db_url)
    with db.session() as s:
        row = s.get(RunRow, run_id)
        for k, v in fields.items():
            setattr(row, k, v)
    db.dispose()


def _points(page, selector: str) -> int:
    return len(page.locator(selector).get_attribute("points").split())


def fmt_seconds(x: float) -> str:
    """What the page shows for a duration (api/static/line_chart.js fmtSeconds), written out
    here as the test's own expectation."""
    if x >= 100:
        return f"{x:.0f} s"
    if x >= 1:
        return f"{x:.2f} s"
    return f"{1000 * x:.0f} ms" if 1000 * x >= 100 else f"{1000 * x:.1f} ms"


def test_run_panel_shows_measured_against_predicted(browser, server, db_url, tmp_path):
    """Runs written to the database: the table (drawn from the runs the page ships, before any
    request), the loss and step-time charts of a succeeded run, and the escaped error of a
    failed one."""
    base, plan = server
    pred = plan["candidates"][0]["estimate"]
    predicted = {**pred, "machine": "16 x 8 H100 (the plan's cluster)"}
    measured = round(pred["step_time_s"] * 1.18, 4)
    losses = [round(10.4 * 0.93 ** i + 0.05 * (i % 3), 4) for i in range(20)]
    times = [measured * 4.0] + [measured * (1 + 0.02 * ((i % 5) - 2)) for i in range(19)]
    ok_id = _add_run(db_url, plan, "succeeded", 600, predicted=predicted, job={"pid": 4242},
                     metrics={
        "loss": losses, "steps": list(range(1, 21)), "step_time_s": measured,
        "step_times_s": times, "tokens_per_s": 123456.0, "mfu": 0.312, "partial": False,
        "expert_load_imbalance": [3.9] + [1.4] * 18 + [1.31]})
    error = "RuntimeError: rank 1 exited with code 1 <b>not markup</b>"
    failed_id = _add_run(db_url, plan, "failed", 60, error=error,
                         log_tail="[rank1] Traceback (most recent call last):\n  ...\n" + error,
                         metrics={"loss": [10.5, 10.2], "steps": [1, 2], "partial": True})

    # The page ships the runs as the API answers them, newest first.
    html = httpx.get(f"{base}/plans/{plan['id']}").text
    assert html.index(failed_id) < html.index(ok_id)
    api_runs = httpx.get(f"{base}/v1/plans/{plan['id']}/runs").json()
    assert [r["id"] for r in api_runs] == [failed_id, ok_id]

    ctx = browser.new_context(viewport={"width": 1360, "height": 900})
    page = ctx.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    external: list[str] = []
    page.on("request", lambda req: None if req.url.startswith(base) else external.append(req.url))
    asked: list[str] = []
    page.on("request", lambda req: asked.append(req.url) if "/v1/" in req.url else None)
    page.goto(f"{base}/plans/{plan['id']}")
    # Drawn from the shipped runs, newest first, without asking the API (nothing is active).
    rows = page.locator("#runs tbody tr[data-run-id]")
    assert [rows.nth(i).get_attribute("data-run-id") for i in range(2)] == [failed_id, ok_id]
    assert rows.nth(0).locator("td.progress").inner_text() == "2 / 20 steps"
    assert rows.nth(1).locator("td.progress").inner_text() == "20 / 20 steps"
    assert asked == []
    # The newest run (failed) is shown first: its error as text, not markup.
    err = page.locator("#run-error")
    err.wait_for()
    assert err.inner_text() == error
    assert err.locator("b").count() == 0
    assert page.locator("#run-log").is_visible()
    assert page.locator("#runs tbody tr[data-run-id]").count() == 2
    assert page.locator("#runs button.cancel").count() == 0
    page.locator("#run-panel").screenshot(path=str(tmp_path / "run_failed.png"))

    page.locator(f"#runs tr[data-run-id='{ok_id}'] td.progress").click()
    page.wait_for_function(f"document.getElementById('run-detail').dataset.runId === '{ok_id}'")
    assert _points(page, "#loss-chart polyline") == 20
    assert _points(page, "#step-time-chart polyline") == 20
    assert page.locator("#step-time-chart line.pred").count() == 1
    assert "step 1" in page.locator("#step-time-chart").text_content()  # warm-up step clipped
    facts = page.locator("#run-facts").inner_text()
    assert fmt_seconds(measured) in facts and fmt_seconds(pred["step_time_s"]) in facts
    assert f"{measured / pred['step_time_s']:.2f}×" in facts
    assert "31.2%" in facts and "pid 4242" in facts
    assert "1.31×" in facts and "busiest / mean" in facts  # the latest step's expert load
    assert "16 x 8 H100" in page.locator("#run-times").inner_text()
    assert page.locator("#run-error").count() == 0
    row = page.locator(f"#runs tr[data-run-id='{ok_id}']").inner_text()
    assert "20 / 20 steps" in row and "1.18×" in row and "123,456" in row
    page.locator("#run-panel").screenshot(path=str(tmp_path / "run_succeeded.png"))
    assert not errors, errors
    assert not external, external
    ctx.close()


def test_running_run_updates_live(browser, idle_scheduler_server, db_url):
    """A running run's row follows the database; polling stops once nothing is running."""
    base, plan = idle_scheduler_server
    run_id = _add_run(db_url, plan, "running", 5, metrics={
        "loss": [10.5, 10.1, 9.8], "steps": [1, 2, 3], "step_time_s": 0.5, "partial": True})
    ctx = browser.new_context(viewport={"width": 1280, "height": 900})
    page = ctx.new_page()
    polls: list[str] = []
    page.on("request", lambda req: polls.append(req.url) if "/runs" in req.url else None)
    page.goto(f"{base}/plans/{plan['id']}")
    progress = page.locator(f"#runs tr[data-run-id='{run_id}'] td.progress")
    assert progress.inner_text() == "3 / 20 steps"
    assert page.locator("#runs button.cancel").count() == 1
    page.locator("#loss-chart polyline").wait_for()

    losses = [10.5, 10.1, 9.8, 9.6, 9.3, 9.1, 9.0]
    _update_run(db_url, run_id, metrics={"loss": losses, "steps": list(range(1, 8)),
                                         "step_time_s": 0.5, "partial": True})
    page.wait_for_function(
        f"document.querySelector(\"#runs tr[data-run-id='{run_id}'] td.progress\")"
        ".textContent === '7 / 20 steps'", timeout=10_000)
    assert _points(page, "#loss-chart polyline") == 7

    _update_run(db_url, run_id, status="succeeded", finished_at=datetime.now(UTC))
    page.wait_for_function("document.querySelector('#runs .badge').textContent === 'succeeded'",
                           timeout=10_000)
    assert page.locator("#runs button.cancel").count() == 0
    assert any(u.endswith("/runs?status=queued&status=running") for u in polls)  # active only

    # Cancel from the page: a queued run's button asks, DELETEs, and the row turns cancelled.
    queued = _add_run(db_url, plan, "queued", 0)
    page.reload()
    page.on("dialog", lambda d: d.accept())
    page.locator(f"#runs tr[data-run-id='{queued}'] button.cancel").click()
    page.wait_for_function(
        f"document.querySelector(\"#runs tr[data-run-id='{queued}'] .badge\").textContent"
        " === 'cancelled'", timeout=10_000)
    assert page.locator("#runs button.cancel").count() == 0
    seen = len(polls)
    page.wait_for_timeout(2500)
    assert len(polls) == seen, "still polling after every run finished"
    ctx.close()


def test_run_form_starts_a_real_run(browser, server, db_url, tmp_path):
    """The page's run form: POST a run of tiny-moe on 2 CPU ranks; the row appears at once and
    follows the run until it succeeds."""
    pytest.importorskip("torch")
    from test_cli import TINY

    base, _ = server
    tiny = fake_plan_answer([{"tp": 1, "pp": 1, "ep": 2}], TINY)
    store_plan(db_url, tiny)
    ctx = browser.new_context(viewport={"width": 1280, "height": 900})
    page = ctx.new_page()
    page.goto(f"{base}/plans/{tiny['id']}")
    assert page.locator("#runs tbody tr[data-run-id]").count() == 0
    page.fill("#r-steps", "2")
    page.click("#r-submit")
    page.locator("#runs tbody tr[data-run-id]").wait_for(timeout=5_000)
    page.wait_for_function(
        "/succeeded|failed|cancelled/.test(document.querySelector('#runs .badge').textContent)",
        timeout=180_000)
    row = page.locator("#runs tbody tr[data-run-id]").inner_text()
    assert "succeeded" in row, page.locator("#run-detail").inner_text()
    assert "2 / 2 steps" in row
    assert _points(page, "#loss-chart polyline") == 2
    page.locator("#run-panel").screenshot(path=str(tmp_path / "run_real.png"))
    assert "succeeded" in httpx.get(f"{base}/plans/{tiny['id']}").text
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
