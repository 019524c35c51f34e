// The CPU epilogues of the chunked path (epilogues.h): rows split over threads with
// at::parallel_for, per-row loops written to vectorize, the per-element math of csrc/common.h.
// The CUDA twin is csrc/cuda/epilogues.cu / rows.cu.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <limits>

#include "chunked/epilogues.h"
#include "common.h"
#include "cpu/cpu_common.h"  // exp_vec, NF_SIMD_CLONES

namespace normface {
namespace chunked {
namespace cpu {
namespace {

template <typename T>
struct Exp {
  T operator()(T x) const { return ::normface::cpu::exp_vec(x); }
};

template <typename T>
const T* ptr_or_null(const at::Tensor& t, int64_t offset = 0) {
  return t.defined() ? t.data_ptr<T>() + offset : nullptr;
}

template <typename T>
T scalar_or_one(const at::Tensor& t) {
  return t.defined() ? *t.data_ptr<T>() : T(1);
}

// P's values rounded through the 16-bit input dtype: what the CUDA GEMM multiplies.
template <typename T>
void round_through(T* row, int64_t n, at::ScalarType dtype) {
  if (dtype == at::kHalf) {
    for (int64_t j = 0; j < n; ++j) row[j] = static_cast<T>(static_cast<c10::Half>(row[j]));
  } else if (dtype == at::kBFloat16) {
    for (int64_t j = 0; j < n; ++j) row[j] = static_cast<T>(static_cast<c10::BFloat16>(row[j]));
  }
}

// ---- softmax

// z of one row of a chunk (written over S) and its merge into the running (max, sum).
template <typename T>
NF_SIMD_CLONES void softmax_forward_row(T* row, int64_t n, int64_t y, T s, T A, T zy, const T* col,
                                        double* run_max, double* run_sum) {
  T m = -std::numeric_limits<T>::infinity();
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < n; ++j) {
    const T v = scaled_dot(row[j], A, col != nullptr ? col[j] : T(1));
    const T z = j == y ? zy : s * v;
    row[j] = z;
    m = z > m ? z : m;  // may drop a NaN: it still reaches the sum through exp
  }
  T l = 0;
  if (m == -std::numeric_limits<T>::infinity()) {
    for (int64_t j = 0; j < n; ++j) l += row[j] != row[j] ? row[j] : T(0);
  } else {
#pragma omp simd reduction(+ : l)
    for (int64_t j = 0; j < n; ++j) l += Exp<T>()(row[j] - m);
  }
  lse_merge(*run_max, *run_sum, static_cast<double>(m), static_cast<double>(l), Exp<double>());
}

// P = dL/dS of one row (over S), returns sum_j G_ij v_ij.
template <typename T>
NF_SIMD_CLONES T softmax_backward_row(T* row, int64_t n, int64_t y, T s, T A, T zy, T vy, T dty,
                                      const T* col, T lse, T g, T e, T gscale) {
  T racc = 0;
  const T ge = g + e;
#pragma omp simd reduction(+ : racc)
  for (int64_t j = 0; j < n; ++j) {
    const bool is_y = j == y;
    const T b = col != nullptr ? col[j] : T(1);
    const T v = is_y ? vy : scaled_dot(row[j], A, b);
    const T z = is_y ? zy : s * v;
    const T p = Exp<T>()(z - lse);
    const T G = ge * p - (is_y ? g : T(0));
    racc += G * v;
    row[j] = G * (s * A * b * (is_y ? dty : T(1))) * gscale;
  }
  return racc;
}

// ---- agents

template <typename T>
NF_SIMD_CLONES T agent_hinge_row(const T* row, int64_t n, int64_t y, T inv_nf, const T* inv_nw,
                                 T bound) {
  T sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < n; ++j) {
    const T d = agent_distance(scaled_dot(row[j], inv_nf, inv_nw[j]));
    sum += j == y ? T(0) : hinge(bound, d);
  }
  return sum;
}

template <typename T>
NF_SIMD_CLONES T agent_backward_row(T* row, int64_t n, int64_t y, T inv_nf, const T* inv_nw,
                                    T bound, T slope, T target_grad, T gscale) {
  T count = 0;
#pragma omp simd reduction(+ : count)
  for (int64_t j = 0; j < n; ++j) {
    const T d = agent_distance(scaled_dot(row[j], inv_nf, inv_nw[j]));
    const bool on = j != y && hinge_active(bound, d);
    count += on ? T(1) : T(0);
    const T coef = j == y ? target_grad : (on ? slope : T(0));
    row[j] = coef * (inv_nf * inv_nw[j]) * gscale;
  }
  return count;
}

// ---- finish (eq. 4)

template <typename x_t, typename u_t, typename acc_t>
void finish_impl(const at::Tensor& U, int64_t offset, const at::Tensor& index,
                 const FinishArgs& a) {
  const int64_t R = U.size(0), D = U.size(1);
  const u_t* up = U.data_ptr<u_t>();
  const x_t* xp = a.x.data_ptr<x_t>();
  const acc_t* inv = a.inv_norm.data_ptr<acc_t>();
  const int64_t* idx = ptr_or_null<int64_t>(index);
  const acc_t* coef = ptr_or_null<acc_t>(a.coef);
  const acc_t* row_scale = ptr_or_null<acc_t>(a.row_scale);
  const int64_t* redirect = ptr_or_null<int64_t>(a.redirect);
  const bool* keep = ptr_or_null<bool>(a.keep);
  acc_t* held = a.held.defined() ? a.held.data_ptr<acc_t>() : nullptr;
  x_t* out = a.out.data_ptr<x_t>();
  const acc_t u_scale = scalar_or_one<acc_t>(a.u_scale);
  at::parallel_for(0, R, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t dst = idx != nullptr ? idx[r] : offset + r;
      if (dst < 0) continue;
      const u_t* u = up + r * D;
      const acc_t scale = u_scale * (row_scale != nullptr ? row_scale[dst] : acc_t(1));
      if (redirect != nullptr && redirect[dst] >= 0) {
        acc_t* h = held + redirect[dst] * D;
        for (int64_t d = 0; d < D; ++d) h[d] = static_cast<acc_t>(u[d]) * scale;
        continue;
      }
      x_t* o = out + dst * D;
      if (keep != nullptr && !keep[dst]) {
        for (int64_t d = 0; d < D; ++d) o[d] = static_cast<x_t>(0);
        continue;
      }
      const x_t* x = xp + dst * D;
      const acc_t in = inv[dst];
      if (a.project) {
        acc_t dot = 0;
        for (int64_t d = 0; d < D; ++d) {
          dot += static_cast<acc_t>(u[d]) * scale * (static_cast<acc_t>(x[d]) * in);
        }
        for (int64_t d = 0; d < D; ++d) {
          const acc_t xn = static_cast<acc_t>(x[d]) * in;
          o[d] = static_cast<x_t>(static_cast<acc_t>(u[d]) * scale - xn * dot);
        }
      } else {
        const acc_t c = coef != nullptr ? coef[dst] : acc_t(0);
        for (int64_t d = 0; d < D; ++d) {
          const acc_t xn = static_cast<acc_t>(x[d]) * in;
          o[d] = static_cast<x_t>(static_cast<acc_t>(u[d]) * scale + c * xn);
        }
      }
    }
  });
}

