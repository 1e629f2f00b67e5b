"""Helpers for RecBole's distributed mode (``torch.distributed``), used by our trainers and
stage 1; RecBole's own distributed code is made to work on CPUs by :mod:`recbole_llm.compat`."""
from __future__ import annotations

from pathlib import Path

import torch


def is_distributed(config) -> bool:
    """True in a rank of a distributed run (RecBole's ``single_spec`` is False)."""
    import torch.distributed as dist

    return not config["single_spec"] and dist.is_available() and dist.is_initialized()


def world_size(config) -> int:
    """The number of processes of the run: ``torch.distributed``'s world size in a distributed run, else 1."""
    import torch.distributed as dist

    return dist.get_world_size() if is_distributed(config) else 1


def is_rank0(config) -> bool:
    """True in the one process of a run, or in rank 0 of a distributed one."""
    import torch.distributed as dist

    return world_size(config) == 1 or dist.get_rank() == 0


def sum_over_ranks(config, tensor: torch.Tensor, device) -> torch.Tensor:
    """``tensor`` summed over the ranks of a distributed run (on ``device``: NCCL reduces on the GPU);
    in one process ``tensor`` itself."""
    if world_size(config) > 1:
        import torch.distributed as dist

        tensor = tensor.to(device)
        dist.all_reduce(tensor)
    return tensor


def from_rank0(config, read):
    """Rank 0's ``read()`` on every rank of a distributed run (the others do not call it); in one
    process ``read()``."""
    value = [read() if is_rank0(config) else None]
    if world_size(config) > 1:
        import torch.distributed as dist

        dist.broadcast_object_list(value, src=0)
    return value[0]


def check_distributed_trainer(trainer_class, model_name) -> None:
    """Refuse a distributed run of a trainer whose own loop would let the ranks drift apart."""
    if getattr(trainer_class, "supports_distributed", True) is False:
        from recbole_llm.errors import InputError

        raise InputError(
            f"{model_name} trains with {trainer_class.__name__}'s own loop, which does not synchronise the "
            "processes of a distributed run; run it in one process (nproc=1, world_size=-1). LRURec, LlamaRec, "
            "E4SRec, Laser and RecBole's models run distributed."
        )


def rank0_bytes(path) -> bytes:
    """The bytes of rank 0's file ``path``, on every rank of a distributed run (rank 0 reads and
    broadcasts; the broadcast also waits for rank 0 to finish writing it)."""
    import torch.distributed as dist

    payload = [None]
    if dist.get_rank() == 0:
        try:
            payload = [Path(path).read_bytes()]
        except OSError as error:
            payload = [error]
    dist.broadcast_object_list(payload, src=0)
    if isinstance(payload[0], BaseException):
        raise payload[0]
    return payload[0]


def load_checkpoint(config, path, map_location="cpu") -> dict:
    """``torch.load`` of one of our checkpoints (``weights_only=False``: RecBole pickles its Config
    in them); in a distributed run, rank 0's file (:func:`rank0_bytes`)."""
    if not is_distributed(config):
        return torch.load(path, map_location=map_location, weights_only=False)
    import io

    return torch.load(io.BytesIO(rank0_bytes(path)), map_location=map_location, weights_only=False)
