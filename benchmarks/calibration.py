"""Predicted step time against the five reference points (../shared/reference).

Run: .venv/bin/python benchmarks/calibration.py [path/to/calibration_h100.json]
Knobs as the runs used them: MBS 1, distributed optimizer, sequence parallel, alltoall
dispatcher, capacity factor 1, no recompute (selective, then full, where memory says no fit).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cost_model.estimate import estimate  # noqa: E402
from cost_model.specs import ClusterSpec, Mapping, ModelSpec, TrainingSpec  # noqa: E402

DEFAULT = Path(__file__).resolve().parents[2] / "shared" / "reference" / "calibration_h100.json"


def evaluate(ref: dict) -> list[dict]:
    rows = []
    for row in ref["rows"]:
        model = ModelSpec(name=row["model"], **{k: v for k, v in ref["models"][row["model"]].items() if k != "note"})
        gpus = row["gpus"]
        cluster = ClusterSpec(num_nodes=gpus // 8, gpus_per_node=8, gpu="h100")
        training = TrainingSpec(seq_length=row["seq_length"], global_batch_size=row["global_batch_size"],
                                moe_expert_capacity_factor=1.0)
        vpp = 7 if row["model"].startswith("qwen2") else 1
        for rc in ("none", "selective", "full"):
            mp = Mapping(**row["mapping"], vpp=vpp, recompute=rc)
            est = estimate(model, cluster, training, mp)
            if est.fits_memory:
                break
        rows.append(dict(model=row["model"], method=row["method"], gpus=gpus, recompute=rc,
                         fits=est.fits_memory, peak_gib=est.memory.peak_gib,
                         predicted=est.step_time_s, measured=row["step_time_s_derived"],
                         err=est.step_time_s / row["step_time_s_derived"] - 1,
                         breakdown=est.breakdown))
    return rows


def main() -> None:
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT
    rows = evaluate(json.loads(path.read_text()))
    print(f"{'model':20s} {'method':8s} {'rc':9s} {'peak GiB':>8s} {'pred s':>7s} {'meas s':>7s} {'err':>7s}")
    for r in rows:
        print(f"{r['model']:20s} {r['method']:8s} {r['recompute']:9s} {r['peak_gib']:8.1f} "
              f"{r['predicted']:7.3f} {r['measured']:7.3f} {r['err']:+7.1%}")
        print("    " + " ".join(f"{k}={v:.3f}" for k, v in r["breakdown"].items() if v))
    mae = sum(abs(r["err"]) for r in rows) / len(rows)
    print(f"mean absolute error: {mae:.1%}; max: {max(abs(r['err']) for r in rows):.1%}")


if __name__ == "__main__":
    main()
