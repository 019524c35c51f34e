// CUDA kernels of cosine_softmax_forward / cosine_softmax_backward (SPEC "Cosine softmax with
// margins", docs/kernels.md). The machinery (cosine tiles, split reductions, the two backward
// products) is in tiles.cuh; this file is the softmax epilogue and the op glue.

#include <torch/library.h>

#include "tiles.cuh"

namespace normface {
namespace cuda {
namespace {

// Everything the softmax epilogue needs; the same object serves forward and backward.
struct SoftmaxEpilogue {
  LabelMap labels;
  const float* nf;     // (B) ||f_i||
  const float* nw;     // (C) ||W_j||
  const float* cos_y;  // (B) target cosine
  float s, m1, m2, m3, lam;
  bool norm_f, norm_w;
  // forward outputs
  float* loss;
  float* lse_out;
  // backward inputs
  const float* lse;
  const float* grad_loss;
  const float* grad_lse;

  struct Row {
    int64_t y;     // local target class, -1 if none in this call
    bool valid;    // label != ignore_index
    float inv_nf;  // 1 / ||f_i||
    float a;       // 1 or ||f_i||
    float z_y;     // s a b_y t_i: the target logit (psi applied in fp32, once per row)
    float t, dt;   // t_i and dt/dcos
    float lse, g, e;
  };

  __device__ Row row(int64_t i) const {
    Row r;
    r.y = labels.local(i);
    r.valid = labels.valid(i);
    const float n = nf[i];
    r.inv_nf = 1.f / n;
    r.a = norm_f ? 1.f : n;
    r.t = r.dt = r.z_y = 0.f;
    if (r.y >= 0) {
      margin_target<float>(cos_y[i], m1, m2, m3, lam, &r.t, &r.dt);
      r.z_y = s * r.a * (norm_w ? 1.f : nw[r.y]) * r.t;
    }
    r.lse = lse != nullptr ? lse[i] : 0.f;
    // Ignored rows have loss 0: no gradient from it. A row whose target is in another shard
    // has loss = local lse (no target column here), so G = (g + e) p, as the formula gives.
    r.g = (grad_loss != nullptr && r.valid) ? grad_loss[i] : 0.f;
    r.e = grad_lse != nullptr ? grad_lse[i] : 0.f;
    return r;
  }

  // Online logsumexp state: running max m and sum l of exp(z - m).
  static constexpr int kStateSize = 2;
  struct State { float v[2]; };

  __device__ State init() const { return State{{-INFINITY, 0.f}}; }

  __device__ float logit(const Row& r, int64_t j, float cos, float nw_j) const {
    return j == r.y ? r.z_y : s * r.a * (norm_w ? 1.f : nw_j) * cos;
  }

  __device__ void reduce(State& st, const Row& r, const float* s_row, const float* nw_tile,
                         const float* inv_nw, int sub, int64_t col0, int64_t C) const {
    float z[kColsPerThread];
    float mx = -INFINITY;
#pragma unroll
    for (int k = 0; k < kColsPerThread; ++k) {
      const int c = sub + 4 * k;
      const int64_t j = col0 + c;
      z[k] = -INFINITY;
      if (j < C) z[k] = logit(r, j, s_row[c] * r.inv_nf * inv_nw[c], nw_tile[c]);
      mx = z[k] > mx ? z[k] : mx;  // a NaN is never the max; it reaches l through exp below
    }
    const float m_new = mx > st.v[0] ? mx : st.v[0];
    if (m_new == -INFINITY) {  // nothing finite so far: only NaN may need recording
#pragma unroll
      for (int k = 0; k < kColsPerThread; ++k)
        if (z[k] != z[k]) st.v[1] = z[k];
      return;
    }
    float sum = 0.f;
#pragma unroll
    for (int k = 0; k < kColsPerThread; ++k) sum += expf(z[k] - m_new);
    st.v[1] = st.v[1] * expf(st.v[0] - m_new) + sum;
    st.v[0] = m_new;
  }

