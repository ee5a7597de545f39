"""The pages engineers keep open, in real headless Chromium against a real `foldplan serve`:
the plan page at 800 px (every differing mapping field highlighted, headroom warning, one
numbering, launch scripts with copy and download, only usable backends), the run page, runs
overlaid on the plan page, the verify flow on CPU, and the rank layout at 1,024 GPUs.
Screenshots go to tests/artifacts/."""

from __future__ import annotations

import uuid
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from conftest import TINY, fake_plan_answer, free_port, start_server, store_plan
from test_browser import ARTIFACTS, browser  # noqa: F401 - the shared Chromium fixture

from planner.export import sbatch_script, torchrun_script

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def with_scripts(plan: dict) -> dict:
    """The fake plan's candidates with launch scripts, as the planner attaches them."""
    cl = plan["cluster"]
    for c in plan["candidates"]:
        args = " ".join(c["megatron_args"]).split()
        c["launch_scripts"] = {
            "torchrun": torchrun_script(args, cl["num_nodes"], cl["gpus_per_node"]),
            "sbatch": sbatch_script(args, cl["num_nodes"], cl["gpus_per_node"])}
    return plan


@pytest.fixture
def served(tmp_path, db_url):
    """A server and the plans stored before it started (the Mixtral fake plan, with scripts)."""
    plan = with_scripts(fake_plan_answer())
    store_plan(db_url, plan)
    port = free_port()
    proc = start_server(db_url, port, tmp_path, env={"FOLDPLAN_RUN_POLL_S": "0.2"})
    yield f"http://127.0.0.1:{port}", plan
    proc.terminate()
    proc.wait(10)


def _page(browser, base, width=1280):  # noqa: F811 - the fixture's value
    ctx = browser.new_context(viewport={"width": width, "height": 900}, accept_downloads=True)
    page = ctx.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    external: list[str] = []
    page.on("request", lambda r: None if r.url.startswith(base) else external.append(r.url))
    return ctx, page, errors, external


def _add_run(db_url: str, plan: dict, candidate: int, measured: float, **fields) -> str:
    from api.db import Database, RunRow, utcnow

    created = utcnow() - timedelta(seconds=60 - candidate)
    n = 12
    pred = plan["candidates"][candidate]["estimate"]
    metrics = {
        "loss": [round(10.0 * 0.9 ** i + 0.1 * candidate, 4) for i in range(n)],
        "aux_loss": [0.02 + 0.001 * (i % 3) for i in range(n)],
        "grad_norm": [2.0 * 0.95 ** i for i in range(n)], "steps": list(range(1, n + 1)),
        "step_times_s": [measured * 3] + [measured * (1 + 0.01 * (i % 4)) for i in range(n - 1)],
        "step_time_s": measured, "tokens_per_s": 1_048_576 / measured, "mfu": 0.3,
        "comm_bytes": {"ep.alltoall": 3.2e9, "tp.allgather": 1.1e9, "dp.reduce_scatter": 4e8},
        "peak_memory_gib": 61.5, "partial": False}
    row = RunRow(id=uuid.uuid4().hex, plan_id=plan["id"], candidate=candidate, steps=n,
                 backend="local", status="succeeded", created_at=created,
                 started_at=created + timedelta(seconds=1), finished_at=created + timedelta(
                     seconds=30), predicted={**pred, "machine": "the plan's cluster"},
                 metrics=metrics, log_tail="step 12/12 loss 3.1\n", **fields)
    db = Database(db_url)
    with db.session() as s:
        s.add(row)
    db.dispose()
    return row.id


