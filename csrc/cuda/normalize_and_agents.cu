// CUDA kernels of l2_normalize (paper eq. 3 and 4) and of the agent losses (paper section 4):
// c_contrastive, c_triplet, center_loss, d_ij = 2 - 2 cos_ij (docs/kernels.md "Agent losses").
//
// c_contrastive and c_triplet (all negatives) reduce over every class: they use the tiled
// kernels of tiles.cuh with their own epilogues. c_triplet (hardest negative) needs an argmin
// forward but a sparse backward (two rows of W per sample), and center_loss is sparse both ways:
// their backward sorts the (class, sample) pairs so that each touched row of grad_W is written
// once by one warp, without a (C, D) fp32 buffer.
//
// Rows whose target lies in another shard of the classes (class_start / num_classes): the
// negatives of c_contrastive are still summed (they are negatives wherever the target is);
// c_triplet and center_loss give 0 (they need d_iy), and c_triplet still reports its hardest
// local negative. Ignored rows: loss 0, hardest -1, no gradient (as the CPU backend).

#include <torch/library.h>

#include "tiles.cuh"

namespace normface {
namespace cuda {
namespace {

// Per-row constants shared by the agent epilogues.
struct AgentRow {
  int64_t y;     // local target, -1 if none here
  bool valid;    // label != ignore_index
  float inv_nf;
  float d_y;     // 2 - 2 cos_iy
  float g;       // upstream gradient of the loss (0 when the loss is a constant 0)
  float count;   // c_triplet (all): number of active hinges, from the forward pass
};

struct AgentBase {
  LabelMap labels;
  const float* nf;
  const float* cos_y;
  const float* grad_loss;  // backward only
  float* loss;             // forward only

  __device__ AgentRow base_row(int64_t i) const {
    AgentRow r;
    r.y = labels.local(i);
    r.valid = labels.valid(i);
    r.inv_nf = 1.f / nf[i];
    r.d_y = r.y >= 0 ? 2.f - 2.f * cos_y[i] : 0.f;
    r.g = 0.f;
    r.count = 0.f;
    return r;
  }
};

// relu(d_iy - pos_margin) + sum_{j != y} relu(neg_margin - d_ij) (paper eq. 10 with agents).
struct ContrastiveEpilogue : AgentBase {
  float pos_margin, neg_margin;

  using Row = AgentRow;
  __device__ Row row(int64_t i) const {
    Row r = base_row(i);
    // Every valid row has a loss (the negatives), wherever its target is.
    if (grad_loss != nullptr && r.valid) r.g = grad_loss[i];
    return r;
  }

  static constexpr int kStateSize = 1;
  struct State { float v[1]; };
  __device__ State init() const { return State{{0.f}}; }

  __device__ void reduce(State& st, const Row& r, const float* s_row, const float*,
                         const float* inv_nw, int sub, int64_t col0, int64_t C) const {
#pragma unroll
    for (int k = 0; k < kColsPerThread; ++k) {
      const int c = sub + 4 * k;
      const int64_t j = col0 + c;
      if (j >= C || j == r.y) continue;
      const float d = 2.f - 2.f * (s_row[c] * r.inv_nf * inv_nw[c]);
      st.v[0] += relu_nan(neg_margin - d);
    }
  }
  __device__ void merge(State& a, const State& b) const { a.v[0] += b.v[0]; }

  template <typename In>
  __device__ void finish(const TileArgs<In>&, int64_t i, const State& st, int lane) const {
    if (lane != 0) return;
    const Row r = row(i);
    const float target = r.y >= 0 ? relu_nan(r.d_y - pos_margin) : 0.f;
    loss[i] = r.valid ? target + st.v[0] : 0.f;
  }

