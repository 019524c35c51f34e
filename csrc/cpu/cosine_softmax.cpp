// Scaled cosine softmax with the whole margin family (contract "one formula for the whole family"),
// walked over class blocks: forward = online logsumexp, backward = recomputation of the tile from
// the saved lse (docs/kernels.md). Extra memory O(B*D + C + B*block), never a (B, C) matrix.
//
// Shards (registration.cpp): a row whose target lies in another shard has no target column here;
// its loss is the local lse (loss_i = lse_i - [target here] z_iy, so summing lse_k - loss_k over
// shards gives z_iy), and its backward is G = (g + e) p, the exact derivative of that.
#include <torch/library.h>

#include <limits>
#include <tuple>

#include "cpu/cpu_common.h"

namespace normface {
namespace cpu {
namespace {

// Everything both passes compute once per call (kernels.md "Norms, once per call" and "Target
// logit"): O(B*D + C) memory.
template <typename scalar_t>
struct Setup {
  using acc_t = at::opmath_type<scalar_t>;
  at::Tensor f, w;            // contiguous inputs
  at::Tensor unit_f, norm_f;  // f~ (B, D) and ||f|| (B,), acc dtype
  std::vector<acc_t> inv_nw;  // 1 / ||W_j||
  std::vector<acc_t> b;       // b_j: 1 or ||W_j||
  std::vector<acc_t> col;     // b_j / ||W_j||: z_ij = s a_i col_j <f~_i, W_j> off target
  std::vector<acc_t> a;       // a_i: 1 or ||f_i||
  std::vector<acc_t> t, dt;   // t_i and dt_i/dcos_iy (common.h margin_target)
  std::vector<acc_t> z_y;     // z_iy = s a_i b_y t_i
  LocalLabels labels;
  acc_t s;

