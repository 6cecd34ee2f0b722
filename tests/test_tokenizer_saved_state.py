"""The tokenizer trainer's checkpoint parts through a real checkpoint manager, in one process: the discriminator,
its optimizer and the LeCAM averages come back as saved; a checkpoint saved before the GAN was on leaves them
fresh; a rank the checkpoint did not have continues the clip stream from the furthest epoch."""

from __future__ import annotations

import torch

from nbp_ds.runtime.checkpoint import CheckpointManager, save_rank_state
from nbp_ds.tokenizer.clip_stream import ClipLoader
from nbp_ds.tokenizer.saved_state import ClipStreamPosition, Discriminator
from nbp_ds.tokenizer.training import LeCam, PatchDiscriminator3D
from nbp_ds.video_io import ClipSpec


def gan(seed: int):
    torch.manual_seed(seed)
    disc = PatchDiscriminator3D(channels=8, layers=2)
    opt = torch.optim.AdamW(disc.parameters(), lr=1e-3)
    disc(torch.randn(1, 3, 5, 16, 16)).mean().backward()
    opt.step()  # the optimizer has moments to keep
    return disc, opt


def test_the_discriminator_its_optimizer_and_lecam_come_back(tmp_path):
    disc, opt = gan(0)
    lecam = LeCam(0.5)
    lecam.penalty(torch.tensor([1.0, 3.0]), torch.tensor([-2.0, 0.0]))
    manager = CheckpointManager(tmp_path, keep_last=2, rank=0)
    manager.register("discriminator", Discriminator(disc, opt, lecam, rank=0))
    ref = manager.save(3)
    assert manager.require_intact(ref) == ref  # the parts' files are in the manifest

    other, other_opt = gan(1)
    fresh = LeCam(0.5)
    resumed = CheckpointManager(tmp_path, keep_last=2, rank=0)
    resumed.register("discriminator", Discriminator(other, other_opt, fresh, rank=0))
    resumed.load(resumed.latest_intact())
    assert all(torch.equal(a, b) for a, b in zip(disc.state_dict().values(), other.state_dict().values(), strict=True))
    saved_moments = opt.state_dict()["state"][0]["exp_avg"]
    assert torch.equal(other_opt.state_dict()["state"][0]["exp_avg"], saved_moments)
    assert (fresh.real, fresh.fake) == (2.0, -1.0)  # the first batch's means, with decay 0.5 once more: 2, -1


def test_a_checkpoint_saved_without_the_gan_leaves_it_fresh(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=2, rank=0)
    ref = manager.save(1)
    disc, opt = gan(2)
    before = {k: v.clone() for k, v in disc.state_dict().items()}
    lecam = LeCam(0.9)
    Discriminator(disc, opt, lecam, rank=0).load(ref)
    assert all(torch.equal(before[k], v) for k, v in disc.state_dict().items()) and lecam.real is None


def test_a_rank_the_checkpoint_did_not_have_starts_the_furthest_epoch(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=2, rank=0)
    ref = manager.save(1)
    for rank, epoch in ((0, 2), (1, 3)):  # two ranks with one loader worker each saved their positions
        save_rank_state(ref, rank, {"batches": 9, "workers": 1, "world": 2, "positions": [[epoch, 4, 1]]})
    stream = ClipLoader(["a.mp4"] * 8, ClipSpec(9, 32, 8.0, 1), batch_size=1, seed=0, rank=2, world=3, workers=0)
    ClipStreamPosition(stream, rank=2).load(ref)
    assert stream.positions == [[3, 0, 0]] and stream.batches == 0
    mine = ClipLoader(["a.mp4"] * 8, ClipSpec(9, 32, 8.0, 1), batch_size=1, seed=0, rank=1, world=2, workers=0)
    ClipStreamPosition(mine, rank=1).load(ref)  # the same layout: exactly where rank 1 was
    assert mine.positions == [[3, 4, 1]] and mine.batches == 9
