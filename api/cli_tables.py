"""What the `foldplan` CLI prints for people: rich tables, the plan table (candidates side by
side, as on the plan page) and the summary `foldplan run` ends with (api/cli.py calls these)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def print_table(title: str, columns: list[str], rows: list[list[Any]],
                 highlight_rows: set[int] | None = None) -> None:
    """A rich table; the rows at the indices in `highlight_rows` are drawn bold yellow. Piped
    output is not cut to 80 columns."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for k, c in enumerate(columns):
        table.add_column(c, justify="left" if k == 0 else "right")
    for i, r in enumerate(rows):
        table.add_row(*[str(x) for x in r],
                      style="bold yellow" if highlight_rows and i in highlight_rows else None)
    console = Console()
    if not console.is_terminal:
        console = Console(width=200)
    console.print(table)


def print_plan_table(answer: Any) -> None:
    """Candidates side by side, one column each, numbered as in the API (candidates[i]), as on
    the plan page: the estimate, the memory headroom, and every mapping field that differs
    between them (starred and highlighted) besides the core sizes."""
    from .pages_view import HEADROOM_WARN_FRACTION, HEADROOM_WHY, headroom, mapping_rows

    cands = answer.candidates
    title = (f"{answer.model.name or 'model'} on {answer.cluster.world_size} GPUs: "
             f"{answer.search.status}")
    if not cands:
        print(title)
    else:
        rooms = [headroom(c.estimate.memory) for c in cands]
        rows: list[list[Any]] = [
            ["step time s"] + [f"{c.estimate.step_time_s:.4g}" for c in cands],
            ["MFU"] + [f"{100 * c.estimate.mfu:.1f}%" for c in cands],
            ["tokens/s"] + [f"{c.estimate.tokens_per_s:,.0f}" for c in cands],
            ["memory GiB"] + [f"{c.estimate.memory.peak_gib:.1f}/"
                              f"{c.estimate.memory.capacity_gib:.0f}" for c in cands],
            ["headroom"] + [f"{'! ' if h['warn'] else ''}{h['percent']}" for h in rooms],
        ]
        fields = mapping_rows([c.mapping for c in cands])
        first = len(rows)
        rows += [[f"{f['field']} *" if f["differs"] else f["field"], *f["values"]]
                 for f in fields]
        print_table(title, ["", *(f"#{i}" for i in range(len(cands)))], rows,
                     highlight_rows={first + k for k, f in enumerate(fields) if f["differs"]})
        if any(f["differs"] for f in fields):
            print("* differs between candidates")
        if any(h["warn"] for h in rooms):
            print(f"! headroom under {HEADROOM_WARN_FRACTION:.0%}: {HEADROOM_WHY}")
    for r in answer.search.reasons:
        print(f"reason: {r}")


def run_summary(plan: dict[str, Any], candidate: int, metrics: dict[str, Any], out: Path) -> str:
    """The few lines `foldplan run` ends with: measured against predicted step time,
    tokens/s, MFU, the loss, and where the files are."""
    from cost_model.specs import ClusterSpec
    from executor.run_files import LOG_FILE, METRICS_FILE

    from .pages_view import prediction_caveat
    from .prediction import machine_prediction

    pred = machine_prediction(plan, candidate, None)
    measured, predicted = metrics.get("step_time_s"), pred["step_time_s"]
    tokens, run_mfu = metrics.get("tokens_per_s"), metrics.get("mfu")
    loss = metrics.get("loss") or []
    ratio = f"{measured / predicted:.2f}x" if measured and predicted else "—"
    lines = [
        (f"candidate {candidate}: {len(loss)} steps on {metrics.get('world_size')} "
         f"{metrics.get('device')} ranks ({metrics.get('backend')})"),
        (f"  step time   measured {_num(measured, '.4g')} s (median after step 1)   predicted "
         f"{predicted:.4g} s   measured/predicted {ratio}"),
        f"  tokens/s    measured {_num(tokens, ',.0f')}   predicted {pred['tokens_per_s']:,.0f}",
        (f"  MFU         measured {_num(run_mfu and 100 * run_mfu, '.2f')}%   predicted "
         f"{100 * pred['mfu']:.2f}%"),
    ]
    if loss:
        lines.append(f"  loss        {loss[0]:.4f} -> {loss[-1]:.4f}")
    lines.append(f"  prediction  for {pred['machine']}")
    caveat = prediction_caveat(ClusterSpec.model_validate(plan["cluster"]), pred)
    if caveat:
        lines.append(f"  note        {caveat}")
    lines.append(f"  files       {out / METRICS_FILE} (all metrics), {out / LOG_FILE} (log)")
    return "\n".join(lines)


def _num(x: float | None, spec: str) -> str:
    """A number in `spec`, or '—' when the run did not record it."""
    return "—" if x is None else format(x, spec)