  Setup(const at::Tensor& features, const at::Tensor& weight, const at::Tensor& labels_in,
        double scale, const Margins& mg, int64_t ignore_index, int64_t class_start)
      : f(features.contiguous()), w(weight.contiguous()), s(static_cast<acc_t>(scale)) {
    const int64_t B = f.size(0), C = w.size(0), D = f.size(1);
    labels = local_labels(labels_in, ignore_index, class_start, C);
    unit_f = unit_rows<scalar_t>(f, norm_f);
    std::vector<acc_t> nw(C);
    row_norms(w.data_ptr<scalar_t>(), C, D, nw.data());
    inv_nw.resize(C);
    b.resize(C);
    col.resize(C);
    for (int64_t j = 0; j < C; ++j) {
      inv_nw[j] = acc_t(1) / nw[j];
      b[j] = mg.normalize_weight ? acc_t(1) : nw[j];
      // b_j / ||W_j|| is 1 when ||W_j|| multiplies the logit -- unless the norm is inf: cos is
      // then inf / inf, NaN as in the reference, not the +-inf of <f~, W_j> alone.
      col[j] = mg.normalize_weight
                   ? inv_nw[j]
                   : (std::isinf(nw[j]) ? std::numeric_limits<acc_t>::quiet_NaN() : acc_t(1));
    }
    std::vector<acc_t> cos_y(B);
    target_cosines(unit_f.data_ptr<acc_t>(), w.data_ptr<scalar_t>(), nw.data(), labels.target, D,
                   cos_y.data());
    const acc_t* nf = norm_f.data_ptr<acc_t>();
    a.resize(B);
    t.assign(B, 0);
    dt.assign(B, 0);
    z_y.assign(B, 0);
    for (int64_t i = 0; i < B; ++i) {
      a[i] = mg.normalize_features ? acc_t(1) : nf[i];
      const int64_t y = labels.target[i];
      if (y < 0) continue;
      margin_target<acc_t>(cos_y[i], mg.m1, mg.m2, mg.m3, mg.lam, &t[i], &dt[i]);
      z_y[i] = s * a[i] * b[y] * t[i];
    }
  }
};

// z_ij of one tile element (contract): z_iy at the target column, else
// s a_i (b_j / ||W_j||) <f~_i, W_j>.
// The forward and the backward both compute z here, and the sources are built without
// floating-point contraction (-ffp-contract=off in setup.py / CMakeLists.txt): the backward must
// recompute every logit bit-identically, since p = exp(z - lse) turns any difference in z into
// an exponent. A product contracted into the backward's z - lse (an FMA) alone made float64
// gradients garbage at |z| ~ 1e17 (half an ulp of z is then 8 or more).
template <typename acc_t>
inline acc_t logit(bool is_y, acc_t zy, acc_t sa, acc_t col, acc_t dot) {
  return is_y ? zy : sa * col * dot;
}

// One row of one class block of the forward: z in place (target column replaced by z_iy,
// kernels.md), then merged into the row's running (max, sum) with one exp per element.
template <typename acc_t>
NF_SIMD_CLONES void forward_row(acc_t* row, int64_t n, int64_t y, acc_t sa, acc_t zy,
                                const acc_t* col, acc_t* run_max, acc_t* run_sum) {
  acc_t m = -std::numeric_limits<acc_t>::infinity();
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < n; ++j) {
    const acc_t z = logit(j == y, zy, sa, col[j], row[j]);
    row[j] = z;
    m = z > m ? z : m;
  }
  // This vectorized max may drop a NaN; the NaN still reaches the sum (exp(NaN) = NaN), so the
  // row's lse is NaN as the contract asks. The running max itself lets NaN win.
  const acc_t m_new = max_nan(*run_max, m);
  acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < n; ++j) sum += exp_vec(row[j] - m_new);
  *run_sum = *run_sum * exp_vec(*run_max - m_new) + sum;
  *run_max = m_new;
}

template <typename acc_t>
struct RowArgs {
  acc_t* row;   // in: <f~_i, W_j> for the block; out: Gc_ij / ||W_j||
  int64_t n;    // classes in the block
  int64_t y;    // target column in the block, or outside [0, n)
  acc_t sa, a;  // s a_i, a_i
  acc_t zy, ty, dty, lse;
  acc_t g, ge;  // g_i and g_i + e_i
};

// One row of one class block of the backward. Recomputes z exactly as the forward did, then
// p = exp(z - lse) (one exp per element), G = g (p - [j = y]) + e p, Gc = G s a b (t' at the
// target), and leaves Gc / ||W_j|| in the tile for the two products. Returns sum_j G b h; with
// kColSums adds G a h to col_sum[j] (grad_b_j = s sum_i G_ij a_i h_ij, kernels.md).
template <bool kColSums, typename acc_t>
NF_SIMD_CLONES acc_t backward_row(const RowArgs<acc_t>& r, const acc_t* col, const acc_t* inv_nw,
                                  const acc_t* bj, acc_t* col_sum) {
  acc_t* row = r.row;
  acc_t racc = 0;
#pragma omp simd reduction(+ : racc)
  for (int64_t j = 0; j < r.n; ++j) {
    const bool is_y = j == r.y;
    const acc_t z = logit(is_y, r.zy, r.sa, col[j], row[j]);
    const acc_t p = exp_vec(z - r.lse);
    const acc_t G = r.ge * p - (is_y ? r.g : acc_t(0));
    const acc_t h = is_y ? r.ty : row[j] * inv_nw[j];
    racc += G * bj[j] * h;
    if (kColSums) col_sum[j] += G * r.a * h;
    row[j] = G * r.sa * bj[j] * (is_y ? r.dty : acc_t(1)) * inv_nw[j];
  }
  return racc;
}

template <typename scalar_t>
std::tuple<at::Tensor, at::Tensor> forward_impl(const at::Tensor& features,
                                                const at::Tensor& weight, const at::Tensor& labels,
                                                double scale, const Margins& mg,
                                                int64_t ignore_index, int64_t class_start) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = features.size(0), C = weight.size(0);
  const auto acc_opts = features.options().dtype(acc_dtype(features.scalar_type()));
  at::Tensor loss = at::empty({B}, acc_opts), lse = at::empty({B}, acc_opts);
  if (B == 0) return {loss, lse};
  Setup<scalar_t> st(features, weight, labels, scale, mg, ignore_index, class_start);

  // Each worker keeps a running (max, sum) of the online logsumexp per row over its own classes;
  // the partial pairs merge with the same formula (kernels.md).
  const ClassSplit sp(B, C);
  const int64_t T = sp.workers;
  std::vector<acc_t> part_max(T * B, -std::numeric_limits<acc_t>::infinity()), part_sum(T * B, 0);
  std::vector<TileScratch> scratch(T);
  parallel_class_blocks(sp, C, [&](int64_t t, int64_t j0, int64_t n) {
    at::Tensor wb;
    acc_t* tp = cosine_tile(st.unit_f, st.w, j0, n, scratch[t], wb).template data_ptr<acc_t>();
    for (int64_t i = 0; i < B; ++i) {
      // The target column is local to the block iff 0 <= y - j0 < n.
      forward_row(tp + i * n, n, st.labels.target[i] - j0, st.s * st.a[i], st.z_y[i],
                  st.col.data() + j0, &part_max[t * B + i], &part_sum[t * B + i]);
    }
  });
  std::vector<acc_t> run_max(B), run_sum(B, 0);
  for (int64_t i = 0; i < B; ++i) {
    acc_t m = part_max[i];
    for (int64_t t = 1; t < T; ++t) m = max_nan(m, part_max[t * B + i]);
    acc_t l = 0;
    for (int64_t t = 0; t < T; ++t) l += part_sum[t * B + i] * exp_vec(part_max[t * B + i] - m);
    run_max[i] = m;
    run_sum[i] = l;
  }
  acc_t* lp = loss.data_ptr<acc_t>();
  acc_t* ep = lse.data_ptr<acc_t>();
  for (int64_t i = 0; i < B; ++i) {
    ep[i] = run_max[i] + std::log(run_sum[i]);
    if (st.labels.ignored[i]) {
      lp[i] = 0;  // lse is still defined (over the plain logits): shards merge it
    } else {
      lp[i] = st.labels.target[i] >= 0 ? ep[i] - st.z_y[i] : ep[i];
    }
  }
  return {loss, lse};
}

