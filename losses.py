"""Losses over the student's head: the cross-entropy of the target tokens, and with a teacher's top-k (train.py
--kd) the distillation term beside it, with the head and the loss computed in row chunks so that the (N, V)
logits never exist at once (model.Transformer._head calls it)."""

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F


class TopKTargets(NamedTuple):
    """The teacher's side of a KD loss: at each of the N target positions its K likeliest tokens `ids` (N, K) and
    their log-probabilities (N, K) (distill.py's sidecar), and how the loss mixes: (1 - alpha) * cross-entropy +
    alpha * KD, where KD is temperature**2 * KL(p || q) with p the teacher's distribution renormalised over its K
    ids at `temperature`, q the student's over the same K ids (Hinton et al. 2015's T**2 keeps the gradient's
    scale as T changes)."""
    ids: torch.Tensor
    logprobs: torch.Tensor
    alpha: float
    temperature: float = 1.0
    parts = ("ce", "kd_loss")  # the loss's parts, logged beside it (train.train_step)

    def loss(self, x, weight, labels, softcap=None):
        """The mixed loss at the N target positions (their final hidden states x) -> ({ce, kd_loss}, the loss).
        Soft-capped logits: plain autograd over the whole (N, V) logits (the chunked loss has no cap)."""
        if softcap is None:
            loss, ce, kd = linear_cross_entropy(x, weight, labels, self)
            return {"ce": ce, "kd_loss": kd}, loss
        logits = capped(F.linear(x, weight), softcap).float()
        ce, kd = F.cross_entropy(logits, labels), kd_loss(logits.gather(1, self.ids), self).mean()
        return {"ce": ce.detach(), "kd_loss": kd.detach()}, _mix(ce, kd, self)


def kl(p, q):
    """Per-row KL(p || q) from log-probabilities, fp32 -> (N,); entries where p is -inf (empty slots) add 0."""
    return torch.where(p.isneginf(), 0.0, p.exp() * (p - q)).sum(-1)


def kd_logprobs(logits_k, teacher):
    """The KD term's two distributions over the teacher's K ids, as log-probabilities at its temperature: the
    teacher's p (renormalised over the K) and the student's q (from its logits at the K ids, (N, K)). A slot the
    teacher left empty (log-probability -inf: xtok.py's projection onto a student's vocabulary) is out of both."""
    t, lp = teacher.temperature, teacher.logprobs.float()
    return (lp / t).log_softmax(-1), (logits_k.float() / t).masked_fill(lp.isneginf(), -math.inf).log_softmax(-1)


def kd_loss(logits_k, teacher):
    """Per-row KD term T^2 KL(p || q), fp32 -> (N,) (plain autograd: the chunked loss computes the same, with its
    gradient, by hand)."""
    return teacher.temperature ** 2 * kl(*kd_logprobs(logits_k, teacher))

CE_CHUNK_ELEMENTS = 2 ** 25  # logits a chunk of the head + cross-entropy holds at once (128 MiB in fp32)


