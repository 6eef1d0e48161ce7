"""Streaming the full (unsharded) weights of an FSDP2 model, one tensor at a time, in HF checkpoint names.

This is what the refit path feeds to the inference engine. Each parameter is gathered with
`DTensor.full_tensor()` only when the consumer asks for it and dropped before the next one, so the peak
extra memory is one full tensor, never a second copy of the model.

Every rank must drive the generator to the end, in the same order: `full_tensor()` is a collective.

Names and layouts are the checkpoint's: `models.checkpoint_format.CheckpointFormat` reverts what transformers
converted on load (fused MoE experts, renamed modules) tensor by tensor; for dense models that is the
identity and the names are the module's `state_dict()` names.

A weight shared by two modules (tied input/output embeddings) is yielded once, under its first name
(`model.embed_tokens.weight`); inference engines re-tie `lm_head` from the config.
"""

from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor, Shard

from colocate.models.checkpoint_format import CheckpointFormat
from colocate.refit.slices import Slice
from colocate.refit.sources import Fill, Source, castable

# (HF name, full shape, dtype) of one streamed weight.
ManifestEntry = tuple[str, tuple[int, ...], torch.dtype]


def _unique_state(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    # keep_vars keeps the sharded DTensor parameters themselves: nothing is copied or gathered here.
    seen: set[int] = set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        yield name, tensor


def reshard(model: nn.Module) -> None:
    """Put every FSDP2 module back in the sharded state (the root stays unsharded after a no-grad forward).
    The FSDP modules are found once and kept on the model: walking all ~370 modules of a 28-layer model
    costs most of a millisecond at every refit."""
    fsdp = model.__dict__.get("_colocate_fsdp_modules")
    if fsdp is None:
        fsdp = model._colocate_fsdp_modules = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for module in fsdp:
        module.reshard()


def gather_groups(model: nn.Module, names: list[str]) -> dict[str, tuple[FSDPModule, str]]:
    """State-dict name -> (the FSDP module whose all-gather holds it, its name inside that module)."""
    fsdp = [(name, m) for name, m in model.named_modules() if isinstance(m, FSDPModule)]
    out = {}
    for name in names:
        # The innermost FSDP module containing the tensor owns it ("" is the root).
        prefix, module = max(((p, m) for p, m in fsdp if p == "" or name.startswith(p + ".")),
                             key=lambda pm: len(pm[0]), default=("", None))
        if module is not None:
            out[name] = (module, name[len(prefix) + 1:] if prefix else name)
    return out


def checkpoint_format(model: nn.Module) -> CheckpointFormat:
    """The model's checkpoint layout, worked out once (on meta tensors) and kept on the model."""
    fmt = getattr(model, "_colocate_checkpoint_format", None)
    if fmt is None:
        fmt = CheckpointFormat(model, {n: tuple(t.shape) for n, t in _unique_state(model)})
        model._colocate_checkpoint_format = fmt
    return fmt


def iter_full_weights(
    model: nn.Module, dtype: torch.dtype | None = None, *, fsdp_param_dtype: torch.dtype | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield `(checkpoint name, full tensor)` for each unique weight, in checkpoint layout: see
    `_iter_model_weights` for the gather and `CheckpointFormat` for the layout."""
    fmt = checkpoint_format(model)
    weights = _iter_model_weights(model, dtype, fsdp_param_dtype=fsdp_param_dtype)
    try:
        for name, tensor in weights:
            yield from fmt.convert(name, tensor)
    finally:
        weights.close()  # reshards at once if the consumer stops early


def _iter_model_weights(
    model: nn.Module, dtype: torch.dtype | None = None, *, fsdp_param_dtype: torch.dtype | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield `(name, full_tensor)` for each unique weight, gathered across ranks and cast to `dtype`.

    `fsdp_param_dtype`: the FSDP2 `MixedPrecisionPolicy.param_dtype` the model was sharded with. When it is
    `dtype` (the refit case: bf16 compute, bf16 engine), each FSDP module is gathered with its own `unshard()`:
    one all-gather per transformer block in that dtype, instead of one per parameter (Qwen2.5-1.5B: 29
    collectives, not 338). The bits are the same: FSDP casts the local shard before gathering, as below.
    Otherwise (e.g. an fp32 checkpoint of a bf16-compute model) each parameter is cast and gathered alone.
    """
    reshard(model)
    state = list(_unique_state(model))
    groups = gather_groups(model, [n for n, _ in state]) if dtype is not None and dtype == fsdp_param_dtype else {}
    current: FSDPModule | None = None
    try:
        for name, tensor in state:
            if name in groups:
                owner, local_name = groups[name]
                if owner is not current:
                    # Keep the root gathered until the end: its tensors (embeddings, final norm) come both
                    # first and last in state-dict order.
                    if current is not None and current is not model:
                        current.reshard()
                    owner.unshard()
                    current = owner
                # A copy: the consumer may hold several tensors (a bucket) past this module's reshard. One
                # device copy per tensor is far cheaper than a collective per tensor.
                yield name, owner.get_parameter(local_name).detach().clone()
                continue
            tensor = tensor.detach()
            # Cast the local shard before gathering: half the traffic for bf16, and the same bits, since a
            # cast is elementwise.
            if dtype is not None:
                tensor = tensor.to(dtype)
            yield name, tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
    finally:
        reshard(model)


def _state_refs(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """(state-dict name, module, attribute) of each unique weight, worked out once and kept on the model: a
    refit then reads `getattr(module, attribute)` (the current sharded parameter, whatever `.to()` or a load
    put there) instead of building the state dict through FSDP's hooks every time (~10 ms for 338 tensors)."""
    refs = getattr(model, "_colocate_state_refs", None)
    if refs is None:
        reshard(model)
        owner: dict[int, tuple[nn.Module, str]] = {}
        for m in model.modules():
            for attr, t in [*m._parameters.items(), *m._buffers.items()]:
                if t is not None:
                    owner.setdefault(id(t), (m, attr))
        refs = [(name, *owner[id(t)]) for name, t in _unique_state(model)]
        model._colocate_state_refs = refs
    return refs


def _local(t: torch.Tensor) -> torch.Tensor:
    # The rank's shard as a plain tensor, without DTensor's dispatch (`to_local()`, `detach()`: tens of
    # microseconds each, hundreds of tensors per refit).
    return (t._local_tensor if isinstance(t, DTensor) else t).detach()


def iter_weight_sources(
    model: nn.Module, dtype: torch.dtype | None = None, *, fsdp_param_dtype: torch.dtype | None = None
) -> Iterator[tuple[str, Source]]:
    """What `iter_full_weights` yields, for a refit sender: every weight as a `Fill` that writes it straight
    into the sender's buffer, in place of an FSDP unshard, a clone per tensor and a pack:
    - one rank: the cast of the shard (the whole tensor) is the copy into the buffer;
    - several, consecutive weights of one FSDP module sharded evenly along dim 0 (the dense families'
      projections): cast and all-gathered by one collective (as FSDP's own unshard, ~one per decoder layer)
      when the first of their fills runs; each fill copies its rows of every rank's block into the buffer
      (the concatenation of equal dim-0 shards is the tensor);
    - anything else (uneven shards, a checkpoint conversion): gathered whole at its first fill, converted.
    Every collective runs inside a fill, never in the generator itself: the ranks call their fills in
    manifest order (a sender as it packs each bucket, a rank that sends nothing as it iterates) but pull from
    the generator at different times, so a collective there would run in a different order on each rank.

    Per weight per refit this runs in Python on the critical path (338 weights for Qwen2.5-1.5B), so each
    mesh's size is asked once per call (DeviceMesh.size() recomputes it from its layout: ~15 us, three times
    a weight before), and there is no `torch.no_grad()` around the generator (entered and left at every
    `next`): every tensor it or its fills touch is detached (`_local`, `_Whole`), and the fills run later,
    outside any context the generator sets anyway."""
    if dtype is None:
        yield from iter_full_weights(model, dtype, fsdp_param_dtype=fsdp_param_dtype)
        return
    fmt = checkpoint_format(model)
    reshard(model)
    owners = _owners(model)
    run: list[tuple[str, DTensor]] = []
    mesh_sizes: dict[int, int] = {}  # id(mesh) -> its size, for the meshes alive during this call

    def sharded_evenly(t: torch.Tensor) -> int:
        """The size of `t`'s mesh if `t` is a DTensor sharded along dim 0 into equal shards over a 1-D mesh
        (FSDP2's layout without padding), else 0."""
        if not isinstance(t, DTensor):
            return 0
        mesh = t.device_mesh
        size = mesh_sizes.get(id(mesh))
        if size is None:
            size = mesh_sizes[id(mesh)] = mesh.size() if mesh.ndim == 1 else 0
        return size if size and tuple(t.placements) == SHARD0 and t.shape[0] % size == 0 else 0

    def flush() -> Iterator[tuple[str, Source]]:
        if run:
            gather = _RunGather([t for _, t in run], dtype)
            yield from ((n, gather.fill_for(k)) for k, (n, _) in enumerate(run))
            run.clear()

    for name, module, attr in _state_refs(model):
        tensor = getattr(module, attr)
        world = sharded_evenly(tensor) if fmt.is_identity(name) else 0
        if world > 1:
            if run and (owners[name] != owners[run[-1][0]] or tensor.device_mesh is not run[-1][1].device_mesh):
                yield from flush()
            run.append((name, tensor))
            continue
        yield from flush()
        if world == 1:  # one rank: the shard is the tensor
            local = _local(tensor)
            yield name, Fill(tuple(tensor.shape), dtype, local.device, lambda out, src=local: out.copy_(src))
            continue
        whole = _Whole(name, tensor, dtype, fmt)
        for piece, shape in whole.pieces:
            yield piece, whole.fill_for(piece, shape)
    yield from flush()


class _Whole:
    """One weight gathered whole at the first fill of its checkpoint tensors (one, or several for a
    conversion), converted, and dropped after the last."""

    def __init__(self, name: str, tensor: torch.Tensor, dtype: torch.dtype, fmt: CheckpointFormat) -> None:
        self.name, self.tensor, self.dtype, self.fmt = name, tensor, dtype, fmt
        self.pieces = fmt.meta(name, tuple(tensor.shape), dtype)
        self.device = _local(tensor).device
        self.parts: dict[str, torch.Tensor] | None = None
        self.left = len(self.pieces)

    def fill_for(self, piece: str, shape: tuple[int, ...]) -> Fill:
        return Fill(shape, self.dtype, self.device, lambda out: self._fill(piece, out))

    def _fill(self, piece: str, out: torch.Tensor) -> None:
        if self.parts is None:
            t = self.tensor.detach()
            if isinstance(t, DTensor):
                t = t.to(self.dtype).full_tensor()  # the cast before the gather: half the traffic, same bits
            self.parts = dict(self.fmt.convert(self.name, t))
        out.copy_(self.parts[piece])
        self.left -= 1
        if self.left == 0:
            self.parts = None


SHARD0 = (Shard(0),)


def _owners(model: nn.Module) -> dict[str, int]:
    """State-dict name -> which FSDP module's unshard would gather it (an id), worked out once."""
    owners = getattr(model, "_colocate_owners", None)
    if owners is None:
        names = [n for n, _, _ in _state_refs(model)]
        groups = gather_groups(model, names)
        owners = {n: id(groups[n][0]) if n in groups else -1 for n in names}
        model._colocate_owners = owners
    return owners


class _RunGather:
    """Consecutive weights of one FSDP module: their shards cast into one input and all-gathered by one
    collective when the first of their fills runs (every rank runs its fills in the same order); a fill
    then copies its rows of every rank's block into `out`. The gathered block is dropped after the last."""

    def __init__(self, tensors: list[DTensor], dtype: torch.dtype) -> None:
        self.locals = [_local(t) for t in tensors]
        self.shapes = [tuple(t.shape) for t in tensors]
        self.dtype = dtype
        self.group = tensors[0].device_mesh.get_group()
        self.world = tensors[0].device_mesh.size()
        self.offsets = [0]
        for local in self.locals:
            self.offsets.append(self.offsets[-1] + local.numel())
        self.block: torch.Tensor | None = None
        self.left = len(tensors)

    def fill_for(self, k: int) -> Fill:
        return Fill(self.shapes[k], self.dtype, self.locals[k].device, lambda out: self._fill(k, out),
                    slice_fn=lambda out, piece: self._fill(k, out, piece))

    def _fill(self, k: int, out: torch.Tensor, piece: Slice | None = None) -> None:
        if self.block is None:
            device = self.locals[0].device
            shards = torch.empty(self.offsets[-1], dtype=self.dtype, device=device)
            torch._foreach_copy_([shards[a:b].view(x.shape) for a, b, x in
                                  zip(self.offsets[:-1], self.offsets[1:], self.locals, strict=True)], self.locals)
            block = torch.empty(self.world * self.offsets[-1], dtype=self.dtype, device=device)
            dist.all_gather_into_tensor(block, shards, group=self.group)
            self.block = block.view(self.world, self.offsets[-1])
        a, b = self.offsets[k], self.offsets[k + 1]
        if piece is None:
            out.view(self.world, b - a).copy_(self.block[:, a:b])
        else:
            _copy_slice(out, self.block[:, a:b], self.shapes[k], piece)
        self.left -= 1
        if self.left == 0:
            self.block = None


def _copy_slice(out: torch.Tensor, blocks: torch.Tensor, shape: tuple[int, ...], piece: Slice) -> None:
    """`out` = `piece` of the tensor of `shape` whose equal dim-0 shards are the rows of `blocks` (world, n):
    only the slice's bytes are read (a shard-sliced refit)."""
    world = blocks.shape[0]
    rows = shape[0] // world
    per_rank = blocks.view(world, rows, *shape[1:])
    if piece.dim > 0:  # every rank's rows, the slice's columns
        out.view(world, rows, *out.shape[1:]).copy_(per_rank.narrow(piece.dim + 1, piece.start, piece.length))
        return
    for rank in range(world):  # the rows of the slice that this rank's shard holds
        lo, hi = max(piece.start, rank * rows), min(piece.start + piece.length, (rank + 1) * rows)
        if lo < hi:
            out[lo - piece.start:hi - piece.start].copy_(per_rank[rank, lo - rank * rows:hi - rank * rows])


def resident_weights(model: nn.Module, dtype: torch.dtype | None = None) -> list[tuple[str, torch.Tensor]] | None:
    """Every weight where it already lives whole on this rank's CUDA device, in checkpoint names and
    manifest order: the parameters themselves (fp32 master weights under bf16 compute; a one-copy refit
    casts to `dtype` as it copies). None where that is not so: sharded over several ranks, a checkpoint
    conversion that is not the identity, parameters off the GPU.

    The answer is kept on the model while every weight's local tensor stays where it was (an optimizer step
    writes in place; an offload or a load that replaces a tensor moves it): checking each of ~340 weights
    again costs ~3 ms of Python per refit, as much as the engine's copy of a 1.5B model. The kept views
    hold the old storages, so no new tensor can take the same address unseen."""
    reshard(model)
    refs = _state_refs(model)
    tensors = [_current(module, attr) for _, module, attr in refs]
    where = [(t._local_tensor if isinstance(t, DTensor) else t) for t in tensors]
    key = (dtype, [(t.data_ptr(), t.dtype) for t in where])
    kept = model.__dict__.get("_colocate_resident")
    if kept is not None and kept[0] == key:
        return kept[1]
    fmt = checkpoint_format(model)
    out = []
    for (name, _, _), t in zip(refs, tensors, strict=True):
        if isinstance(t, DTensor) and t.device_mesh.size() != 1:
            return None
        t = _local(t)
        if (not fmt.is_identity(name) or not t.is_cuda or not t.is_contiguous()
                or (dtype is not None and not castable(t.dtype, dtype))):
            return None
        out.append((name, t))
    model._colocate_resident = (key, out)
    return out


def forget_resident(model: nn.Module) -> None:
    """Drop the views `resident_weights` keeps (before the parameters leave the device: they hold its memory)."""
    model.__dict__.pop("_colocate_resident", None)


def _current(module: nn.Module, attr: str) -> torch.Tensor:
    """`getattr(module, attr)` for a parameter or buffer, without `nn.Module.__getattr__` (~2 us each)."""
    t = module._parameters.get(attr)
    return t if t is not None else module._buffers[attr]


def weights_manifest(model: nn.Module, dtype: torch.dtype | None = None) -> list[ManifestEntry]:
    """`(name, shape, dtype)` of exactly what `iter_full_weights` yields, without gathering anything."""
    kept = model.__dict__.setdefault("_colocate_manifests", {})
    if dtype is not None and dtype in kept:
        return list(kept[dtype])  # names and (global) shapes never change; the dtype is the one asked for
    fmt = checkpoint_format(model)
    out = []
    # A DTensor's .shape is the global shape, so no communication is needed. The kept references, not the
    # state dict: building that through FSDP's hooks costs ~3 ms per refit for 338 tensors.
    for name, module, attr in _state_refs(model):
        tensor = _current(module, attr)
        dt = dtype if dtype is not None else tensor.dtype
        out += [(n, shape, dt) for n, shape in fmt.meta(name, tuple(tensor.shape), dt)]
    if dtype is not None:
        kept[dtype] = out
    return list(out)