#define NF_DISPATCH_INPUT(dtype, name, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, name, __VA_ARGS__)

}  // namespace

void row_norms(const at::Tensor& x, double eps, at::Tensor& norm, at::Tensor& inv_norm) {
  const int64_t N = x.size(0), D = x.size(1);
  NF_DISPATCH_INPUT(x.scalar_type(), "row_norms", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    acc_t* np = norm.data_ptr<acc_t>();
    acc_t* ip = inv_norm.data_ptr<acc_t>();
    at::parallel_for(0, N, 64, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* row = xp + r * D;
        acc_t sum = 0;
        for (int64_t d = 0; d < D; ++d) {
          const acc_t v = static_cast<acc_t>(row[d]);
          sum += v * v;
        }
        np[r] = std::sqrt(sum + static_cast<acc_t>(eps));
        ip[r] = acc_t(1) / np[r];
      }
    });
  });
}

void scale_rows(const at::Tensor& x, const at::Tensor& inv_norm, at::Tensor& out) {
  const int64_t N = x.size(0), D = x.size(1);
  NF_DISPATCH_INPUT(x.scalar_type(), "scale_rows", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const acc_t* ip = inv_norm.data_ptr<acc_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, N, 64, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        for (int64_t d = 0; d < D; ++d) {
          op[r * D + d] = static_cast<scalar_t>(static_cast<acc_t>(xp[r * D + d]) * ip[r]);
        }
      }
    });
  });
}

