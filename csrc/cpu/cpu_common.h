// Helpers shared by the CPU kernels (csrc/cpu/*.cpp). The math is in docs/kernels.md; this file
// holds the pieces every op repeats: accumulation dtype, NaN-propagating max/relu, row norms,
// labels -> local targets, the class-block walk and the backward of L2 normalization (eq. 4).
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "common.h"

// The per-element epilogue loops (exp, margins, hinges) are compiled three times and picked at load
// time by the CPU (GCC function multiversioning): AVX-512, AVX2+FMA, or the baseline x86-64 build.
// setup.py builds for the baseline, whose 4-wide SSE loops would be the bottleneck.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define NF_SIMD_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define NF_SIMD_CLONES
#endif

namespace normface {
namespace cpu {

// The class walk of every dense op (kernels.md): classes in blocks; the blocks are cut into
// `workers` contiguous ranges, one per thread, each with its own scratch and partial results that
// are merged once at the end. One parallel region per call (no barrier per block, which costs
// dearly on a busy machine), and at::mm inside it runs single-threaded BLAS on the worker's block.
// A (B, block) tile of ~1 MB stays in cache; extra memory O(workers * (B * block + B * D)).
struct ClassSplit {
  int64_t block = 1, num_blocks = 0, workers = 1;
  ClassSplit(int64_t batch, int64_t num_classes) {
    const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
    block = (int64_t{1} << 18) / std::max<int64_t>(batch, 1);
    block = std::min<int64_t>(std::max<int64_t>(block, 256), 4096);
    // At least one block per thread when there are enough classes.
    block = std::max<int64_t>(1, std::min(block, (num_classes + threads - 1) / threads));
    num_blocks = (num_classes + block - 1) / block;
    workers = std::max<int64_t>(1, std::min(num_blocks, threads));
  }
};

// fn(worker, j0, n) for every class block [j0, j0 + n), in class order within a worker.
template <typename Fn>
void parallel_class_blocks(const ClassSplit& sp, int64_t num_classes, Fn&& fn) {
  at::parallel_for(0, sp.workers, 1, [&](int64_t t_begin, int64_t t_end) {
    // The caller runs below autograd, but that dispatch state is thread-local and the pool's
    // threads do not inherit it: without this guard at::mm on a block of a weight that requires
    // grad would be routed through autograd.
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    for (int64_t t = t_begin; t < t_end; ++t) {
      const int64_t b_end = (t + 1) * sp.num_blocks / sp.workers;
      for (int64_t b = t * sp.num_blocks / sp.workers; b < b_end; ++b) {
        const int64_t j0 = b * sp.block;
        fn(t, j0, std::min(sp.block, num_classes - j0));
      }
    }
  });
}

// relu_nan (torch.relu with NaN propagation) is in common.h, shared with the chunked path.

// max that lets NaN win (std::max drops a NaN in its second argument; contract: NaN -> NaN loss).
template <typename T>
inline T max_nan(T a, T b) {
  return (b > a || b != b) ? b : a;
}

// exp for float in a form GCC vectorizes (Cephes expf: Cody-Waite reduction by ln 2 and a degree-5
// minimax polynomial, about 1 ulp). std::exp is a scalar libm call per element, and the
// logsumexp / softmax-recompute loops do one exp per (sample, class) pair. Domain: accurate on
// [-87.3, 88]; 0 below (no subnormals), +inf above 88 (the kernels only pass x <= ~0).
inline float exp_vec(float x) {
  const float hi = 88.0f, lo = -87.3365447505531f;
  const float xc = x > hi ? hi : (x < lo ? lo : x);
  // n = round(x / ln 2) with the 1.5 * 2^23 trick (round to nearest, no libm call).
  const float shifter = 12582912.0f;
  const float n = (xc * 1.44269504088896341f + shifter) - shifter;
  float r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;  // 2^n, n in [-126, 127]
  float two_n;
  std::memcpy(&two_n, &bits, sizeof(float));
  const float y = p * two_n;
  // Below lo the true value is < 1e-38: 0 (exp(-inf) = 0). NaN stays NaN.
  return x < lo ? 0.0f : (x > hi ? INFINITY : (x != x ? x : y));
}
inline double exp_vec(double x) { return std::exp(x); }

// Local class index of each sample's target (kernels.md: y_local = y - class_start, present iff
// 0 <= y_local < C), -1 when the target is elsewhere or the sample is ignored.
struct LocalLabels {
  std::vector<int64_t> target;   // (B,) local target or -1
  std::vector<uint8_t> ignored;  // (B,) label == ignore_index
};

inline LocalLabels local_labels(const at::Tensor& labels, int64_t ignore_index, int64_t class_start,
                                int64_t num_local) {
  const at::Tensor y = labels.contiguous();
  const int64_t* yp = y.data_ptr<int64_t>();
  const int64_t batch = y.numel();
  LocalLabels out{std::vector<int64_t>(batch, -1), std::vector<uint8_t>(batch, 0)};
  for (int64_t i = 0; i < batch; ++i) {
    if (yp[i] == ignore_index) {
      out.ignored[i] = 1;
      continue;
    }
    const int64_t local = yp[i] - class_start;
    if (local >= 0 && local < num_local) out.target[i] = local;
  }
  return out;
}

// ||x_r|| = sqrt(sum x^2 + eps) per row (the contract, paper eq. 3), accumulated in acc_t.
template <typename scalar_t, typename acc_t>
void row_norms(const scalar_t* x, int64_t rows, int64_t dim, acc_t* norm) {
  at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* row = x + r * dim;
      acc_t sum = 0;
      for (int64_t d = 0; d < dim; ++d) {
        const acc_t v = static_cast<acc_t>(row[d]);
        sum += v * v;
      }
      norm[r] = std::sqrt(sum + static_cast<acc_t>(kNormEps));
    }
  });
}

