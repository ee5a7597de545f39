"""Pipeline parallelism: which layers a stage holds, and the 1F1B schedules over the pp group.

Legend: L layers, P = pp stages, V = vpp virtual chunks per stage, M micro-batches per step,
B micro-batch size, s tokens of a sequence on this rank (S / (cp * tp)), D model dim.

Layer split (`stage_layer_ranges`): the cost model's (`cost_model/stage_split.py`, rule and
worked example there), so the executor runs exactly the stages the plan priced.

Schedules (Megatron-Core `forward_backward_pipelining_without_interleaving` and
`..._with_interleaving`, PipeDream-Flush): a list of ('F' | 'B', micro-batch, chunk) steps per
stage. 1F1B: P - r - 1 warm-up forwards, then one forward / one backward alternately, then the
remaining backwards. Interleaved: virtual micro-batches k = 0 .. M*V-1 run chunk (k // P) % V
of micro-batch (k // (P*V)) * P + k % P in forward (backward: chunks in reverse), with
(P - r - 1) * 2 + (V - 1) * P warm-up forwards (M must be a multiple of P).
Activations and gradients move with isend / irecv (non-blocking sends, blocking receives) on
one communicator per direction and kind (`P2P`), so each communicator carries messages one way
between two stages, sent and received in the same order (both stages follow the same virtual
micro-batch order), and no message queues behind one going the other way: no pairing of calls
(Megatron's batch_isend_irecv) is needed. NCCL ignores tags and orders one communicator's p2p
operations, which this rule respects; checked on gloo only.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from cost_model.specs import Mapping
from cost_model.stage_split import stage_chunks


def stage_layer_ranges(num_layers: int, mapping: Mapping) -> list[list[range]]:
    """ranges[stage][virtual chunk]: the layers of each pipeline chunk (the cost model's split,
    `cost_model.stage_split`); raises StageSplitError (a ValueError) for a split it refuses."""
    return stage_chunks(num_layers, mapping.pp, mapping.vpp,
                        mapping.decoder_first_pipeline_num_layers,
                        mapping.decoder_last_pipeline_num_layers,
                        embedding=mapping.account_for_embedding_in_pipeline_split,
                        loss=mapping.account_for_loss_in_pipeline_split)


def schedule_1f1b(num_micro: int, pp: int, pp_rank: int) -> list[tuple[str, int, int]]:
    """Steps of one stage without interleaving: [('F'|'B', micro-batch, chunk 0), ...]."""
    warm = min(pp - pp_rank - 1, num_micro)
    steps = [("F", m, 0) for m in range(warm)]
    for i in range(num_micro - warm):
        steps += [("F", warm + i, 0), ("B", i, 0)]
    steps += [("B", m, 0) for m in range(num_micro - warm, num_micro)]
    return steps


def schedule_interleaved(num_micro: int, pp: int, pp_rank: int, vpp: int) -> list[tuple[str, int, int]]:
    """Steps of one stage with vpp chunks (Megatron's interleaved 1F1B order)."""
    if vpp == 1:
        return schedule_1f1b(num_micro, pp, pp_rank)
    assert num_micro % pp == 0, (num_micro, pp)
    total = num_micro * vpp

    def fwd(k):
        return (k // (pp * vpp)) * pp + k % pp, (k // pp) % vpp

    def bwd(k):
        m, c = fwd(k)
        return m, vpp - 1 - c

    warm = min((pp - pp_rank - 1) * 2 + (vpp - 1) * pp, total)
    steps = [("F",) + fwd(k) for k in range(warm)]
    for i in range(total - warm):
        steps += [("F",) + fwd(warm + i), ("B",) + bwd(i)]
    steps += [("B",) + bwd(k) for k in range(total - warm, total)]
    return steps


FWD, BWD = 0, 1  # message tags: activations go to stage + 1, gradients to stage - 1


class P2P:
    """Send / receive activations and gradients between neighbouring stages, one communicator
    per direction: `pp` (activations, stage r -> r+1), `pp_bwd` (gradients, r -> r-1) and, for
    the wrap-around between the last and the first stage (vpp), `pp_wrap` / `pp_bwd_wrap`."""

    def __init__(self, dims, counter=None):
        self.dims, self.counter = dims, counter
        self.group = dims.group("pp")
        self.pending: list = []

    def _peer(self, delta: int) -> int:
        return self.group.ranks[(self.group.index + delta) % self.group.size]

    def _pg(self, tag: int, delta: int):
        wrap = not 0 <= self.group.index + delta < self.group.size
        kind = ("pp" if tag == FWD else "pp_bwd") + ("_wrap" if wrap else "")
        return self.dims.group(kind).pg

    def send(self, t: torch.Tensor, delta: int, tag: int) -> None:
        t = t.detach().float().contiguous()
        if self.counter is not None:
            self.counter.add("pp.send", t.numel() * t.element_size())
        self.pending.append((dist.isend(t, self._peer(delta), group=self._pg(tag, delta), tag=tag), t))

    def recv(self, shape, device, delta: int, tag: int) -> torch.Tensor:
        t = torch.empty(shape, dtype=torch.float32, device=device)
        # the sender's direction: it sent with -delta, so it wrapped iff we do
        dist.irecv(t, self._peer(delta), group=self._pg(tag, delta), tag=tag).wait()
        return t

    def flush(self) -> None:
        for work, _ in self.pending:
            work.wait()
        self.pending = []


def run_schedule(chunks, steps, p2p: P2P | None, get_batch, act_shape, loss_scale: float,
                 aux_scale: float, autocast_dtype=None):
    """Run one step's forward and backward passes in schedule order on this stage.

    `chunks[c]` is virtual chunk c of this stage (MoETransformer with its pre/post flags),
    `get_batch(m)` the (tokens, targets) of micro-batch m. Each micro-batch's objective is
    ce_sum * loss_scale + router loss * aux_scale (not formed: the backward starts from both
    terms with their weights as seeds, bit for bit the same gradients); returns float64 totals
    [ce sum of the last stage, router loss share, dropped pairs], on the device: nothing is
    read back per micro-batch (the trainer reads a step's numbers once).
    """
    dev = next(chunks[0].parameters()).device
    parts: tuple[list, list, list] = ([], [], [])  # per forward: ce sum, router loss, dropped pairs
    saved: dict[tuple[int, int], tuple] = {}
    seeds: dict[tuple[float, torch.dtype], torch.Tensor] = {}  # made once per step
    for kind, m, c in steps:
        chunk = chunks[c]
        if kind == "F":
            tokens, targets = (t.to(dev) for t in get_batch(m))
            pos, rope, mask = chunk.attention_context(tokens.shape[1], dev)
            x_in = None
            with torch.autocast(dev.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                if chunk.pre:
                    x = chunk.embed_tokens(tokens, pos)
                else:
                    x_in = p2p.recv(act_shape, dev, -1, FWD).requires_grad_()
                    x = x_in.to(next(chunk.parameters()).dtype)  # bf16 parameters: bf16 activations
                x, aux, dropped = chunk.run_layers(x, rope, mask)
                objs = [(aux, aux_scale)]  # the objective's terms and their weights
                if chunk.post:
                    ce = chunk.loss(x, targets, pos)
                    objs.append((ce, loss_scale))
                    parts[0].append(ce)  # summed without autograd at the end (no detach op)
            parts[1].append(aux)
            parts[2].append(dropped)
            if not chunk.post:
                p2p.send(x, +1, FWD)
            saved[(m, c)] = (x_in, None if chunk.post else x, objs)
        else:
            x_in, out, objs = saved.pop((m, c))
            outs, grads = [], []
            if out is not None:
                g = p2p.recv(act_shape, dev, +1, BWD)
                outs.append(out)
                grads.append(g.to(out.dtype))
            for term, weight in objs:  # d objective / d term = its weight: the backward's seed
                if term.requires_grad:
                    key = (weight, term.dtype)
                    if key not in seeds:
                        seeds[key] = torch.full((), weight, dtype=term.dtype, device=dev)
                    outs.append(term)
                    grads.append(seeds[key])
            if outs:
                torch.autograd.backward(outs, grads)
            if x_in is not None:
                p2p.send(x_in.grad if x_in.grad is not None else torch.zeros_like(x_in), -1, BWD)
    assert not saved, sorted(saved)
    if p2p is not None:
        p2p.flush()
    with torch.no_grad():
        return torch.stack([_device_sum(xs, dev) for xs in parts])


def _device_sum(values: list, device) -> torch.Tensor:
    """float64 sum of device scalars and Python numbers, on the device (no host read)."""
    tensors = [v for v in values if isinstance(v, torch.Tensor)]
    total = torch.stack(tensors).sum(dtype=torch.float64) if tensors else torch.zeros((), dtype=torch.float64, device=device)
    number = sum(v for v in values if not isinstance(v, torch.Tensor))
    return total + number if number else total
