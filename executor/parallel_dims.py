"""The process groups of one folded mapping, held in one frozen value (no globals).

`build_parallel_dims` creates every torch.distributed group of `cost_model.layout.build_layout`
(dense tp/cp/dp/pp, expert etp/ep/edp, and dp_cp/tp_cp/tp_ep) plus `tp_cp_dp` (all ranks of one
pipeline stage: the ranks holding distinct tokens of a micro-batch, see `stage_groups`) in one
fixed order, on every rank, as `new_group` requires. The result is passed explicitly to
modules and dispatchers.

Sub-worlds: `base_ranks` maps layout rank r to global rank base_ranks[r], so one launched world
can host several smaller configurations in sequence (tests do this). Processes outside the
sub-world still take part in every `new_group` call and get `None` back.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType

import torch
import torch.distributed as dist

from cost_model.layout import RankLayout, build_layout
from cost_model.specs import Mapping
from cost_model.validate import mapping_data_parallel

# Fixed creation order: every rank must call new_group in the same sequence.
ALL_KINDS = ("tp", "cp", "dp", "pp", "ep", "etp", "edp", "dp_cp", "tp_cp", "tp_ep", "tp_cp_dp",
             "pp_bwd", "pp_wrap", "pp_bwd_wrap", "pp_embed")
# Kinds that get their own communicator even when another kind has the same ranks: pipeline
# messages use one communicator per direction and kind (activations, gradients, and their
# wrap-around between the last and the first stage with vpp), so every communicator carries
# messages one way only (NCCL runs one communicator's p2p operations in order).
PRIVATE_KINDS = ("pp_bwd", "pp_wrap", "pp_bwd_wrap")


def stage_groups(pp_groups: list[list[int]]) -> list[list[int]]:
    """The ranks of each pipeline stage: stage i is the i-th member of every pp group.

    Example: pp groups [[0, 4], [1, 5], [2, 6], [3, 7]] -> [[0, 1, 2, 3], [4, 5, 6, 7]].
    These are the tp x cp x dp (= etp x ep x edp) ranks that share a stage's layers.
    """
    return [sorted(g[i] for g in pp_groups) for i in range(len(pp_groups[0]))]


def rank_lists(layout: RankLayout, kind: str) -> list[list[int]]:
    """Rank lists of `kind`: the layout's groups, the derived `tp_cp_dp` stage groups and
    `pp_embed` groups (first + last member of each pp group), or the pp groups again for the
    private pipeline kinds."""
    if kind == "tp_cp_dp":
        return stage_groups(layout.groups["pp"])
    if kind == "pp_embed":  # first and last stage (tied embedding copies); others alone
        pp = layout.groups["pp"]
        return [[g[0], g[-1]] if len(g) > 1 else [g[0]] for g in pp] + [[r] for g in pp for r in g[1:-1]]
    return layout.groups["pp" if kind.startswith("pp") else kind]


@dataclass(frozen=True)
class Group:
    """This rank's group of one kind: its global ranks, the process group, our index in it."""

    ranks: tuple[int, ...]
    pg: object | None  # torch ProcessGroup; None when the group has one rank
    index: int

    @property
    def size(self) -> int:
        return len(self.ranks)


@dataclass(frozen=True)
class ParallelDims:
    """Sizes, coordinates and process groups of one mapping, as seen from one rank."""

    mapping: Mapping
    world_size: int
    rank: int  # rank inside this (sub-)world
    layout: RankLayout | None
    groups: MappingProxyType = field(repr=False)  # kind -> Group, read-only
    device: torch.device = torch.device("cpu")

    def group(self, kind: str) -> Group:
        return self.groups[kind]

    @property
    def dp(self) -> int:
        return self.groups["dp"].size

    @property
    def edp(self) -> int:
        return self.groups["edp"].size

    @property
    def ep(self) -> int:
        return self.groups["ep"].size

    @property
    def etp(self) -> int:
        return self.groups["etp"].size

    @property
    def tp(self) -> int:
        return self.groups["tp"].size

    @property
    def tp_rank(self) -> int:
        return self.groups["tp"].index

    @property
    def cp(self) -> int:
        return self.groups["cp"].size

    @property
    def cp_rank(self) -> int:
        return self.groups["cp"].index

    @property
    def pp(self) -> int:
        return self.groups["pp"].size

    @property
    def pp_rank(self) -> int:
        return self.groups["pp"].index

    @property
    def ep_rank(self) -> int:
        return self.groups["ep"].index

    @property
    def etp_rank(self) -> int:
        return self.groups["etp"].index

    @property
    def dp_rank(self) -> int:
        return self.groups["dp"].index

    @classmethod
    def single(cls, mapping: Mapping | None = None, device: torch.device | str = "cpu") -> ParallelDims:
        """The one-rank world: every group is just this rank (the reference configuration)."""
        m = (mapping or Mapping()).model_copy(update=dict(tp=1, cp=1, pp=1, vpp=1, ep=1, etp=1, dp=1, edp=1,
                                                           decoder_first_pipeline_num_layers=None,
                                                           decoder_last_pipeline_num_layers=None))
        groups = MappingProxyType({k: Group((0,), None, 0) for k in ALL_KINDS})
        return cls(m, 1, 0, None, groups, torch.device(device))


def complete_mapping(mapping: Mapping, world_size: int) -> Mapping:
    """Fill dp/edp when omitted (`cost_model.validate.mapping_data_parallel`)."""
    dp, edp = mapping_data_parallel(world_size, mapping)
    return mapping.model_copy(update=dict(dp=dp, edp=edp))


def build_parallel_dims(
    mapping: Mapping,
    world_size: int,
    gpus_per_node: int,
    device: torch.device | str = "cpu",
    base_ranks: list[int] | None = None,
) -> ParallelDims | None:
    """Create every group of `mapping`'s layout; call on every process of the default group.

    Returns None on processes that are not part of the (sub-)world given by `base_ranks`.
    Identical rank lists of different kinds (e.g. dp and dp_cp when cp == 1) share one
    process group; the sharing is decided by the lists alone, so it is the same on every rank.
    """
    base = list(range(world_size)) if base_ranks is None else list(base_ranks)
    assert len(base) == world_size, (base, world_size)
    mapping = complete_mapping(mapping, world_size)
    layout = build_layout(world_size, gpus_per_node, mapping)
    me = dist.get_rank()
    made: dict[tuple[str, tuple[int, ...]], object] = {}
    mine: dict[str, Group] = {}
    for kind in ALL_KINDS:
        for ranks in rank_lists(layout, kind):
            global_ranks = tuple(base[r] for r in ranks)
            key = (kind if kind in PRIVATE_KINDS else "", global_ranks)
            if len(global_ranks) == 1:
                pg = None
            elif key in made:
                pg = made[key]
            else:
                pg = dist.new_group(list(global_ranks))
                made[key] = pg
            if me in global_ranks:
                mine[kind] = Group(global_ranks, pg, global_ranks.index(me))
    if me not in base:
        return None
    return ParallelDims(mapping, world_size, base.index(me), layout, MappingProxyType(mine), torch.device(device))
