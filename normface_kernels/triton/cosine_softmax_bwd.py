"""cosine_softmax backward from the forward's saved statistics (docs/kernels.md "Backward"):
grad_features, grad_scale and the ||f_i|| term in closed form (no GEMM), grad_weight in one
class-stationary kernel (2 GEMM-equivalents).

With g_i (upstream gradient of the loss, 0 for ignored rows), e_i (of the lse), p_ij the softmax,
P_i = sum_{j != y} p_ij and the target's coefficient c_i = G_iy = e_i p_iy - g_i P_i:

    grad f~_i = s a_i [(g_i + e_i) Ubar_i + c_i t'_i b_y W~_y]
    r_i       = (g_i + e_i) Rbar_i + c_i b_y t_i            (= sum_j G_ij b_j h_ij)
    grad_s    = sum_i a_i r_i,      grad_a_i = s r_i (when a_i = ||f_i||)
"""

import torch

from .cosine_softmax_fwd import STATS
from .grad_weight import SOFTMAX, grad_weight
from .row_grad import row_coefs, row_grad
from .rows import local_targets


def softmax_backward(grad_loss, grad_lse, features, weight, labels, scale, lse, stats, ubar, nw,
                     normalize_features, normalize_weight, ignore_index, class_start):
    """(grad_features, grad_weight, grad_scale) of sum_i g_i loss_i + e_i lse_i."""
    acc = stats.dtype
    dev = features.device
    st = dict(zip(STATS, stats))
    nf = st["nf"]
    norm_f, norm_w = bool(normalize_features), bool(normalize_weight)
    yl = local_targets(labels, ignore_index, class_start, weight.shape[0])
    has = yl >= 0
    zero = torch.zeros((), dtype=acc, device=dev)
    g = torch.where(yl != -2, grad_loss.to(acc), zero)
    e = grad_lse.to(acc)
    ge = g + e
    live = (g != 0) | (e != 0)  # a row with g = e = 0 contributes nothing, even if NaN
    s = scale.detach().to(device=dev, dtype=acc).reshape(())
    a = nf if not norm_f else torch.ones_like(nf)
    ra = torch.ones_like(nf) if not norm_f else 1.0 / nf  # a_i / ||f_i||
    nw_y = nw[yl.clamp(min=0).long()]
    b_y = nw_y if not norm_w else torch.ones_like(nf)
    cs_y = torch.ones_like(nf) if not norm_w else 1.0 / nw_y
    c = torch.where(has, e * st["p_y"] - g * st["p_neg"], zero)
    r = ge * st["r_bar"] + c * b_y * st["t"]

    coef = row_coefs(nf, s * a * ge, s * a * c * st["dt"] * cs_y, 0.0,
                     s * r if not norm_f else 0.0, live)
    grad_f = row_grad(features, weight, coef, yl, u=ubar)
    grad_s = torch.where(live, a * r, zero).sum()

    one = torch.ones_like(nf)
    table = torch.stack([torch.where(live, nf, one), torch.where(live, lse.to(acc), zero),
                         torch.where(live, ge * ra, zero),
                         torch.where(live & has, c * st["dt"] * ra, zero),
                         torch.where(live & has, c * a * st["t"], zero)])
    f_live = torch.where(live[:, None], features, torch.zeros((), dtype=features.dtype,
                                                                 device=dev))
    grad_w = grad_weight(f_live, weight, nw, s, yl, table, SOFTMAX, norm_f, norm_w)
    return grad_f, grad_w, grad_s.to(device=scale.device, dtype=scale.dtype).reshape(scale.shape)
