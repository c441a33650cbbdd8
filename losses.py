"""Losses over the student's head: the cross-entropy of the target tokens, and with a teacher's top-k (train.py
--kd) the distillation term beside it, with the head and the loss computed in row chunks so that the (N, V)
logits never exist at once (model.Transformer._head calls it)."""

from typing import NamedTuple

import torch
import torch.nn.functional as F


class Teacher(NamedTuple):
    """The teacher's side of a KD loss: at each of the N target positions its K likeliest tokens `ids` (N, K) and
    their log-probabilities (N, K) (distill.py's sidecar), and how the loss mixes: (1 - alpha) * cross-entropy +
    alpha * KD, where KD is temperature**2 * KL(p || q) with p the teacher's distribution renormalised over its K
    ids at `temperature`, q the student's over the same K ids (Hinton et al. 2015's T**2 keeps the gradient's
    scale as T changes)."""
    ids: torch.Tensor
    logprobs: torch.Tensor
    alpha: float
    temperature: float = 1.0


def kd_loss(logits_k, teacher):
    """Per-row KD term from the student's logits at the teacher's K ids (N, K), fp32 -> (N,) (plain autograd: the
    chunked loss computes the same, with its gradient, by hand)."""
    t = teacher.temperature
    p = (teacher.logprobs.float() / t).log_softmax(-1)
    q = (logits_k.float() / t).log_softmax(-1)
    return t * t * (p.exp() * (p - q)).sum(-1)

CE_CHUNK_ELEMENTS = 2 ** 25  # logits a chunk of the head + cross-entropy holds at once (128 MiB in fp32)


def linear_cross_entropy(x, weight, labels, teacher=None):
    """Mean cross-entropy of the logits x @ weight.T (N, V) against labels (N,), in fp32, computed in chunks of
    rows so that the whole (N, V) logits never exist at once (for N = 2,048 targets and SmolLM2's 49k vocabulary
    they would be 400 MB in fp32, twice over with their gradient). Equal to F.cross_entropy(F.linear(x,
    weight).float(), labels) with its gradients (tested to 1e-5); no rows: a zero loss with zero gradients.

    teacher (a Teacher): -> (the mixed loss, and detached, the mean cross-entropy and the mean KD term), the KD
    term's gradient added to each chunk's (tested against a dense reference to 1e-5)."""
    if x.shape[0] == 0:  # no target at all (a rank's empty share of a batch)
        zero = (x.sum() * weight.sum()).float() * 0
        return zero if teacher is None else (zero, zero.detach(), zero.detach())
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        out = _ChunkedLinearCE.apply(x, weight, labels, teacher)
        return out[0] if teacher is None else out
    sums = torch.stack([torch.stack(_chunk_loss(x[s], weight, labels[s], _rows(teacher, s), grad=False)[:2])
                        for s in _chunks(x.shape[0], weight.shape[0])]).sum(0) / x.shape[0]
    return sums[0] if teacher is None else (_mix(*sums, teacher), sums[0], sums[1])


def _mix(ce, kd, teacher):
    return (1 - teacher.alpha) * ce + teacher.alpha * kd


def _rows(teacher, s):
    return None if teacher is None else teacher._replace(ids=teacher.ids[s], logprobs=teacher.logprobs[s])


def _chunks(n, vocab):
    rows = max(1, CE_CHUNK_ELEMENTS // vocab)
    return [slice(s, min(s + rows, n)) for s in range(0, n, rows)]


def _chunk_loss(x, weight, labels, teacher=None, grad=True):
    """-> (the chunk's summed cross-entropy, its summed KD term (0 without a teacher), and with grad the logits'
    gradient of the chunk's summed loss: softmax - one-hot, or mixed with the KD term's T * (q - p) at the K ids),
    fp32."""
    logits = F.linear(x, weight).float()
    lse = logits.logsumexp(-1)
    loss = (lse - logits.gather(1, labels[:, None])[:, 0]).sum()
    kd = loss.new_zeros(())
    if teacher is not None:
        t = teacher.temperature
        p = (teacher.logprobs.float() / t).log_softmax(-1)
        q = (logits.gather(1, teacher.ids) / t).log_softmax(-1)
        kd = (t * t * (p.exp() * (p - q))).sum()
    if not grad:
        return loss, kd, None
    grad = (logits - lse[:, None]).exp_()
    grad[torch.arange(len(labels), device=labels.device), labels] -= 1
    if teacher is not None:
        grad.mul_(1 - teacher.alpha).scatter_add_(1, teacher.ids, teacher.alpha * t * (q.exp() - p.exp()))
    return loss, kd, grad


class _ChunkedLinearCE(torch.autograd.Function):
    """The forward pass computes the gradients too, chunk by chunk (each chunk's logits are freed once its
    gradients wrt x and weight are taken); the backward pass only scales them by grad_out / N."""

    @staticmethod
    def forward(ctx, x, weight, labels, teacher=None):
        loss, kd, grad_x = x.new_zeros((), dtype=torch.float32), x.new_zeros((), dtype=torch.float32), torch.empty_like(x)
        grad_w = torch.zeros_like(weight, dtype=torch.float32)
        fp32 = x.dtype == weight.dtype == torch.float32 and not torch.is_autocast_enabled(x.device.type)
        for s in _chunks(x.shape[0], weight.shape[0]):
            chunk_loss, chunk_kd, grad = _chunk_loss(x[s], weight, labels[s], _rows(teacher, s))
            loss += chunk_loss
            kd += chunk_kd
            if fp32:  # the products written in place, the sum over chunks inside the GEMM
                torch.mm(grad, weight, out=grad_x[s])
                grad_w.addmm_(grad.T, x[s])
            else:  # under autocast: each product in the autocast precision, as autograd's would be; summed in fp32
                grad_x[s] = grad.to(x.dtype) @ weight.to(x.dtype)
                grad_w += grad.T @ x[s]
        ctx.save_for_backward(grad_x, grad_w.to(weight.dtype))
        ctx.n = x.shape[0]
        loss, kd = loss / x.shape[0], kd / x.shape[0]
        ctx.mark_non_differentiable(loss, kd)
        return (loss if teacher is None else _mix(loss, kd, teacher)).clone(), loss, kd

    @staticmethod
    def backward(ctx, grad_out, _ce, _kd):
        grad_x, grad_w = ctx.saved_tensors
        scale = grad_out / ctx.n
        return grad_x * scale.to(grad_x.dtype), grad_w * scale.to(grad_w.dtype), None, None
