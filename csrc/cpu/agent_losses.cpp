// Agent losses on CPU (paper section 4, eq. 10, 11; contract "Agent losses"), d_ij = 2 - 2 cos_ij:
//   c_contrastive  relu(d_iy - pos_margin) + sum_{j != y} relu(neg_margin - d_ij)
//   c_triplet      hardest: relu(margin + d_iy - min_{k != y} d_ik); all: sum over k != y;
//                  center adds d_iy
//   center_loss    d_iy
// Shards (registration.cpp): c_contrastive sums its local negatives for a row whose target is
// elsewhere (so shard losses add up to the full loss); c_triplet gives such a row loss 0 and still
// its hardest local negative; center_loss gives it 0. Ignored rows: loss 0, hardest -1, no grad.
#include <torch/library.h>

#include <limits>
#include <tuple>

#include "cpu/agent_common.h"

namespace normface {
namespace cpu {
namespace {

at::Tensor empty_losses(const at::Tensor& features) {
  return at::empty({features.size(0)}, features.options().dtype(acc_dtype(features.scalar_type())));
}

template <typename scalar_t>
std::vector<at::opmath_type<scalar_t>> upstream(const at::Tensor& grad_loss,
                                                const AgentSetup<scalar_t>& st) {
  using acc_t = at::opmath_type<scalar_t>;
  const at::Tensor g = grad_loss.to(st.unit_f.scalar_type()).contiguous();
  const acc_t* gp = g.template data_ptr<acc_t>();
  std::vector<acc_t> out(st.B);
  for (int64_t i = 0; i < st.B; ++i) out[i] = st.labels.ignored[i] ? acc_t(0) : gp[i];
  return out;
}

// Per-row loops of the dense terms over one class block (row: <f~_i, W_j> on entry), compiled for
// several vector widths (NF_SIMD_CLONES). The target column y is skipped (it is a sparse term).

// sum_{j != y} relu(bound - d_ij): the C-contrastive negatives (bound = neg_margin) and the
// all-negatives C-triplet (bound = margin + d_iy).
template <typename acc_t>
NF_SIMD_CLONES acc_t hinge_row_loss(const acc_t* row, int64_t n, int64_t y, const acc_t* inv_nw,
                                    acc_t bound) {
  acc_t s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t j = 0; j < n; ++j) {
    const acc_t d = acc_t(2) - acc_t(2) * row[j] * inv_nw[j];
    s += j == y ? acc_t(0) : relu_nan(bound - d);
  }
  return s;
}

// row <- Gc_ij / ||W_j|| = 2 g [neg_margin - d_ij > 0] / ||W_j||  (0 at the target column)
template <typename acc_t>
NF_SIMD_CLONES void contrastive_row_grad(acc_t* row, int64_t n, int64_t y, const acc_t* inv_nw,
                                         acc_t neg, acc_t two_g) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const acc_t d = acc_t(2) - acc_t(2) * row[j] * inv_nw[j];
    row[j] = (j != y && neg - d > acc_t(0)) ? two_g * inv_nw[j] : acc_t(0);
  }
}

// row <- 2 g [base - d_ik > 0] / ||W_k|| (0 at the target column); returns the active count.
template <typename acc_t>
NF_SIMD_CLONES acc_t triplet_row_grad(acc_t* row, int64_t n, int64_t y, const acc_t* inv_nw,
                                      acc_t base, acc_t two_g) {
  acc_t count = 0;
#pragma omp simd reduction(+ : count)
  for (int64_t j = 0; j < n; ++j) {
    const acc_t d = acc_t(2) - acc_t(2) * row[j] * inv_nw[j];
    const bool on = j != y && base - d > acc_t(0);
    count += on ? acc_t(1) : acc_t(0);
    row[j] = on ? two_g * inv_nw[j] : acc_t(0);
  }
  return count;
}

// ---------------------------------------------------------------- c_contrastive (eq. 10)

