// CUDA chunk epilogues of the chunked path (epilogues.h): one block per row of the chunk's (B, n)
// GEMM output S, its threads striding over the n classes (coalesced), one block reduction per
// row. The per-element math is csrc/common.h's; the CPU twin is csrc/chunked/cpu_epilogues.cpp.
// Loss ops run on float32/float16/bfloat16 inputs: S and every term are float32 here.
#include "cuda/cuda_common.cuh"

namespace normface {
namespace chunked {
namespace cuda {
namespace {

constexpr float kInf = INFINITY;

struct RowArgs {
  const float* S;  // (B, n)
  int64_t n, j0;
  const int64_t* target;  // (B,)
};

// ---------------------------------------------------------------------------------------------
// Cosine softmax
// ---------------------------------------------------------------------------------------------

struct SoftmaxPtrs {
  const float* A;      // kRow
  const float* zy;     // kZ
  const float* vy;     // kV
  const float* dty;    // kDt
  const float* col;    // (n,) B_j of the chunk, or null for 1
  const float* scale;  // s
  const float* lse;
  const float* g;
  const float* e;
  const bool* active;
  const float* gc_scale;  // or null
};

__global__ void __launch_bounds__(kThreads)
    softmax_forward_kernel(RowArgs r, SoftmaxPtrs p, double* __restrict__ run_max,
                           double* __restrict__ run_sum) {
  __shared__ float shared_m[kWarps], shared_l[kWarps];
  const int64_t i = blockIdx.x;
  const float* row = r.S + i * r.n;
  const int64_t y = r.target[i] - r.j0;
  const float s = *p.scale, A = p.A[i], zy = p.zy[i];
  float m = -kInf, l = 0.f;
#pragma unroll 4
  for (int64_t j = threadIdx.x; j < r.n; j += kThreads) {
    const float v = scaled_dot(row[j], A, p.col != nullptr ? p.col[j] : 1.f);
    lse_add(m, l, j == y ? zy : s * v, DeviceExp());
  }
  // (max, sum) pairs merged across the warp, then across the warps.
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) {
    const float m2 = __shfl_xor_sync(kFullMask, m, offset);
    const float l2 = __shfl_xor_sync(kFullMask, l, offset);
    lse_merge(m, l, m2, l2, DeviceExp());
  }
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) {
    shared_m[warp] = m;
    shared_l[warp] = l;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    float cm = shared_m[0], cl = shared_l[0];
    for (int w = 1; w < kWarps; ++w) lse_merge(cm, cl, shared_m[w], shared_l[w], DeviceExp());
    double bm = run_max[i], bl = run_sum[i];
    lse_merge(bm, bl, double(cm), double(cl), DeviceExp());
    run_max[i] = bm;
    run_sum[i] = bl;
  }
}

// P_ij = G_ij s A_i B_j (dt_i at the target) gc_scale; row_acc_i += sum_j G_ij v_ij.
template <typename P_t>
__global__ void __launch_bounds__(kThreads)
    softmax_backward_kernel(RowArgs r, SoftmaxPtrs p, P_t* P,  // P may alias S
                            float* __restrict__ row_acc) {
  __shared__ float shared[kWarps];
  const int64_t i = blockIdx.x;
  P_t* out = P + i * r.n;
  if (!p.active[i]) {  // exact zeros, whatever S holds (a select, not a product)
    for (int64_t j = threadIdx.x; j < r.n; j += kThreads) out[j] = narrow<P_t>(0.f);
    return;
  }
  const float* row = r.S + i * r.n;
  const int64_t y = r.target[i] - r.j0;
  const float s = *p.scale, A = p.A[i], zy = p.zy[i], vy = p.vy[i], dty = p.dty[i];
  const float lse = p.lse[i], g = p.g[i], ge = g + p.e[i];
  const float gscale = p.gc_scale != nullptr ? *p.gc_scale : 1.f;
  float racc = 0.f;
#pragma unroll 4
  for (int64_t j = threadIdx.x; j < r.n; j += kThreads) {
    const bool is_y = j == y;
    const float b = p.col != nullptr ? p.col[j] : 1.f;
    const float v = is_y ? vy : scaled_dot(row[j], A, b);
    const float z = is_y ? zy : s * v;
    const float prob = expf(z - lse);
    const float G = ge * prob - (is_y ? g : 0.f);
    racc += G * v;
    out[j] = narrow<P_t>(G * (s * A * b * (is_y ? dty : 1.f)) * gscale);
  }
  racc = block_sum(racc, shared);
  if (threadIdx.x == 0) row_acc[i] += racc;
}

// ---------------------------------------------------------------------------------------------
// Agent losses: d_ij = agent_distance(scaled_dot(S_ij, 1/||f_i||, 1/||W_j||))
// ---------------------------------------------------------------------------------------------

struct AgentPtrs {
  const float* inv_nf;  // (B,)
  const float* inv_nw;  // (n,) of the chunk
  const float* bound;
  const float* slope;
  const float* target_grad;
  const bool* active;
  const float* gc_scale;  // or null
};

__global__ void __launch_bounds__(kThreads)
    agent_forward_kernel(RowArgs r, AgentPtrs p, float* __restrict__ hinge_sum) {
  __shared__ float shared[kWarps];
  const int64_t i = blockIdx.x;
  const float* row = r.S + i * r.n;
  const int64_t y = r.target[i] - r.j0;
  const float inv_nf = p.inv_nf[i], bound = p.bound[i];
  float sum = 0.f;
#pragma unroll 4
  for (int64_t j = threadIdx.x; j < r.n; j += kThreads) {
    const float d = agent_distance(scaled_dot(row[j], inv_nf, p.inv_nw[j]));
    sum += j == y ? 0.f : hinge(bound, d);
  }
  sum = block_sum(sum, shared);
  if (threadIdx.x == 0) hinge_sum[i] += sum;
}

template <typename P_t>
__global__ void __launch_bounds__(kThreads)
    agent_backward_kernel(RowArgs r, AgentPtrs p, P_t* P,  // P may alias S
                          float* __restrict__ active_count) {
  __shared__ float shared[kWarps];
  const int64_t i = blockIdx.x;
  P_t* out = P + i * r.n;
  if (!p.active[i]) {
    for (int64_t j = threadIdx.x; j < r.n; j += kThreads) out[j] = narrow<P_t>(0.f);
    return;
  }
  const float* row = r.S + i * r.n;
  const int64_t y = r.target[i] - r.j0;
  const float inv_nf = p.inv_nf[i], bound = p.bound[i], slope = p.slope[i];
  const float target_grad = p.target_grad[i];
  const float gscale = p.gc_scale != nullptr ? *p.gc_scale : 1.f;
  float count = 0.f;
#pragma unroll 4
  for (int64_t j = threadIdx.x; j < r.n; j += kThreads) {
    const float d = agent_distance(scaled_dot(row[j], inv_nf, p.inv_nw[j]));
    const bool on = j != y && hinge_active(bound, d);
    count += on ? 1.f : 0.f;
    const float coef = j == y ? target_grad : (on ? slope : 0.f);
    out[j] = narrow<P_t>(coef * (inv_nf * p.inv_nw[j]) * gscale);
  }
  if (active_count == nullptr) return;
  count = block_sum(count, shared);
  if (threadIdx.x == 0) active_count[i] += count;
}

// Running argmin of d_ij over the chunk's negatives (argmin_before: NaN wins, first index).
__global__ void __launch_bounds__(kThreads)
    argmin_kernel(RowArgs r, AgentPtrs p, float* __restrict__ best_d,
                  int64_t* __restrict__ best_k) {
  __shared__ float shared_d[kWarps];
  __shared__ int64_t shared_k[kWarps];
  const int64_t i = blockIdx.x;
  const float* row = r.S + i * r.n;
  const int64_t y = r.target[i] - r.j0;
  const float inv_nf = p.inv_nf[i];
  float bd = kInf;
  int64_t bk = -1;
  for (int64_t j = threadIdx.x; j < r.n; j += kThreads) {
    if (j == y) continue;
    const float d = agent_distance(scaled_dot(row[j], inv_nf, p.inv_nw[j]));
    if (argmin_before(d, r.j0 + j, bd, bk)) {
      bd = d;
      bk = r.j0 + j;
    }
  }
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) {
    const float d2 = __shfl_xor_sync(kFullMask, bd, offset);
    const int64_t k2 = __shfl_xor_sync(kFullMask, static_cast<long long>(bk), offset);
    if (argmin_before(d2, k2, bd, bk)) {
      bd = d2;
      bk = k2;
    }
  }
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) {
    shared_d[warp] = bd;
    shared_k[warp] = bk;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    // The running best comes from earlier chunks (smaller indices): it wins ties.
    float d = best_d[i];
    int64_t k = best_k[i];
    for (int w = 0; w < kWarps; ++w) {
      if (argmin_before(shared_d[w], shared_k[w], d, k)) {
        d = shared_d[w];
        k = shared_k[w];
      }
    }
    best_d[i] = d;
    best_k[i] = k;
  }
}

