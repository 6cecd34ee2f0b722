"""The tokenizer recipe's GAN losses as the trainer calls them (issue 36): LeCAM's formula is checked alone in
tests/test_tokenizer_losses.py; here the trainer's own step must hand it the discriminator's logits on the real
clips as the real ones and on the reconstructions as the fake ones, and add it with ``loss.lecam_weight``. The
logged ``gan/d`` of the first GAN step is rebuilt by hand from the logits the discriminator gave."""

from __future__ import annotations

import json

import pytest
import torch
from video_fixtures import dataset

from nbp_ds.cli.train_tokenizer import config_from_arguments
from nbp_ds.tokenizer import training
from nbp_ds.tokenizer.trainer import train_tokenizer


def test_the_trainer_gives_lecam_the_real_and_the_fake_logits_in_their_roles(tmp_path, monkeypatch):
    seen, penalties = [], []  # (input, output) of every discriminator call; the arguments of every LeCAM call
    forward, penalty = training.PatchDiscriminator3D.forward, training.LeCam.penalty

    def recording_forward(self, x):
        out = forward(self, x)
        seen.append((x.detach().clone(), out.detach().clone()))
        return out

    def recording_penalty(self, real_logits, fake_logits):
        penalties.append((real_logits.detach().clone(), fake_logits.detach().clone()))
        return penalty(self, real_logits, fake_logits)

    monkeypatch.setattr(training.PatchDiscriminator3D, "forward", recording_forward)
    monkeypatch.setattr(training.LeCam, "penalty", recording_penalty)
    videos = dataset(tmp_path / "videos", classes=2, per_class=2)
    cfg, _ = config_from_arguments([
        "--videos", str(videos), "--out", str(tmp_path / "run"), "--preset", "tiny", "--frames", "5",
        "--resolution", "16", "--batch-size", "2", "--workers", "1", "--log-every", "1", "--image-every", "1000",
        "--warmup", "1", "--steps", "1", "--adversarial-weight", "0.1", "--adversarial-start", "0",
        "loss.lecam_weight=10", "loss.lecam_decay=0.5", "train.threads=1"])
    threads = torch.get_num_threads()
    try:
        train_tokenizer(cfg)
    finally:
        torch.set_num_threads(threads)  # train.threads sets this process' torch, which the next tests share

    # the step calls the discriminator on the reconstruction (the generator's loss), then on the real clips and
    # on the reconstruction again (its own loss); the real clips are the input unlike the other two
    (recon, _), (real, real_logits), (recon_again, fake_logits) = seen[:3]
    assert torch.equal(recon, recon_again) and not torch.equal(real, recon)
    assert len(penalties) == 1
    given_real, given_fake = penalties[0]
    assert torch.equal(given_real, real_logits) and torch.equal(given_fake, fake_logits)

    # the logged discriminator loss: hinge + 10 x LeCAM, LeCAM's averages starting at this batch's means
    hinge = 0.5 * (torch.relu(1 - real_logits).mean() + torch.relu(1 + fake_logits).mean())
    lecam = (torch.relu(real_logits - fake_logits.mean()).pow(2).mean()
             + torch.relu(real_logits.mean() - fake_logits).pow(2).mean())
    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert row["gan/d"] == pytest.approx(float(hinge + 10 * lecam), rel=1e-5)
    assert float(lecam) > 1e-3 * float(hinge)  # the term is there to be seen
