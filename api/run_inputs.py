"""A run body's `init_hf` and `data`: names inside the server's folders, checked before a run is queued.

`init_hf` names a Hugging Face model folder under FOLDPLAN_MODELS_DIR, `data` a Megatron
indexed dataset prefix under FOLDPLAN_DATA_DIR. A name is refused (422 at its field) when it is
absolute, has a `..` part, leaves the folder once resolved (symlinks included), or the folder
setting is unset; the checkpoint must hold the plan's model (executor.config.load_run with
`init_hf`: config fields, shards, tensor shapes) and the dataset must have both files.
The run row's `options` keep the names as requested (`init_hf`, `data`) and the resolved
absolute paths the ranks get (`init_hf_path`, `data_path`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from .service import RequestError
from .settings import Settings


@dataclass(frozen=True)
class RunInputs:
    """Resolved `init_hf` / `data` of one run (None: not asked for)."""

    init_hf_name: str | None = None
    init_hf: Path | None = None
    data_name: str | None = None
    data: Path | None = None

    def options(self) -> dict[str, Any]:
        """What the run row's `options` keep (module docstring)."""
        return {"init_hf": self.init_hf_name, "data": self.data_name,
                "init_hf_path": str(self.init_hf) if self.init_hf else None,
                "data_path": str(self.data) if self.data else None}

    @staticmethod
    def of_options(options: dict[str, Any] | None) -> tuple[str | None, str | None]:
        """(init_hf path, data path) stored in a run row's options."""
        o = options or {}
        return o.get("init_hf_path"), o.get("data_path")


def resolve_inside(root: Path | None, name: str, field: str, setting: str) -> Path:
    """`root / name`, refused unless it stays inside `root` (module docstring)."""
    if root is None:
        raise RequestError((field,), f"{field}={name!r}: this server has no {setting} set")
    pure = PurePosixPath(name)
    if not name or pure.is_absolute() or name.startswith(("/", "\\")) or ".." in pure.parts:
        raise RequestError((field,), f"{field}={name!r} must be a relative name inside {setting} "
                           "(no leading '/', no '..')")
    base = Path(root).resolve()
    path = (base / name).resolve()
    if path != base and base not in path.parents:
        raise RequestError((field,), f"{field}={name!r} resolves outside {setting}")
    return path


def resolve_run_inputs(settings: Settings, plan: dict[str, Any], candidate: int,
                       init_hf: str | None, data: str | None) -> RunInputs:
    """Check and resolve a run body's `init_hf` and `data` (RequestError at the field)."""
    hf_path = data_path = None
    if init_hf is not None:
        hf_path = resolve_inside(settings.models_dir, init_hf, "init_hf", "FOLDPLAN_MODELS_DIR")
        if not (hf_path / "config.json").is_file():
            raise RequestError(("init_hf",), f"init_hf={init_hf!r}: no Hugging Face model there "
                               "(no config.json)")
        from executor.config import UnsupportedPlan, load_run

        try:
            load_run(plan, candidate, init_hf=str(hf_path))
        except UnsupportedPlan as exc:
            raise RequestError(("init_hf",), f"init_hf={init_hf!r}: {exc}") from None
    if data is not None:
        data_path = resolve_inside(settings.data_dir, data, "data", "FOLDPLAN_DATA_DIR")
        missing = [s for s in (".bin", ".idx") if not Path(str(data_path) + s).is_file()]
        if missing:
            raise RequestError(("data",), f"data={data!r}: no {' and '.join(missing)} file "
                               "(a Megatron indexed dataset, e.g. from `foldplan tokenize`)")
    return RunInputs(init_hf, hf_path, data, data_path)
