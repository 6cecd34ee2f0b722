"""The output layer fused with cross-entropy.

A 64,000-way head over every position of a micro-batch would hold B x S x 64,000 logits (fp32: 2.6 GB per
sequence-batch of 8 x 1281), and a head checkpointed per chunk computes its matmul twice. Here the rows go
through the head a chunk at a time, and each chunk's whole contribution is finished in the forward pass:

    logits = h @ W^T                       (the compute dtype: bf16 on a GPU)
    loss  += logsumexp(logits) - logits[target]          (fp32)
    correct += argmax(logits) == target
    g      = softmax(logits) - onehot(target)            (d loss / d logits, back in the compute dtype)
    dh     = g @ W,   dW += g^T @ h                      (the two gradient matmuls)

so the head costs three matmuls (forward and the two gradients, as an unfused head would) and no recompute,
only one chunk of logits is ever alive, and backward only scales the stored gradients by the incoming one.
The elementwise middle (logsumexp, argmax, softmax, one-hot) is one compiled kernel when ``compiled``.

Gradients with respect to the weight are accumulated over chunks in fp32 (one rounding to the weight's dtype
at the end, as one unchunked matmul would round).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

LossTerms = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def loss_terms(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For logits [n, V] and targets [n]: (summed cross-entropy in fp32, number of correct argmax predictions,
    d loss_sum / d logits in the logits' dtype)."""
    x = logits.float()
    lse = torch.logsumexp(x, dim=-1)
    target_logit = x.gather(1, targets.unsqueeze(1)).squeeze(1)
    correct = (x.argmax(dim=-1) == targets).sum()
    grad = torch.exp(x - lse.unsqueeze(1))  # softmax
    # minus one at each row's target, in place (a one-hot matrix would be another [n, V] tensor when eager)
    grad.scatter_add_(1, targets.unsqueeze(1), torch.full_like(target_logit, -1.0).unsqueeze(1))
    return (lse - target_logit).sum(), correct, grad.to(logits.dtype)


def loss_only(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed cross-entropy in fp32, number of correct argmax predictions), for evaluation."""
    x = logits.float()
    target_logit = x.gather(1, targets.unsqueeze(1)).squeeze(1)
    return (torch.logsumexp(x, dim=-1) - target_logit).sum(), (x.argmax(dim=-1) == targets).sum()


_compiled: dict[str, Callable] = {}


def _kernel(fn: Callable, compiled: bool) -> Callable:
    """``fn``, or its compiled form (made once; the row count is dynamic, so a last, shorter chunk reuses it)."""
    if not compiled:
        return fn
    if fn.__name__ not in _compiled:
        _compiled[fn.__name__] = torch.compile(fn, fullgraph=True)
    compiled_fn = _compiled[fn.__name__]

    def call(logits: torch.Tensor, targets: torch.Tensor):
        torch._dynamo.maybe_mark_dynamic(logits, 0)
        torch._dynamo.maybe_mark_dynamic(targets, 0)
        return compiled_fn(logits, targets)

    return call


class _LinearCrossEntropy(torch.autograd.Function):
    """(loss_sum, correct) of ``hidden @ weight.T`` against ``targets``, gradients made in the forward pass."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int,
                terms: LossTerms) -> tuple[torch.Tensor, torch.Tensor]:
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        n = hidden.shape[0]
        loss = hidden.new_zeros((), dtype=torch.float32)
        correct = hidden.new_zeros((), dtype=torch.long)
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
        for lo in range(0, n, chunk):
            h, t = hidden[lo:lo + chunk], targets[lo:lo + chunk]
            part_loss, part_correct, g = terms(h @ weight.t(), t)
            loss += part_loss
            correct += part_correct
            if need_hidden:
                torch.mm(g, weight, out=grad_hidden[lo:lo + chunk])
            if need_weight and g.dtype == grad_weight.dtype:
                grad_weight.addmm_(g.t(), h)
            elif need_weight:
                grad_weight += g.t() @ h  # a bf16 product added in place into fp32: no fp32 temporary
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        ctx.mark_non_differentiable(correct)
        return loss, correct

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor, _grad_correct: torch.Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is not None:  # the scale (1 / rows, 1 / accumulation) applied in fp32, rounded once
            grad_hidden = (grad_hidden.float() * grad_loss).to(grad_hidden.dtype)
        if grad_weight is not None:
            grad_weight = (grad_weight * grad_loss).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int,
                         compiled: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed cross-entropy, number of correct argmax predictions) of the logits ``hidden @ weight.T``.

    hidden [n, d] and weight [V, d] in the compute dtype; targets [n] in [0, V) (every row counts). The rows
    go through in chunks of ``chunk``; see the module docstring for what is stored and when. Under no_grad,
    or when neither input needs a gradient, no gradient is computed."""
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    with torch.profiler.record_function("linear_cross_entropy"):  # a named range for profiles (nbp_ds.perf)
        if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
            return _LinearCrossEntropy.apply(hidden, weight, targets, chunk, _kernel(loss_terms, compiled))
        return _evaluate(hidden, weight, targets, chunk, _kernel(loss_only, compiled))


def _evaluate(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int,
              terms: Callable) -> tuple[torch.Tensor, torch.Tensor]:
    loss = hidden.new_zeros((), dtype=torch.float32)
    correct = hidden.new_zeros((), dtype=torch.long)
    with torch.no_grad():
        for lo in range(0, hidden.shape[0], chunk):
            part_loss, part_correct = terms(hidden[lo:lo + chunk] @ weight.t(), targets[lo:lo + chunk])
            loss += part_loss
            correct += part_correct
    return loss, correct
