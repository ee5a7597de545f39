"""Predicted vs measured on one real GPU: train a ~1.3B-parameter MoE with the executor
(NCCL, bf16, our Triton dispatch kernels, grouped expert GEMMs) and compare each mapping's
measured step time and peak memory with the cost model's estimate for that GPU.

    python benchmarks/gpu_step.py [--steps 6] [--out DIR]

One GPU leaves only micro-batch size and recompute to vary (no communication): this checks
the compute and memory side of the model on real hardware. The mappings are fixed in advance
(below), the GPU preset is picked from the device name (H100 or H200). The step time is the
median of the steps after the first; memory is torch.cuda.max_memory_allocated on rank 0.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cost_model.estimate import estimate  # noqa: E402
from cost_model.specs import ClusterSpec, Mapping, ModelSpec, TrainingSpec  # noqa: E402
from executor.launch import run_plan  # noqa: E402

MODEL = ModelSpec(
    name="gpu-moe-1.3b", num_layers=8, hidden_size=2048, num_attention_heads=16,
    num_query_groups=4, kv_channels=128, ffn_hidden_size=5632, vocab_size=32000, swiglu=True,
    untie_embeddings_and_output_weights=True, num_experts=16, moe_ffn_hidden_size=1408,
    moe_router_topk=2, moe_layer_freq=1)
TRAINING = TrainingSpec(seq_length=2048, global_batch_size=16, precision="bf16",
                        moe_expert_capacity_factor=None)
MAPPINGS = [  # chosen before measuring: every micro-batch size with no recompute, plus full
    dict(micro_batch_size=1, recompute="none"),
    dict(micro_batch_size=2, recompute="none"),
    dict(micro_batch_size=4, recompute="none"),
    dict(micro_batch_size=2, recompute="full"),
]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    name = torch.cuda.get_device_name()
    gpu = "h200" if "H200" in name else "h100"
    cluster = ClusterSpec(num_nodes=1, gpus_per_node=1, gpu=gpu)
    out = Path(args.out or tempfile.mkdtemp(prefix="gpu_step_"))
    rows = []
    print(f"{name} (preset {gpu}); model {MODEL.name}, seq {TRAINING.seq_length}, "
          f"gbs {TRAINING.global_batch_size}, bf16, {args.steps} steps each", flush=True)
    for i, fields in enumerate(MAPPINGS):
        mapping = Mapping(**fields)
        est = estimate(MODEL, cluster, TRAINING, mapping)
        plan = {"model": MODEL.model_dump(mode="json"), "cluster": cluster.model_dump(mode="json"),
                "training": TRAINING.model_dump(mode="json"),
                "candidates": [{"mapping": est_mapping(mapping), "estimate": est.model_dump(mode="json")}]}
        try:
            m = run_plan(plan, 0, args.steps, out / f"m{i}", echo=False)
        except RuntimeError as exc:
            print(f"{fields}: failed: {str(exc)[-800:]}", flush=True)
            rows.append({"mapping": fields, "error": str(exc)[-2000:]})
            continue
        row = {"mapping": fields, "predicted_s": est.step_time_s, "measured_s": m["step_time_s"],
               "predicted_gib": est.memory.peak_gib, "measured_gib": m.get("peak_memory_gib"),
               "measured_mfu": m.get("mfu"), "predicted_mfu": est.mfu, "loss": m["loss"],
               "step_times_s": m.get("step_times_s")}
        rows.append(row)
        print(f"mbs {fields['micro_batch_size']} recompute {fields['recompute']:<5} "
              f"predicted {est.step_time_s * 1e3:8.1f} ms  measured {m['step_time_s'] * 1e3:8.1f} ms  "
              f"ratio {m['step_time_s'] / est.step_time_s:5.2f}  mfu pred {est.mfu:.3f} meas "
              f"{m.get('mfu', float('nan')):.3f}  mem pred {est.memory.peak_gib:5.1f} GiB "
              f"meas {m.get('peak_memory_gib') or float('nan'):5.1f} GiB  "
              f"loss {m['loss'][0]:.3f}->{m['loss'][-1]:.3f}", flush=True)
    (out / "gpu_step.json").write_text(json.dumps({"device": name, "rows": rows}, indent=2))
    print(f"wrote {out / 'gpu_step.json'}")
    return 0


def est_mapping(mapping: Mapping) -> dict:
    """The complete mapping the executor reads (dp/edp filled in for one GPU)."""
    d = mapping.model_dump(mode="json")
    d.update(dp=1, edp=1)
    return d


if __name__ == "__main__":
    sys.exit(main())
