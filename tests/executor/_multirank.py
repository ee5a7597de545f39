"""Helpers for multi-rank CPU tests: spawn a gloo world on a free port and collect results.

Each rank runs `worker(rank, world, port, job, out_dir)` in its own process; the job writes
`out_dir/rank<r>.json` and the test asserts on those files. Imported by test modules only.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import socket
from pathlib import Path

import torch
import torch.distributed as dist

from cost_model.specs import Mapping, ModelSpec, TrainingSpec
from executor.comm import CommCounter, all_gather_v, all_to_all_v, reduce_scatter_v
from executor.data import bundled_corpus_tokens
from executor.parallel_dims import (
    ALL_KINDS,
    Group,
    ParallelDims,
    build_parallel_dims,
    rank_lists,
)
from executor.router import RouterConfig
from executor.trainer import Trainer

# Small MoE with a dense layer in the middle and shared experts: 8 experts so EP 8 works.
TEST_SPEC = ModelSpec(
    name="test-moe", num_layers=3, hidden_size=64, num_attention_heads=4, num_query_groups=2,
    kv_channels=16, ffn_hidden_size=128, vocab_size=256, num_experts=8, moe_ffn_hidden_size=64,
    moe_router_topk=2, moe_shared_expert_intermediate_size=32, moe_layer_freq=[1, 0, 1],
)
TEST_TRAINING = TrainingSpec(seq_length=32, global_batch_size=8, precision="fp32")
SPEC_TIED = ModelSpec(**dict(TEST_SPEC.model_dump(), name="test-moe-tied", untie_embeddings_and_output_weights=False))
# Four layers (dense first) for interleaved pipelines: pp2 x vpp2 = four chunks of one layer.
SPEC_4L = ModelSpec(**dict(TEST_SPEC.model_dump(), name="test-moe-4l", num_layers=4, moe_layer_freq=[0, 1, 1, 1]))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world, port, job, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        result = JOBS[job](rank, world)
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def spawn(job: str, world: int, out_dir: Path, timeout: float = 240.0) -> list[dict]:
    """Run JOBS[job] on `world` gloo ranks; return every rank's result dict."""
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(r, world, port, job, str(out_dir))) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout)
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        p.kill()
    codes = [p.exitcode for p in procs]
    assert not alive, f"ranks timed out after {timeout}s"
    assert all(c == 0 for c in codes), f"rank exit codes {codes}"
    return [json.loads(Path(out_dir, f"rank{r}.json").read_text()) for r in range(world)]


# --- equivalence job ----------------------------------------------------------------------

NUM_STEPS = 3