  // dL/dcos = -2 dL/dd.
  __device__ float grad(const Row& r, int64_t j, float cos, float, float&, float&) const {
    if (j == r.y) return r.d_y - pos_margin > 0.f ? -2.f * r.g : 0.f;
    return neg_margin - (2.f - 2.f * cos) > 0.f ? 2.f * r.g : 0.f;
  }
};

// sum_{k != y} relu(margin + d_iy - d_ik) (+ d_iy with center): paper eq. 11, all negatives.
struct TripletAllEpilogue : AgentBase {
  float margin;
  bool center;
  float* count_out;      // forward: number of active hinges per row (for the backward)
  const float* count;    // backward: the same, recomputed by a forward pass

  using Row = AgentRow;
  __device__ Row row(int64_t i) const {
    Row r = base_row(i);
    if (r.y >= 0) {
      if (grad_loss != nullptr) r.g = grad_loss[i];
      if (count != nullptr) r.count = count[i];
    }
    return r;
  }

  static constexpr int kStateSize = 2;  // hinge sum, active count
  struct State { float v[2]; };
  __device__ State init() const { return State{{0.f, 0.f}}; }

  __device__ void reduce(State& st, const Row& r, const float* s_row, const float*,
                         const float* inv_nw, int sub, int64_t col0, int64_t C) const {
    if (r.y < 0) return;  // no d_iy here: loss 0
#pragma unroll
    for (int k = 0; k < kColsPerThread; ++k) {
      const int c = sub + 4 * k;
      const int64_t j = col0 + c;
      if (j >= C || j == r.y) continue;
      const float hinge = margin + r.d_y - (2.f - 2.f * (s_row[c] * r.inv_nf * inv_nw[c]));
      st.v[0] += relu_nan(hinge);
      st.v[1] += hinge > 0.f ? 1.f : 0.f;
    }
  }
  __device__ void merge(State& a, const State& b) const {
    a.v[0] += b.v[0];
    a.v[1] += b.v[1];
  }

  template <typename In>
  __device__ void finish(const TileArgs<In>&, int64_t i, const State& st, int lane) const {
    if (lane != 0) return;
    const Row r = row(i);
    if (loss != nullptr) loss[i] = r.y >= 0 ? st.v[0] + (center ? r.d_y : 0.f) : 0.f;
    if (count_out != nullptr) count_out[i] = st.v[1];
  }

  __device__ float grad(const Row& r, int64_t j, float cos, float, float&, float&) const {
    if (r.y < 0) return 0.f;
    if (j == r.y) return -2.f * r.g * (r.count + (center ? 1.f : 0.f));
    return margin + r.d_y - (2.f - 2.f * cos) > 0.f ? 2.f * r.g : 0.f;
  }
};

// Nearest wrong agent: argmin_{k != y} d_ik, first index on ties, NaN wins (as torch.argmin).
struct HardestEpilogue : AgentBase {
  float margin;
  bool center;
  int64_t* hardest;

  using Row = AgentRow;
  __device__ Row row(int64_t i) const { return base_row(i); }

  static constexpr int kStateSize = 2;  // distance, index (int bits)
  struct State { float v[2]; };
  __device__ State init() const { return State{{INFINITY, __int_as_float(-1)}}; }

  // Is (da, ja) strictly before (db, jb) in argmin order? Index -1 means "none yet".
  __device__ static bool better(float da, int ja, float db, int jb) {
    if (ja < 0) return false;
    if (jb < 0) return true;
    const bool na = da != da, nb = db != db;
    if (na || nb) return na && (!nb || ja < jb);
    return da < db || (da == db && ja < jb);
  }

  __device__ void reduce(State& st, const Row& r, const float* s_row, const float*,
                         const float* inv_nw, int sub, int64_t col0, int64_t C) const {
#pragma unroll
    for (int k = 0; k < kColsPerThread; ++k) {
      const int c = sub + 4 * k;
      const int64_t j = col0 + c;
      if (j >= C || j == r.y) continue;
      const float d = 2.f - 2.f * (s_row[c] * r.inv_nf * inv_nw[c]);
      if (better(d, static_cast<int>(j), st.v[0], __float_as_int(st.v[1]))) {
        st.v[0] = d;
        st.v[1] = __int_as_float(static_cast<int>(j));
      }
    }
  }
  __device__ void merge(State& a, const State& b) const {
    if (better(b.v[0], __float_as_int(b.v[1]), a.v[0], __float_as_int(a.v[1]))) a = b;
  }