def test_plan_page_at_800px(browser, served):  # noqa: F811
    base, plan = served
    ctx, page, errors, external = _page(browser, base, width=800)
    page.goto(f"{base}/plans/{plan['id']}")
    # Usable at 800 px: nothing scrolls the page sideways (wide tables scroll in their box).
    assert page.evaluate("document.documentElement.scrollWidth") <= 800
    # One numbering: the API's index.
    assert page.locator("#candidates thead th").nth(1).inner_text() == "#0 best"
    assert "candidate #0" in page.locator("#layout").inner_text()
    # Every mapping field that differs is there and highlighted; equal ones are not.
    differs = page.locator("#candidates tr.differs")
    fields = [differs.nth(i).get_attribute("data-field") for i in range(differs.count())]
    assert fields == ["tp", "pp", "etp", "dp", "edp", "recompute"]
    assert "differs" not in (page.locator("tr[data-field=ep]").get_attribute("class") or "")
    # Headroom with its warning band: candidate #0 is at 92% of the GPU.
    warn = page.locator("#headroom-row td.headroom.warn")
    assert warn.count() == 1 and "⚠" in warn.inner_text()
    assert "10%" in page.locator("#headroom-note").inner_text()
    # Launch scripts: one flag per line, placeholders, "$@", copy and download.
    script = page.locator("#script-sbatch").text_content()
    assert '"$@"' in script and "DATA_PATH" in script and "TOKENIZER_MODEL" in script
    assert "    --tensor-model-parallel-size 2 \\\n" in script
    with page.expect_download() as dl:
        page.locator("button[data-download=script-torchrun]").click()
    assert dl.value.suggested_filename == "launch.sh"
    assert '"$@"' in Path(dl.value.path()).read_text()
    page.locator("button[data-copy=script-torchrun]").click()
    page.wait_for_function("document.querySelector('button[data-copy=script-torchrun]')"
                           ".textContent === 'Copied.'")
    # Backends: each one this server cannot use for this plan is disabled, with the reason.
    for opt in page.locator("#r-backend option[disabled]").all():
        name = opt.get_attribute("value")
        assert page.locator(f".backend-off[data-backend={name}]").inner_text().startswith(name)
    assert page.locator("link[rel=icon]").count() == 1
    page.screenshot(path=str(ARTIFACTS / "plan_page_800px.png"), full_page=True)
    # The form's advanced fields, and an HTML 404 page for an unknown plan.
    page.goto(base + "/")
    page.locator("#f-advanced summary").click()
    for field in ("#f-precision", "#f-capacity", "#f-fixed-tp", "#f-fixed-recompute", "#f-time"):
        assert page.locator(field).is_visible(), field
    assert page.evaluate("document.documentElement.scrollWidth") <= 800
    page.screenshot(path=str(ARTIFACTS / "index_800px.png"), full_page=True)
    # The README's CPU plan from the form: tiny-moe on 1 x 4 cpu ranks in fp32, top 3.
    page.select_option("#f-preset", "tiny-moe")
    page.select_option("#f-gpu", "cpu")
    for field, value in (("#f-nodes", "1"), ("#f-gpn", "4"), ("#f-seq", "64"),
                         ("#f-gbs", "8"), ("#f-topk", "3"), ("#f-time", "30")):
        page.fill(field, value)
    page.select_option("#f-precision", "fp32")
    page.click("#f-submit")
    page.wait_for_url(lambda url: "/plans/" in url, timeout=90_000)
    assert "fp32" in page.locator(".facts").first.inner_text()
    assert 1 <= page.locator("#candidates thead th").count() - 1 <= 3
    r = page.goto(f"{base}/plans/no-such-plan")
    assert r.status == 404 and "No plan with id" in page.locator("h1").inner_text()
    r = page.goto(f"{base}/runs/no-such-run")
    assert r.status == 404 and "No run with id" in page.locator("h1").inner_text()
    assert not errors, errors
    assert not external, external
    ctx.close()


