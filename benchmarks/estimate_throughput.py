"""Mappings estimated per second, for a batch of 10,000 mappings.

Run: .venv/bin/python benchmarks/estimate_throughput.py
Two paths: `estimate()` (validation + pydantic answer, what /v1/estimate serves) and
`evaluate()` with a per-request cache (what the planner calls in bulk).
"""

from __future__ import annotations

import itertools
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "planner"))

from cost_model.estimate import estimate, evaluate  # noqa: E402
from cost_model.presets import preset_model  # noqa: E402
from cost_model.specs import ClusterSpec, TrainingSpec  # noqa: E402
from exhaustive import enumerate_mappings  # noqa: E402  (tests/planner: the test oracle)

N = 10_000


def main() -> None:
    model = preset_model("mixtral-8x22b")
    cluster = ClusterSpec(num_nodes=128, gpus_per_node=8)
    training = TrainingSpec(seq_length=4096, global_batch_size=1024, moe_expert_capacity_factor=1.0)
    mappings = list(itertools.islice(enumerate_mappings(model, cluster, training, {}), N))
    assert len(mappings) == N, len(mappings)
    t = time.perf_counter()
    for m in mappings:
        estimate(model, cluster, training, m)
    full = time.perf_counter() - t
    cache: dict = {}
    t = time.perf_counter()
    for m in mappings:
        evaluate(model, cluster, training, m, cache)
    bulk = time.perf_counter() - t
    print(f"{N} mappings of mixtral-8x22b on 1,024 H100")
    print(f"estimate():          {N / full:8.0f} mappings/s  ({full * 1e6 / N:.0f} us each)")
    print(f"evaluate() + cache:  {N / bulk:8.0f} mappings/s  ({bulk * 1e6 / N:.0f} us each)")


if __name__ == "__main__":
    main()