  // The loss uses an fp32 dot for d_ik* (the tile only chose k*), as the backward does.
  template <typename In>
  __device__ void finish(const TileArgs<In>& args, int64_t i, const State& st, int lane) const {
    const Row r = row(i);
    const int k = __float_as_int(st.v[1]);
    float d_k = INFINITY;
    if (k >= 0) {
      const In* fi = args.f + i * args.D;
      const In* wk = args.w + int64_t(k) * args.D;
      float dot = 0.f;
      for (int64_t d = lane; d < args.D; d += 32) dot += widen(fi[d]) * widen(wk[d]);
      dot = warp_sum(dot);
      d_k = 2.f - 2.f * (dot * r.inv_nf * (1.f / args.nw[k]));
    }
    if (lane != 0) return;
    hardest[i] = r.valid ? k : -1;  // ignored rows: -1, as the CPU backend
    loss[i] = r.y >= 0 ? relu_nan(margin + r.d_y - d_k) + (center ? r.d_y : 0.f) : 0.f;
  }
};

// ---------------------------------------------------------------------------------------------
// Sparse backward (c_triplet hardest, center_loss): each sample touches W_y and maybe W_k*.
// ---------------------------------------------------------------------------------------------

struct SparseEntries {
  int64_t* key;   // (E) local class, or C for "no entry"
  float* coef;    // dL/dcos of the pair
  float* cos;     // cos of the pair
  int64_t* row;   // sample
};

// One warp per sample: the pairs it contributes, and grad_f_i itself (eq. 4, in one pass:
// <grad_f~_i, f~_i> = sum over its pairs of coef * cos).
template <typename In>
__global__ void __launch_bounds__(kThreads)
    sparse_rows_kernel(const In* __restrict__ f, const In* __restrict__ w, LabelMap labels,
                       const float* __restrict__ nf, const float* __restrict__ nw,
                       const float* __restrict__ cos_y, const float* __restrict__ grad_loss,
                       const int64_t* __restrict__ hardest, float margin, bool center,
                       int64_t B, int64_t C, int64_t D, SparseEntries out, In* __restrict__ grad_f) {
  const int lane = threadIdx.x % 32;
  const int64_t i = int64_t(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (i >= B) return;
  const int64_t y = labels.local(i);
  const In* fi = f + i * D;
  const float inv_nf = 1.f / nf[i];
  float coef_y = 0.f, coef_k = 0.f, cos_k = 0.f;
  int64_t k = -1;
  if (y >= 0) {
    const float g = grad_loss[i];
    const float cy = cos_y[i];
    if (hardest == nullptr) {
      coef_y = -2.f * g;  // center loss: d = 2 - 2 cos
    } else {
      const int64_t hk = hardest[i];
      float active = 0.f;
      if (hk >= 0 && hk < C) {
        const In* wk = w + hk * D;
        float dot = 0.f;
        for (int64_t d = lane; d < D; d += 32) dot += widen(fi[d]) * widen(wk[d]);
        dot = warp_sum(dot);
        cos_k = dot * inv_nf * (1.f / nw[hk]);
        active = margin + (2.f - 2.f * cy) - (2.f - 2.f * cos_k) > 0.f ? 1.f : 0.f;
        if (active > 0.f) k = hk;
      }
      coef_y = -2.f * g * (active + (center ? 1.f : 0.f));
      coef_k = 2.f * g * active;
    }
    const float inv_ny = 1.f / nw[y];
    const float inv_nk = k >= 0 ? 1.f / nw[k] : 0.f;
    const In* wy = w + y * D;
    const In* wk = w + (k >= 0 ? k : 0) * D;
    const float proj = coef_y * cy + (k >= 0 ? coef_k * cos_k : 0.f);
    for (int64_t d = lane; d < D; d += 32) {
      float gd = coef_y * widen(wy[d]) * inv_ny;
      if (k >= 0) gd += coef_k * widen(wk[d]) * inv_nk;
      grad_f[i * D + d] = narrow<In>((gd - widen(fi[d]) * inv_nf * proj) * inv_nf);
    }
    if (lane == 0) {
      const float cy_for_w = cy;
      out.key[2 * i] = y;
      out.coef[2 * i] = coef_y;
      out.cos[2 * i] = cy_for_w;
      out.row[2 * i] = i;
    }
  } else {
    for (int64_t d = lane; d < D; d += 32) grad_f[i * D + d] = narrow<In>(0.f);
    if (lane == 0) out.key[2 * i] = C;
  }
  if (lane == 0) {
    out.key[2 * i + 1] = k >= 0 ? k : C;
    out.coef[2 * i + 1] = coef_k;
    out.cos[2 * i + 1] = cos_k;
    out.row[2 * i + 1] = i;
  }
}

// One warp per run of equal classes in the sorted pairs writes that row of grad_W (eq. 4 is
// linear: grad_W_j = sum over pairs (coef f~_i - W~_j coef cos) / ||W_j||).
template <typename In>
__global__ void __launch_bounds__(kThreads)
    sparse_weight_kernel(const In* __restrict__ f, const In* __restrict__ w,
                         const float* __restrict__ nf, const float* __restrict__ nw,
                         const int64_t* __restrict__ sorted_key,
                         const int64_t* __restrict__ order, SparseEntries entries, int64_t E,
                         int64_t C, int64_t D, In* __restrict__ grad_w) {
  const int lane = threadIdx.x % 32;
  const int64_t e = int64_t(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (e >= E) return;
  const int64_t j = sorted_key[e];
  if (j >= C || (e > 0 && sorted_key[e - 1] == j)) return;  // only the first of each run
  int64_t end = e;
  float proj = 0.f;
  while (end < E && sorted_key[end] == j) {
    const int64_t src = order[end];
    proj += entries.coef[src] * entries.cos[src];
    ++end;
  }
  const float inv_nw = 1.f / nw[j];
  const In* wj = w + j * D;
  for (int64_t d = lane; d < D; d += 32) {
    float acc = 0.f;
    for (int64_t q = e; q < end; ++q) {
      const int64_t src = order[q];
      const int64_t i = entries.row[src];
      acc += entries.coef[src] * widen(f[i * D + d]) * (1.f / nf[i]);
    }
    grad_w[j * D + d] = narrow<In>((acc - widen(wj[d]) * inv_nw * proj) * inv_nw);
  }
}

// ---------------------------------------------------------------------------------------------
// Op glue
// ---------------------------------------------------------------------------------------------

struct AgentCall {
  at::Tensor f, w, y;
  LabelMap labels;
  Prep prep;
  at::TensorOptions float_opts;
};

AgentCall setup_agent(const at::Tensor& features, const at::Tensor& weight,
                      const at::Tensor& labels, int64_t ignore_index, int64_t class_start,
                      int64_t num_classes) {
  check_loss_inputs(features, weight, labels, ignore_index, class_start, num_classes);
  check_loss_dtype(features);
  TORCH_CHECK(features.is_cuda(), "features must be a CUDA tensor, got ", features.device());
  AgentCall call;
  call.f = features.contiguous();
  call.w = weight.contiguous();
  call.y = labels.contiguous();
  call.labels = LabelMap{call.y.data_ptr<int64_t>(), class_start, ignore_index, weight.size(0)};
  call.float_opts = call.f.options().dtype(at::kFloat);
  return call;
}

template <typename In>
void prepare_agent(AgentCall& call) {
  call.prep = prepare<In>(reinterpret_cast<const In*>(call.f.data_ptr()),
                          reinterpret_cast<const In*>(call.w.data_ptr()), call.labels,
                          call.f.size(0), call.w.size(0), call.f.size(1), call.float_opts);
}

template <class Epi>
Epi agent_epilogue(const AgentCall& call) {
  Epi e{};
  e.labels = call.labels;
  e.nf = call.prep.nf.data_ptr<float>();
  e.cos_y = call.prep.cos_y.data_ptr<float>();
  return e;
}

at::Tensor check_grad_loss(const at::Tensor& grad_loss, const AgentCall& call) {
  TORCH_CHECK(grad_loss.dim() == 1 && grad_loss.size(0) == call.f.size(0) &&
                  grad_loss.device() == call.f.device(),
              "grad_loss must be (B,) on the device of features, got shape ", grad_loss.sizes(),
              " on ", grad_loss.device());
  return grad_loss.to(at::kFloat).contiguous();
}

at::Tensor c_contrastive_cuda(const at::Tensor& features, const at::Tensor& weight,
                              const at::Tensor& labels, double pos_margin, double neg_margin,
                              int64_t ignore_index, int64_t class_start, int64_t num_classes) {
  const c10::cuda::CUDAGuard guard(features.device());
  AgentCall call = setup_agent(features, weight, labels, ignore_index, class_start, num_classes);
  at::Tensor loss = at::empty({call.f.size(0)}, call.float_opts);
  if (call.f.size(0) == 0) return loss;
  dispatch_engine(call.f.scalar_type(), [&](auto engine) {
    using Eng = decltype(engine);
    using In = typename Eng::In;
    prepare_agent<In>(call);
    auto epi = agent_epilogue<ContrastiveEpilogue>(call);
    epi.pos_margin = static_cast<float>(pos_margin);
    epi.neg_margin = static_cast<float>(neg_margin);
    epi.loss = loss.data_ptr<float>();
    reduce_rows<Eng>(make_tile_args<In>(call.f, call.w, call.prep), epi, call.float_opts);
  });
  return loss;
}

std::tuple<at::Tensor, at::Tensor> c_contrastive_backward_cuda(
    const at::Tensor& grad_loss, const at::Tensor& features, const at::Tensor& weight,
    const at::Tensor& labels, double pos_margin, double neg_margin, int64_t ignore_index,
    int64_t class_start, int64_t num_classes) {
  const c10::cuda::CUDAGuard guard(features.device());
  AgentCall call = setup_agent(features, weight, labels, ignore_index, class_start, num_classes);
  const at::Tensor gl = check_grad_loss(grad_loss, call);
  DenseGrads grads;
  grads.grad_f = at::empty_like(call.f);
  grads.grad_w = at::empty_like(call.w);
  dispatch_engine(call.f.scalar_type(), [&](auto engine) {
    using Eng = decltype(engine);
    using In = typename Eng::In;
    prepare_agent<In>(call);
    auto epi = agent_epilogue<ContrastiveEpilogue>(call);
    epi.pos_margin = static_cast<float>(pos_margin);
    epi.neg_margin = static_cast<float>(neg_margin);
    epi.grad_loss = gl.data_ptr<float>();
    dense_backward<Eng>(make_tile_args<In>(call.f, call.w, call.prep), epi, call.prep, 1.f,
                        /*want_sums=*/false, true, true, grads);
  });
  return {grads.grad_f, grads.grad_w};
}

std::tuple<at::Tensor, at::Tensor> c_triplet_forward_cuda(
    const at::Tensor& features, const at::Tensor& weight, const at::Tensor& labels, double margin,
    bool hardest_only, bool center, int64_t ignore_index, int64_t class_start,
    int64_t num_classes) {
  const c10::cuda::CUDAGuard guard(features.device());
  AgentCall call = setup_agent(features, weight, labels, ignore_index, class_start, num_classes);
  const int64_t B = call.f.size(0);
  at::Tensor loss = at::empty({B}, call.float_opts);
  // hardest is only defined for hardest_only; the other mode reports -1.
  at::Tensor hardest = at::full({B}, -1, call.f.options().dtype(at::kLong));
  if (B == 0) return {loss, hardest};
  TORCH_CHECK(weight.size(0) < (int64_t(1) << 31),
              "c_triplet CUDA: at most 2^31 - 1 classes per call, got ", weight.size(0));
  dispatch_engine(call.f.scalar_type(), [&](auto engine) {
    using Eng = decltype(engine);
    using In = typename Eng::In;
    prepare_agent<In>(call);
    const auto args = make_tile_args<In>(call.f, call.w, call.prep);
    if (hardest_only) {
      auto epi = agent_epilogue<HardestEpilogue>(call);
      epi.margin = static_cast<float>(margin);
      epi.center = center;
      epi.loss = loss.data_ptr<float>();
      epi.hardest = hardest.data_ptr<int64_t>();
      reduce_rows<Eng>(args, epi, call.float_opts);
    } else {
      auto epi = agent_epilogue<TripletAllEpilogue>(call);
      epi.margin = static_cast<float>(margin);
      epi.center = center;
      epi.loss = loss.data_ptr<float>();
      reduce_rows<Eng>(args, epi, call.float_opts);
    }
  });
  return {loss, hardest};
}

// grad_f and grad_W of the sparse losses (hardest null: center loss).
template <typename In>
void sparse_backward(const AgentCall& call, const at::Tensor& gl, const int64_t* hardest,
                     float margin, bool center, at::Tensor& grad_f, at::Tensor& grad_w) {
  auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t B = call.f.size(0), C = call.w.size(0), D = call.f.size(1);
  grad_w.zero_();
  if (B == 0) return;
  const int64_t E = 2 * B;
  const auto long_opts = call.f.options().dtype(at::kLong);
  at::Tensor key = at::empty({E}, long_opts), row = at::empty({E}, long_opts);
  at::Tensor coef = at::empty({E}, call.float_opts), cos = at::empty({E}, call.float_opts);
  SparseEntries entries{key.data_ptr<int64_t>(), coef.data_ptr<float>(), cos.data_ptr<float>(),
                        row.data_ptr<int64_t>()};
  const In* f = reinterpret_cast<const In*>(call.f.data_ptr());
  const In* w = reinterpret_cast<const In*>(call.w.data_ptr());
  sparse_rows_kernel<In><<<row_blocks(B), kThreads, 0, stream>>>(
      f, w, call.labels, call.prep.nf.data_ptr<float>(), call.prep.nw.data_ptr<float>(),
      call.prep.cos_y.data_ptr<float>(), gl.data_ptr<float>(), hardest, margin, center, B, C, D,
      entries, reinterpret_cast<In*>(grad_f.data_ptr()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  // Group the pairs by class: one warp then owns each touched row of grad_W (no atomics).
  const auto sorted = at::sort(key);
  const at::Tensor sorted_key = std::get<0>(sorted).contiguous();
  const at::Tensor order = std::get<1>(sorted).contiguous();
  sparse_weight_kernel<In><<<row_blocks(E), kThreads, 0, stream>>>(
      f, w, call.prep.nf.data_ptr<float>(), call.prep.nw.data_ptr<float>(),
      sorted_key.data_ptr<int64_t>(), order.data_ptr<int64_t>(), entries, E, C, D,
      reinterpret_cast<In*>(grad_w.data_ptr()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> c_triplet_backward_cuda(
    const at::Tensor& grad_loss, const at::Tensor& features, const at::Tensor& weight,
    const at::Tensor& labels, const at::Tensor& hardest, double margin, bool hardest_only,
    bool center, int64_t ignore_index, int64_t class_start, int64_t num_classes) {
  const c10::cuda::CUDAGuard guard(features.device());
  AgentCall call = setup_agent(features, weight, labels, ignore_index, class_start, num_classes);
  const at::Tensor gl = check_grad_loss(grad_loss, call);
  const int64_t B = call.f.size(0);
  TORCH_CHECK(hardest.dim() == 1 && hardest.size(0) == B && hardest.scalar_type() == at::kLong &&
                  hardest.device() == call.f.device(),
              "hardest must be (B,) int64 on the device of features, got ", hardest.sizes(), " ",
              hardest.scalar_type(), " on ", hardest.device());
  const at::Tensor hk = hardest.contiguous();
  DenseGrads grads;
  grads.grad_f = at::empty_like(call.f);
  grads.grad_w = at::empty_like(call.w);
  dispatch_engine(call.f.scalar_type(), [&](auto engine) {
    using Eng = decltype(engine);
    using In = typename Eng::In;
    prepare_agent<In>(call);
    if (hardest_only) {
      // Out-of-range entries of `hardest` are treated as "no negative" by the kernel.
      sparse_backward<In>(call, gl, hk.data_ptr<int64_t>(), static_cast<float>(margin), center,
                          grads.grad_f, grads.grad_w);
      return;
    }
    const auto args = make_tile_args<In>(call.f, call.w, call.prep);
    // dL/dcos_iy needs the number of active hinges of row i: one forward pass counts them.
    at::Tensor count = at::empty({B}, call.float_opts);
    auto epi = agent_epilogue<TripletAllEpilogue>(call);
    epi.margin = static_cast<float>(margin);
    epi.center = center;
    epi.count_out = count.data_ptr<float>();
    reduce_rows<Eng>(args, epi, call.float_opts);
    epi.count_out = nullptr;
    epi.count = count.data_ptr<float>();
    epi.grad_loss = gl.data_ptr<float>();
    dense_backward<Eng>(args, epi, call.prep, 1.f, /*want_sums=*/false, true, true, grads);
  });
  return {grads.grad_f, grads.grad_w};
}

at::Tensor center_loss_cuda(const at::Tensor& features, const at::Tensor& weight,
                            const at::Tensor& labels, int64_t ignore_index, int64_t class_start,
                            int64_t num_classes) {
  const c10::cuda::CUDAGuard guard(features.device());
  AgentCall call = setup_agent(features, weight, labels, ignore_index, class_start, num_classes);
  at::Tensor loss = at::zeros({call.f.size(0)}, call.float_opts);
  if (call.f.size(0) == 0) return loss;
  dispatch_engine(call.f.scalar_type(), [&](auto engine) {
    using In = typename decltype(engine)::In;
    prepare_agent<In>(call);
  });
  // d_iy = 2 - 2 cos_iy for rows with a target here, 0 otherwise (cos_y is 0 there: mask it).
  const at::Tensor has_target = (call.y != ignore_index) & (call.y >= class_start) &
                                (call.y < class_start + call.w.size(0));
  loss = at::where(has_target, 2.0 - 2.0 * call.prep.cos_y, at::zeros_like(call.prep.cos_y));
  return loss;
}

std::tuple<at::Tensor, at::Tensor> center_loss_backward_cuda(
    const at::Tensor& grad_loss, const at::Tensor& features, const at::Tensor& weight,
    const at::Tensor& labels, int64_t ignore_index, int64_t class_start, int64_t num_classes) {
  const c10::cuda::CUDAGuard guard(features.device());
  AgentCall call = setup_agent(features, weight, labels, ignore_index, class_start, num_classes);
  const at::Tensor gl = check_grad_loss(grad_loss, call);
  at::Tensor grad_f = at::empty_like(call.f), grad_w = at::empty_like(call.w);
  dispatch_engine(call.f.scalar_type(), [&](auto engine) {
    using In = typename decltype(engine)::In;
    prepare_agent<In>(call);
    sparse_backward<In>(call, gl, nullptr, 0.f, false, grad_f, grad_w);
  });
  return {grad_f, grad_w};
}

// ---------------------------------------------------------------------------------------------
// l2_normalize (any rank, along the last dim; float64 too: it needs no tensor cores)
// ---------------------------------------------------------------------------------------------

template <class F>
void dispatch_all_floats(at::ScalarType dtype, F&& body) {
  switch (dtype) {
    case at::kFloat: body(float{}, float{}); break;
    case at::kDouble: body(double{}, double{}); break;
    case at::kHalf: body(__half{}, float{}); break;
    case at::kBFloat16: body(__nv_bfloat16{}, float{}); break;
    default: TORCH_CHECK(false, "l2_normalize: x must be floating, got ", dtype);
  }
}

at::Tensor l2_normalize_cuda(const at::Tensor& x, double eps) {
  TORCH_CHECK(x.dim() >= 1, "l2_normalize: x must have at least one dimension");
  TORCH_CHECK(x.is_cuda(), "l2_normalize: x must be a CUDA tensor, got ", x.device());
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous();
  at::Tensor out = at::empty_like(xc);
  const int64_t D = x.size(-1);
  const int64_t N = D == 0 ? 0 : xc.numel() / D;
  if (N == 0) return out;
  auto stream = at::cuda::getCurrentCUDAStream();
  dispatch_all_floats(x.scalar_type(), [&](auto t, auto acc) {
    using T = decltype(t);
    using Acc = decltype(acc);
    l2_normalize_kernel<T, Acc><<<row_blocks(N), kThreads, 0, stream>>>(
        reinterpret_cast<const T*>(xc.data_ptr()), N, D, eps, reinterpret_cast<T*>(out.data_ptr()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor l2_normalize_backward_cuda(const at::Tensor& grad, const at::Tensor& x, double eps) {
  TORCH_CHECK(grad.sizes() == x.sizes() && grad.scalar_type() == x.scalar_type() &&
                  grad.device() == x.device(),
              "l2_normalize_backward: grad must match x in shape, dtype and device, got ",
              grad.sizes(), " ", grad.scalar_type(), " and ", x.sizes(), " ", x.scalar_type());
  TORCH_CHECK(x.dim() >= 1, "l2_normalize_backward: x must have at least one dimension");
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous(), gc = grad.contiguous();
  at::Tensor out = at::empty_like(xc);
  const int64_t D = x.size(-1);
  const int64_t N = D == 0 ? 0 : xc.numel() / D;
  if (N == 0) return out;
  auto stream = at::cuda::getCurrentCUDAStream();
  dispatch_all_floats(x.scalar_type(), [&](auto t, auto acc) {
    using T = decltype(t);
    using Acc = decltype(acc);
    normalize_backward_kernel<T, T, Acc><<<row_blocks(N), kThreads, 0, stream>>>(
        reinterpret_cast<const T*>(gc.data_ptr()), reinterpret_cast<const T*>(xc.data_ptr()),
        nullptr, nullptr, Acc(1), Acc(0), eps, N, D, reinterpret_cast<T*>(out.data_ptr()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace
}  // namespace cuda
}  // namespace normface

TORCH_LIBRARY_IMPL(normface, CUDA, m) {
  m.impl("l2_normalize", &normface::cuda::l2_normalize_cuda);
  m.impl("l2_normalize_backward", &normface::cuda::l2_normalize_backward_cuda);
  m.impl("c_contrastive", &normface::cuda::c_contrastive_cuda);
  m.impl("c_contrastive_backward", &normface::cuda::c_contrastive_backward_cuda);
  m.impl("c_triplet_forward", &normface::cuda::c_triplet_forward_cuda);
  m.impl("c_triplet_backward", &normface::cuda::c_triplet_backward_cuda);
  m.impl("center_loss", &normface::cuda::center_loss_cuda);
  m.impl("center_loss_backward", &normface::cuda::center_loss_backward_cuda);
}