# (name, world, mapping fields, router options, capacity-style reference[, model spec])
EQUIV_CONFIGS = [
    # tensor + sequence parallelism, folded with expert parallelism
    ("tp2_sp_w2", 2, dict(tp=2), {}, False),
    ("tp2_etp1_ep2_dp2", 4, dict(tp=2, ep=2), {}, False),
    ("tp2_ep4_dp4_w8", 8, dict(tp=2, ep=4), {}, False),
    ("tp2_etp2_ep4_allgather_w8", 8, dict(tp=2, etp=2, ep=4, dispatcher="allgather"), {}, False),
    # pipelines: 1F1B with an uneven first stage, interleaved, and with EP / TP
    ("pp2_first1_w2", 2, dict(pp=2, decoder_first_pipeline_num_layers=1), {}, False),
    ("pp2_vpp2_w2", 2, dict(pp=2, vpp=2), {}, False, SPEC_4L),
    ("pp2_tp2_ep2_last1", 4, dict(pp=2, tp=2, ep=2, decoder_last_pipeline_num_layers=1), {}, False),
    ("pp2_vpp2_dp2_ep2", 4, dict(pp=2, vpp=2, ep=2), {}, False, SPEC_4L),
    # embedding and loss in the split: 4 + 2 slots over pp2 x vpp3, so the first chunk holds
    # only the embedding and the last only the loss (chunks with no decoder layer)
    ("pp2_vpp3_embed_loss_w2", 2, dict(pp=2, vpp=3, account_for_embedding_in_pipeline_split=True,
                                       account_for_loss_in_pipeline_split=True), {}, False, SPEC_4L),
    # context parallelism (load-balanced chunks, K/V all-gather)
    ("cp2_w2", 2, dict(cp=2), {}, False),
    ("cp2_tp2_ep4_w4", 4, dict(cp=2, tp=2, ep=4), {}, False),
    ("cp2_dp2_tp2_ep2_etp2_w8", 8, dict(cp=2, tp=2, ep=2, etp=2), {}, False),
    ("pp2_tp2_cp2_etp2_ep2_w8", 8, dict(pp=2, tp=2, cp=2, ep=2, etp=2, decoder_first_pipeline_num_layers=1),
     {}, False),
    ("pp2_tied_tp2_ep2_w4", 4, dict(pp=2, tp=2, ep=2, decoder_first_pipeline_num_layers=1), {}, False, SPEC_TIED),
    ("pp2_vpp2_tied_w2", 2, dict(pp=2, vpp=2, distributed_optimizer=False), {}, False,
     SPEC_4L.model_copy(update=dict(name="test-moe-4l-tied", untie_embeddings_and_output_weights=False))),
    ("pp2_cp2_w4", 4, dict(pp=2, cp=2, decoder_first_pipeline_num_layers=1), {}, False),
    ("pp2_etp2_w4", 4, dict(pp=2, etp=2, decoder_first_pipeline_num_layers=1), {}, False),
    # partial recompute (first layer of each stage)
    ("tp2_recompute1_w2", 2, dict(tp=2, recompute="full", recompute_num_layers=1), {}, False),
    ("dp2", 2, dict(), {}, False),
    ("ep2_allgather_w2", 2, dict(ep=2, dispatcher="allgather"), {}, False),
    ("etp2_w2", 2, dict(etp=2), {}, False),
    ("dp4_ep4", 4, dict(ep=4), {}, False),
    ("dp4_etp2_ep2", 4, dict(ep=2, etp=2), {}, False),
    ("dp4_ep2_mbs2", 4, dict(ep=2, micro_batch_size=2), {}, False),
    ("dp8_ep8", 8, dict(ep=8), {}, False),
    ("dp8_ep8_allgather", 8, dict(ep=8, dispatcher="allgather"), {}, False),
    ("dp8_ep2_edp4", 8, dict(ep=2), {}, False),
    ("dp8_etp2_ep4_allgather", 8, dict(ep=4, etp=2, dispatcher="allgather"), {}, False),
    ("dp8_etp2_ep2_edp2", 8, dict(ep=2, etp=2), {}, False),
    ("dp8_ep4_order_dp_first", 8, dict(ep=4, order="dp-ep-tp-cp-pp"), {}, False),
    ("dp4_ep4_recompute_full", 4, dict(ep=4, recompute="full", distributed_optimizer=False), {}, False),
    ("dp2_ep2_recompute_selective", 2, dict(ep=2, recompute="selective"), {}, False),
    ("dp4_ep4_sigmoid", 4, dict(ep=4), dict(score_function="sigmoid"), False),
    ("dp2_ep2_sigmoid_scaled", 2, dict(ep=2), dict(score_function="sigmoid", topk_scaling_factor=2.5),
     False),
    ("dp4_ep2_pre_softmax", 4, dict(ep=2, etp=2), dict(pre_softmax=True), False),
    ("dp2_ep2_capacity", 2, dict(ep=2), dict(capacity_factor=1.0, aux_loss_coeff=0.0), True),
    ("dp4_etp2_ep2_capacity_allgather", 4, dict(ep=2, etp=2, dispatcher="allgather"),
     dict(capacity_factor=0.75, aux_loss_coeff=0.0), True),
]


def _reference(mbs: int, router: RouterConfig, tokens, spec: ModelSpec = TEST_SPEC) -> dict:
    mapping = Mapping(micro_batch_size=mbs, distributed_optimizer=False)  # plain AdamW
    t = Trainer(spec, TEST_TRAINING, ParallelDims.single(mapping), tokens, seed=0, router_config=router)
    results = [t.step(s, keep_grads=(s == 0)) for s in range(NUM_STEPS)]
    return {"loss": [r.loss for r in results], "grad_norm": [r.grad_norm for r in results],
            "dropped": [r.num_dropped for r in results],
            "load": [r.expert_load_imbalance for r in results],
            "grads": results[0].grads}