void pair_cosines(const at::Tensor& f, const at::Tensor& w, const at::Tensor& index,
                  const at::Tensor& inv_nf, const at::Tensor& inv_nw, at::Tensor& cos) {
  const int64_t B = f.size(0), D = f.size(1);
  NF_DISPATCH_INPUT(f.scalar_type(), "pair_cosines", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* fp = f.data_ptr<scalar_t>();
    const scalar_t* wp = w.data_ptr<scalar_t>();
    const int64_t* kp = index.data_ptr<int64_t>();
    const acc_t* inf = inv_nf.data_ptr<acc_t>();
    const acc_t* inw = inv_nw.data_ptr<acc_t>();
    acc_t* cp = cos.data_ptr<acc_t>();
    at::parallel_for(0, B, 64, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t k = kp[i];
        if (k < 0) {
          cp[i] = 0;
          continue;
        }
        acc_t dot = 0;
        for (int64_t d = 0; d < D; ++d) {
          dot += static_cast<acc_t>(fp[i * D + d]) * static_cast<acc_t>(wp[k * D + d]);
        }
        cp[i] = scaled_dot(dot, inf[i], inw[k]);
      }
    });
  });
}

void softmax_rows(const at::Tensor& cos_y, const at::Tensor& target, const at::Tensor& nf,
                  const at::Tensor& nw, const at::Tensor& scale, const Margins& mg,
                  at::Tensor& table) {
  const int64_t B = cos_y.size(0);
  AT_DISPATCH_FLOATING_TYPES(cos_y.scalar_type(), "softmax_rows", [&] {
    using T = scalar_t;
    const T* cp = cos_y.data_ptr<T>();
    const int64_t* yp = target.data_ptr<int64_t>();
    const T* nfp = nf.data_ptr<T>();
    const T* nwp = nw.data_ptr<T>();
    const T s = *scale.data_ptr<T>();
    T* out = table.data_ptr<T>();
    for (int64_t i = 0; i < B; ++i) {
      softmax_row_terms<T>(cp[i], yp[i], nfp[i], nwp, s, mg, out, i, B);
    }
  });
}

void softmax_forward_chunk(const at::Tensor& S, int64_t j0, const SoftmaxTerms& t,
                           at::Tensor& run_max, at::Tensor& run_sum) {
  const int64_t B = S.size(0), n = S.size(1);
  AT_DISPATCH_FLOATING_TYPES(S.scalar_type(), "softmax_forward_chunk", [&] {
    using T = scalar_t;
    T* sp = S.data_ptr<T>();
    const int64_t* yp = t.target.data_ptr<int64_t>();
    const T* A = t.table[kRow].data_ptr<T>();
    const T* zy = t.table[kZ].data_ptr<T>();
    const T* col = ptr_or_null<T>(t.col_factor, j0);
    const T s = *t.scale.data_ptr<T>();
    double* mp = run_max.data_ptr<double>();
    double* lp = run_sum.data_ptr<double>();
    at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        softmax_forward_row(sp + i * n, n, yp[i] - j0, s, A[i], zy[i], col, mp + i, lp + i);
      }
    });
  });
}

void softmax_backward_chunk(const at::Tensor& S, at::Tensor& P, int64_t j0, const SoftmaxTerms& t,
                            at::Tensor& row_acc) {
  TORCH_INTERNAL_ASSERT(P.data_ptr() == S.data_ptr(), "CPU: P is written over S");
  const int64_t B = S.size(0), n = S.size(1);
  AT_DISPATCH_FLOATING_TYPES(S.scalar_type(), "softmax_backward_chunk", [&] {
    using T = scalar_t;
    T* sp = S.data_ptr<T>();
    const int64_t* yp = t.target.data_ptr<int64_t>();
    const T* A = t.table[kRow].data_ptr<T>();
    const T* zy = t.table[kZ].data_ptr<T>();
    const T* vy = t.table[kV].data_ptr<T>();
    const T* dty = t.table[kDt].data_ptr<T>();
    const T* col = ptr_or_null<T>(t.col_factor, j0);
    const T* lse = t.lse.data_ptr<T>();
    const T* g = t.g.data_ptr<T>();
    const T* e = t.e.data_ptr<T>();
    const bool* active = t.active.data_ptr<bool>();
    const T s = *t.scale.data_ptr<T>();
    const T gscale = scalar_or_one<T>(t.gc_scale);
    T* acc = row_acc.data_ptr<T>();
    at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        T* row = sp + i * n;
        if (!active[i]) {  // exact zeros, whatever S holds (a select, not a product)
          std::fill(row, row + n, T(0));
          continue;
        }
        acc[i] += softmax_backward_row(row, n, yp[i] - j0, s, A[i], zy[i], vy[i], dty[i], col,
                                       lse[i], g[i], e[i], gscale);
        round_through(row, n, t.input_dtype);
      }
    });
  });
}

