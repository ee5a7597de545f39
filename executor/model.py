"""Decoder-only MoE transformer built from a ModelSpec, sharded per `ParallelDims`.

Legend: B sequences, S sequence length (this rank's cp shard), s = S / tp the sequence-parallel
shard, Sf full sequence, D model dim, V vocabulary, Vl = V / tp.

Layer: x + Attn(RMSNorm(x)), then x + FFN(RMSNorm(x)) with FFN = MoE on the layers of
`ModelSpec.moe_layer_pattern()` and a dense SwiGLU MLP elsewhere. RoPE on q and k, GQA,
causal attention (or multi-latent attention, mla.py, when the spec asks for it), final
RMSNorm, output layer (untied unless the spec ties it). Shared experts optionally behind a
sigmoid gate (`moe_shared_expert_gate`, Qwen2-MoE: sigmoid(x . w) * shared(x) per token).
Value-only details (RoPE base, norm epsilons, router renormalisation) come from an
`ArchOptions` (arch.py; a Hugging Face checkpoint's config sets them).
Parallelism: TP + SP (tensor_parallel.py; between layers a rank holds x_BsD, without tp the
flat x_ND, N = B*S), CP (attention.py; the load-balanced chunks of the sequence), EP/ETP inside
MoE layers, PP: one module holds a contiguous range of layers (a pipeline chunk, `layer_ids`),
the embedding when `pre` and the final norm, output layer and loss when `post`. Parameter
names are the same on every mapping ("layers.<global id>. ...") so shards can be compared with
the single-rank model.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from cost_model.specs import ModelSpec

from .arch import ArchOptions
from .attention import Attention, cp_positions, rope_tables
from .comm import CommCounter
from .init import normal
from .linear import linear
from .mla import MultiLatentAttention
from .mlp import MLP
from .moe import MoELayer
from .norm import RMSNorm
from .parallel_dims import ParallelDims
from .router import RouterConfig
from .tensor_parallel import (
    VocabParallelEmbedding,
    full_shape,
    mark_tp,
    shard_of_full,
    sp_gather,
    sp_scatter,
    vocab_parallel_cross_entropy,
)


class GatedSharedExperts(nn.Module):
    """sigmoid(x . gate) * shared(x) per local token; the gate [1, D] is replicated."""

    def __init__(self, shared: MLP, hidden_size: int):
        super().__init__()
        self.mlp = shared
        self.gate = nn.Linear(hidden_size, 1, bias=False)

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.gate(x_TD)) * self.mlp(x_TD)


class Block(nn.Module):
    """Pre-norm transformer layer; forward returns (x, router loss share, dropped pairs)."""

    def __init__(self, spec: ModelSpec, is_moe: bool, dims: ParallelDims, counter, router_config,
                 dispatcher: str, kernel_backend: str, recompute: str, arch: ArchOptions):
        super().__init__()
        self.tp, self.counter = dims.group("tp"), counter
        self.attn_norm = RMSNorm(spec.hidden_size, arch.norm_eps)
        attention = MultiLatentAttention if spec.multi_latent_attention else Attention
        self.attn = attention(spec, dims, counter, selective_recompute=recompute == "selective", arch=arch)
        self.ffn_norm = RMSNorm(spec.hidden_size, arch.norm_eps)
        self.is_moe = is_moe
        if is_moe:
            self.ffn = MoELayer(spec, dims, counter, router_config, dispatcher, kernel_backend)
            if spec.moe_shared_expert_gate:
                self.ffn.shared = GatedSharedExperts(self.ffn.shared, spec.hidden_size)
        else:
            self.ffn = MLP(spec.hidden_size, spec.ffn_hidden_size, spec.swiglu, self.tp, counter)

    def forward(self, x_BsD, rope, mask_SSk):
        if self.tp.size == 1 and mask_SSk is None and isinstance(self.attn, Attention):
            # norm, attention, residual add and the next norm as one op on CPU (attention.py)
            x_BsD, h_BsD = self.attn.block(x_BsD, self.attn_norm, self.ffn_norm, rope)
        else:
            h_BSD = sp_gather(self.attn_norm(x_BsD), self.tp, self.counter)
            x_BsD = x_BsD + sp_scatter(self.attn(h_BSD, rope, mask_SSk), self.tp, self.counter)
            h_BsD = self.ffn_norm(x_BsD)
        if self.is_moe:
            out = self.ffn(h_BsD)
            return x_BsD + out.out_BsD, out.aux_loss, out.num_dropped
        zero = x_BsD.new_zeros((), dtype=torch.float32)
        if h_BsD.dim() == 2:  # the flat residual stream
            return x_BsD + self.ffn(h_BsD), zero, 0
        B, s, D = h_BsD.shape
        return x_BsD + self.ffn(h_BsD.reshape(B * s, D)).view(B, s, D), zero, 0


class MoETransformer(nn.Module):
    """Layers `layer_ids` of the model on one rank (all of them by default)."""

    def __init__(self, spec: ModelSpec, dims: ParallelDims, counter: CommCounter | None = None,
                 router_config: RouterConfig | None = None, dispatcher: str = "alltoall",
                 kernel_backend: str = "torch", recompute: str = "none",
                 layer_ids: range | None = None, pre: bool = True, post: bool = True,
                 recompute_num_layers: int | None = None, arch: ArchOptions | None = None):
        super().__init__()
        self.arch = arch = arch or ArchOptions()
        self.spec, self.dims, self.counter = spec, dims, counter
        self.recompute, self.recompute_num_layers = recompute, recompute_num_layers
        self.pre, self.post = pre, post
        # Without tp (no sequence-parallel gathers) the residual stream between the layers is
        # flat, x_ND with N = B*S tokens: no 3-D views around every linear and MoE block
        # (issue 12). Multi-latent attention keeps [B, S, D].
        self.flat = dims.group("tp").size == 1 and not spec.multi_latent_attention
        self._contexts: dict[tuple[int, str], tuple] = {}  # attention_context per (seq_len, device)
        tp = dims.group("tp")
        router_config = router_config or RouterConfig(expert_bias=spec.moe_router_enable_expert_bias)
        pattern = spec.moe_layer_pattern()
        layer_ids = range(len(pattern)) if layer_ids is None else layer_ids
        if pre or (post and not spec.untie_embeddings_and_output_weights):
            self.embed = VocabParallelEmbedding(spec.vocab_size, spec.hidden_size, tp, counter)
        self.layers = nn.ModuleDict({
            str(i): Block(spec, bool(pattern[i]), dims, counter, router_config, dispatcher, kernel_backend,
                          recompute, arch)
            for i in layer_ids
        })
        self.output = None
        if post:
            self.norm = RMSNorm(spec.hidden_size, arch.norm_eps)
            if spec.untie_embeddings_and_output_weights:
                self.output = nn.Linear(spec.hidden_size, spec.vocab_size // tp.size, bias=False)
                mark_tp(self.output.weight, 0, 1, tp)

    @torch.no_grad()
    def init_weights(self, seed: int) -> None:
        """Mapping-independent init (see init.py): N(0, 0.02) linears, zeros for biases, ones
        for norms; each tensor drawn at its full shape and sliced to this rank's shard."""
        for name, module in self.named_modules():
            if hasattr(module, "init_from_seed"):
                module.init_from_seed(seed, name)
        for name, p in self.named_parameters():
            if getattr(p, "is_expert", False):
                continue
            if name.endswith("weight_D"):
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            else:
                p.copy_(shard_of_full(p, normal(full_shape(p), seed, name)).to(p.device))

    def shard_of_full(self, name: str, full: torch.Tensor) -> torch.Tensor:
        """This rank's shard of the single-rank tensor `full` of parameter `name`."""
        p = self.get_parameter(name)
        if getattr(p, "is_expert", False):
            mod_name, pname = name.rsplit(".", 1)
            return self.get_submodule(mod_name).shard_of_full(pname, full)
        return shard_of_full(p, full)

    def full_shape_of(self, name: str) -> tuple[int, ...]:
        """Shape of parameter `name` in the single-rank model."""
        p = self.get_parameter(name)
        if getattr(p, "is_expert", False):
            mod_name, pname = name.rsplit(".", 1)
            return self.get_submodule(mod_name).full_shape(pname)
        return full_shape(p)

    def attention_context(self, seq_len: int, device):
        """(positions of the local tokens, rope tables, cp mask or None) for full length seq_len;
        computed once per (seq_len, device) and reused (constants, no gradient)."""
        key = (seq_len, str(device))
        if key not in self._contexts:
            with torch.inference_mode(False):  # normal tensors even if first asked for in inference
                self._contexts[key] = self._attention_context(seq_len, device)
        return self._contexts[key]

    def _attention_context(self, seq_len: int, device):
        cp = self.dims.group("cp")
        pos_S = cp_positions(seq_len, cp.size, cp.index, device)
        mask_SSk = None
        if cp.size > 1:
            pos_k = torch.cat([cp_positions(seq_len, cp.size, j, device) for j in range(cp.size)])
            mask_SSk = pos_S[:, None] >= pos_k[None, :]
        rope_dim = self.spec.qk_pos_emb_head_dim if self.spec.multi_latent_attention else self.spec.head_dim
        return pos_S, rope_tables(pos_S, rope_dim, self.arch.rope_theta, self.arch.yarn), mask_SSk

    def _local_chunks(self, x_BSf: torch.Tensor, pos_S: torch.Tensor) -> torch.Tensor:
        """x at this rank's positions: all of it without cp (no gather op)."""
        return x_BSf if self.dims.group("cp").size == 1 else x_BSf[:, pos_S]

    def embed_tokens(self, tokens_BSf: torch.Tensor, pos_S: torch.Tensor) -> torch.Tensor:
        """This rank's cp chunks, embedded and scattered over tp: x_BsD (flat: x_ND)."""
        tokens_BS = self._local_chunks(tokens_BSf, pos_S)
        return self.embed(tokens_BS.reshape(-1) if self.flat else tokens_BS)

    def run_layers(self, x_BsD, rope, mask_SSk):
        """Every layer of this module: (x, router loss share, dropped pairs)."""
        aux, dropped = None, 0
        n_rc = len(self.layers) if self.recompute_num_layers is None else self.recompute_num_layers
        for i, layer in enumerate(self.layers.values()):
            if self.recompute == "full" and i < n_rc and torch.is_grad_enabled():
                x_BsD, a, d = checkpoint(layer, x_BsD, rope, mask_SSk, use_reentrant=False)
            else:
                x_BsD, a, d = layer(x_BsD, rope, mask_SSk)
            aux, dropped = a if aux is None else aux + a, dropped + d
        if aux is None:  # no layers
            aux = x_BsD.new_zeros((), dtype=torch.float32)
        return x_BsD, aux, dropped

    def loss(self, x_BsD: torch.Tensor, targets_BSf: torch.Tensor, pos_S: torch.Tensor) -> torch.Tensor:
        """Sum of the cross-entropies of this rank's cp chunks (replicated over tp)."""
        tp = self.dims.group("tp")
        x_BSD = sp_gather(self.norm(x_BsD), tp, self.counter)
        weight_VlD = self.output.weight if self.output is not None else self.embed.weight
        logits = linear(x_BSD, weight_VlD)
        logits_TVl = logits if logits.dim() == 2 else logits.reshape(-1, weight_VlD.shape[0])  # flat already
        targets_T = self._local_chunks(targets_BSf, pos_S).reshape(-1)
        return vocab_parallel_cross_entropy(logits_TVl, targets_T, tp, self.counter, reduction="sum")

    def forward(self, tokens_BSf: torch.Tensor, targets_BSf: torch.Tensor):
        """Whole model (pre and post): (sum of token cross-entropies, router loss share, dropped)."""
        assert self.pre and self.post, "a pipeline chunk runs through executor.pipeline"
        pos_S, rope, mask_SSk = self.attention_context(tokens_BSf.shape[1], tokens_BSf.device)
        x_BsD, aux, dropped = self.run_layers(self.embed_tokens(tokens_BSf, pos_S), rope, mask_SSk)
        return self.loss(x_BsD, targets_BSf, pos_S), aux, dropped