template <typename scalar_t>
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_impl(
    const at::Tensor& grad_loss_in, const at::Tensor& grad_lse_in, const at::Tensor& features,
    const at::Tensor& weight, const at::Tensor& labels, const at::Tensor& scale,
    const at::Tensor& lse_in, const Margins& mg, int64_t ignore_index, int64_t class_start) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = features.size(0), C = weight.size(0), D = features.size(1);
  const auto acc_opts = features.options().dtype(acc_dtype(features.scalar_type()));
  at::Tensor grad_f = at::empty(features.sizes(), features.options());
  at::Tensor grad_w = at::empty(weight.sizes(), weight.options());
  if (B == 0) {
    grad_w.zero_();
    return {grad_f, grad_w, at::zeros_like(scale)};
  }
  Setup<scalar_t> st(features, weight, labels, scale.item<double>(), mg, ignore_index, class_start);
  const at::Tensor lse = lse_in.to(acc_opts.dtype()).contiguous();
  const at::Tensor g_loss = grad_loss_in.to(acc_opts.dtype()).contiguous();
  const at::Tensor g_lse = grad_lse_in.to(acc_opts.dtype()).contiguous();
  const acc_t* lse_p = lse.data_ptr<acc_t>();
  const acc_t* gl = g_loss.data_ptr<acc_t>();
  const acc_t* ge = g_lse.data_ptr<acc_t>();
  std::vector<acc_t> g(B);  // g_i = 0 for ignored rows (kernels.md)
  for (int64_t i = 0; i < B; ++i) g[i] = st.labels.ignored[i] ? acc_t(0) : gl[i];
  // An ignored row without an lse gradient takes no part at all (contract: it contributes nothing,
  // even when its features are NaN or inf). Its tile row is zeroed and so is its f~ row, since
  // 0 * NaN = NaN in the products would otherwise spread it over every row of grad_W.
  std::vector<uint8_t> dropped(B, 0);
  acc_t* unit_f = st.unit_f.template data_ptr<acc_t>();
  for (int64_t i = 0; i < B; ++i) {
    dropped[i] = st.labels.ignored[i] && ge[i] == acc_t(0);
    if (dropped[i]) std::fill(unit_f + i * D, unit_f + (i + 1) * D, acc_t(0));
  }

  // Per worker: sum_j G_ij b_j h_ij per row (gives grad_s times a_i and grad_a_i times s), the
  // partial grad f~ = sum_j Gc_ij W~_j over its classes, and column sums for grad_b (only when
  // ||W_j|| multiplies the logits). Rows of grad_w are written by the worker owning the class.
  const ClassSplit sp(B, C);
  const int64_t T = sp.workers;
  std::vector<acc_t> row_part(T * B, 0);
  std::vector<at::Tensor> grad_unit_part(T);
  std::vector<std::vector<acc_t>> col_acc(T);
  std::vector<TileScratch> scratch(T);
  std::vector<at::Tensor> q_buf(T);
  scalar_t* gw = grad_w.data_ptr<scalar_t>();
  parallel_class_blocks(sp, C, [&](int64_t t, int64_t j0, int64_t n) {
    at::Tensor wb;
    at::Tensor tile = cosine_tile(st.unit_f, st.w, j0, n, scratch[t], wb);
    acc_t* tp = tile.template data_ptr<acc_t>();
    const acc_t* col = st.col.data() + j0;
    const acc_t* inv_nw = st.inv_nw.data() + j0;
    const acc_t* bj = st.b.data() + j0;
    acc_t* cacc = nullptr;
    if (!mg.normalize_weight) {
      col_acc[t].assign(n, acc_t(0));
      cacc = col_acc[t].data();
    }
    for (int64_t i = 0; i < B; ++i) {
      if (dropped[i]) {
        std::fill(tp + i * n, tp + (i + 1) * n, acc_t(0));
        continue;
      }
      RowArgs<acc_t> r{tp + i * n,     n,           st.labels.target[i] - j0,
                       st.s * st.a[i], st.a[i],     st.z_y[i],
                       st.t[i],        st.dt[i],    lse_p[i],
                       g[i],           g[i] + ge[i]};
      row_part[t * B + i] += cacc ? backward_row<true>(r, col, inv_nw, bj, cacc)
                                  : backward_row<false>(r, col, inv_nw, bj, cacc);
    }
    // The tile now holds P = Gc / ||W||:  grad f~ += P @ W_block,  grad W~ / ||W|| = P^T @ f~.
    if (!grad_unit_part[t].defined()) grad_unit_part[t] = at::zeros({B, D}, acc_opts);
    grad_unit_part[t].addmm_(tile, wb);
    at::Tensor q = scratch_view(q_buf[t], n, D, acc_opts);
    at::mm_out(q, tile.t(), st.unit_f);
    const acc_t* qp = q.template data_ptr<acc_t>();
    const acc_t* wbp = wb.template data_ptr<acc_t>();
    for (int64_t j = 0; j < n; ++j) {
      const acc_t grad_b = cacc ? st.s * cacc[j] : acc_t(0);
      normalize_backward_row(wbp + j * D, inv_nw[j], qp + j * D, acc_t(1), grad_b, D,
                             gw + (j0 + j) * D);
    }
  });
  at::Tensor grad_unit_f = grad_unit_part[0];
  for (int64_t t = 1; t < T; ++t) grad_unit_f.add_(grad_unit_part[t]);
  std::vector<acc_t> row_acc(B, 0);
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t i = 0; i < B; ++i) row_acc[i] += row_part[t * B + i];
  }

  acc_t grad_s = 0;
  for (int64_t i = 0; i < B; ++i) {
    if (!dropped[i]) grad_s += st.a[i] * row_acc[i];
  }
  const acc_t* guf = grad_unit_f.data_ptr<acc_t>();
  const acc_t* nf = st.norm_f.template data_ptr<acc_t>();
  const scalar_t* fp = st.f.template data_ptr<scalar_t>();
  scalar_t* gf = grad_f.data_ptr<scalar_t>();
  const bool norm_f = mg.normalize_features;
  at::parallel_for(0, B, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      if (dropped[i]) {
        std::fill(gf + i * D, gf + (i + 1) * D, scalar_t(0));
        continue;
      }
      const acc_t inv = acc_t(1) / nf[i];
      const acc_t grad_a = norm_f ? acc_t(0) : st.s * row_acc[i];
      normalize_backward_row(fp + i * D, inv, guf + i * D, inv, grad_a, D, gf + i * D);
    }
  });
  at::Tensor grad_scale = at::empty_like(scale).fill_(static_cast<double>(grad_s));
  return {grad_f, grad_w, grad_scale};
}