RowArgs row_args(const at::Tensor& S, int64_t j0, const at::Tensor& target) {
  return RowArgs{data<float>(S), S.size(1), j0, data<int64_t>(target)};
}

SoftmaxPtrs softmax_ptrs(const SoftmaxTerms& t, int64_t j0) {
  return SoftmaxPtrs{data<float>(t.table[kRow]),
                     data<float>(t.table[kZ]),
                     data<float>(t.table[kV]),
                     data<float>(t.table[kDt]),
                     ptr_or_null<float>(t.col_factor, j0),
                     data<float>(t.scale),
                     ptr_or_null<float>(t.lse),
                     ptr_or_null<float>(t.g),
                     ptr_or_null<float>(t.e),
                     ptr_or_null<bool>(t.active),
                     ptr_or_null<float>(t.gc_scale)};
}

AgentPtrs agent_ptrs(const AgentTerms& t, int64_t j0) {
  return AgentPtrs{
      data<float>(t.inv_nf),         data<float>(t.inv_nw) + j0,        data<float>(t.bound),
      ptr_or_null<float>(t.slope),   ptr_or_null<float>(t.target_grad), ptr_or_null<bool>(t.active),
      ptr_or_null<float>(t.gc_scale)};
}

// One block per row of S.
unsigned blocks(const at::Tensor& S) { return static_cast<unsigned>(S.size(0)); }