template <typename scalar_t>
at::Tensor contrastive_forward(const at::Tensor& features, const at::Tensor& weight,
                               const at::Tensor& labels, double pos_margin, double neg_margin,
                               int64_t ignore_index, int64_t class_start) {
  using acc_t = at::opmath_type<scalar_t>;
  at::Tensor loss = empty_losses(features);
  if (features.size(0) == 0) return loss;
  AgentSetup<scalar_t> st(features, weight, labels, ignore_index, class_start, /*dense=*/true);
  const acc_t neg = static_cast<acc_t>(neg_margin), pos = static_cast<acc_t>(pos_margin);
  const int64_t B = st.B, T = st.split.workers;
  std::vector<acc_t> part(T * B, 0);  // per worker: sum of its negatives' hinges
  walk_class_blocks(
      st,
      [&](int64_t t, int64_t i, int64_t j0, int64_t n, acc_t* row) {
        if (st.labels.ignored[i]) return;
        part[t * B + i] +=
            hinge_row_loss(row, n, st.labels.target[i] - j0, st.inv_nw.data() + j0, neg);
      },
      [](int64_t, int64_t, int64_t, const at::Tensor&, const at::Tensor&) {});
  acc_t* lp = loss.data_ptr<acc_t>();
  for (int64_t i = 0; i < B; ++i) {
    if (st.labels.ignored[i]) {
      lp[i] = 0;
      continue;
    }
    acc_t sum = st.labels.target[i] >= 0 ? relu_nan(st.d_y[i] - pos) : acc_t(0);
    for (int64_t t = 0; t < T; ++t) sum += part[t * B + i];
    lp[i] = sum;
  }
  return loss;
}

// Gc_ij = 2 g [neg_margin - d_ij > 0] (j != y), Gc_iy = -2 g [d_iy - pos_margin > 0].
template <typename scalar_t>
std::tuple<at::Tensor, at::Tensor> contrastive_backward(const at::Tensor& grad_loss,
                                                        const at::Tensor& features,
                                                        const at::Tensor& weight,
                                                        const at::Tensor& labels, double pos_margin,
                                                        double neg_margin, int64_t ignore_index,
                                                        int64_t class_start) {
  using acc_t = at::opmath_type<scalar_t>;
  AgentSetup<scalar_t> st(features, weight, labels, ignore_index, class_start, /*dense=*/true);
  const std::vector<acc_t> g = upstream(grad_loss, st);
  const acc_t neg = static_cast<acc_t>(neg_margin), pos = static_cast<acc_t>(pos_margin);
  AgentGrads<scalar_t> grads(st, st.labels.target, /*dense=*/true);
  walk_class_blocks(
      st,
      [&](int64_t, int64_t i, int64_t j0, int64_t n, acc_t* row) {
        if (st.labels.ignored[i]) {  // loss 0, no gradient
          std::fill(row, row + n, acc_t(0));
          return;
        }
        contrastive_row_grad(row, n, st.labels.target[i] - j0, st.inv_nw.data() + j0, neg,
                             acc_t(2) * g[i]);
      },
      [&](int64_t t, int64_t j0, int64_t n, const at::Tensor& p, const at::Tensor& wb) {
        grads.add_dense_block(t, j0, n, p, wb);
      });
  for (int64_t i = 0; i < st.B; ++i) {
    const int64_t y = st.labels.target[i];
    if (y >= 0 && st.d_y[i] - pos > acc_t(0)) grads.add_sparse(i, y, acc_t(-2) * g[i]);
  }
  return grads.finish();
}

// ---------------------------------------------------------------- c_triplet (eq. 11)