std::tuple<at::Tensor, at::Tensor> cosine_softmax_forward_cpu(
    const at::Tensor& features, const at::Tensor& weight, const at::Tensor& labels,
    const at::Tensor& scale, double m1, double m2, double m3, double lam, bool normalize_features,
    bool normalize_weight, int64_t ignore_index, int64_t class_start, int64_t num_classes) {
  check_softmax_forward_args(features, weight, labels, scale, m1, m2, m3, lam, ignore_index,
                             class_start, num_classes);
  const Margins mg{m1, m2, m3, lam, normalize_features, normalize_weight};
  const double s = scale.item<double>();
  std::tuple<at::Tensor, at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, features.scalar_type(), "cosine_softmax_forward", [&] {
        out = forward_impl<scalar_t>(features, weight, labels, s, mg, ignore_index, class_start);
      });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cosine_softmax_backward_cpu(
    const at::Tensor& grad_loss, const at::Tensor& grad_lse, const at::Tensor& features,
    const at::Tensor& weight, const at::Tensor& labels, const at::Tensor& scale,
    const at::Tensor& lse, double m1, double m2, double m3, double lam, bool normalize_features,
    bool normalize_weight, int64_t ignore_index, int64_t class_start, int64_t num_classes,
    bool check_data) {
  check_softmax_backward_args(grad_loss, grad_lse, features, weight, labels, scale, lse, m1, m2, m3,
                              lam, ignore_index, class_start, num_classes, check_data);
  const Margins mg{m1, m2, m3, lam, normalize_features, normalize_weight};
  std::tuple<at::Tensor, at::Tensor, at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, features.scalar_type(), "cosine_softmax_backward", [&] {
        out = backward_impl<scalar_t>(grad_loss, grad_lse, features, weight, labels, scale, lse, mg,
                                      ignore_index, class_start);
      });
  return out;
}

}  // namespace
}  // namespace cpu
}  // namespace normface

TORCH_LIBRARY_IMPL(normface, CPU, m) {
  m.impl("cosine_softmax_forward", &normface::cpu::cosine_softmax_forward_cpu);
  m.impl("cosine_softmax_backward", &normface::cpu::cosine_softmax_backward_cpu);
}