void check_float(const at::Tensor& S) {
  TORCH_CHECK(S.scalar_type() == at::kFloat, "CUDA epilogues: float32 logits expected, got ",
              S.scalar_type());
}

// body(P_t{}) for the element type of the gradient operand P.
template <class F>
void dispatch_operand(const at::Tensor& P, F&& body) {
  switch (P.scalar_type()) {
    case at::kFloat: body(float{}); break;
    case at::kHalf: body(__half{}); break;
    case at::kBFloat16: body(__nv_bfloat16{}); break;
    default: TORCH_CHECK(false, "CUDA epilogues: unsupported operand dtype ", P.scalar_type());
  }
}

}  // namespace

void softmax_forward_chunk(const at::Tensor& S, int64_t j0, const SoftmaxTerms& t,
                           at::Tensor& run_max, at::Tensor& run_sum) {
  check_float(S);
  softmax_forward_kernel<<<blocks(S), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      row_args(S, j0, t.target), softmax_ptrs(t, j0), mutable_data<double>(run_max),
      mutable_data<double>(run_sum));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void softmax_backward_chunk(const at::Tensor& S, at::Tensor& P, int64_t j0, const SoftmaxTerms& t,
                            at::Tensor& row_acc) {
  check_float(S);
  dispatch_operand(P, [&](auto tag) {
    using P_t = decltype(tag);
    softmax_backward_kernel<P_t><<<blocks(S), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        row_args(S, j0, t.target), softmax_ptrs(t, j0), mutable_data<P_t>(P),
        mutable_data<float>(row_acc));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void agent_forward_chunk(const at::Tensor& S, int64_t j0, const AgentTerms& t,
                         at::Tensor& hinge_sum) {
  check_float(S);
  agent_forward_kernel<<<blocks(S), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      row_args(S, j0, t.target), agent_ptrs(t, j0), mutable_data<float>(hinge_sum));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void agent_backward_chunk(const at::Tensor& S, at::Tensor& P, int64_t j0, const AgentTerms& t,
                          at::Tensor& active_count) {
  check_float(S);
  float* count = active_count.defined() ? mutable_data<float>(active_count) : nullptr;
  dispatch_operand(P, [&](auto tag) {
    using P_t = decltype(tag);
    agent_backward_kernel<P_t><<<blocks(S), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        row_args(S, j0, t.target), agent_ptrs(t, j0), mutable_data<P_t>(P), count);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void argmin_chunk(const at::Tensor& S, int64_t j0, const AgentTerms& t, at::Tensor& best_d,
                  at::Tensor& best_k) {
  check_float(S);
  argmin_kernel<<<blocks(S), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      row_args(S, j0, t.target), agent_ptrs(t, j0), mutable_data<float>(best_d),
      mutable_data<int64_t>(best_k));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace cuda
}  // namespace chunked
}  // namespace normface
