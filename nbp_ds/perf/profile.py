"""Where a training step's time goes: a torch.profiler trace and the share of the step per category.

:func:`profile_steps` runs a step function under ``torch.profiler`` (started as the trainer's ``train.profile``
starts it, nbp_ds.runtime.profiling) and writes the trace as
``<worker>.<time>.pt.trace.json`` into a folder (open it in Perfetto, chrome://tracing, or TensorBoard with
the torch-tb-profiler plugin: ``tensorboard --logdir FOLDER``). :func:`step_shares` then sorts the step's
time into categories:

    matmul | attention | norm/rope/activation | loss/head | optimizer | communication | other | idle

On a GPU the time sorted is kernel time (each kernel by its own name and the operator that launched it), and
``idle`` is the step's wall time the GPU spent on no kernel (launch overhead, host synchronisation, the host
falling behind). On the CPU it is each operator's self time, and ``idle`` the step's time in no operator
(Python). Rules, first match wins (:func:`categorize`):

* under ``Optimizer.*`` (torch optimizers record themselves so): optimizer;
* collectives (nccl / gloo / c10d): communication;
* attention kernels and everything under an attention operator (sdpa, flex, FlashAttention, cuDNN fmha);
* the output layer and the loss: everything under ``linear_cross_entropy`` (nbp_ds.model.loss records that
  range; its backward only scales stored gradients), the loss kernels (logsumexp, cross-entropy, argmax);
* other matmuls (cuBLAS / CUTLASS gemm kernels, ``aten::mm`` and friends);
* elementwise and reduction work (norms, rotary, SwiGLU, residual adds, casts, fused Triton kernels);
* anything else (embedding lookups, index copies, memcpy / memset): other.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import schedule

from nbp_ds.runtime.profiling import TRACE_GLOB, trace_profiler

CATEGORIES = ("matmul", "attention", "norm/rope/activation", "loss/head", "optimizer", "communication", "other",
              "idle")

_COMM = re.compile(r"nccl|gloo|c10d|all_reduce|allreduce|all_gather|reduce_scatter|broadcast", re.I)
_ATTENTION = re.compile(r"scaled_dot_product|flex_attention|flash|fmha|attention|sdpa|cudnn", re.I)
_LOSS = re.compile(r"logsumexp|cross_?entropy|nll_loss|log_softmax|one_hot|argmax", re.I)
_MATMUL = re.compile(r"gemm|gemv|xmma|wgmma|cutlass|nvjet|cublas|^aten::(mm|addmm|bmm|matmul|linear|_addmm)|"
                     r"triton_tem_fused_.*(mm|bmm)", re.I)
_COPY = re.compile(r"^mem(cpy|set)", re.I)  # device copies and fills (data transfer, zeroed buffers)
_TEMPLATE = re.compile(r"^triton_tem_", re.I)  # Triton template kernels that are not matmuls: flex attention
_ELEMENTWISE = re.compile(r"^triton_(poi|red|per)_|^aten::(mul|add|sub|div|rsqrt|pow|mean|silu|sigmoid|cat|neg|"
                          r"sin|cos|exp|_to_copy|to|copy_|clone|where|sum|fill_|zero_|zeros_like|ones_like|"
                          r"rms_norm|_fused_rms_norm|native_layer_norm|silu_backward|threshold|transpose|"
                          r"contiguous|reshape|view|permute|expand|split|chunk|slice|select|unsqueeze|squeeze|"
                          r"stack|narrow|empty_like)$|elementwise|vectorized|reduce_kernel|unrolled", re.I)


@dataclass(frozen=True)
class Op:
    """What the rules read of an operator: its name and the names of its enclosing operators and ranges."""

    name: str
    ancestors: tuple[str, ...] = ()


def categorize(kernel: str | None, op: Op) -> str:
    """The category of a unit of time: a device kernel named ``kernel`` launched by ``op``, or ``op``'s own CPU
    time when ``kernel`` is None."""
    names = [n for n in (kernel, op.name) if n]
    if any(a.startswith("Optimizer.") for a in op.ancestors):
        return "optimizer"
    if any(_COMM.search(n) for n in names):
        return "communication"
    is_matmul = bool((kernel and _MATMUL.search(kernel)) or _MATMUL.search(op.name))
    if any(_ATTENTION.search(n) for n in (*names, *op.ancestors)) or (
            kernel and _TEMPLATE.search(kernel) and not is_matmul):
        return "attention"
    if any(_LOSS.search(n) for n in (*names, *op.ancestors)):
        return "loss/head"
    if is_matmul:
        return "matmul"
    if kernel and _COPY.search(kernel):
        return "other"
    if any(_ELEMENTWISE.search(n) for n in names):
        return "norm/rope/activation"
    return "other"


@dataclass
class StepShares:
    """Milliseconds per step by category, over ``steps`` profiled steps of ``step_ms`` each (wall time)."""

    ms: dict[str, float]
    step_ms: float
    steps: int
    device: str

    def share(self, category: str) -> float:
        return self.ms.get(category, 0.0) / self.step_ms if self.step_ms > 0 else 0.0

    def table(self) -> str:
        lines = [f"time per step by category ({self.device}, {self.steps} profiled steps of {self.step_ms:.1f} ms)"]
        for category in CATEGORIES:
            lines.append(f"  {category:<22} {self.ms.get(category, 0.0):9.2f} ms  {100 * self.share(category):5.1f}%")
        return "\n".join(lines)


def _ancestors(event) -> tuple[str, ...]:
    names, parent = [], event.cpu_parent
    while parent is not None:
        names.append(parent.name)
        parent = parent.cpu_parent
    return tuple(names)


def _op(event) -> Op:
    return Op(event.name, _ancestors(event))


def step_shares(events, device: torch.device) -> StepShares:
    """Sort the profiled steps' time (``events``: a profiler's ``events()``) into :data:`CATEGORIES`."""
    steps = [e for e in events if e.name.startswith("ProfilerStep")]
    if not steps:
        raise ValueError("no ProfilerStep events: profile with a schedule and call prof.step() after each step")
    wall_us = sum(e.time_range.elapsed_us() for e in steps)
    ms: dict[str, float] = dict.fromkeys(CATEGORIES, 0.0)
    if device.type == "cuda":
        ops = {e.id: e for e in events if e.device_type == DeviceType.CPU}
        busy = 0.0
        for e in events:
            if e.device_type != DeviceType.CUDA or e.is_async:
                continue
            launcher = ops.get(e.linked_correlation_id)
            op = _op(launcher) if launcher is not None else Op("")
            ms[categorize(e.name, op)] += e.time_range.elapsed_us() / 1e3
            busy += e.time_range.elapsed_us()
        ms["idle"] = max(wall_us - busy, 0.0) / 1e3
    else:
        step_threads = {e.thread for e in steps}
        for e in events:
            if e.device_type != DeviceType.CPU or e.is_async or e.thread not in step_threads:
                continue
            if e.name.startswith("ProfilerStep"):
                ms["idle"] += e.self_cpu_time_total / 1e3  # the step's time in no operator
            else:
                ms[categorize(None, _op(e))] += e.self_cpu_time_total / 1e3
    n = len(steps)
    return StepShares({k: v / n for k, v in ms.items()}, wall_us / 1e3 / n, n, str(device))


def profile_steps(step: Callable[[], None], folder: Path | str, steps: int, device: torch.device,
                  worker: str = "bench_train") -> tuple[object, Path]:
    """Run ``step`` 1 + ``steps`` times under the profiler (the first untraced, a warm-up) and write the
    trace into ``folder``; (the profiler, the trace file)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    before = set(folder.glob(TRACE_GLOB))
    with trace_profiler(folder, device, worker, schedule(wait=0, warmup=1, active=steps, repeat=1)) as prof:
        for _ in range(1 + steps):
            step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            prof.step()
    written = sorted(set(folder.glob(TRACE_GLOB)) - before)
    if not written:
        raise RuntimeError(f"the profiler wrote no trace into {folder}")
    return prof, written[-1]
