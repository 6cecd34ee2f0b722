"""The README's promise about every decoder: a video's random draws come from a stream keyed by (seed, video
index, token position), so a video is the same whatever batch it is generated in. Shared by the CPU decoder
tests (eager, static) and the GPU ones (graph)."""

from __future__ import annotations

import torch

from nbp_ds.generate import PAPER_SAMPLING, generate

# greedy (no draws: the batch must not change a row's logits), plain sampling, guidance (twice the rows, the
# null class in the second half), and the paper's FVD sampling (top-k 16000, top-p 0.9; the top-k filters only
# a model with more codes than that)
SAMPLINGS = {
    "greedy": {"temperature": 0.0},
    "sampled": {"temperature": 1.0, "seed": 9},
    "guided": {"temperature": 1.0, "cfg_scale": 2.0, "seed": 9},
    "paper": {**PAPER_SAMPLING, "seed": 9},
}
LABELS = {5: 2, 6: 1, 7: 0, 8: 1, 9: 3}  # video index -> class; videos 6 and 8 share a class


def assert_drawn_by_video_index(model: torch.nn.Module, mode: str, sampling: dict) -> None:
    """Video 6 drawn as the middle of the batch [5, 6, 7], alone, and first of the batch [6, 9] is one video;
    video 8 of the same class, alone in the same place, is another one (when tokens are drawn at random)."""

    def draw(indices: list[int]) -> dict[int, torch.Tensor]:
        label = torch.tensor([LABELS[i] for i in indices])
        videos, stats = generate(model, len(indices), label=label, video_index=indices, mode=mode, **sampling)
        assert stats["mode"] == mode
        return dict(zip(indices, videos.cpu(), strict=True))

    alone = draw([6])[6]
    middle = draw([5, 6, 7])
    first = draw([6, 9])
    assert torch.equal(middle[6], alone), f"{mode}: video 6 in the middle of a batch differs from video 6 alone"
    assert torch.equal(first[6], alone), f"{mode}: video 6 first in another batch differs from video 6 alone"
    assert not torch.equal(middle[5], middle[7])  # the batch's videos are not all one video
    if sampling["temperature"] > 0:  # the draws follow the index, not only the class and the place in the batch
        assert not torch.equal(draw([8])[8], alone), f"{mode}: video 8 alone is video 6 alone"