void agent_forward_chunk(const at::Tensor& S, int64_t j0, const AgentTerms& t,
                         at::Tensor& hinge_sum) {
  const int64_t B = S.size(0), n = S.size(1);
  AT_DISPATCH_FLOATING_TYPES(S.scalar_type(), "agent_forward_chunk", [&] {
    using T = scalar_t;
    const T* sp = S.data_ptr<T>();
    const int64_t* yp = t.target.data_ptr<int64_t>();
    const T* inf = t.inv_nf.data_ptr<T>();
    const T* inw = t.inv_nw.data_ptr<T>() + j0;
    const T* bound = t.bound.data_ptr<T>();
    T* out = hinge_sum.data_ptr<T>();
    at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        out[i] += agent_hinge_row(sp + i * n, n, yp[i] - j0, inf[i], inw, bound[i]);
      }
    });
  });
}

void agent_backward_chunk(const at::Tensor& S, at::Tensor& P, int64_t j0, const AgentTerms& t,
                          at::Tensor& active_count) {
  TORCH_INTERNAL_ASSERT(P.data_ptr() == S.data_ptr(), "CPU: P is written over S");
  const int64_t B = S.size(0), n = S.size(1);
  AT_DISPATCH_FLOATING_TYPES(S.scalar_type(), "agent_backward_chunk", [&] {
    using T = scalar_t;
    T* sp = S.data_ptr<T>();
    const int64_t* yp = t.target.data_ptr<int64_t>();
    const T* inf = t.inv_nf.data_ptr<T>();
    const T* inw = t.inv_nw.data_ptr<T>() + j0;
    const T* bound = t.bound.data_ptr<T>();
    const T* slope = t.slope.data_ptr<T>();
    const T* tgrad = t.target_grad.data_ptr<T>();
    const bool* active = t.active.data_ptr<bool>();
    const T gscale = scalar_or_one<T>(t.gc_scale);
    T* count = active_count.defined() ? active_count.data_ptr<T>() : nullptr;
    at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        T* row = sp + i * n;
        if (!active[i]) {
          std::fill(row, row + n, T(0));
          continue;
        }
        const T c = agent_backward_row(row, n, yp[i] - j0, inf[i], inw, bound[i], slope[i],
                                       tgrad[i], gscale);
        round_through(row, n, t.input_dtype);
        if (count != nullptr) count[i] += c;
      }
    });
  });
}

void argmin_chunk(const at::Tensor& S, int64_t j0, const AgentTerms& t, at::Tensor& best_d,
                  at::Tensor& best_k) {
  const int64_t B = S.size(0), n = S.size(1);
  AT_DISPATCH_FLOATING_TYPES(S.scalar_type(), "argmin_chunk", [&] {
    using T = scalar_t;
    const T* sp = S.data_ptr<T>();
    const int64_t* yp = t.target.data_ptr<int64_t>();
    const T* inf = t.inv_nf.data_ptr<T>();
    const T* inw = t.inv_nw.data_ptr<T>() + j0;
    T* bd = best_d.data_ptr<T>();
    int64_t* bk = best_k.data_ptr<int64_t>();
    at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const T* row = sp + i * n;
        const int64_t y = yp[i] - j0;
        T d_best = bd[i];
        int64_t k_best = bk[i];
        for (int64_t j = 0; j < n; ++j) {
          if (j == y) continue;
          const T d = agent_distance(scaled_dot(row[j], inf[i], inw[j]));
          if (argmin_before(d, j0 + j, d_best, k_best)) {
            d_best = d;
            k_best = j0 + j;
          }
        }
        bd[i] = d_best;
        bk[i] = k_best;
      }
    });
  });
}

void finish_rows(const at::Tensor& U, int64_t offset, const at::Tensor& index,
                 const FinishArgs& a) {
  NF_DISPATCH_INPUT(a.x.scalar_type(), "finish_rows", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    if (U.scalar_type() == a.x.scalar_type()) {
      finish_impl<scalar_t, scalar_t, acc_t>(U, offset, index, a);
    } else {
      TORCH_INTERNAL_ASSERT(U.scalar_type() == c10::CppTypeToScalarType<acc_t>::value);
      finish_impl<scalar_t, acc_t, acc_t>(U, offset, index, a);
    }
  });
}

}  // namespace cpu
}  // namespace chunked
}  // namespace normface
