"""`foldplan` command line: the HTTP API's twins plus `serve` and `run`.

Every command that takes input reads the same JSON as the HTTP body, from `--json FILE` or
stdin, and prints JSON to stdout (`--format table` for a table). Bad input exits non-zero with
one line on stderr that names the field; no traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from .cli_tables import print_plan_table, print_table, run_summary

EXIT_BAD_INPUT = 2
EXIT_FAILED = 1
EXIT_INFEASIBLE = 3  # `foldplan plan`: the JSON is printed, but no mapping fits


class CLIError(Exception):
    def __init__(self, msg: str, code: int = EXIT_BAD_INPUT):
        super().__init__(msg)
        self.code = code


def _read_json(path: str | None) -> str:
    if path in (None, "-"):
        if sys.stdin.isatty():
            raise CLIError("no input: give --json FILE or pipe JSON on stdin")
        return sys.stdin.read()
    try:
        return Path(path).read_text()
    except OSError as exc:
        raise CLIError(f"--json {path}: {exc.strerror}") from None


def _parse(model: type[BaseModel], text: str) -> Any:
    from .errors import error_lines, untag

    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CLIError(f"input is not valid JSON: {exc}") from None
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise CLIError("; ".join(error_lines(untag(exc.errors())))) from None


def _dump(obj: Any) -> str:
    if isinstance(obj, BaseModel):
        return obj.model_dump_json(indent=2)
    if isinstance(obj, list):
        return json.dumps([o.model_dump(mode="json") if isinstance(o, BaseModel) else o
                           for o in obj], indent=2)
    return json.dumps(obj, indent=2)


def _estimate_rows(e: Any) -> list[list[Any]]:
    if hasattr(e, "error"):
        return [["error", e.error]]
    rows: list[list[Any]] = [
        ["step_time_s", f"{e.step_time_s:.4f}"], ["mfu", f"{100 * e.mfu:.1f}%"],
        ["tokens_per_s", f"{e.tokens_per_s:,.0f}"], ["tflops_per_gpu", f"{e.tflops_per_gpu:.1f}"],
        ["fits_memory", e.fits_memory],
        ["memory peak", f"{e.memory.peak_gib:.1f} / {e.memory.capacity_gib:.1f} GiB"],
    ]
    rows += [[f"  {k}", f"{v:.4f} s"] for k, v in e.breakdown.items()]
    return rows


def cmd_estimate(args: argparse.Namespace) -> None:
    from .schemas import EstimateRequest
    from .service import run_estimate

    req = _parse(EstimateRequest, _read_json(args.json))
    out = run_estimate(req)
    if args.format == "table":
        for i, e in enumerate(out if isinstance(out, list) else [out]):
            print_table(f"estimate {i}", ["quantity", "value"], _estimate_rows(e))
    else:
        print(_dump(out))


def cmd_plan(args: argparse.Namespace) -> None:
    from .schemas import PlanRequest
    from .service import make_plan
    from .settings import Settings

    req = _parse(PlanRequest, _read_json(args.json))
    answer = make_plan(req, req.time_limit_s or Settings().plan_time_limit_s)
    if args.format == "table":
        print_plan_table(answer)
    else:
        print(_dump(answer))
    if answer.search.status == "INFEASIBLE":
        raise CLIError("no mapping fits (search status INFEASIBLE); see search.reasons",
                       EXIT_INFEASIBLE)


def cmd_layout(args: argparse.Namespace) -> None:
    from .schemas import LayoutRequest
    from .service import run_layout

    ans = run_layout(_parse(LayoutRequest, _read_json(args.json)))
    if args.format == "table":
        rows = [[k, len(g[0]), len(g), ans.crosses_node[k], ans.tiers[k],
                 g[0] if len(g[0]) <= 16 else "..."] for k, g in ans.groups.items()]
        print_table("rank layout", ["kind", "size", "groups", "crosses node", "outermost link",
                                     "first group"], rows)
    else:
        print(_dump(ans))


def cmd_presets(args: argparse.Namespace) -> None:
    from .service import presets

    p = presets()
    if args.format == "table":
        print_table("models", ["id", "layers", "hidden", "experts", "top-k", "source"],
                     [[k, v.spec.num_layers, v.spec.hidden_size, v.spec.num_experts or "-",
                       v.spec.moe_router_topk or "-", v.source] for k, v in p.models.items()])
        print_table("gpus", ["id", "name", "TFLOP/s", "GiB"],
                     [[k, g.name, g.peak_tflops, g.memory_gib] for k, g in p.gpus.items()])
    else:
        print(_dump(p))


def cmd_run(args: argparse.Namespace) -> None:
    try:
        plan = json.loads(Path(args.plan).read_text())
    except OSError as exc:
        raise CLIError(f"--plan {args.plan}: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise CLIError(f"--plan {args.plan} is not valid JSON: {exc}") from None
    if not isinstance(plan, dict) or not isinstance(plan.get("candidates"), list):
        raise CLIError(f"--plan {args.plan}: not a plan answer (no 'candidates' list)")
    if not 0 <= args.candidate < len(plan["candidates"]):
        raise CLIError(f"--candidate {args.candidate}: the plan has {len(plan['candidates'])} "
                       "candidates")
    convert = args.steps == 0
    if convert and not (args.init_hf and args.export_hf):
        raise CLIError("--steps 0 converts a checkpoint: it needs --init-hf and --export-hf")
    if args.export_hf and not args.init_hf:
        raise CLIError("--export-hf needs --init-hf (the checkpoint's config.json is written back)")
    try:
        from executor.config import UnsupportedPlan
        from executor.launch import run_plan
    except ImportError as exc:
        raise CLIError(f"the executor is not available: {exc}", EXIT_FAILED) from None
    from .backends import RunJob
    from .backends.local import LocalBackend

    out = Path(args.out).resolve()
    if isinstance(plan.get("cluster"), dict):  # the same checks as the service's local runs
        try:
            job = RunJob.from_plan(out.name, plan, args.candidate, max(args.steps, 1), out)
        except (ValidationError, KeyError, TypeError) as exc:
            raise CLIError(f"--plan {args.plan}: not a usable plan answer: {exc}") from None
        why = LocalBackend().unavailable(job)
        if why:
            raise CLIError(why.replace("backend='local'", "foldplan run"))
    if args.cuda_graphs:  # the contract's flag; the executor has no graph capture yet
        print("foldplan run: --cuda-graphs: CUDA graphs are not implemented by foldplan's "
              "executor yet; running without them", file=sys.stderr)
    if args.on_failure == "replan":
        if args.init_hf or args.export_hf or args.data:
            raise CLIError("--init-hf, --export-hf and --data are not taken by --on-failure replan yet")
        metrics = _run_elastic(args, plan, out)
    else:
        try:
            with contextlib.redirect_stdout(sys.stderr):  # rank output to stderr; stdout: the JSON
                metrics = run_plan(plan, args.candidate, args.steps, out, seed=args.seed,
                                   save_every=args.save_every or 0, resume=args.resume,
                                   data=args.data, init_hf=args.init_hf, export_hf=args.export_hf)
        except (UnsupportedPlan, ValueError) as exc:  # refused before any rank started
            raise CLIError(str(exc)) from None  # (plan, checkpoint, dataset, steps)
    if convert:
        print(json.dumps({"exported": str(Path(args.export_hf).resolve())}, indent=2))
        return
    if args.format == "json":
        print(json.dumps(metrics, indent=2))  # what run_plan read back from out/metrics.json
    summary = run_summary(plan, args.candidate, metrics, out)
    print(summary, file=sys.stdout if args.format == "table" else sys.stderr)


def cmd_tokenize(args: argparse.Namespace) -> None:
    """`foldplan tokenize`: progress on stderr, the summary JSON on stdout."""
    try:
        from executor.text_data import TokenizeError, tokenize_file
    except ImportError as exc:
        raise CLIError(f"the executor is not available: {exc}", EXIT_FAILED) from None
    try:
        summary = tokenize_file(args.tokenizer, args.input, args.out)
    except TokenizeError as exc:
        raise CLIError(str(exc)) from None
    print(json.dumps(summary.__dict__, indent=2))


def _run_elastic(args: argparse.Namespace, plan: dict[str, Any], out: Path) -> dict[str, Any]:
    """`--on-failure replan`: the service's elastic run in the foreground (elastic_foreground)."""
    from .elastic_foreground import ElasticRunFailed, attempts_summary, run_elastic
    from .settings import Settings

    if args.resume:
        raise CLIError("--resume and --on-failure replan: give one (an elastic run resumes by "
                       "itself after a lost node)")
    try:
        with contextlib.redirect_stdout(sys.stderr):  # rank output to stderr
            metrics, attempts = run_elastic(
                plan, args.candidate, args.steps, out, seed=args.seed,
                save_every=args.save_every or 0, min_nodes=args.min_nodes,
                replan_time_limit_s=Settings().plan_time_limit_s)
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    except ElasticRunFailed as exc:
        raise CLIError(str(exc), EXIT_FAILED) from None
    print(attempts_summary(attempts), file=sys.stderr)
    return metrics


