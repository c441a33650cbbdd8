"""Losses over the student's head: the cross-entropy of the target tokens, with the head and the loss computed
in row chunks so that the (N, V) logits never exist at once (model.Transformer._head calls it)."""

import torch
import torch.nn.functional as F

CE_CHUNK_ELEMENTS = 2 ** 25  # logits a chunk of the head + cross-entropy holds at once (128 MiB in fp32)


def linear_cross_entropy(x, weight, labels):
    """Mean cross-entropy of the logits x @ weight.T (N, V) against labels (N,), in fp32, computed in chunks of
    rows so that the whole (N, V) logits never exist at once (for N = 2,048 targets and SmolLM2's 49k vocabulary
    they would be 400 MB in fp32, twice over with their gradient). Equal to F.cross_entropy(F.linear(x,
    weight).float(), labels) with its gradients (tested to 1e-5); no rows: a zero loss with zero gradients."""
    if x.shape[0] == 0:  # no target at all (a rank's empty share of a batch)
        return (x.sum() * weight.sum()).float() * 0
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return _ChunkedLinearCE.apply(x, weight, labels)
    return sum(_chunk_loss(x[s], weight, labels[s], grad=False)[0] for s in _chunks(x.shape[0], weight.shape[0])) / x.shape[0]


def _chunks(n, vocab):
    rows = max(1, CE_CHUNK_ELEMENTS // vocab)
    return [slice(s, min(s + rows, n)) for s in range(0, n, rows)]


def _chunk_loss(x, weight, labels, grad=True):
    """-> (the chunk's summed loss, and with grad its logits' gradient of that sum: softmax - one-hot), fp32."""
    logits = F.linear(x, weight).float()
    lse = logits.logsumexp(-1)
    loss = (lse - logits.gather(1, labels[:, None])[:, 0]).sum()
    if not grad:
        return loss, None
    grad = (logits - lse[:, None]).exp_()
    grad[torch.arange(len(labels), device=labels.device), labels] -= 1
    return loss, grad


class _ChunkedLinearCE(torch.autograd.Function):
    """The forward pass computes the gradients too, chunk by chunk (each chunk's logits are freed once its
    gradients wrt x and weight are taken); the backward pass only scales them by grad_out / N."""

    @staticmethod
    def forward(ctx, x, weight, labels):
        loss, grad_x = x.new_zeros((), dtype=torch.float32), torch.empty_like(x)
        grad_w = torch.zeros_like(weight, dtype=torch.float32)
        fp32 = x.dtype == weight.dtype == torch.float32 and not torch.is_autocast_enabled(x.device.type)
        for s in _chunks(x.shape[0], weight.shape[0]):
            chunk_loss, grad = _chunk_loss(x[s], weight, labels[s])
            loss += chunk_loss
            if fp32:  # the products written in place, the sum over chunks inside the GEMM
                torch.mm(grad, weight, out=grad_x[s])
                grad_w.addmm_(grad.T, x[s])
            else:  # under autocast: each product in the autocast precision, as autograd's would be; summed in fp32
                grad_x[s] = grad.to(x.dtype) @ weight.to(x.dtype)
                grad_w += grad.T @ x[s]
        ctx.save_for_backward(grad_x, grad_w.to(weight.dtype))
        ctx.n = x.shape[0]
        return loss / x.shape[0]

    @staticmethod
    def backward(ctx, grad_out):
        grad_x, grad_w = ctx.saved_tensors
        scale = grad_out / ctx.n
        return grad_x * scale.to(grad_x.dtype), grad_w * scale.to(grad_w.dtype), None
