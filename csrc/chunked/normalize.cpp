// l2_normalize (paper eq. 3) and its backward (eq. 4) along the last dim, any leading shape, as
// row kernels of the chunked path (epilogues.h row_norms, scale_rows, finish_rows).
#include "chunked/chunked.h"

namespace normface {
namespace chunked {

at::Tensor l2_normalize(const at::Tensor& x, double eps) {
  check_normalize_args(x, eps);
  const c10::DeviceGuard guard(x.device());
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const at::Tensor xc = x.contiguous();
  at::Tensor out = at::empty_like(xc);
  const int64_t D = x.size(-1);
  const int64_t N = D == 0 ? 0 : xc.numel() / D;
  if (N == 0) return out;
  const at::Tensor rows = xc.view({N, D});
  at::Tensor out_rows = out.view({N, D});
  const at::Tensor inv = std::get<1>(norms(rows, eps));
  NF_ON_DEVICE(rows, scale_rows, rows, inv, out_rows);
  return out;
}

// (g - x~ <g, x~>) / ||x||: finish_rows with u = g / ||x||.
at::Tensor l2_normalize_backward(const at::Tensor& grad, const at::Tensor& x, double eps) {
  check_normalize_backward_args(grad, x, eps);
  const c10::DeviceGuard guard(x.device());
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const at::Tensor xc = x.contiguous();
  at::Tensor out = at::empty_like(xc);
  const int64_t D = x.size(-1);
  const int64_t N = D == 0 ? 0 : xc.numel() / D;
  if (N == 0) return out;
  FinishArgs a;
  a.x = xc.view({N, D});
  a.inv_norm = std::get<1>(norms(a.x, eps));
  a.row_scale = a.inv_norm;
  a.out = out.view({N, D});
  finish_rows(grad.to(x.scalar_type()).contiguous().view({N, D}), 0, at::Tensor(), a);
  return out;
}

}  // namespace chunked
}  // namespace normface