template <typename scalar_t>
std::tuple<at::Tensor, at::Tensor> triplet_forward(const at::Tensor& features,
                                                   const at::Tensor& weight,
                                                   const at::Tensor& labels, double margin_in,
                                                   bool hardest_only, bool center,
                                                   int64_t ignore_index, int64_t class_start) {
  using acc_t = at::opmath_type<scalar_t>;
  at::Tensor loss = empty_losses(features);
  at::Tensor hardest = at::full({features.size(0)}, -1, features.options().dtype(at::kLong));
  if (features.size(0) == 0) return {loss, hardest};
  AgentSetup<scalar_t> st(features, weight, labels, ignore_index, class_start, /*dense=*/true);
  const acc_t margin = static_cast<acc_t>(margin_in);
  // Per worker and row: hardest_only keeps the running (min d, first index), NaN winning as in
  // torch.argmin; otherwise the running sum of hinges.
  const int64_t B = st.B, T = st.split.workers;
  std::vector<acc_t> part(T * B, hardest_only ? std::numeric_limits<acc_t>::infinity() : acc_t(0));
  std::vector<int64_t> part_idx(hardest_only ? T * B : 0, -1);
  walk_class_blocks(
      st,
      [&](int64_t t, int64_t i, int64_t j0, int64_t n, acc_t* row) {
        if (st.labels.ignored[i]) return;
        const int64_t y = st.labels.target[i] - j0;
        const acc_t* inv_nw = st.inv_nw.data() + j0;
        if (hardest_only) {
          acc_t best = part[t * B + i];
          int64_t best_j = part_idx[t * B + i];
          for (int64_t j = 0; j < n; ++j) {
            const acc_t d = acc_t(2) - acc_t(2) * row[j] * inv_nw[j];
            // Strict < keeps the first of equal distances; a NaN replaces any non-NaN best once.
            if (j != y && (d < best || (d != d && best == best))) {
              best = d;
              best_j = j0 + j;
            }
          }
          part[t * B + i] = best;
          part_idx[t * B + i] = best_j;
        } else {
          if (st.labels.target[i] < 0) return;  // target elsewhere: no d_iy, loss 0
          part[t * B + i] += hinge_row_loss(row, n, y, inv_nw, margin + st.d_y[i]);
        }
      },
      [](int64_t, int64_t, int64_t, const at::Tensor&, const at::Tensor&) {});
  acc_t* lp = loss.data_ptr<acc_t>();
  int64_t* hp = hardest.data_ptr<int64_t>();
  for (int64_t i = 0; i < B; ++i) {
    if (st.labels.ignored[i]) {
      lp[i] = 0;
      continue;
    }
    acc_t v = part[i];
    if (hardest_only) {
      // Workers hold increasing class ranges: merging in order keeps the first index.
      int64_t k = part_idx[i];
      for (int64_t t = 1; t < T; ++t) {
        const acc_t d = part[t * B + i];
        if (part_idx[t * B + i] >= 0 && (d < v || (d != d && v == v))) {
          v = d;
          k = part_idx[t * B + i];
        }
      }
      hp[i] = k;
    } else {
      for (int64_t t = 1; t < T; ++t) v += part[t * B + i];
    }
    if (st.labels.target[i] < 0) {
      lp[i] = 0;
      continue;
    }
    // No negative (C = 1): min over nothing is +inf, the hinge is relu(-inf) = 0.
    const acc_t l = hardest_only ? relu_nan(margin + st.d_y[i] - v) : v;
    lp[i] = center ? l + st.d_y[i] : l;
  }
  return {loss, hardest};
}

