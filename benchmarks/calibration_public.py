"""Predicted step time against the public Megatron-Core points (../shared/reference).

Run: .venv/bin/python benchmarks/calibration_public.py [path/to/calibration_public_h100.json]
Each point is estimated exactly as written (model, cluster, training, mapping with the
round-2 option names); the two Qwen3-235B-A22B mappings must rank as measured.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cost_model.estimate import estimate  # noqa: E402
from cost_model.specs import ClusterSpec, Mapping, ModelSpec, TrainingSpec  # noqa: E402

DEFAULT = Path(__file__).resolve().parents[2] / "shared" / "reference" / "calibration_public_h100.json"


def evaluate(ref: dict) -> list[dict]:
    rows = []
    for p in ref["points"]:
        est = estimate(ModelSpec(**p["model"]), ClusterSpec(**p["cluster"]),
                       TrainingSpec(**p["training"]), Mapping(**p["mapping"]))
        rows.append(dict(name=p["name"], fits=est.fits_memory, peak_gib=est.memory.peak_gib,
                         predicted=est.step_time_s, measured=p["step_time_s"],
                         err=est.step_time_s / p["step_time_s"] - 1, breakdown=est.breakdown))
    return rows


def main() -> None:
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT
    rows = evaluate(json.loads(path.read_text()))
    print(f"{'point':32s} {'fits':>4s} {'peak GiB':>8s} {'pred s':>7s} {'meas s':>7s} {'err':>7s}")
    for r in rows:
        print(f"{r['name']:32s} {'yes' if r['fits'] else 'NO':>4s} {r['peak_gib']:8.1f} "
              f"{r['predicted']:7.2f} {r['measured']:7.2f} {r['err']:+7.1%}")
        print("    " + " ".join(f"{k}={v:.2f}" for k, v in r["breakdown"].items() if v))
    errs = [abs(r["err"]) for r in rows]
    print(f"mean absolute error: {sum(errs) / len(errs):.1%}; max: {max(errs):.1%}")
    by = {r["name"]: r for r in rows}
    a, b = by.get("mz-qwen3-235b-tp2ep32pp8vpp4"), by.get("mz-qwen3-235b-tp4ep8pp8vpp4")
    if a and b:
        print("Qwen3-235B ranking (TP2 EP32 faster, as measured):",
              "right" if a["predicted"] < b["predicted"] else "WRONG")


if __name__ == "__main__":
    main()
