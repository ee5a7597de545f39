"""Megatron-Core-compatible rank layout (public face of `cost_model.layout`).

The arithmetic lives in cost_model so the cost model can use it without importing upward;
see that module's docstring for the rule and a worked example.
"""

from cost_model.layout import (  # noqa: F401  (re-exported API)
    GROUP_KINDS,
    RankLayout,
    build_layout,
    group_placement,
    masked_orthogonal_rank_groups,
)