// f~ = f / ||f|| as an acc-dtype (B, D) copy (kernels.md "Norms, once per call"); norms in `norm`.
template <typename scalar_t>
at::Tensor unit_rows(const at::Tensor& x, at::Tensor& norm) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t rows = x.size(0), dim = x.size(1);
  const at::ScalarType acc = acc_dtype(x.scalar_type());
  norm = at::empty({rows}, x.options().dtype(acc));
  at::Tensor unit = at::empty({rows, dim}, x.options().dtype(acc));
  const scalar_t* xp = x.data_ptr<scalar_t>();
  acc_t* np = norm.data_ptr<acc_t>();
  acc_t* up = unit.data_ptr<acc_t>();
  row_norms(xp, rows, dim, np);
  at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const acc_t inv = acc_t(1) / np[r];
      for (int64_t d = 0; d < dim; ++d) up[r * dim + d] = static_cast<acc_t>(xp[r * dim + d]) * inv;
    }
  });
  return unit;
}

// cos_iy = <f~_i, W_y> / ||W_y|| for rows whose target is local (a B-length dot, kernels.md
// "Target logit"), NaN-free 0 elsewhere (never read there).
template <typename scalar_t, typename acc_t>
void target_cosines(const acc_t* unit_f, const scalar_t* w, const acc_t* norm_w,
                    const std::vector<int64_t>& target, int64_t dim, acc_t* cos_y) {
  const int64_t batch = static_cast<int64_t>(target.size());
  at::parallel_for(0, batch, 64, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t y = target[i];
      if (y < 0) {
        cos_y[i] = 0;
        continue;
      }
      const acc_t* f = unit_f + i * dim;
      const scalar_t* wy = w + y * dim;
      acc_t dot = 0;
      for (int64_t d = 0; d < dim; ++d) dot += f[d] * static_cast<acc_t>(wy[d]);
      cos_y[i] = dot / norm_w[y];
    }
  });
}

// Rows [start, start + n) of W in the acc dtype: a view when W already is, else converted into
// `buffer` (one block, O(block * D)). The fp32 block feeds at::mm.
inline at::Tensor weight_block(const at::Tensor& w, int64_t start, int64_t n, at::Tensor& buffer) {
  at::Tensor rows = w.narrow(0, start, n);
  const at::ScalarType acc = acc_dtype(w.scalar_type());
  if (w.scalar_type() == acc) return rows;
  if (!buffer.defined() || buffer.numel() < n * w.size(1)) {
    buffer = at::empty({n * w.size(1)}, w.options().dtype(acc));
  }
  at::Tensor view = buffer.narrow(0, 0, n * w.size(1)).view({n, w.size(1)});
  view.copy_(rows);
  return view;
}

// A (rows, cols) view over the front of a flat scratch buffer (the last class block is smaller),
// allocated on first use (by the worker that owns it).
inline at::Tensor scratch_view(at::Tensor& buffer, int64_t rows, int64_t cols,
                               const at::TensorOptions& options) {
  if (!buffer.defined() || buffer.numel() < rows * cols) buffer = at::empty({rows * cols}, options);
  return buffer.narrow(0, 0, rows * cols).view({rows, cols});
}

// One worker's scratch for the cosine tile: the tile and (half/bf16 inputs) the converted W block.
struct TileScratch {
  at::Tensor tile, w_block;
};

// tile = f~ W_block^T (B, n) in the acc dtype via BLAS: <f~_i, W_j>, 1/||W_j|| is applied by the
// epilogue (kernels.md). `wb` receives the acc-dtype block of W, for the gradient products.
inline at::Tensor cosine_tile(const at::Tensor& unit_f, const at::Tensor& w, int64_t j0, int64_t n,
                              TileScratch& scratch, at::Tensor& wb) {
  wb = weight_block(w, j0, n, scratch.w_block);
  at::Tensor tile = scratch_view(scratch.tile, unit_f.size(0), n, unit_f.options());
  at::mm_out(tile, unit_f, wb.t());
  return tile;
}

// Backward of u = x / ||x|| for one row (paper eq. 4) plus the gradient of a norm factor:
//   out = (g - u <g, u>) * g_scale + extra * u,   u = x * inv_norm.
// Callers pass g = dL/du with g_scale = 1/||x||, or g = (dL/du)/||x|| with g_scale = 1.
// `extra` is dL/d||x|| when ||x|| itself multiplies the logits (normalize_* = False).
template <typename x_t, typename g_t, typename acc_t, typename out_t>
inline void normalize_backward_row(const x_t* x, acc_t inv_norm, const g_t* g, acc_t g_scale,
                                   acc_t extra, int64_t dim, out_t* out) {
  acc_t dot = 0;
  for (int64_t d = 0; d < dim; ++d) dot += static_cast<acc_t>(g[d]) * static_cast<acc_t>(x[d]);
  dot *= inv_norm;
  for (int64_t d = 0; d < dim; ++d) {
    const acc_t u = static_cast<acc_t>(x[d]) * inv_norm;
    out[d] = static_cast<out_t>((static_cast<acc_t>(g[d]) - u * dot) * g_scale + extra * u);
  }
}

}  // namespace cpu
}  // namespace normface