def test_run_page_and_overlay(browser, served, db_url):  # noqa: F811
    base, plan = served
    attempts = [
        {"plan_id": plan["id"], "candidate": 1, "mapping": plan["candidates"][1]["mapping"],
         "num_nodes": 16, "start_step": 1, "end_step": 6, "status": "failed", "error": "node 3",
         "recovery_s": None},
        {"plan_id": plan["id"], "candidate": 0, "mapping": plan["candidates"][0]["mapping"],
         "num_nodes": 15, "start_step": 7, "end_step": 12, "status": "succeeded", "error": None,
         "recovery_s": 41.0}]
    a = _add_run(db_url, plan, 1, 6.1, attempts=attempts)
    b = _add_run(db_url, plan, 0, 5.6)
    ctx, page, errors, external = _page(browser, base)
    page.goto(f"{base}/runs/{a}")
    assert page.locator("#run-id").inner_text() == a
    for chart in ("loss-chart", "aux-loss-chart", "grad-norm-chart", "step-time-chart",
                  "tokens-chart", "mfu-chart"):
        assert len(page.locator(f"#{chart} polyline").get_attribute("points").split()) == 12
    for chart in ("step-time-chart", "tokens-chart", "mfu-chart"):
        assert page.locator(f"#{chart} line.pred").count() == 1, chart
    assert page.locator("#step-time-chart line.mark").count() == 1  # the mapping changed
    assert "Step 7" in page.locator("#run-marks").inner_text()
    assert page.locator("#comm-chart rect").count() == 3
    assert "61.50 GiB" in page.locator("#memory-facts").inner_text()
    assert page.locator("#run-mapping td", has_text="recompute").count() == 1
    csv = httpx.get(base + page.locator("#download-csv").get_attribute("href"))
    assert csv.headers["content-disposition"].startswith("attachment")
    lines = csv.text.splitlines()
    assert lines[0].startswith("step,loss,aux_loss,grad_norm,step_time_s,tokens_per_s,mfu")
    assert len(lines) == 13
    js = httpx.get(base + page.locator("#download-json").get_attribute("href")).json()
    assert js["metrics"]["comm_bytes"]["ep.alltoall"] == 3.2e9 and len(js["per_step"]["mfu"]) == 12
    page.screenshot(path=str(ARTIFACTS / "run_page.png"), full_page=True)

    # Both runs overlaid on the plan page; unchecking one leaves the other.
    page.goto(f"{base}/plans/{plan['id']}")
    overlay = page.locator("#runs-overlay")
    overlay.wait_for()
    assert page.locator("#overlay-loss polyline").count() == 2
    assert page.locator("#overlay-step-time polyline").count() == 2
    assert page.locator("#overlay-step-time line.pred").count() == 2
    page.locator(f"#overlay-picks input[data-run-id='{b}']").uncheck()
    assert page.locator("#overlay-loss polyline").count() == 1
    page.locator(f"#overlay-picks input[data-run-id='{b}']").check()
    # the run id in the table opens the run's page
    assert page.locator(f"#runs tr[data-run-id='{a}'] a").get_attribute("href") == f"/runs/{a}"
    overlay.screenshot(path=str(ARTIFACTS / "runs_overlay.png"))
    assert not errors, errors
    assert not external, external
    ctx.close()


