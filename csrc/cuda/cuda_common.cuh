// CUDA helpers of the chunked path's epilogues (csrc/chunked/epilogues.h): launch shape, the
// 16-bit types, warp and block reductions. Every launch goes on the current stream and is checked.
#pragma once

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "chunked/epilogues.h"
#include "common.h"

namespace normface {
namespace chunked {
namespace cuda {

constexpr int kThreads = 256;  // every kernel: 8 warps
constexpr int kWarps = kThreads / 32;
constexpr unsigned kFullMask = 0xffffffffu;

// Row kernels give a warp to each row: blocks for n rows.
inline unsigned warp_row_blocks(int64_t rows) {
  return static_cast<unsigned>((rows + kWarps - 1) / kWarps);
}

// Accumulation type: float, double for double.
template <typename T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};

__device__ __forceinline__ float widen(float x) { return x; }
__device__ __forceinline__ double widen(double x) { return x; }
__device__ __forceinline__ float widen(__half x) { return __half2float(x); }
__device__ __forceinline__ float widen(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T narrow(float x);
template <>
__device__ __forceinline__ float narrow<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ __half narrow<__half>(float x) {
  return __float2half_rn(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 narrow<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}
template <typename T>
__device__ __forceinline__ T narrow(double x) {
  return static_cast<T>(x);
}

struct DeviceExp {
  __device__ __forceinline__ float operator()(float x) const { return expf(x); }
  __device__ __forceinline__ double operator()(double x) const { return exp(x); }
};

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(kFullMask, v, offset);
  return v;
}

// Sum over the block, valid in thread 0. `shared` holds kWarps values.
template <typename T>
__device__ T block_sum(T v, T* shared) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  v = warp_sum(v);
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  T total = 0;
  if (threadIdx.x == 0) {
#pragma unroll
    for (int w = 0; w < kWarps; ++w) total += shared[w];
  }
  return total;
}

template <typename T>
const T* ptr_or_null(const at::Tensor& t, int64_t offset = 0) {
  return t.defined() ? t.data_ptr<T>() + offset : nullptr;
}

// The CUDA type of a tensor's 16-bit or float data.
template <typename T>
const T* data(const at::Tensor& t) {
  return reinterpret_cast<const T*>(t.data_ptr());
}
template <typename T>
T* mutable_data(const at::Tensor& t) {
  return reinterpret_cast<T*>(t.data_ptr());
}

// body(T{}) with T the CUDA element type of `dtype`.
template <class F>
void dispatch_input(at::ScalarType dtype, const char* what, F&& body) {
  switch (dtype) {
    case at::kFloat: body(float{}); break;
    case at::kDouble: body(double{}); break;
    case at::kHalf: body(__half{}); break;
    case at::kBFloat16: body(__nv_bfloat16{}); break;
    default: TORCH_CHECK_VALUE(false, what, ": unsupported dtype ", dtype);
  }
}

}  // namespace cuda
}  // namespace chunked
}  // namespace normface