  __device__ void merge(State& a, const State& b) const {
    const float m = a.v[0] > b.v[0] ? a.v[0] : b.v[0];
    if (m == -INFINITY) {
      a.v[1] = a.v[1] + b.v[1];  // both 0, or NaN
      return;
    }
    a.v[1] = a.v[1] * expf(a.v[0] - m) + b.v[1] * expf(b.v[0] - m);
    a.v[0] = m;
  }

  template <typename In>
  __device__ void finish(const TileArgs<In>&, int64_t i, const State& st, int lane) const {
    if (lane != 0) return;
    const Row r = row(i);
    const float lse_i = st.v[0] + logf(st.v[1]);
    lse_out[i] = lse_i;
    // Target elsewhere: loss_i = lse_i (summing lse_k - loss_k over the shards gives z_iy).
    loss[i] = r.valid ? lse_i - (r.y >= 0 ? r.z_y : 0.f) : 0.f;
  }

  // dL/dz_ij = g (p - [j = y]) + e p; returns dL/dcos / s; row/col terms of grad_a/s, grad_b/s.
  __device__ float grad(const Row& r, int64_t j, float cos, float nw_j, float& row_term,
                        float& col_term) const {
    const bool target = j == r.y;
    const float h = target ? r.t : cos;
    const float b = norm_w ? 1.f : nw_j;
    const float p = expf(logit(r, j, cos, nw_j) - r.lse);
    const float G = r.g * (p - (target ? 1.f : 0.f)) + r.e * p;
    row_term = G * b * h;
    col_term = G * r.a * h;
    return G * r.a * b * (target ? r.dt : 1.f);
  }
};

struct SoftmaxCall {
  at::Tensor f, w;
  LabelMap labels;
  Prep prep;
  SoftmaxEpilogue epi;
};

SoftmaxCall setup_softmax(const at::Tensor& features, const at::Tensor& weight,
                          const at::Tensor& labels, const at::Tensor& scale, double m1, double m2,
                          double m3, double lam, bool norm_f, bool norm_w, int64_t ignore_index,
                          int64_t class_start, int64_t num_classes) {
  check_loss_inputs(features, weight, labels, ignore_index, class_start, num_classes);
  check_scale(scale, features);
  check_loss_dtype(features);
  TORCH_CHECK(features.is_cuda(), "features must be a CUDA tensor, got ", features.device());
  SoftmaxCall call;
  call.f = features.contiguous();
  call.w = weight.contiguous();
  call.labels = LabelMap{nullptr, class_start, ignore_index, weight.size(0)};
  SoftmaxEpilogue& e = call.epi;
  e = SoftmaxEpilogue{};
  e.s = static_cast<float>(scale.item<double>());
  e.m1 = static_cast<float>(m1);
  e.m2 = static_cast<float>(m2);
  e.m3 = static_cast<float>(m3);
  e.lam = static_cast<float>(lam);
  e.norm_f = norm_f;
  e.norm_w = norm_w;
  return call;
}

template <class Eng>
void prepare_softmax(SoftmaxCall& call, const at::Tensor& labels) {
  using In = typename Eng::In;
  call.labels.labels = labels.data_ptr<int64_t>();
  const auto float_opts = call.f.options().dtype(at::kFloat);
  call.prep = prepare<In>(reinterpret_cast<const In*>(call.f.data_ptr()),
                          reinterpret_cast<const In*>(call.w.data_ptr()), call.labels,
                          call.f.size(0), call.w.size(0), call.f.size(1), float_opts);
  SoftmaxEpilogue& e = call.epi;
  e.labels = call.labels;
  e.nf = call.prep.nf.data_ptr<float>();
  e.nw = call.prep.nw.data_ptr<float>();
  e.cos_y = call.prep.cos_y.data_ptr<float>();
}

std::tuple<at::Tensor, at::Tensor> cosine_softmax_forward_cuda(
    const at::Tensor& features, const at::Tensor& weight, const at::Tensor& labels,
    const at::Tensor& scale, double m1, double m2, double m3, double lam, bool normalize_features,
    bool normalize_weight, int64_t ignore_index, int64_t class_start, int64_t num_classes) {
  const c10::cuda::CUDAGuard guard(features.device());
  SoftmaxCall call = setup_softmax(features, weight, labels, scale, m1, m2, m3, lam,
                                   normalize_features, normalize_weight, ignore_index, class_start,
                                   num_classes);
  const at::Tensor y = labels.contiguous();
  const auto float_opts = call.f.options().dtype(at::kFloat);
  const int64_t B = call.f.size(0);
  at::Tensor loss = at::empty({B}, float_opts);
  at::Tensor lse = at::empty({B}, float_opts);
  if (B == 0) return {loss, lse};
  dispatch_engine(call.f.scalar_type(), [&](auto engine) {
    using Eng = decltype(engine);
    using In = typename Eng::In;
    prepare_softmax<Eng>(call, y);
    call.epi.loss = loss.data_ptr<float>();
    call.epi.lse_out = lse.data_ptr<float>();
    reduce_rows<Eng>(make_tile_args<In>(call.f, call.w, call.prep), call.epi, float_opts);
  });
  return {loss, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cosine_softmax_backward_cuda(
    const at::Tensor& grad_loss, const at::Tensor& grad_lse, const at::Tensor& features,
    const at::Tensor& weight, const at::Tensor& labels, const at::Tensor& scale,
    const at::Tensor& lse, double m1, double m2, double m3, double lam, bool normalize_features,
    bool normalize_weight, int64_t ignore_index, int64_t class_start, int64_t num_classes) {
  const c10::cuda::CUDAGuard guard(features.device());
  SoftmaxCall call = setup_softmax(features, weight, labels, scale, m1, m2, m3, lam,
                                   normalize_features, normalize_weight, ignore_index, class_start,
                                   num_classes);
  const int64_t B = call.f.size(0);
  for (const auto* t : {&grad_loss, &grad_lse, &lse}) {
    TORCH_CHECK(t->dim() == 1 && t->size(0) == B && t->device() == features.device(),
                "cosine_softmax_backward: grad_loss, grad_lse and lse must be (B,) on the device "
                "of features, got shape ", t->sizes(), " on ", t->device());
  }
  const at::Tensor y = labels.contiguous();
  const at::Tensor gl = grad_loss.to(at::kFloat).contiguous();
  const at::Tensor ge = grad_lse.to(at::kFloat).contiguous();
  const at::Tensor saved_lse = lse.to(at::kFloat).contiguous();
  DenseGrads grads;
  grads.grad_f = at::empty_like(call.f);
  grads.grad_w = at::empty_like(call.w);
  at::Tensor grad_scale;
  dispatch_engine(call.f.scalar_type(), [&](auto engine) {
    using Eng = decltype(engine);
    using In = typename Eng::In;
    prepare_softmax<Eng>(call, y);
    call.epi.lse = saved_lse.data_ptr<float>();
    call.epi.grad_loss = gl.data_ptr<float>();
    call.epi.grad_lse = ge.data_ptr<float>();
    dense_backward<Eng>(make_tile_args<In>(call.f, call.w, call.prep), call.epi, call.prep,
                        call.epi.s, /*want_sums=*/true, normalize_features, normalize_weight,
                        grads);
    // dL/ds = sum_ij G_ij a_i b_j h_ij = sum_j b_j col_sum_j.
    grad_scale = normalize_weight ? grads.col_sums.sum() : (grads.col_sums * call.prep.nw).sum();
  });
  grad_scale = grad_scale.to(scale.options()).reshape(scale.sizes());
  return {grads.grad_f, grads.grad_w, grad_scale};
}

}  // namespace
}  // namespace cuda
}  // namespace normface

TORCH_LIBRARY_IMPL(normface, CUDA, m) {
  m.impl("cosine_softmax_forward", &normface::cuda::cosine_softmax_forward_cuda);
  m.impl("cosine_softmax_backward", &normface::cuda::cosine_softmax_backward_cuda);
}
