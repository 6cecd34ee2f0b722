"""Validation: the mean loss over every validation sample exactly once, whatever the ranks hold.

Ranks may hold different numbers of validation batches (shards of unequal size). Under ZeRO-3 a forward
pass is a collective (parameters are gathered layer by layer), so a rank that has run out keeps running
forward passes on a placeholder batch, whose loss it does not count, until no rank has data left.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from nbp_ds.data import to_device
from nbp_ds.runtime import distributed


@torch.no_grad()
def evaluate(engine, batches: Iterable[dict], placeholder: dict, device: torch.device,
             max_batches: int = 0) -> tuple[float, int]:
    """(mean loss per target token over all ranks' samples, batches this rank counted).

    ``batches`` yields this rank's batches (on the host); ``placeholder`` is a batch of the right shapes to
    run while others still have data; ``max_batches`` (> 0) stops every rank after that many rounds."""
    it = iter(batches)
    total = torch.zeros(2, dtype=torch.float64, device=device)  # loss x tokens, tokens
    rounds = counted = 0
    while max_batches == 0 or rounds < max_batches:
        batch = next(it, None)
        if distributed.all_reduce([batch is not None], op="max").item() == 0:
            break  # every rank is done
        loss, metrics = engine(to_device(placeholder if batch is None else batch, device))
        if batch is not None:
            total += torch.stack([loss.double() * metrics["tokens"], total.new_tensor(float(metrics["tokens"]))])
            counted += 1
        rounds += 1
    total = distributed.all_reduce(total).tolist()
    return (total[0] / total[1] if total[1] > 0 else float("nan")), counted