def collectives_check(rank: int, world: int) -> dict:
    """Uneven all-to-all / all-gather / reduce-scatter: values, gradients and byte counts."""
    g = Group(tuple(range(world)), dist.group.WORLD, rank)
    D, counter, res = 3, CommCounter(), {}
    # all-to-all: rank r sends (r + j) % 3 rows of value 100 r + j to rank j
    in_splits = [(rank + j) % 3 for j in range(world)]
    out_splits = [(j + rank) % 3 for j in range(world)]
    x = torch.cat([torch.full((n, D), 100.0 * rank + j) for j, n in enumerate(in_splits)]).requires_grad_()
    y = all_to_all_v(x, out_splits, in_splits, g, counter, "w.a2a")
    expect = torch.cat([torch.full((n, D), 100.0 * j + rank) for j, n in enumerate(out_splits)])
    res["a2a_ok"] = bool(torch.equal(y, expect))
    (y * y).sum().backward()  # grad of row sent to j comes back as 2 * its value
    res["a2a_grad_ok"] = bool(torch.equal(x.grad, 2 * x.detach()))
    # all-gather-v: rank r holds r + 1 rows of value r
    sizes = [r + 1 for r in range(world)]
    x = torch.full((rank + 1, D), float(rank), requires_grad=True)
    y = all_gather_v(x, sizes, g, counter, "w")
    res["ag_ok"] = bool(torch.equal(y, torch.cat([torch.full((n, D), float(r)) for r, n in enumerate(sizes)])))
    weights = torch.arange(y.shape[0], dtype=torch.float32)[:, None].expand(-1, D)
    (y * weights).sum().backward()  # every rank contributes the same weights: grad = world * w
    off = sum(sizes[:rank])
    res["ag_grad_ok"] = bool(torch.equal(x.grad, world * weights[off : off + rank + 1]))
    # reduce-scatter-v: everyone holds rows 0..N-1 scaled by (rank + 1)
    n_total = sum(sizes)
    x = (torch.arange(n_total, dtype=torch.float32)[:, None].expand(-1, D) * (rank + 1)).contiguous()
    y = reduce_scatter_v(x, sizes, g, counter, "w")
    tri = world * (world + 1) // 2
    res["rs_ok"] = bool(torch.equal(y, torch.arange(n_total, dtype=torch.float32)[off : off + rank + 1, None].expand(-1, D) * tri))
    res["bytes"] = dict(counter.current)
    res["in_splits"], res["out_splits"], res["sizes"] = in_splits, out_splits, sizes
    return res


def groups_check(dims: ParallelDims) -> bool:
    """Each group holds this rank, is one of the layout's groups, and its process group works."""
    me = dist.get_rank()
    for kind in ALL_KINDS:
        grp = dims.group(kind)
        if me not in grp.ranks or list(grp.ranks) not in rank_lists(dims.layout, kind):
            return False
        if grp.pg is not None:
            t = torch.ones(1)
            dist.all_reduce(t, group=grp.pg)
            if int(t) != grp.size:
                return False
    return True


