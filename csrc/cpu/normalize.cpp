// L2 normalization along the last dim (paper eq. 3) and its backward (eq. 4), any leading shape.
#include <torch/library.h>

#include "cpu/cpu_common.h"

namespace normface {
namespace cpu {
namespace {

// 1 / sqrt(sum x^2 + eps) of one row, accumulated in acc_t.
template <typename acc_t, typename scalar_t>
acc_t inv_norm(const scalar_t* row, int64_t dim, double eps) {
  acc_t sum = 0;
  for (int64_t d = 0; d < dim; ++d) sum += static_cast<acc_t>(row[d]) * static_cast<acc_t>(row[d]);
  return acc_t(1) / std::sqrt(sum + static_cast<acc_t>(eps));
}

// x / sqrt(sum x^2 + eps), accumulated in opmath (float32 for half/bf16), stored in x's dtype.
at::Tensor l2_normalize_cpu(const at::Tensor& x_in, double eps) {
  check_normalize_args(x_in, eps);
  const at::Tensor x = x_in.contiguous();
  at::Tensor out = at::empty_like(x);
  const int64_t dim = x.size(-1);
  if (x.numel() == 0) return out;
  const int64_t rows = x.numel() / dim;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "l2_normalize", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* row = xp + r * dim;
        const acc_t inv = inv_norm<acc_t>(row, dim, eps);
        for (int64_t d = 0; d < dim; ++d)
          op[r * dim + d] = static_cast<scalar_t>(static_cast<acc_t>(row[d]) * inv);
      }
    });
  });
  return out;
}

// Eq. 4: (g - x~ <g, x~>) / ||x||, orthogonal to x (appendix 8.5). Result in x's dtype.
at::Tensor l2_normalize_backward_cpu(const at::Tensor& grad_in, const at::Tensor& x_in,
                                     double eps) {
  check_normalize_backward_args(grad_in, x_in, eps);
  const at::Tensor x = x_in.contiguous();
  const at::Tensor grad = grad_in.to(x.scalar_type()).contiguous();
  at::Tensor out = at::empty_like(x);
  const int64_t dim = x.size(-1);
  if (x.numel() == 0) return out;
  const int64_t rows = x.numel() / dim;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "l2_normalize_backward", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const scalar_t* xp = x.data_ptr<scalar_t>();
        const scalar_t* gp = grad.data_ptr<scalar_t>();
        scalar_t* op = out.data_ptr<scalar_t>();
        at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
          for (int64_t r = begin; r < end; ++r) {
            const scalar_t* row = xp + r * dim;
            const acc_t inv = inv_norm<acc_t>(row, dim, eps);
            normalize_backward_row(row, inv, gp + r * dim, inv, acc_t(0), dim, op + r * dim);
          }
        });
      });
  return out;
}

}  // namespace
}  // namespace cpu
}  // namespace normface

TORCH_LIBRARY_IMPL(normface, CPU, m) {
  m.impl("l2_normalize", &normface::cpu::l2_normalize_cpu);
  m.impl("l2_normalize_backward", &normface::cpu::l2_normalize_backward_cpu);
}