def linear_cross_entropy(x, weight, labels, teacher=None):
    """Mean cross-entropy of the logits x @ weight.T (N, V) against labels (N,), in fp32, computed in chunks of
    rows so that the whole (N, V) logits never exist at once (for N = 2,048 targets and SmolLM2's 49k vocabulary
    they would be 400 MB in fp32, twice over with their gradient). Equal to F.cross_entropy(F.linear(x,
    weight).float(), labels) with its gradients (tested to 1e-5); no rows: a zero loss with zero gradients.

    teacher (TopKTargets): -> (the mixed loss, and detached, the mean cross-entropy and the mean KD term), the KD
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
        p, q = kd_logprobs(logits.gather(1, teacher.ids), teacher)
        kd = t * t * kl(p, q).sum()
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
        loss, kd = x.new_zeros((), dtype=torch.float32), x.new_zeros((), dtype=torch.float32)
        grad_x = torch.empty_like(x)
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


# -----------------------------------------------------------------------------
# On-policy distillation (train.py --on-policy): the student's own chains, graded by the teacher token by token


class Grader(NamedTuple):
    """A local teacher's view of the student's chains: its final hidden states at the N graded positions (N, d_t),
    its head (V_t, d_t) and soft-cap, and the divergence: the generalised Jensen-Shannon divergence of GKD
    (Agarwal et al. 2024) at `beta`, as TRL defines it -- 1 (the default): the reverse KL(student || teacher),
    0: the forward KL(teacher || student), between: beta * KL(teacher || m) + (1 - beta) * KL(student || m), m =
    beta * teacher + (1 - beta) * student -- exact over the vocabulary (the first min(V, V_t) tokens)."""
    hidden: torch.Tensor
    weight: torch.Tensor
    softcap: float | None = None
    beta: float = 1.0
    parts = ("divergence",)

    def loss(self, x, weight, labels, softcap=None):
        loss, shown = linear_divergence(x, weight, self, softcap)
        return {"divergence": shown}, loss


class SampledTokens(NamedTuple):
    """A served teacher's view: its log-probability of each of the N tokens the student sampled (N,). The loss
    is the sampled-token estimator of the reverse KL's gradient: sg(log q - log p) * log q at each token (the
    per-token advantage of the on-policy distillation write-ups), its value reported as their mean."""
    logprobs: torch.Tensor
    parts = ("divergence",)

    def loss(self, x, weight, labels, softcap=None):
        loss, shown = linear_sampled_kl(x, weight, labels, self, softcap)
        return {"divergence": shown}, loss


class ProjectedGrades(NamedTuple):
    """A teacher of another tokenizer grading the student's chains (xtok.py): at each of the N graded positions its
    next-token distribution carried onto the student's vocabulary, as log-probabilities (N, V) (-inf where no
    teacher piece begins with that student piece), and `aligned` (N,): False where the student token starts inside
    a teacher piece (the teacher predicted nothing from that text: no grade there, a divergence of 0). beta < 1:
    the reverse KL is unbounded where the teacher gives a student piece no mass."""
    logprobs: torch.Tensor
    aligned: torch.Tensor
    beta: float = 0.5
    parts = ("divergence",)

    def loss(self, x, weight, labels, softcap=None):
        loss, shown = linear_projected_divergence(x, weight, self, softcap)
        return {"divergence": shown}, loss


def generalized_jsd(student_logits, teacher_logits, beta):
    """Per-row divergence (fp32) between the student's and the teacher's next-token distributions (Grader)."""
    return jsd_of(student_logits.float().log_softmax(-1), teacher_logits.float().log_softmax(-1), beta)


def jsd_of(q, p, beta):
    """generalized_jsd of the two distributions as log-probabilities, the student's q and the teacher's p (-inf
    entries of p add nothing)."""
    if beta == 1:
        return kl(q, p)
    if beta == 0:
        return kl(p, q)
    m = torch.logsumexp(torch.stack((p + math.log(beta), q + math.log(1 - beta))), 0)
    return beta * kl(p, m) + (1 - beta) * kl(q, m)


def capped(logits, cap):
    return logits if cap is None else torch.tanh(logits / cap) * cap


def linear_divergence(x, weight, grader, softcap=None):
    """Mean divergence (generalized_jsd) over the N rows between the student's logits x @ weight.T (soft-capped
    as its config says) and the teacher's from grader.hidden @ grader.weight.T -> (the loss, and detached, the
    same value), in chunks of rows: neither model's (N, V) logits exist whole (chunked_head). Equal to the dense
    loss and its gradients (tested to 1e-5)."""
    vocab = min(weight.shape[0], grader.weight.shape[0])

    def rows(s, logits):
        with torch.no_grad():
            teacher = capped(F.linear(grader.hidden[s], grader.weight)[:, :vocab].float(), grader.softcap)
        loss = generalized_jsd(capped(logits[:, :vocab], softcap), teacher, grader.beta).sum()
        return loss, loss.detach()
    return chunked_head(x, weight, rows, vocab * 3)  # three (rows, V) tensors at once: two logits, a mixture


def linear_projected_divergence(x, weight, grades, softcap=None):
    """linear_divergence against ProjectedGrades: the mean over the N rows of jsd_of(the student's distribution,
    the teacher's carried onto the student's vocabulary), rows that are not aligned adding 0 -> (the loss, and
    detached, the same value), in chunks of rows."""
    def rows(s, logits):
        q = capped(logits, softcap).float().log_softmax(-1)
        loss = torch.where(grades.aligned[s], jsd_of(q, grades.logprobs[s].float(), grades.beta), 0.0).sum()
        return loss, loss.detach()
    return chunked_head(x, weight, rows, weight.shape[0] * 3)


def linear_sampled_kl(x, weight, labels, teacher, softcap=None):
    """SampledTokens' loss over the N sampled tokens `labels` -> (the loss to differentiate, and detached, the
    estimate of the reverse KL a token: mean(log q - log p)), in chunks of rows (chunked_head)."""
    def rows(s, logits):
        logq = capped(logits, softcap).float().log_softmax(-1).gather(1, labels[s, None])[:, 0]
        advantage = (logq - teacher.logprobs[s].float()).detach()
        return (advantage * logq).sum(), advantage.sum()
    return chunked_head(x, weight, rows, weight.shape[0])


def chunked_head(x, weight, rows_loss, width):
    """The mean over N rows of a loss of the student's logits x @ weight.T, a chunk of rows at a time:
    rows_loss(rows, their logits) -> (the chunk's summed loss, a summed value to report). Each chunk's gradient is
    taken as it is computed (autograd on the chunk, whose logits are then freed) and summed; the backward pass
    only scales it. -> (the mean loss, the mean reported value, detached)."""
    if x.shape[0] == 0:
        zero = (x.sum() * weight.sum()).float() * 0
        return zero, zero.detach()
    return _ChunkedHead.apply(x, weight, rows_loss, width)


class _ChunkedHead(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, rows_loss, width):
        total, shown = x.new_zeros((), dtype=torch.float32), x.new_zeros((), dtype=torch.float32)
        grad_x, grad_w = torch.zeros_like(x), torch.zeros_like(weight)
        for s in _chunks(x.shape[0], width):
            with torch.enable_grad():
                xs, w = x[s].detach().requires_grad_(), weight.detach().requires_grad_()
                loss, value = rows_loss(s, F.linear(xs, w))
                gx, gw = torch.autograd.grad(loss, (xs, w))
            total += loss.detach().float()
            shown += value.float()
            grad_x[s] += gx
            grad_w += gw
        ctx.save_for_backward(grad_x, grad_w)
        ctx.n = x.shape[0]
        shown = shown / x.shape[0]
        ctx.mark_non_differentiable(shown)
        return total / x.shape[0], shown

    @staticmethod
    def backward(ctx, grad_out, _shown):
        grad_x, grad_w = ctx.saved_tensors
        scale = grad_out / ctx.n
        return grad_x * scale.to(grad_x.dtype), grad_w * scale.to(grad_w.dtype), None, None
