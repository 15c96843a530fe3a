"""Scale-out on torch.distributed: one process per device under ``torchrun``.

Nothing here runs without ``WORLD_SIZE > 1`` in the environment: a plain ``bitnet train`` is
one process. DDP replicates the model; FSDP (``train.distributed: fsdp``) shards parameters,
gradients and optimiser state per decoder layer, for shapes that do not fit one device.
Checkpoints are always written as full (unsharded) tensors by rank 0.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init(device_type: str) -> DistInfo:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    info = DistInfo(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        if device_type == "cuda":
            torch.cuda.set_device(info.local_rank)
            dist.init_process_group(backend="nccl", device_id=torch.device("cuda", info.local_rank))
        else:
            dist.init_process_group(backend="gloo")
    return info


def shutdown(info: DistInfo):
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo):
    if info.enabled:
        dist.barrier()


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def wrap(model: nn.Module, strategy: str, info: DistInfo, device: torch.device) -> nn.Module:
    if not info.enabled:
        return model
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    # No buffer broadcast: the only buffers are int8_linear's cached ternary weights, which every rank
    # derives itself from identical parameters once per step.
    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False)


def unwrap(model: nn.Module) -> nn.Module:
    """The BitNetForCausalLM inside DDP / torch.compile wrappers (FSDP2 shards in place)."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or getattr(model, "_orig_mod")
    return model


def _options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True, **kw)


def full_model_state(model: nn.Module, info: DistInfo) -> dict[str, torch.Tensor]:
    """Full fp32 tensors on CPU under the module's own (HF) names; a collective under FSDP."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    if info.enabled:
        return get_model_state_dict(unwrap(model), options=_options())
    return {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()}


def full_optim_state(model: nn.Module, opt: torch.optim.Optimizer, info: DistInfo) -> dict:
    """Optimiser state keyed by parameter name, so it does not depend on the world size."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(unwrap(model), opt, options=_options())


def load_optim_state(model: nn.Module, opt: torch.optim.Optimizer, state: dict, info: DistInfo):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(unwrap(model), opt, optim_state_dict=state,
                             options=StateDictOptions(full_state_dict=True))
