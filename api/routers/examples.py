"""OpenAPI request examples (they work when sent from /docs)."""

MIXTRAL_CLUSTER = {"num_nodes": 16, "gpus_per_node": 8, "gpu": "h100"}
MIXTRAL_TRAINING = {"seq_length": 4096, "global_batch_size": 256}

PLAN_EXAMPLES = {
    "mixtral-8x22b": {
        "summary": "Mixtral-8x22B on 16 x 8 H100",
        "value": {"model": {"preset": "mixtral-8x22b"}, "cluster": MIXTRAL_CLUSTER,
                  "training": MIXTRAL_TRAINING, "top_k": 5},
    },
    "fixed": {
        "summary": "Qwen2-57B-A14B on 8 x 8 H100 with tp=2, ep=8 fixed",
        "value": {"model": {"preset": "qwen2-57b-a14b"},
                  "cluster": {"num_nodes": 8, "gpus_per_node": 8, "gpu": "h100"},
                  "training": {"seq_length": 4096, "global_batch_size": 256},
                  "fixed": {"tp": 2, "ep": 8}, "time_limit_s": 30},
    },
}

_MIXTRAL_MAPPING = {"tp": 2, "pp": 8, "ep": 8, "etp": 1, "micro_batch_size": 1}

ESTIMATE_EXAMPLES = {
    "one": {
        "summary": "Mixtral-8x22B, one mapping (tp2 pp8 ep8)",
        "value": {"model": {"preset": "mixtral-8x22b"}, "cluster": MIXTRAL_CLUSTER,
                  "training": MIXTRAL_TRAINING, "mapping": _MIXTRAL_MAPPING},
    },
    "batch": {
        "summary": "A batch with one invalid mapping (ep=3)",
        "value": {"model": {"preset": "mixtral-8x22b"}, "cluster": MIXTRAL_CLUSTER,
                  "training": MIXTRAL_TRAINING,
                  "mappings": [_MIXTRAL_MAPPING, {"tp": 2, "pp": 8, "ep": 3}]},
    },
}

LAYOUT_EXAMPLES = {
    "folded": {
        "summary": "16 GPUs, tp2 pp2, ep4 folded over tp and dp",
        "value": {"world_size": 16, "gpus_per_node": 8,
                  "mapping": {"tp": 2, "pp": 2, "ep": 4, "etp": 1}},
    },
}

RUN_EXAMPLES = {
    "short": {"summary": "10 steps of the best candidate",
              "value": {"candidate": 0, "steps": 10, "backend": "local"}},
}
