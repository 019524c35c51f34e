// CUDA row kernels of the chunked path (epilogues.h): norms, eq. 3, the pair cosines, the
// softmax row table and the normalization backward (eq. 4). One warp per row of D values.
// The CPU twin is csrc/chunked/cpu_epilogues.cpp.
#include "cuda/cuda_common.cuh"

namespace normface {
namespace chunked {
namespace cuda {
namespace {

template <typename T, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    row_norms_kernel(const T* __restrict__ x, int64_t N, int64_t D, acc_t eps,
                     acc_t* __restrict__ norm, acc_t* __restrict__ inv_norm) {
  const int lane = threadIdx.x % 32;
  const int64_t r = int64_t(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (r >= N) return;
  const T* row = x + r * D;
  acc_t sum = 0;
  for (int64_t d = lane; d < D; d += 32) {
    const acc_t v = widen(row[d]);
    sum += v * v;
  }
  sum = warp_sum(sum);
  if (lane == 0) {
    const acc_t n = sqrt(sum + eps);
    norm[r] = n;
    inv_norm[r] = acc_t(1) / n;
  }
}

template <typename T, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    scale_rows_kernel(const T* __restrict__ x, const acc_t* __restrict__ inv_norm, int64_t N,
                      int64_t D, T* __restrict__ out) {
  const int lane = threadIdx.x % 32;
  const int64_t r = int64_t(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (r >= N) return;
  const acc_t in = inv_norm[r];
  for (int64_t d = lane; d < D; d += 32) out[r * D + d] = narrow<T>(widen(x[r * D + d]) * in);
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    pair_cosines_kernel(const T* __restrict__ f, const T* __restrict__ w,
                        const int64_t* __restrict__ index, const float* __restrict__ inv_nf,
                        const float* __restrict__ inv_nw, int64_t B, int64_t D,
                        float* __restrict__ cos) {
  const int lane = threadIdx.x % 32;
  const int64_t i = int64_t(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (i >= B) return;
  const int64_t k = index[i];
  if (k < 0) {
    if (lane == 0) cos[i] = 0.f;
    return;
  }
  float dot = 0.f;
  for (int64_t d = lane; d < D; d += 32) dot += widen(f[i * D + d]) * widen(w[k * D + d]);
  dot = warp_sum(dot);
  if (lane == 0) cos[i] = scaled_dot(dot, inv_nf[i], inv_nw[k]);
}

// One thread per row: margin_target (common.h) and the products of the row table.
__global__ void __launch_bounds__(kThreads)
    softmax_rows_kernel(const float* __restrict__ cos_y, const int64_t* __restrict__ target,
                        const float* __restrict__ nf, const float* __restrict__ nw,
                        const float* __restrict__ scale, Margins mg, int64_t B,
                        float* __restrict__ out) {
  const int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  if (i >= B) return;
  softmax_row_terms<float>(cos_y[i], target[i], nf[i], nw, *scale, mg, out, i, B);
}

// epilogues.h FinishArgs, one warp per row of U.
template <typename x_t, typename acc_t>
struct FinishPtrs {
  const x_t* x;
  const acc_t* inv_norm;
  bool project;
  const acc_t* coef;
  const acc_t* u_scale;
  const acc_t* row_scale;
  const int64_t* redirect;
  acc_t* held;
  const bool* keep;
  x_t* out;
};

template <typename x_t, typename u_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    finish_rows_kernel(const u_t* __restrict__ U, int64_t R, int64_t D, int64_t offset,
                       const int64_t* __restrict__ index, FinishPtrs<x_t, acc_t> a) {
  const int lane = threadIdx.x % 32;
  const int64_t r = int64_t(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (r >= R) return;
  const int64_t dst = index != nullptr ? index[r] : offset + r;
  if (dst < 0) return;
  const u_t* u = U + r * D;
  const acc_t scale = (a.u_scale != nullptr ? *a.u_scale : acc_t(1)) *
                      (a.row_scale != nullptr ? a.row_scale[dst] : acc_t(1));
  if (a.redirect != nullptr && a.redirect[dst] >= 0) {
    acc_t* h = a.held + a.redirect[dst] * D;
    for (int64_t d = lane; d < D; d += 32) h[d] = acc_t(widen(u[d])) * scale;
    return;
  }
  x_t* o = a.out + dst * D;
  if (a.keep != nullptr && !a.keep[dst]) {
    for (int64_t d = lane; d < D; d += 32) o[d] = narrow<x_t>(acc_t(0));
    return;
  }
  const x_t* x = a.x + dst * D;
  const acc_t in = a.inv_norm[dst];
  if (a.project) {
    acc_t dot = 0;
    for (int64_t d = lane; d < D; d += 32) {
      dot += acc_t(widen(u[d])) * scale * (acc_t(widen(x[d])) * in);
    }
    dot = warp_sum(dot);
    for (int64_t d = lane; d < D; d += 32) {
      const acc_t xn = acc_t(widen(x[d])) * in;
      o[d] = narrow<x_t>(acc_t(widen(u[d])) * scale - xn * dot);
    }
  } else {
    const acc_t c = a.coef != nullptr ? a.coef[dst] : acc_t(0);
    for (int64_t d = lane; d < D; d += 32) {
      const acc_t xn = acc_t(widen(x[d])) * in;
      o[d] = narrow<x_t>(acc_t(widen(u[d])) * scale + c * xn);
    }
  }
}

}  // namespace

int64_t l2_cache_bytes(const at::Device& device) {
  return at::cuda::getDeviceProperties(device.index())->l2CacheSize;
}

void row_norms(const at::Tensor& x, double eps, at::Tensor& norm, at::Tensor& inv_norm) {
  const int64_t N = x.size(0), D = x.size(1);
  auto stream = at::cuda::getCurrentCUDAStream();
  dispatch_input(x.scalar_type(), "row_norms", [&](auto tag) {
    using T = decltype(tag);
    using acc_t = typename AccOf<T>::type;
    row_norms_kernel<T, acc_t><<<warp_row_blocks(N), kThreads, 0, stream>>>(
        data<T>(x), N, D, static_cast<acc_t>(eps), mutable_data<acc_t>(norm),
        mutable_data<acc_t>(inv_norm));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void scale_rows(const at::Tensor& x, const at::Tensor& inv_norm, at::Tensor& out) {
  const int64_t N = x.size(0), D = x.size(1);
  auto stream = at::cuda::getCurrentCUDAStream();
  dispatch_input(x.scalar_type(), "scale_rows", [&](auto tag) {
    using T = decltype(tag);
    using acc_t = typename AccOf<T>::type;
    scale_rows_kernel<T, acc_t><<<warp_row_blocks(N), kThreads, 0, stream>>>(
        data<T>(x), data<acc_t>(inv_norm), N, D, mutable_data<T>(out));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void pair_cosines(const at::Tensor& f, const at::Tensor& w, const at::Tensor& index,
                  const at::Tensor& inv_nf, const at::Tensor& inv_nw, at::Tensor& cos) {
  const int64_t B = f.size(0), D = f.size(1);
  auto stream = at::cuda::getCurrentCUDAStream();
  dispatch_input(f.scalar_type(), "pair_cosines", [&](auto tag) {
    using T = decltype(tag);
    if constexpr (std::is_same_v<T, double>) {
      TORCH_CHECK(false, "features: float64 is supported on CPU only");
    } else {
      pair_cosines_kernel<T><<<warp_row_blocks(B), kThreads, 0, stream>>>(
          data<T>(f), data<T>(w), data<int64_t>(index), data<float>(inv_nf), data<float>(inv_nw), B,
          D, mutable_data<float>(cos));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
}

void softmax_rows(const at::Tensor& cos_y, const at::Tensor& target, const at::Tensor& nf,
                  const at::Tensor& nw, const at::Tensor& scale, const Margins& mg,
                  at::Tensor& table) {
  const int64_t B = cos_y.size(0);
  TORCH_CHECK(cos_y.scalar_type() == at::kFloat, "softmax_rows: float32 terms expected");
  const unsigned blocks = static_cast<unsigned>((B + kThreads - 1) / kThreads);
  softmax_rows_kernel<<<blocks, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      data<float>(cos_y), data<int64_t>(target), data<float>(nf), data<float>(nw),
      data<float>(scale), mg, B, mutable_data<float>(table));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void finish_rows(const at::Tensor& U, int64_t offset, const at::Tensor& index,
                 const FinishArgs& a) {
  const int64_t R = U.size(0), D = U.size(1);
  auto stream = at::cuda::getCurrentCUDAStream();
  dispatch_input(a.x.scalar_type(), "finish_rows", [&](auto tag) {
    using x_t = decltype(tag);
    using acc_t = typename AccOf<x_t>::type;
    const FinishPtrs<x_t, acc_t> p{data<x_t>(a.x),
                                   data<acc_t>(a.inv_norm),
                                   a.project,
                                   ptr_or_null<acc_t>(a.coef),
                                   ptr_or_null<acc_t>(a.u_scale),
                                   ptr_or_null<acc_t>(a.row_scale),
                                   ptr_or_null<int64_t>(a.redirect),
                                   a.held.defined() ? mutable_data<acc_t>(a.held) : nullptr,
                                   ptr_or_null<bool>(a.keep),
                                   mutable_data<x_t>(a.out)};
    const int64_t* idx = ptr_or_null<int64_t>(index);
    if (U.scalar_type() == a.x.scalar_type()) {
      finish_rows_kernel<x_t, x_t, acc_t>
          <<<warp_row_blocks(R), kThreads, 0, stream>>>(data<x_t>(U), R, D, offset, idx, p);
    } else {
      TORCH_CHECK(U.scalar_type() == c10::CppTypeToScalarType<acc_t>::value,
                  "finish_rows: U must be in the input or the accumulation dtype");
      finish_rows_kernel<x_t, acc_t, acc_t>
          <<<warp_row_blocks(R), kThreads, 0, stream>>>(data<acc_t>(U), R, D, offset, idx, p);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace cuda
}  // namespace chunked
}  // namespace normface
