"""KD + CE of the student's LM head without a [N, V] float32 tensor, at the cost of plain CE.

Every KD loss of losses.py (bucket, renorm, sampled; every divergence; any T) and the CE look at the
student's log-softmax at a few ids per position only: the teacher's head and tail ids at T, the label
at T=1. So the LM head, the log-softmax, the losses and their gradient run together over chunks of
positions, in the forward pass, the way fused linear cross-entropy does (Liger-Kernel; Wijmans et al.
2024, "Cut your losses in large-vocabulary language models"), here for gathered log-probs at two
temperatures and any loss of them. Per chunk, with z = h W^T (+ b) and s_T = z / T - logsumexp(z / T):
the loss of the chunk's gathered values and its gradient g (at the ids) and g_y (at the label) come
from autograd on those small tensors, then
    dL/dz = (scatter(g) - softmax(z / T) * sum(g)) / T + scatter(g_y) - softmax(z) * g_y,
    dL/dh = dL/dz W,   dL/dW += dL/dz^T h,   dL/db += sum dL/dz.
So the head costs the three matrix products of plain CE (no recomputation) and a few [chunk, V]
float32 buffers; backward only scales the stored gradients. The gradient is that of
kd_weight * kd + ce_weight * ce, the weights the trainer uses (checked in backward).

    kd_sum, ce_sum, argmax = fused_kd_ce(h, weight, bias, ids, labels, loss, targets, T, weights, chunk)
"""

from __future__ import annotations

import torch


def default_chunk(vocab: int, budget_bytes: int = 1 << 27) -> int:
    """Positions per chunk: about ``budget_bytes`` (128 MiB) for one [chunk, V] float32 buffer."""
    return max(16, budget_bytes // (4 * vocab))


class _FusedKdCe(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, bias, ids, labels, loss, targets, temperature: float, weights: tuple, chunk: int,
                need_grad: bool):
        # Under autocast the product runs in its dtype, as the model's own head would.
        dtype = torch.get_autocast_dtype(h.device.type) if torch.is_autocast_enabled(h.device.type) else weight.dtype
        w, b = weight.to(dtype), bias.to(dtype) if bias is not None else None
        T, (kd_w, ce_w) = temperature, weights
        n = h.shape[0]
        kd_sum = torch.zeros((), dtype=torch.float32, device=h.device)
        ce_sum = torch.zeros((), dtype=torch.float32, device=h.device)
        top1 = torch.empty(n, dtype=torch.long, device=h.device)
        grad_h = torch.empty_like(h) if need_grad else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_grad else None
        grad_b = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) \
            if need_grad and bias is not None else None
        for s in range(0, n, chunk):
            hc, ic, yc = h[s:s + chunk], ids[s:s + chunk], labels[s:s + chunk]
            with torch.autocast(h.device.type, enabled=False):
                z = torch.nn.functional.linear(hc.to(dtype), w, b).float()
            # One max, one exp per temperature; the exponentials are kept as the softmax for the gradient.
            m, top1[s:s + chunk] = z.max(-1)
            e_1 = torch.sub(z, m[:, None]).exp_()
            sum_1 = e_1.sum(-1)
            lse_1 = m + sum_1.log()
            s_lab = z.gather(1, yc[:, None])[:, 0] - lse_1
            if T == 1.0:
                e_t, sum_t, lse_t = e_1, sum_1, lse_1
            else:
                e_t = torch.sub(z, m[:, None]).mul_(1.0 / T).exp_()
                sum_t = e_t.sum(-1)
                lse_t = m / T + sum_t.log()
            s_ids = z.gather(1, ic) / T - lse_t[:, None]
            del z
            with torch.enable_grad():
                s_ids, s_lab = s_ids.requires_grad_(need_grad), s_lab.requires_grad_(need_grad)
                kd, ce = loss(s_ids, s_lab, *(t[s:s + chunk] if t is not None else None for t in targets))
                kd_sum += kd.detach()
                ce_sum += ce.detach()
                if not need_grad:
                    continue
                g_ids, g_lab = torch.autograd.grad(kd_w * kd + ce_w * ce, (s_ids, s_lab), allow_unused=True,
                                                   materialize_grads=True)
            # dL/dz = -softmax(z) g_y - softmax(z/T) sum(g) / T + scatters, in the buffer of exp(z - m)
            g_sum = g_ids.sum(-1)
            if T == 1.0:
                dz = e_1.mul_((-(g_lab + g_sum) / sum_1)[:, None])
            else:
                dz = e_1.mul_((-g_lab / sum_1)[:, None]).sub_(e_t.mul_((g_sum / (T * sum_t))[:, None]))
            dz.scatter_add_(1, ic, g_ids / T)
            dz.scatter_add_(1, yc[:, None], g_lab[:, None])
            grad_h[s:s + chunk] = (dz.to(dtype) @ w).to(h.dtype)
            grad_w.addmm_(dz.t(), hc.float())
            if grad_b is not None:
                grad_b.add_(dz.sum(0))
        if need_grad:
            ctx.save_for_backward(grad_h, grad_w, grad_b if grad_b is not None else torch.empty(0))
        ctx.weights, ctx.has_bias, ctx.dtypes = weights, bias is not None, (weight.dtype, getattr(bias, "dtype", None))
        ctx.mark_non_differentiable(top1)
        return kd_sum, ce_sum, top1

    @staticmethod
    def backward(ctx, g_kd, g_ce, _):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        kd_w, ce_w = ctx.weights
        # the stored gradient is of kd_w * kd + ce_w * ce: the upstream ones must be c * (kd_w, ce_w)
        c = g_ce / ce_w if ce_w else g_kd / kd_w
        if not (torch.allclose(g_kd, c * kd_w, rtol=1e-4, atol=0) and torch.allclose(g_ce, c * ce_w, rtol=1e-4, atol=0)):
            raise RuntimeError(f"fused_kd_ce was built for loss weights kd {kd_w}, ce {ce_w} but the loss weighs them "
                               f"{float(g_kd)}, {float(g_ce)}")
        return ((grad_h * c).to(grad_h.dtype), (grad_w * c).to(ctx.dtypes[0]),
                (grad_b * c).to(ctx.dtypes[1]) if ctx.has_bias else None, *(None,) * 8)


def fused_kd_ce(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, ids: torch.Tensor,
                labels: torch.Tensor, loss, targets: tuple, temperature: float, weights: tuple[float, float],
                chunk: int | None = None):
    """(KD sum, CE sum, argmax [N]) of the logits h [N, d] @ weight [V, d]^T (+ bias [V]).

    ``loss(s_ids, s_label, *targets_of_the_chunk) -> (kd_sum, ce_sum)`` takes the student's
    log-softmax at ``temperature`` at ``ids`` [c, m] and at T=1 at ``labels`` [c] for a chunk of c
    positions, with the matching rows of each [N, ...] tensor of ``targets`` (None passes through);
    the gradient (of weights[0] * kd + weights[1] * ce) is computed in the forward pass."""
    chunk = chunk or default_chunk(weight.shape[0])
    need = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad) and any(weights)
    return _FusedKdCe.apply(h, weight, bias, ids, labels, loss, tuple(targets), float(temperature),
                            (float(weights[0]), float(weights[1])), int(chunk), bool(need))