template <typename scalar_t>
std::tuple<at::Tensor, at::Tensor> triplet_backward(
    const at::Tensor& grad_loss, const at::Tensor& features, const at::Tensor& weight,
    const at::Tensor& labels, const at::Tensor& hardest_in, double margin_in, bool hardest_only,
    bool center, int64_t ignore_index, int64_t class_start) {
  using acc_t = at::opmath_type<scalar_t>;
  AgentSetup<scalar_t> st(features, weight, labels, ignore_index, class_start,
                          /*dense=*/!hardest_only);
  const std::vector<acc_t> g = upstream(grad_loss, st);
  const acc_t margin = static_cast<acc_t>(margin_in);
  // Only rows with a local target carry a loss (and so a gradient).
  std::vector<int64_t> sparse(st.labels.target);
  if (!hardest_only) {
    // Gc_ik = 2 g [margin + d_iy - d_ik > 0]; Gc_iy = -2 g (#active + center) once all are counted.
    const int64_t B = st.B, T = st.split.workers;
    std::vector<acc_t> active(T * B, 0);  // per worker and row: active hinges
    AgentGrads<scalar_t> grads(st, sparse, /*dense=*/true);
    walk_class_blocks(
        st,
        [&](int64_t t, int64_t i, int64_t j0, int64_t n, acc_t* row) {
          if (st.labels.target[i] < 0) {  // target elsewhere or ignored: loss 0, no gradient
            std::fill(row, row + n, acc_t(0));
            return;
          }
          active[t * B + i] +=
              triplet_row_grad(row, n, st.labels.target[i] - j0, st.inv_nw.data() + j0,
                               margin + st.d_y[i], acc_t(2) * g[i]);
        },
        [&](int64_t t, int64_t j0, int64_t n, const at::Tensor& p, const at::Tensor& wb) {
          grads.add_dense_block(t, j0, n, p, wb);
        });
    for (int64_t i = 0; i < B; ++i) {
      const int64_t y = st.labels.target[i];
      if (y < 0) continue;
      acc_t count = center ? acc_t(1) : acc_t(0);
      for (int64_t t = 0; t < T; ++t) count += active[t * B + i];
      grads.add_sparse(i, y, acc_t(-2) * g[i] * count);
    }
    return grads.finish();
  }
  // hardest_only: two rows of W per sample, no matmul (kernels.md).
  // hardest was checked (common.h check_hardest: int64 (B,) in [-1, C)).
  const at::Tensor hardest = hardest_in.contiguous();
  const int64_t* hp = hardest.data_ptr<int64_t>();
  for (int64_t i = 0; i < st.B; ++i) {
    if (st.labels.target[i] >= 0 && hp[i] >= 0) sparse.push_back(hp[i]);
  }
  st.norm_rows(sparse);
  AgentGrads<scalar_t> grads(st, sparse, /*dense=*/false);
  for (int64_t i = 0; i < st.B; ++i) {
    const int64_t y = st.labels.target[i], k = hp[i];
    if (y < 0) continue;
    const bool active = k >= 0 && margin + st.d_y[i] - st.distance(i, k) > acc_t(0);
    const acc_t on = active ? acc_t(1) : acc_t(0);
    grads.add_sparse(i, y, acc_t(-2) * g[i] * (on + (center ? 1 : 0)));
    if (active) grads.add_sparse(i, k, acc_t(2) * g[i]);
  }
  return grads.finish();
}

// ---------------------------------------------------------------- center loss

template <typename scalar_t>
at::Tensor center_forward(const at::Tensor& features, const at::Tensor& weight,
                          const at::Tensor& labels, int64_t ignore_index, int64_t class_start) {
  using acc_t = at::opmath_type<scalar_t>;
  at::Tensor loss = empty_losses(features);
  if (features.size(0) == 0) return loss;
  AgentSetup<scalar_t> st(features, weight, labels, ignore_index, class_start, /*dense=*/false);
  acc_t* lp = loss.data_ptr<acc_t>();
  for (int64_t i = 0; i < st.B; ++i) lp[i] = st.labels.target[i] >= 0 ? st.d_y[i] : acc_t(0);
  return loss;
}

// Gc_iy = -2 g: one row of W per sample.
template <typename scalar_t>
std::tuple<at::Tensor, at::Tensor> center_backward(const at::Tensor& grad_loss,
                                                   const at::Tensor& features,
                                                   const at::Tensor& weight,
                                                   const at::Tensor& labels, int64_t ignore_index,
                                                   int64_t class_start) {
  using acc_t = at::opmath_type<scalar_t>;
  AgentSetup<scalar_t> st(features, weight, labels, ignore_index, class_start, /*dense=*/false);
  const std::vector<acc_t> g = upstream(grad_loss, st);
  AgentGrads<scalar_t> grads(st, st.labels.target, /*dense=*/false);
  for (int64_t i = 0; i < st.B; ++i) {
    if (st.labels.target[i] >= 0) grads.add_sparse(i, st.labels.target[i], acc_t(-2) * g[i]);
  }
  return grads.finish();
}

// ---------------------------------------------------------------- op entry points

#define NF_DISPATCH(features, name, ...)                                                    \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, (features).scalar_type(), name, \
                                  __VA_ARGS__)

