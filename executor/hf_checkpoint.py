"""Hugging Face checkpoints in (`--init-hf DIR`) and out (`--export-hf DIR`), with safetensors only.

Reading: `HFCheckpoint(DIR)` opens config.json and the safetensors files (sharded with
`model.safetensors.index.json`, or single) and reads tensor SLICES: each rank reads only the
rows / columns of its tp (or etp) shard, the experts of its ep rank and the layers of its
pipeline chunks (`load_into`), never the whole model. transformers is not needed.
Before any rank starts (`check_checkpoint`, called by `executor.config.load_run`): the
config must describe the plan's model (differing fields named), every shard of the index
must exist, every tensor must be present with the shape the config implies, and the
architecture must be one the executor runs (hf_names.SUPPORTED_ARCHITECTURES).
Writing (`export`, collective): every rank writes its shards with their positions in the
single-rank tensors (reshard.portable_state), rank 0 reassembles the full tensors, converts
them back to the checkpoint's names and layouts (hf_names) and writes config.json plus
safetensors shards with `model.safetensors.index.json`. Rank 0 holds the whole model while it
writes (fine for the sizes trained here; a streaming writer is left for later).
Multi-token prediction: DeepSeek-V3's `num_nextn_predict_layers` counts only when the
checkpoint has the MTP layer's tensors (`model.layers.<num_hidden_layers>.*`); transformers
itself ignores them, so a checkpoint without them is a model without MTP.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file

from cost_model.hf_import import UnsupportedConfig, import_hf_config
from cost_model.specs import ModelSpec

from .arch import ArchOptions, UnsupportedArchitecture
from .hf_names import Source, hf_sources
from .model import MoETransformer
from .parallel_dims import ParallelDims
from .reshard import full_tensors, portable_state

INDEX_FILE = "model.safetensors.index.json"
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # buffers some old checkpoints carry
# also ignored: lm_head.weight of a tied model (some checkpoints store the tied copy)
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class CheckpointError(ValueError):
    """A checkpoint the executor cannot load; the message names the file, tensor or field."""


class HFCheckpoint:
    """A Hugging Face model folder: config.json and safetensors, read slice by slice."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        cfg_file = self.path / "config.json"
        if not cfg_file.is_file():
            raise CheckpointError(f"{self.path}: no config.json (not a Hugging Face model folder)")
        self.config: dict[str, Any] = json.loads(cfg_file.read_text())
        index = self.path / INDEX_FILE
        if index.is_file():
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
            missing = sorted({f for f in weight_map.values() if not (self.path / f).is_file()})
            if missing:
                raise CheckpointError(f"{self.path}: shard(s) {', '.join(missing)} listed in "
                                      f"{INDEX_FILE} are missing")
            self.files = {k: self.path / f for k, f in weight_map.items()}
        else:
            found = sorted(self.path.glob("*.safetensors"))
            if not found:
                raise CheckpointError(f"{self.path}: no *.safetensors files and no {INDEX_FILE}")
            self.files = {}
            for f in found:
                with safe_open(f, "pt") as h:
                    self.files.update({k: f for k in h.keys()})
        self._handles: dict[Path, Any] = {}

    def _open(self, key: str):
        if key not in self.files:
            raise CheckpointError(f"{self.path}: tensor {key!r} is missing from the checkpoint")
        f = self.files[key]
        if f not in self._handles:
            self._handles[f] = safe_open(f, "pt")
        return self._handles[f]

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._open(key).get_slice(key).get_shape())

    def read(self, key: str, dim: int = 0, start: int | None = None, stop: int | None = None) -> torch.Tensor:
        """Tensor `key`, or only [start, stop) along `dim` (0 or 1): only those bytes are read."""
        sl = self._open(key).get_slice(key)
        if start is None:
            return sl[:]
        return sl[start:stop] if dim == 0 else sl[:, start:stop]

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the config names (transformers 5 `dtype`, 4 `torch_dtype`); fp32 default."""
        return _DTYPES.get(self.config.get("dtype") or self.config.get("torch_dtype") or "float32",
                           torch.float32)

    def has_mtp(self) -> bool:
        layers = self.config.get("num_hidden_layers")
        return any(k.startswith(f"model.layers.{layers}.") for k in self.files)

    def model_spec(self) -> ModelSpec:
        """The ModelSpec the planner makes from this config.json (MTP only with its tensors)."""
        try:
            spec, _ = import_hf_config(self.config)
        except UnsupportedConfig as exc:
            raise CheckpointError(f"{self.path}/config.json: {exc}") from exc
        if spec.mtp_num_layers and not self.has_mtp():
            spec = spec.model_copy(update=dict(mtp_num_layers=None))
        return spec

    def arch(self) -> ArchOptions:
        try:
            return ArchOptions.from_hf_config(self.config)
        except UnsupportedArchitecture as exc:
            raise CheckpointError(f"{self.path}/config.json: {exc}") from exc


def reference_model(spec: ModelSpec, arch: ArchOptions) -> MoETransformer:
    """The single-rank model on the meta device: names, shapes and tp attributes, no memory."""
    with torch.device("meta"):
        return MoETransformer(spec, ParallelDims.single(), arch=arch)


def model_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Parameters plus the routers' expert-bias buffers (what a checkpoint holds)."""
    out = dict(model.named_parameters())
    out.update({n: b for n, b in model.named_buffers() if n.endswith("expert_bias_E")})
    return out


