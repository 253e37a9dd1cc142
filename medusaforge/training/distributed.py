"""torch.distributed for `medusaforge train` under torchrun: process group, data slicing, reductions.

A run launched by `torchrun --nproc-per-node N ...` finds RANK/WORLD_SIZE/LOCAL_RANK in its
environment; a plain `medusaforge train` has none and runs as a world of one, where every helper
here is a no-op. The design keeps results independent of the number of processes:

- `--batch-size` is the *global* micro-batch. The seeded schedule in train.py fixes which
  conversations form each global micro-batch; rank r takes `batch[r::world_size]` of it (what a
  DistributedSampler does to an index list), so 1 process and N processes see the same batches.
- The loss is normalised by the target-token count of the whole global optimizer step (the counts
  are all-reduced), so the gradients summed over ranks are exactly the single-process gradients.
- Only rank 0 writes files and prints; metrics are all-reduced sums, so they are global means.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class DistributedContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        """Rank 0: the only process that writes files, logs and shows a progress bar."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_distributed(device: torch.device) -> DistributedContext:
    """Join the process group torchrun set up (nccl on CUDA, gloo on CPU); a world of one otherwise.

    On CUDA each process takes the GPU of its LOCAL_RANK, whatever index `device` named.
    """
    if not launched_by_torchrun():
        return DistributedContext(device=device)
    rank = int(os.environ["RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        # device_id binds NCCL's communicator to this GPU up front (avoids a lazy-init hang on mismatch).
        dist.init_process_group(backend=backend, device_id=device if device.type == "cuda" else None)
    return DistributedContext(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def shutdown_distributed(context: DistributedContext) -> None:
    if context.enabled and dist.is_initialized():
        dist.destroy_process_group()


def barrier(context: DistributedContext) -> None:
    if context.enabled:
        dist.barrier()


@contextmanager
def main_process_first(context: DistributedContext):
    """Rank 0 runs the block first (e.g. converting a model or tokenizing data into the shared cache),
    then the others run it and find the cache filled."""
    if not context.is_main:
        barrier(context)
    yield
    if context.is_main:
        barrier(context)


def rank_slice(global_batch: list[int], rank: int, world_size: int) -> list[int]:
    """This rank's share of a global micro-batch: every world_size-th example starting at `rank`.

    Strided rather than contiguous so ranks get similar mixes when the schedule sorts nothing.
    A short last batch can leave a rank with an empty list; see `placeholder_slice`.
    """
    return global_batch[rank::world_size]


def placeholder_slice(global_batch: list[int], rank: int, world_size: int) -> tuple[list[int], bool]:
    """(indices, is_placeholder). A rank whose slice is empty still has to join the backward pass
    (DDP's gradient all-reduce needs every rank), so it runs the batch's first example with its loss
    mask cleared: zero loss, zero gradient, zero counts. Results stay those of the global batch."""
    indices = rank_slice(global_batch, rank, world_size)
    if indices:
        return indices, False
    return global_batch[:1], True


def all_reduce_sum(tensor: torch.Tensor, context: DistributedContext) -> torch.Tensor:
    """Sum a small tensor over ranks (in place, and returned). A host-device sync on CUDA."""
    if context.enabled:
        original_device = tensor.device
        # nccl reduces CUDA tensors only; gloo CPU tensors only.
        work = tensor.to(context.device) if context.device.type == "cuda" else tensor
        dist.all_reduce(work, op=dist.ReduceOp.SUM)
        if work is not tensor:
            tensor.copy_(work.to(original_device))
    return tensor


def all_gather_objects(value, context: DistributedContext) -> list:
    """[value of rank 0, value of rank 1, ...]; [value] in a world of one."""
    if not context.enabled:
        return [value]
    gathered = [None] * context.world_size
    dist.all_gather_object(gathered, value)
    return gathered


class HeadsWithLoss(nn.Module):
    """The heads and their loss as one forward call. DDP hooks its gradient all-reduce into
    forward, and the loss calls head methods rather than `heads(...)`, so this gives DDP a forward."""

    def __init__(self, heads: nn.Module, loss_fn, chunk_size: int) -> None:
        super().__init__()
        self.heads = heads
        self.loss_fn = loss_fn
        self.chunk_size = chunk_size

    def forward(self, hidden, input_ids, loss_mask):
        return self.loss_fn(self.heads, hidden, input_ids, loss_mask, self.chunk_size)


def wrap_heads_for_ddp(module: nn.Module, context: DistributedContext) -> nn.Module:
    """DDP around the trainable heads (broadcasts rank 0's weights, then averages gradients)."""
    if not context.enabled:
        return module
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [context.device.index] if context.device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=device_ids)


def shard_frozen_base(base: nn.Module, context: DistributedContext, keep_whole: tuple[nn.Parameter, ...] = ()) -> None:
    """FSDP2 `fully_shard` of the frozen base: each decoder layer, then the decoder as the root.

    For bases too big for one device. Parameters are all-gathered layer by layer in forward and
    freed after. The lm_head (on the CausalLM wrapper, outside the decoder) stays whole on every
    rank, because the heads are initialised from it and `--shared-lm-head` projects with it.
    `keep_whole` are decoder parameters used outside the decoder's forward (the EAGLE-3 draft
    embeds its tokens with the base embedding): FSDP ignores them, so they stay plain tensors.
    Call after anything that reads the full base weights (fingerprint, lm_head copy).
    """
    if not context.enabled:
        return
    from torch.distributed.fsdp import fully_shard

    decoder = base.get_decoder()
    layers = getattr(decoder, "layers", None)
    if layers is None:
        raise ValueError(f"{type(base).__name__}: --fsdp-base needs a decoder with a .layers list")
    decoder_class = type(decoder)
    for layer in layers:
        fully_shard(layer)
    fully_shard(decoder, ignored_params=set(keep_whole) or None)
    keep_output_capture(decoder, decoder_class)


def keep_output_capture(module: nn.Module, original_class: type) -> None:
    """fully_shard swaps a module's class for an FSDP subclass, and transformers 5 looks up what a model
    may record (`output_hidden_states`, which EAGLE-3 reads) by its class name: without this the
    sharded decoder returns hidden_states=None. Registers the original class's entry under the new one
    (a private registry of transformers 5; nothing to do where it does not exist)."""
    try:
        from transformers.utils.output_capturing import _CAN_RECORD_REGISTRY
    except ImportError:
        return
    specs = dict.get(_CAN_RECORD_REGISTRY, str(original_class))
    if specs:
        _CAN_RECORD_REGISTRY[module] = specs
