"""Data-parallel training under ``torchrun``: the process group, DDP or FSDP2 wrapping, and full states.

:class:`Parallel` is the only code the trainer uses to talk to ``torch.distributed``; in a single process
(``WORLD_SIZE`` unset or 1) its every method is a no-op or the identity, so training code never branches on
the world size. FSDP checkpoints have the same single-file format as the others (:meth:`Parallel.full_state`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..devices import available
from ..distributed import all_reduce, is_distributed, rank_and_world  # noqa: F401  (the trainer imports them here)


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    """Whether ``torchrun`` started this process (it sets TORCHELASTIC_RUN_ID), one process or many."""
    return "TORCHELASTIC_RUN_ID" in os.environ


def setup_distributed() -> DistInfo:
    """Join the process group when launched by ``torchrun``: NCCL on CUDA, gloo on CPU. A one-process torchrun
    joins too, so ``--nproc_per_node 1`` runs the distributed code path (FSDP2 over one rank, the NCCL
    launch) on a single GPU. Returns this process's rank, world size and device (CUDA, else MPS for a plain
    process, else the CPU); a plain process gets rank 0 of 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    # one process without CUDA may use Apple's MPS; ranks of a CPU job use gloo
    single_mps = world == 1 and not launched_by_torchrun() and available("mps")
    device = torch.device("cuda", local) if cuda else torch.device("mps" if single_mps else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    if (world > 1 or launched_by_torchrun()) and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    return DistInfo(rank, world, device)


def cleanup_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# -- FSDP2 -------------------------------------------------------------------------------------------------

def shard_model(model: nn.Module, device: torch.device, world_size: int, bf16: bool = False) -> nn.Module:
    """Apply FSDP2 in place: each transformer block (backbone ``DecoderLayer``, autoencoder ``ResidualMLP``) is
    one unit, all-gathered just before it runs and freed after; the root unit holds the rest (embeddings,
    heads, norms, so tied weights stay in one unit). Frozen parameters (CALM's autoencoder) are left whole on
    every rank: they need no gradient sync, and CALM calls its autoencoder through methods that FSDP's
    forward hooks would not see. ``model`` may be on the CPU: each unit is moved to ``device`` as it is sharded.
    ``bf16``: gather parameters in bf16 for compute, reduce gradients in fp32 (master weights stay fp32)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from ..models.transformer import DecoderLayer
    from ..models.layers import ResidualMLP

    with torch.no_grad():
        # every rank starts from rank 0's weights, as under DDP; one tensor at a time through ``device``, so the
        # whole model never has to sit there unsharded
        for t in [*model.parameters(), *model.buffers()]:
            buf = t.to(device)
            dist.broadcast(buf, 0)
            t.copy_(buf)
        frozen = {p for p in model.parameters() if not p.requires_grad}
        for p in frozen:
            p.data = p.data.to(device)  # fully_shard does not move ignored parameters
    mesh = init_device_mesh(device.type, (world_size,))
    mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16
          else MixedPrecisionPolicy())
    for block in [m for m in model.modules() if isinstance(m, (DecoderLayer, ResidualMLP))]:
        if not any(p in frozen for p in block.parameters()):
            fully_shard(block, mesh=mesh, mp_policy=mp)
    return fully_shard(model, mesh=mesh, mp_policy=mp, ignored_params=frozen or None)


def _param_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """Parameter names in the order ``Optimizer.state_dict`` numbers the parameters."""
    names = {p: n for n, p in model.named_parameters()}
    return [names[p] for g in optimizer.param_groups for p in g["params"]]


# -- the strategy ------------------------------------------------------------------------------------------

class Parallel:
    """One process's part in data-parallel training: ``mode`` "ddp" (replicate) or "fsdp" (FSDP2: shard
    parameters, gradients and optimizer state); either is plain single-process training outside ``torchrun``
    (FSDP2 still shards over the one rank of a one-process torchrun; DDP then does not wrap). Joins the process group (``setup_distributed``) unless ``info`` is given."""

    def __init__(self, mode: str = "ddp", info: DistInfo | None = None) -> None:
        if mode not in ("ddp", "fsdp"):
            raise ValueError(f"unknown distributed mode {mode!r}; use 'ddp' or 'fsdp'")
        self.info = info if info is not None else setup_distributed()
        self.fsdp = mode == "fsdp" and dist.is_available() and dist.is_initialized()  # one-process torchrun too
        self.ddp: Any = None

    def wrap(self, model: nn.Module, device: torch.device, bf16: bool = False) -> tuple[nn.Module, nn.Module]:
        """Place ``model`` on ``device`` and wrap it (before the optimizer is built: FSDP replaces the parameters
        by sharded DTensors). Returns (the model, the module to call for training)."""
        if self.fsdp:
            shard_model(model, device, self.info.world_size, bf16=bf16)
            return model, model
        model = model.to(device)
        if self.info.world_size == 1:
            return model, model
        from torch.nn.parallel import DistributedDataParallel as DDP

        # every trainable parameter gets a gradient each step (CALM's frozen autoencoder has none to sync), so
        # find_unused_parameters is not needed; no model has buffers that change
        self.ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False)
        return model, self.ddp

    def sync_gradients(self, model: nn.Module, sync: bool) -> contextlib.AbstractContextManager[Any]:
        """A context for one micro-step's backward; ``sync=False`` skips the gradient all-reduce / reduce-scatter
        (gradient accumulation syncs on the last micro-step only)."""
        if self.fsdp:
            model.set_requires_gradient_sync(sync)  # type: ignore[operator]
        return self.ddp.no_sync() if self.ddp is not None and not sync else contextlib.nullcontext()

    @contextlib.contextmanager
    def unsharded(self, model: nn.Module) -> Iterator[None]:
        """Under FSDP, all-gather every unit once (same units, same order on every rank) and keep the full
        parameters until the block ends. Evaluation runs a different number of forwards on each rank and
        calls model methods that bypass FSDP's hooks, so it must not trigger any collective itself."""
        if not self.fsdp:
            yield
            return
        from torch.distributed.fsdp import FSDPModule, fully_shard

        fully_shard.state(model)._lazy_init()  # fix the root even if no training forward ran yet
        units = [m for m in model.modules() if isinstance(m, FSDPModule)]
        for m in units:
            m.set_reshard_after_forward(False, recurse=False)
            m.unshard()
        try:
            yield
        finally:
            for m in units:
                m.reshard()
                m.set_reshard_after_forward(m is not model, recurse=False)  # FSDP's defaults again

    def gather(self, obj: Any) -> Any:
        """Every rank's ``obj`` as a list (collective), or ``obj`` itself in a single process."""
        if not is_distributed():
            return obj
        out: list[Any] = [None] * self.info.world_size
        dist.all_gather_object(out, obj)
        return out

    def agree(self, flag: bool, device: torch.device) -> bool:
        """Rank 0's ``flag`` on every rank (decisions that collectives follow must be the same everywhere)."""
        if not is_distributed():
            return flag
        t = torch.tensor(float(flag), device=device)
        dist.broadcast(t, 0)
        return bool(t.item())

    def barrier(self) -> None:
        if is_distributed():
            dist.barrier()

    def full_state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict[str, Any], dict[str, Any]]:
        """(weights, optimizer state) as plain, unsharded state dicts in the usual format (collective under
        FSDP; valid on rank 0, where the tensors are gathered one at a time onto the CPU)."""
        if not self.fsdp:
            return model.state_dict(), optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict)

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        weights = get_model_state_dict(model, options=opts)
        by_name = get_optimizer_state_dict(model, optimizer, options=opts)
        optim: dict[str, Any] = {}
        if self.info.is_main:  # the usual numbered format: hyperparameters from the optimizer, full tensors
            optim = optimizer.state_dict()
            names = _param_names(model, optimizer)
            optim["state"] = {i: by_name["state"][n] for i, n in enumerate(names) if n in by_name["state"]}
        return weights, optim

    def load_weights(self, model: nn.Module, weights: dict[str, torch.Tensor]) -> None:
        """Load full (unsharded) weights; under FSDP every rank keeps its own shard."""
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
            set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True))
        else:
            model.load_state_dict(weights)

    def load_optimizer(self, model: nn.Module, optimizer: torch.optim.Optimizer, optim: dict[str, Any] | None) -> None:
        """Load a full optimizer state in the usual numbered format (the inverse of :meth:`full_state`)."""
        if optim is None:
            return
        if not self.fsdp:
            optimizer.load_state_dict(optim)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
        names = _param_names(model, optimizer)
        groups = [{**g, "params": [names[i] for i in g["params"]]} for g in optim["param_groups"]]
        by_name = {"state": {names[i]: s for i, s in optim["state"].items()}, "param_groups": groups}
        set_optimizer_state_dict(model, optimizer, by_name, options=StateDictOptions(full_state_dict=True))