def _split_dim(p: torch.Tensor) -> int:
    return getattr(p, "tp_dim", 0)


def _expected_shapes(src: Source, full_shape: tuple[int, ...], dim: int, num_experts: int) -> dict[str, tuple]:
    if src.kind == "plain":
        shape = list(full_shape)
        shape[dim] //= len(src.keys)
        return {k: tuple(shape) for k in src.keys}
    _, a, b = full_shape  # expert_in [E, D, n*F]; expert_out [E, F, D]
    piece = (b // len(src.keys), a) if src.kind == "expert_in" else (b, a)
    return {k.format(e=e): piece for k in src.keys for e in range(num_experts)}


def check_checkpoint(ckpt: HFCheckpoint, plan_model: ModelSpec) -> tuple[ModelSpec, ArchOptions]:
    """Raise CheckpointError unless the checkpoint holds exactly the plan's model: the same
    spec (fields named), every tensor present with its shape, no tensor left over. Returns the
    spec to run (the plan's, with MTP dropped when the checkpoint has no MTP tensors) and the
    architecture's options. Reads headers only."""
    spec = ckpt.model_spec()
    mine = plan_model.model_dump(exclude={"name"})
    theirs = spec.model_dump(exclude={"name"})
    if mine.get("mtp_num_layers") and not theirs.get("mtp_num_layers") and not ckpt.has_mtp():
        mine["mtp_num_layers"] = None  # the plan counted MTP layers the checkpoint does not have
    diff = sorted(k for k in mine if mine[k] != theirs.get(k))
    if diff:
        raise CheckpointError(
            f"{ckpt.path}/config.json does not describe the plan's model: "
            + "; ".join(f"{k}: plan {mine[k]!r}, checkpoint {theirs.get(k)!r}" for k in diff)
            + " (make the plan from this config: model.hf_config)")
    arch = ckpt.arch()
    try:
        sources = hf_sources(spec, ckpt.config)
    except ValueError as exc:
        raise CheckpointError(f"{ckpt.path}/config.json: {exc}") from exc
    ref = reference_model(spec, arch)
    used: set[str] = set()
    problems = []
    for name, p in model_tensors(ref).items():
        expected = _expected_shapes(sources[name], tuple(p.shape), _split_dim(p), spec.num_experts or 0)
        for key, shape in expected.items():
            used.add(key)
            if key not in ckpt.files:
                problems.append(f"tensor {key!r} is missing")
            elif ckpt.shape(key) != shape:
                problems.append(f"tensor {key!r} has shape {list(ckpt.shape(key))}, the config "
                                f"implies {list(shape)}")
    tied_head = {"lm_head.weight"} if not spec.untie_embeddings_and_output_weights else set()
    extra = sorted(k for k in set(ckpt.files) - used - tied_head if not k.endswith(_IGNORED_SUFFIXES)
                   and not (ckpt.has_mtp() and k.startswith(f"model.layers.{spec.num_layers}.")))
    if extra:
        problems.append(f"{len(extra)} tensor(s) the executor's model has no place for, e.g. "
                        + ", ".join(repr(k) for k in extra[:3]))
    if problems:
        raise CheckpointError(f"{ckpt.path}: " + "; ".join(problems[:5])
                              + (f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""))
    return plan_model.model_copy(update=dict(mtp_num_layers=spec.mtp_num_layers)), arch


def read_shard(ckpt: HFCheckpoint, src: Source, module: torch.nn.Module, pname: str,
               p: torch.Tensor) -> torch.Tensor:
    """This rank's shard of one executor tensor, read slice by slice (hf_names layouts)."""
    if src.kind == "plain":
        dim, size, rank = _split_dim(p), getattr(p, "tp_size", 1), getattr(p, "tp_rank", 0)
        parts = []
        for key in src.keys:
            n = ckpt.shape(key)[dim] // size
            parts.append(ckpt.read(key, dim, rank * n, (rank + 1) * n) if size > 1 else ckpt.read(key))
        t = torch.cat(parts, dim) if len(parts) > 1 else parts[0]
        return src.rope.to_interleaved(t) if src.rope else t
    # GroupedExperts: local experts [first_expert, +num_local), FFN columns [first_col, +shard)
    es = range(module.first_expert, module.first_expert + module.num_local)
    a, b = module.first_col, module.first_col + module.shard
    if src.kind == "expert_in":  # gate/up_e [F, D]: rows a:b, transposed to [D, Fs]
        return torch.stack([torch.cat([ckpt.read(k.format(e=e), 0, a, b).t() for k in src.keys], 1)
                            for e in es])
    return torch.stack([ckpt.read(src.keys[0].format(e=e), 1, a, b).t() for e in es])  # down_e [D, F]


@torch.no_grad()
def load_into(ckpt: HFCheckpoint, chunks: list[MoETransformer], spec: ModelSpec) -> None:
    """Copy this rank's shards of every tensor of `chunks` from the checkpoint."""
    sources = hf_sources(spec, ckpt.config)
    for chunk in chunks:
        for name, p in model_tensors(chunk).items():
            mod_name, pname = name.rsplit(".", 1)
            t = read_shard(ckpt, sources[name], chunk.get_submodule(mod_name), pname, p)
            if tuple(t.shape) != tuple(p.shape):  # check_checkpoint ran: an internal error
                raise AssertionError(f"{name}: read {list(t.shape)}, expected {list(p.shape)}")
            p.copy_(t.to(p.dtype))


def to_hf_tensors(spec: ModelSpec, config: dict[str, Any], arch: ArchOptions,
                  full: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Single-rank executor tensors -> checkpoint tensors (the inverse of read_shard)."""
    sources = hf_sources(spec, config)
    ref = model_tensors(reference_model(spec, arch))
    out: dict[str, torch.Tensor] = {}
    for name, src in sources.items():
        t = full[name]
        if src.kind == "plain":
            t = src.rope.to_rotate_half(t) if src.rope else t
            for key, piece in zip(src.keys, t.chunk(len(src.keys), _split_dim(ref[name]))):
                out[key] = piece
        elif src.kind == "expert_in":
            for e in range(t.shape[0]):
                for key, piece in zip(src.keys, t[e].chunk(len(src.keys), 1)):
                    out[key.format(e=e)] = piece.t()
        else:
            for e in range(t.shape[0]):
                out[src.keys[0].format(e=e)] = t[e].t()
    return {k: v.to(dtype).contiguous() for k, v in out.items()}


def write_checkpoint(out_dir: Path, config: dict[str, Any], tensors: dict[str, torch.Tensor],
                     max_shard_bytes: int = 2 * 2**30) -> None:
    """config.json + model-0000i-of-0000n.safetensors (at most `max_shard_bytes` each, one
    tensor at least) + model.safetensors.index.json."""
    out_dir.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key in sorted(tensors):
        nbytes = tensors[key].numel() * tensors[key].element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensors[key]
        size += nbytes
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out_dir / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (out_dir / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total},
                                                  "weight_map": weight_map}, indent=2))
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))


def export(trainer, out_dir: Path, spec: ModelSpec, config: dict[str, Any], arch: ArchOptions,
           rank: int, dtype: torch.dtype, max_shard_bytes: int = 2 * 2**30) -> None:
    """Collective: write the trained model as a Hugging Face checkpoint into `out_dir`."""
    tmp = Path(out_dir) / ".foldplan_export"
    tmp.mkdir(parents=True, exist_ok=True)
    buffers = {n: b.detach().cpu().clone() for c in trainer.chunks for n, b in model_tensors(c).items()
               if n.endswith("expert_bias_E")}
    torch.save({"portable": portable_state(trainer), "buffers": buffers}, tmp / f"rank{rank}.pt")
    dist.barrier()
    if rank == 0:
        files = sorted(tmp.glob("rank*.pt"))
        _, full = full_tensors(files)
        tensors = {name: values[0] for name, values in full.items()}
        for f in files:
            tensors.update(torch.load(f, map_location="cpu", weights_only=True)["buffers"])
        write_checkpoint(Path(out_dir), config, to_hf_tensors(spec, config, arch, tensors, dtype),
                         max_shard_bytes)
        shutil.rmtree(tmp)
    dist.barrier()
