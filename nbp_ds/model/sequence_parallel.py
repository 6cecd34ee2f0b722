"""Context parallelism: DeepSpeed-Ulysses sequence parallelism over a group of ranks (``train.sequence_parallel``).

Every rank of a sequence-parallel group holds the same batch and runs 1/P of its sequence through the model:
embeddings, norms, MLPs and the output head are per position and run on the local shard. Attention needs the
whole sequence; DeepSpeed's ``DistributedAttention`` exchanges q, k, v with one all-to-all each, so that every
rank holds the whole sequence for 1/P of the heads, runs the project's block-causal backend on it unchanged,
and a last all-to-all gives each rank its positions back for every head. The attention rule, the backends and
the masks are those of single-rank training: this module only wraps the existing ``full`` call.

A sequence whose length P does not divide is padded at its end to the next multiple of P. The padding forms one
more block after the last one: no real position sees it (its block id is larger than every real one), it sees
everything (so no row of the attention is empty, which would give NaN), and its outputs are never read, so the
real positions' values and gradients are exactly those of the unpadded sequence.

Every rank's loss is the whole sequence's mean (its positions' sum over the sequence's count, summed over the
group); its gradient reaches each rank's own positions P times (once from every rank's loss), and ZeRO-3, which
averages gradients over all processes of the data x sequence group, divides that by P again.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch
import torch.distributed as dist

from nbp_ds.errors import ConfigError
from nbp_ds.layout import Layout
from nbp_ds.model.attention import DeviceBackend


def check_heads_divisible(n_head: int, size: int) -> None:
    """Ulysses gives each rank of the group n_head / P whole heads: refuse a head count P does not divide."""
    if size < 1 or n_head % size:
        raise ConfigError(f"train.sequence_parallel={size} must divide model.n_head={n_head}: Ulysses gives every "
                          f"rank of a sequence-parallel group n_head / sequence_parallel whole heads (pick a "
                          f"divisor of {n_head})")


def data_parallel_share(rank: int, world: int, size: int) -> tuple[int, int]:
    """(data-parallel rank, data-parallel world) of ``rank`` among ``world`` processes in sequence-parallel groups
    of ``size`` consecutive ranks (DeepSpeed's ``parallel_state_sp`` groups): the ranks of one group read the same
    batches."""
    if size < 1 or world % size:
        raise ConfigError(f"train.sequence_parallel={size} must divide the number of processes ({world}): each "
                          f"sequence-parallel group is {size} processes")
    return rank // size, world // size


@dataclass(frozen=True)
class PaddedRule:
    """The layout's block-causal rule over the sequence padded to ``seq_len`` (one more block at the end), in the
    form the attention backends read (block_ids, seq_len, allowed, is_causal, is_one_block)."""

    layout: Layout
    seq_len: int

    @cached_property
    def block_ids(self) -> np.ndarray:
        ids = self.layout.block_ids
        pad = np.full(self.seq_len - len(ids), ids.max() + 1, dtype=ids.dtype)
        return np.concatenate([ids, pad])

    def allowed(self) -> torch.Tensor:
        ids = torch.from_numpy(self.block_ids)
        return ids[None, :] <= ids[:, None]

    @cached_property
    def is_causal(self) -> bool:
        return bool(np.all(np.diff(self.block_ids) > 0))

    def is_one_block(self, start: int, end: int) -> bool:
        return bool(self.block_ids[start] == self.block_ids[end - 1])


class SequenceShard:
    """Which positions of the (padded) sequence this rank of ``group`` holds, and the collectives that split and
    join per-position values."""

    def __init__(self, layout: Layout, group: dist.ProcessGroup):
        self.layout, self.group = layout, group
        self.size, self.rank = dist.get_world_size(group), dist.get_rank(group)
        self.local_len = -(-layout.seq_len // self.size)
        self.padded_len = self.local_len * self.size
        self.start, self.stop = self.rank * self.local_len, (self.rank + 1) * self.local_len
        self._rows: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def split(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """This rank's positions of ``x`` (the whole sequence along ``dim``), padded at the end by repeating the
        last position (the padding's values are never read: see the module docstring)."""
        missing = self.padded_len - x.shape[dim]
        if missing:
            last = x.narrow(dim, x.shape[dim] - 1, 1)
            x = torch.cat([x, last.expand(*[missing if d == dim % x.dim() else -1 for d in range(x.dim())])], dim)
        return x.narrow(dim, self.start, self.local_len)

    def gather(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """The whole sequence of per-position values [.., local, ..] from every rank, padding removed (no
        gradient: for scoring, not training)."""
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim).narrow(dim, 0, self.layout.seq_len)

    def loss_rows(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows of the local shard whose targets count, the same rows in the whole sequence), on ``device``; made
        once per device, so a step reads no host value."""
        if device not in self._rows:
            rows = self.layout.loss_rows(torch.device("cpu"))
            mine = rows[(rows >= self.start) & (rows < self.stop)]
            self._rows[device] = (mine - self.start).to(device), mine.to(device)
        return self._rows[device]

    def whole_sequence(self, local: torch.Tensor) -> torch.Tensor:
        """A per-rank share of a sum -> the group's total, on every rank, with the gradient of P x the share: that
        of every rank's total with respect to this share (what summing the shares with a differentiable
        all-gather gives, as DeepSpeed's Ulysses examples do). ZeRO-3 averages gradients over all P x D ranks of
        the data x sequence group, so the update is the mean over the D data-parallel replicas of the whole
        sequence's gradient."""
        total = local.detach().clone()
        dist.all_reduce(total, group=self.group)
        return self.size * local + (total - self.size * local.detach())


class UlyssesAttention:
    """The model's attention backend with ``full`` run sequence-parallel through DeepSpeed's DistributedAttention
    (decoding, ``chunk`` and ``masked``, runs on one rank as before: it is passed to the model's own backend)."""

    def __init__(self, inner: DeviceBackend, shard: SequenceShard, n_head: int):
        from deepspeed.sequence.layer import DistributedAttention  # local: DeepSpeed takes seconds to import

        check_heads_divisible(n_head, shard.size)
        self.inner, self.shard = inner, shard
        rule = PaddedRule(inner.layout, shard.padded_len)
        self.padded = DeviceBackend(inner.name, rule, inner.head_dim, inner.flex_kernel_options)
        # [B, S/P, heads, D] in, scattered over heads (dim 2) and gathered over the sequence (dim 1)
        self.distributed = DistributedAttention(self._local_attention, shard.group, scatter_idx=2, gather_idx=1)

    def _local_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The whole padded sequence for this rank's heads, [B, S, heads/P, D], through the project's backend."""
        out = self.padded.full(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2)

    def on(self, device: torch.device):
        self.padded.on(device)
        return self.inner.on(device)

    def full(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q, k, v [B, heads, S/P, D] of this rank's positions -> the block-causal attention output for them."""
        out = self.distributed(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), batch_dim_idx=0)
        return out.transpose(1, 2)

    def chunk(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int) -> torch.Tensor:
        return self.inner.chunk(q, k, v, start)

    def masked(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.inner.masked(q, k, v, mask)