at::Tensor c_contrastive_cpu(const at::Tensor& features, const at::Tensor& weight,
                             const at::Tensor& labels, double pos_margin, double neg_margin,
                             int64_t ignore_index, int64_t class_start, int64_t num_classes) {
  check_contrastive_args(features, weight, labels, pos_margin, neg_margin, ignore_index,
                         class_start, num_classes);
  at::Tensor out;
  NF_DISPATCH(features, "c_contrastive", [&] {
    out = contrastive_forward<scalar_t>(features, weight, labels, pos_margin, neg_margin,
                                        ignore_index, class_start);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> c_contrastive_backward_cpu(
    const at::Tensor& grad_loss, const at::Tensor& features, const at::Tensor& weight,
    const at::Tensor& labels, double pos_margin, double neg_margin, int64_t ignore_index,
    int64_t class_start, int64_t num_classes, bool check_data) {
  check_contrastive_args(features, weight, labels, pos_margin, neg_margin, ignore_index,
                         class_start, num_classes, check_data);
  check_per_sample("grad_loss", grad_loss, features);
  std::tuple<at::Tensor, at::Tensor> out;
  NF_DISPATCH(features, "c_contrastive_backward", [&] {
    out = contrastive_backward<scalar_t>(grad_loss, features, weight, labels, pos_margin,
                                         neg_margin, ignore_index, class_start);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> c_triplet_forward_cpu(const at::Tensor& features,
                                                         const at::Tensor& weight,
                                                         const at::Tensor& labels, double margin,
                                                         bool hardest_only, bool center,
                                                         int64_t ignore_index, int64_t class_start,
                                                         int64_t num_classes) {
  check_triplet_args(features, weight, labels, margin, ignore_index, class_start, num_classes);
  std::tuple<at::Tensor, at::Tensor> out;
  NF_DISPATCH(features, "c_triplet_forward", [&] {
    out = triplet_forward<scalar_t>(features, weight, labels, margin, hardest_only, center,
                                    ignore_index, class_start);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> c_triplet_backward_cpu(
    const at::Tensor& grad_loss, const at::Tensor& features, const at::Tensor& weight,
    const at::Tensor& labels, const at::Tensor& hardest, double margin, bool hardest_only,
    bool center, int64_t ignore_index, int64_t class_start, int64_t num_classes, bool check_data) {
  check_triplet_backward_args(grad_loss, features, weight, labels, hardest, margin, hardest_only,
                              ignore_index, class_start, num_classes, check_data);
  std::tuple<at::Tensor, at::Tensor> out;
  NF_DISPATCH(features, "c_triplet_backward", [&] {
    out = triplet_backward<scalar_t>(grad_loss, features, weight, labels, hardest, margin,
                                     hardest_only, center, ignore_index, class_start);
  });
  return out;
}

at::Tensor center_loss_cpu(const at::Tensor& features, const at::Tensor& weight,
                           const at::Tensor& labels, int64_t ignore_index, int64_t class_start,
                           int64_t num_classes) {
  check_agent_args(features, weight, labels, ignore_index, class_start, num_classes);
  at::Tensor out;
  NF_DISPATCH(features, "center_loss", [&] {
    out = center_forward<scalar_t>(features, weight, labels, ignore_index, class_start);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> center_loss_backward_cpu(
    const at::Tensor& grad_loss, const at::Tensor& features, const at::Tensor& weight,
    const at::Tensor& labels, int64_t ignore_index, int64_t class_start, int64_t num_classes,
    bool check_data) {
  check_agent_args(features, weight, labels, ignore_index, class_start, num_classes, check_data);
  check_per_sample("grad_loss", grad_loss, features);
  std::tuple<at::Tensor, at::Tensor> out;
  NF_DISPATCH(features, "center_loss_backward", [&] {
    out = center_backward<scalar_t>(grad_loss, features, weight, labels, ignore_index, class_start);
  });
  return out;
}

#undef NF_DISPATCH

}  // namespace
}  // namespace cpu
}  // namespace normface

TORCH_LIBRARY_IMPL(normface, CPU, m) {
  m.impl("c_contrastive", &normface::cpu::c_contrastive_cpu);
  m.impl("c_contrastive_backward", &normface::cpu::c_contrastive_backward_cpu);
  m.impl("c_triplet_forward", &normface::cpu::c_triplet_forward_cpu);
  m.impl("c_triplet_backward", &normface::cpu::c_triplet_backward_cpu);
  m.impl("center_loss", &normface::cpu::center_loss_cpu);
  m.impl("center_loss_backward", &normface::cpu::center_loss_backward_cpu);
}