def equivalence_job(rank: int, world: int) -> dict:
    """Every config of EQUIV_CONFIGS against the single-rank reference, on sub-worlds."""
    tokens = bundled_corpus_tokens()
    refs: dict = {}
    out = {"_collectives": collectives_check(rank, world)}
    only = os.environ.get("EXEC_EQUIV_ONLY")  # debugging: comma-separated config names
    for name, w, fields, router_opts, per_rank_ref, *rest in EQUIV_CONFIGS:
        if only and name not in only.split(","):
            continue
        spec = rest[0] if rest else TEST_SPEC
        mapping = Mapping(**fields)
        router = RouterConfig(**router_opts)
        dp = w // (mapping.tp * mapping.cp * mapping.pp)
        ref_mbs = mapping.micro_batch_size * (1 if per_rank_ref else dp)
        key = (ref_mbs, router, spec.name)
        if key not in refs:
            obj = [_reference(ref_mbs, router, tokens, spec) if rank == 0 else None]
            dist.broadcast_object_list(obj, src=0)
            refs[key] = obj[0]
        ref = refs[key]
        dims = build_parallel_dims(mapping, w, gpus_per_node=4, base_ranks=list(range(w)))
        if dims is None:
            continue
        groups_ok = groups_check(dims)
        counter = CommCounter()
        t = Trainer(spec, TEST_TRAINING, dims, tokens, seed=0, counter=counter, router_config=router)
        results = [t.step(s, keep_grads=(s == 0)) for s in range(NUM_STEPS)]
        counter.end_step()
        grad_err = 0.0
        worst = ""
        for n, g in results[0].grads.items():
            full = t.shard_of_full(n, ref["grads"][n])
            err = float((g - full).abs().max() / full.norm().clamp_min(1e-12))
            if err > grad_err:
                grad_err, worst = err, n
        loss_err = max(abs(a - b) / abs(b) for a, b in zip((r.loss for r in results), ref["loss"]))
        out[name] = {
            "loss": [r.loss for r in results], "ref_loss": ref["loss"], "loss_rel_err": loss_err,
            "grad_err": grad_err, "worst_grad": worst, "num_params": len(results[0].grads),
            "param_names": sorted(results[0].grads), "ref_param_names": sorted(ref["grads"]),
            "moment_numel": sum(v["exp_avg"].numel() for v in t.optimizer.state_dict()["state"].values()),
            "param_numel": sum(p.numel() for _, p in t.named_parameters()),
            "dropped": [r.num_dropped for r in results], "ref_dropped": ref["dropped"],
            "load": [r.expert_load_imbalance for r in results], "ref_load": ref["load"],
            "comm_keys": sorted(counter.per_step[0]),
            "groups_ok": groups_ok,
            "grad_norm": [r.grad_norm for r in results], "ref_grad_norm": ref["grad_norm"],
            "ep_bytes": counter.per_step[0].get("ep.all_to_all", 0),
        }
    if not only or "_reshard" in only:
        out["_reshard"] = reshard_check(rank, tokens, refs)
    return out


def reshard_check(rank: int, tokens, refs: dict) -> dict:
    """Train 2 steps on 4 ranks (tp2 x ep2, dp2), save the portable state, resume on all 8
    ranks with another world and mapping (pp2 x tp2 x cp2, ep2 x etp2, mbs 2) for steps 3, 4: they
    must equal the uninterrupted 4-rank run (step 4 depends on the resharded AdamW moments)."""
    import shutil
    import tempfile

    from executor.reshard import full_tensors, load_portable, portable_state

    # the reference with 2 sequences per micro-batch (the 4-rank run: micro-batch 1 x dp 2)
    ref = refs[(2, RouterConfig(), TEST_SPEC.name)]
    box = [tempfile.mkdtemp(prefix="reshard") if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    d = Path(box[0])
    dims = build_parallel_dims(Mapping(tp=2, ep=2), 4, gpus_per_node=4, base_ranks=list(range(4)))
    res = {}
    if dims is not None:
        t = Trainer(TEST_SPEC, TEST_TRAINING, dims, tokens, seed=0)
        res["old_loss"] = [t.step(s).loss for s in range(2)]
        torch.save({"portable": portable_state(t)}, d / f"rank{rank}.pt")
        res["old_loss"] += [t.step(s).loss for s in range(2, 4)]  # uninterrupted continuation
    dist.barrier()
    # dp 1 x micro-batch 2 = the old dp 2 x micro-batch 1: the router's load-balancing loss is
    # taken per global micro-batch, so both runs must cut the batch into the same micro-batches
    mapping = Mapping(pp=2, tp=2, cp=2, ep=2, etp=2, decoder_first_pipeline_num_layers=1, micro_batch_size=2)
    dims = build_parallel_dims(mapping, 8, gpus_per_node=4)
    t = Trainer(TEST_SPEC, TEST_TRAINING, dims, tokens, seed=0)
    adam_step, full = full_tensors([d / f"rank{r}.pt" for r in range(4)])
    load_portable(t, adam_step, full)
    res["new_loss"] = [t.step(s).loss for s in range(2, 4)]
    res["ref_loss"] = ref["loss"]
    dist.barrier()
    if rank == 0:
        shutil.rmtree(d, ignore_errors=True)
    return res


JOBS = {"equivalence": equivalence_job}