def cmd_serve(args: argparse.Namespace) -> None:
    import uvicorn

    from .app import create_app
    from .settings import Settings

    overrides = {k: v for k, v in (("db", args.db), ("host", args.host), ("port", args.port),
                                   ("run_dir", args.run_dir),
                                   ("max_concurrent_runs", args.max_concurrent_runs),
                                   ("run_profile", args.run_profile)) if v is not None}
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        from .errors import error_lines
        raise CLIError("; ".join(error_lines(exc.errors()))) from None
    try:
        app = create_app(settings)
    except ValueError as exc:  # e.g. an unusable run profile
        raise CLIError(str(exc)) from None
    base = f"http://{settings.host}:{settings.port}"
    print(f"foldplan serving on {base}/  (API docs: {base}/docs, database: {settings.db})",
          flush=True)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="info")


def _int_at_least(minimum: int):
    """An argparse type: an integer >= minimum, with a message naming the value."""

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if v < minimum:
            raise argparse.ArgumentTypeError(f"{v} must be >= {minimum}")
        return v

    return parse


_positive = _int_at_least(1)
_nonneg = _int_at_least(0)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="foldplan", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    def io(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--json", metavar="FILE", help="request JSON (default: stdin)")
        sp.add_argument("--format", choices=("json", "table"), default="json")

    io(s := sub.add_parser("estimate", help="predict one step of a mapping (POST /v1/estimate)"))
    s.set_defaults(fn=cmd_estimate)
    io(s := sub.add_parser("plan", help="ranked mappings (POST /v1/plans, not stored)"))
    s.set_defaults(fn=cmd_plan)
    io(s := sub.add_parser("layout", help="rank groups of a mapping (POST /v1/layout)"))
    s.set_defaults(fn=cmd_layout)
    s = sub.add_parser("presets", help="built-in models and GPUs (GET /v1/presets)")
    s.add_argument("--format", choices=("json", "table"), default="json")
    s.set_defaults(fn=cmd_presets)
    s = sub.add_parser("run", help="train a plan candidate in the foreground")
    s.add_argument("--plan", required=True, metavar="FILE", help="plan answer JSON")
    s.add_argument("--candidate", type=_nonneg, default=0, metavar="K")
    s.add_argument("--steps", type=_nonneg, required=True, metavar="N",
                   help="optimizer steps; 0 with --init-hf and --export-hf converts only")
    s.add_argument("--out", required=True, metavar="DIR")
    s.add_argument("--data", default=None, metavar="PREFIX",
                   help="Megatron indexed dataset (PREFIX.bin/.idx, e.g. from `foldplan "
                   "tokenize`); default: the bundled corpus, byte-level")
    s.add_argument("--init-hf", default=None, metavar="DIR",
                   help="start from this Hugging Face model folder (config.json + safetensors)")
    s.add_argument("--export-hf", default=None, metavar="DIR",
                   help="write the trained model here as a Hugging Face checkpoint")
    s.add_argument("--seed", type=int, default=0, metavar="S")
    s.add_argument("--cuda-graphs", action="store_true",
                   help="capture CUDA graphs where shapes are static (not implemented yet: the "
                   "run goes on without them and says so)")
    s.add_argument("--save-every", type=_positive, default=None, metavar="K")
    s.add_argument("--resume", action="store_true")
    s.add_argument("--on-failure", choices=("fail", "replan"), default="fail",
                   help="replan: re-plan for the nodes left when nodes are lost (docs/API.md)")
    s.add_argument("--min-nodes", type=_positive, default=1, metavar="M",
                   help="with --on-failure replan: fewer nodes left than M fails the run")
    s.add_argument("--format", choices=("json", "table"), default="json",
                   help="json: metrics.json on stdout, then a summary on stderr; table: only "
                   "the summary, on stdout")
    s.set_defaults(fn=cmd_run)
    s = sub.add_parser("tokenize", help="text (.txt, .jsonl with 'text', .parquet) to a "
                       "Megatron indexed dataset for `run --data`")
    s.add_argument("--tokenizer", required=True, metavar="DIR", help="folder with tokenizer.json")
    s.add_argument("--input", required=True, metavar="FILE")
    s.add_argument("--out", required=True, metavar="PREFIX", help="writes PREFIX.bin and PREFIX.idx")
    s.set_defaults(fn=cmd_tokenize)
    sub.add_parser("profile", help="measure this machine for the cost model "
                   "(executor.profile; see `foldplan profile --help`)")
    s = sub.add_parser("serve", help="run the HTTP service")
    s.add_argument("--host", default=None)
    s.add_argument("--port", type=int, default=None)
    s.add_argument("--db", default=None, metavar="URL", help="SQLAlchemy URL (FOLDPLAN_DB)")
    s.add_argument("--run-dir", default=None, metavar="DIR", help="FOLDPLAN_RUN_DIR")
    s.add_argument("--max-concurrent-runs", type=int, default=None, metavar="N",
                   help="FOLDPLAN_MAX_CONCURRENT_RUNS: jobs active at once (default 1)")
    s.add_argument("--run-profile", default=None, metavar="FILE",
                   help="FOLDPLAN_RUN_PROFILE: `foldplan profile` JSON of the run machines")
    s.set_defaults(fn=cmd_serve)
    return p


def _profile(argv: list[str]) -> int:
    """`foldplan profile ...` is `python -m executor.profile ...` (its own options and help)."""
    try:
        from executor.profile import main as profile_main
    except ImportError as exc:
        print(f"foldplan profile: error: the executor is not available: {exc}", file=sys.stderr)
        return EXIT_FAILED
    return profile_main(argv) or 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["profile"]:
        return _profile(argv[1:])
    args = build_parser().parse_args(argv)
    from cost_model.validate import InvalidMapping

    from .service import RequestError

    try:
        args.fn(args)
    except CLIError as exc:
        print(f"foldplan {args.command}: error: {exc}", file=sys.stderr)
        return exc.code
    except (RequestError, InvalidMapping) as exc:
        print(f"foldplan {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # stdout closed early (e.g. `| head`): not an error of ours
        sys.stderr.close()
        return 0
    except Exception as exc:  # noqa: BLE001 - one line for the user, not a traceback
        print(f"foldplan {args.command}: failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    return 0


if __name__ == "__main__":
    sys.exit(main())
