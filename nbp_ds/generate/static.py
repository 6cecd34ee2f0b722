"""The static decoder: every pass of a video with fixed shapes, no host synchronisation, CUDA graphs on a GPU.

Everything a pass touches is allocated once per decoder: the KV cache (padded to whole attention buckets), the
token buffer, the condition ids, the per-video random keys and the index of the current step. A pass picks its
step's row of the plan's tables on the device (``index_select`` by a one-element index tensor), builds its input
ids with ``Layout.input_ids_at``, attends through a ``DecodeWindow`` (cache slots written with ``index_copy_``,
read under a mask made once per pass), samples on the device and scatters the tokens into the buffer. So the
host only launches work until the video is complete, and each distinct pass shape can be captured once in a
CUDA graph and replayed for every step of that shape (95 passes of the paper's UCF-101 layout replay 8 graphs).

Eager decoding (``nbp_ds.generate.decode``) stays the reference: both draw from the same random stream, so they
give the same tokens up to floating-point rounding of the attention (masked full-length vs sliced).
"""

from __future__ import annotations

import contextlib
import weakref
from functools import lru_cache

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from nbp_ds.generate.draw import Sampling, draw_tokens
from nbp_ds.generate.plan import DEFAULT_KV_BUCKET, DecodePlan
from nbp_ds.layout import Layout
from nbp_ds.model.transformer import DecodeWindow, NBPModel

# cuDNN's attention has known faults under CUDA graphs with long masked key ranges; the memory-efficient kernel
# takes any mask and captures cleanly (FlashAttention takes no mask and is skipped by SDPA on its own)
DECODE_SDPA_BACKENDS = [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]


@lru_cache(maxsize=16)
def plan_for(layout: Layout, device: str, kv_bucket: int = DEFAULT_KV_BUCKET) -> DecodePlan:
    """The decode plan of a layout on a device, built once."""
    return DecodePlan(layout, torch.device(device), kv_bucket)


class StaticDecoder:
    """Decodes ``batch`` videos of ``model`` with ``sampling``; ``graphs`` captures each pass shape in a CUDA graph.

    Use: ``prepare(tokens, condition, keys)`` (the batch's given tokens, condition ids and random keys, copied into
    the decoder's buffers), then ``decode()``; the videos are in ``tokens`` [batch, T*H*W] when the device is done.
    The decoder keeps only a weak reference to the model: it must not outlive it (captured graphs read the
    weights where they were at capture time, so the weights must stay in place, as ``load_state_dict`` keeps them).
    """

    def __init__(self, model: NBPModel, batch: int, sampling: Sampling, graphs: bool = False,
                 kv_bucket: int = DEFAULT_KV_BUCKET, keep_unrotated: bool = False):
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        if graphs and self.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device; the model is on {self.device}")
        layout = model.layout
        self.layout, self.batch, self.sampling = layout, batch, sampling
        self.plan = plan_for(layout, str(self.device), kv_bucket)
        self.rows = 2 * batch if sampling.guided else batch  # guided: the second half runs the null class
        self.cache = model.new_cache(self.rows, self.device, self.dtype, self.plan.cache_len, keep_unrotated)
        self.tokens = torch.zeros(batch, layout.num_video_tokens, dtype=torch.long, device=self.device)
        self.condition = (torch.zeros(self.rows, layout.prefix_len, dtype=torch.long, device=self.device)
                          if layout.prefix_len else None)
        self.keys = torch.zeros(batch, dtype=torch.long, device=self.device)
        self.step_row = torch.zeros(1, dtype=torch.long, device=self.device)
        # added to the raster positions the random draws are keyed by: long sampling's place of the clip's tokens
        self.stream_offset = torch.zeros(1, dtype=torch.long, device=self.device)
        self._model = weakref.ref(model)
        # the layout's index tables and the attention backend's masks are copied to a device at their first use:
        # let that be now, not in a pass
        layout.input_ids_at(self.tokens, self.plan.groups[0].positions[0], self.condition)
        model.backend.on(self.device)
        self.graphs: list[torch.cuda.CUDAGraph] | None = None
        if graphs:
            self._capture()

    @property
    def passes(self) -> int:
        return len(self.plan)

    def prepare(self, tokens: torch.Tensor, condition: torch.Tensor | None, keys: torch.Tensor) -> None:
        """Copy a batch's inputs into the buffers: tokens [batch, T*H*W] (the given context; the rest is
        overwritten), condition ids [rows, prefix_len] (None without a prefix), random keys [batch]."""
        self.tokens.copy_(tokens)
        if self.condition is not None:
            if condition is None:
                raise ValueError("this layout has a condition prefix: prepare() needs its condition ids")
            self.condition.copy_(condition)
        self.keys.copy_(keys)

    @torch.no_grad()
    def decode(self, steps: range | list[int] | None = None) -> None:
        """Run the passes (all of them, or the steps named: a benchmark may time a subset) without waiting for the
        device: each is a fill of the step index and a graph replay (or the pass run eagerly)."""
        plan = self.plan
        with self._kernels():
            for i in range(len(plan)) if steps is None else steps:
                step = plan.steps[i]
                self.step_row.fill_(step.row)
                if self.graphs is not None:
                    self.graphs[step.group].replay()
                else:
                    self._pass(step.group)

    def _kernels(self):
        return sdpa_kernel(DECODE_SDPA_BACKENDS) if self.device.type == "cuda" else contextlib.nullcontext()

    def _pass(self, group_index: int) -> None:
        """One pass of the group's shape, for the step whose row ``step_row`` holds: only device work."""
        model = self._model()
        group = self.plan.groups[group_index]
        positions = group.positions.index_select(0, self.step_row).squeeze(0)
        read_rows = group.read_rows.index_select(0, self.step_row).squeeze(0)
        targets = group.targets.index_select(0, self.step_row).squeeze(0)
        video = self.tokens if self.rows == self.batch else torch.cat([self.tokens, self.tokens])
        ids = self.layout.input_ids_at(video, positions, self.condition)
        window = DecodeWindow(positions, self.plan.attention_mask(positions, group.shape.kv, self.dtype))
        hidden = model(ids, start=window, cache=self.cache)
        logits = model.head(hidden.index_select(1, read_rows)).float()
        sampled = draw_tokens(logits, self.sampling, self.keys, targets + self.stream_offset)
        self.tokens.scatter_(1, targets.unsqueeze(0).expand(self.batch, -1), sampled)

    def _capture(self) -> None:
        """Warm every pass up on a side stream (library handles, kernel choice, allocator), then capture each in
        its own graph; the graphs share one memory pool (they never run at the same time)."""
        current = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(current)
        with torch.no_grad(), self._kernels():
            with torch.cuda.stream(side):
                for g in range(len(self.plan.groups)):
                    self.step_row.zero_()
                    self._pass(g)
            current.wait_stream(side)
            pool = torch.cuda.graph_pool_handle()
            graphs = []
            for g in range(len(self.plan.groups)):
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self._pass(g)
                graphs.append(graph)
        # the warm-up wrote finite values; clear them anyway so that no slot ever holds something stale
        self.cache.k.zero_()
        self.cache.v.zero_()
        if self.cache.unrotated_k is not None:
            self.cache.unrotated_k.zero_()
        self.tokens.zero_()
        self.graphs = graphs