def test_verify_flow_on_cpu(browser, tmp_path, db_url):  # noqa: F811
    """Three tiny-moe candidates on 2 CPU ranks, three steps each, from the plan page's form:
    the runs go one after the other and the measured ranking appears beside the predicted."""
    pytest.importorskip("torch")
    plan = fake_plan_answer([{"tp": 1, "pp": 1, "ep": 2}, {"tp": 2, "pp": 1, "ep": 2},
                             {"tp": 1, "pp": 2, "ep": 1}], TINY)
    store_plan(db_url, plan)
    port = free_port()
    proc = start_server(db_url, port, tmp_path, env={"FOLDPLAN_RUN_POLL_S": "0.5"})
    base = f"http://127.0.0.1:{port}"
    try:
        ctx, page, errors, external = _page(browser, base)
        page.goto(f"{base}/plans/{plan['id']}")
        assert page.locator("input[name=v-candidate]:checked").count() == 3
        page.fill("#v-steps", "3")
        page.click("#v-submit")
        table = page.locator("#verify-table")
        table.wait_for()
        page.wait_for_function(
            "/succeeded|failed|cancelled/.test(document.getElementById('verify-table')"
            ".dataset.status)", timeout=600_000)
        assert table.get_attribute("data-status") == "succeeded", page.locator(
            "#verify-summary").inner_text()
        ranks = sorted(int(t) for t in page.locator("#verify-table td.measured-rank")
                       .all_inner_texts())
        assert ranks == [1, 2, 3] or len(set(ranks)) < 3  # ties share a rank
        vid = table.get_attribute("data-verification-id")
        v = httpx.get(f"{base}/v1/verifications/{vid}").json()
        assert all(c["measured_step_time_s"] > 0 for c in v["candidates"])
        assert "Spearman" in page.locator("#verify-summary").inner_text()
        page.locator("#verify-heading").scroll_into_view_if_needed()
        page.screenshot(path=str(ARTIFACTS / "verify.png"), full_page=True)
        assert not errors, errors
        assert not external, external
        ctx.close()
    finally:
        proc.terminate()
        proc.wait(10)


def test_layout_at_1024_gpus(browser, tmp_path, db_url):  # noqa: F811
    """128 nodes x 8 GPUs: one cell per node, coloured by the nodes each kind's groups tie
    together; the legend of links; a click zooms to one node's GPUs."""
    request = {"model": {"preset": "mixtral-8x22b"},
               "cluster": {"num_nodes": 128, "gpus_per_node": 8, "gpu": "h100"},
               "training": {"seq_length": 4096, "global_batch_size": 1024}}
    plan = fake_plan_answer([{"tp": 2, "pp": 8, "ep": 8}], request)
    store_plan(db_url, plan)
    port = free_port()
    proc = start_server(db_url, port, tmp_path)
    base = f"http://127.0.0.1:{port}"
    try:
        ctx, page, errors, external = _page(browser, base)
        page.goto(f"{base}/plans/{plan['id']}")
        grid = page.locator("#node-grid")
        assert grid.get_attribute("data-kind") == "tp"
        assert grid.locator("rect").count() == 128  # every node, none left out
        assert page.locator("#layout-note").count() == 0  # no "first 64 of 128 nodes"

        def fills() -> set[str]:
            return set(grid.locator("rect").evaluate_all(
                "rs => rs.map(r => r.getAttribute('fill'))"))

        assert fills() == {"#d7dbe0"}  # tp groups stay inside each node
        tiers = {r.get_attribute("data-kind"): r.locator("td.tier").inner_text()
                 for r in page.locator("#link-legend tbody tr").all()}
        assert tiers["tp"] == "nvlink" and tiers["ep"] == "nvlink"
        assert tiers["dp"] != "nvlink" and tiers["pp"] != "nvlink"
        page.locator("#layout-tabs input[value=dp]").check()
        assert grid.get_attribute("data-kind") == "dp"
        assert len(fills()) == 8  # dp groups tie 8 sets of 16 nodes
        page.screenshot(path=str(ARTIFACTS / "layout_1024.png"), full_page=False,
                        clip={"x": 0, "y": page.locator("#layout").bounding_box()["y"] - 10,
                              "width": 1280, "height": 720})
        grid.locator("rect[data-cell='5']").click()
        page.wait_for_url("**node=5**")
        rows = page.locator("#zoom-table tbody tr")
        assert rows.count() == 8
        assert "this node" in rows.first.inner_text() and "16 nodes" in rows.first.inner_text()
        page.locator("#layout-zoom").screenshot(path=str(tmp_path / "zoom_title.png"))
        page.locator("#zoom-table").screenshot(path=str(ARTIFACTS / "layout_1024_zoom.png"))
        assert not errors, errors
        assert not external, external
        ctx.close()
    finally:
        proc.terminate()
        proc.wait(10)
