// Shared machinery of the CUDA backend: the on-chip cosine tile and the generic kernels built on it.
//
// Every loss here is a function of the (B, C) cosine matrix that is never stored (docs/kernels.md).
// A thread block owns a 64 x 64 tile of it: the raw dot products <f_i, W_j> are computed with
// tensor cores (WMMA: fp16/bf16, TF32 when torch allows it for fp32) or plain fp32 FMA, into
// shared memory; the epilogue scales them by 1/||f_i|| and 1/||W_j|| (B + C floats computed once)
// and consumes them right there. Three generic kernels use the tile:
//   reduce_rows_kernel     forward: a per-row reduction (online logsumexp, hinge sums, argmin)
//                          over the class tiles of one split; grid (B tiles, C splits); the
//                          (splits, B) partial states are merged exactly by merge_rows_kernel.
//   grad_features_kernel   backward, grid (B tiles, C splits): recomputes the tile, forms
//                          dL/dcos on chip and accumulates grad_f~ = Gc/||W|| @ W in shared
//                          memory (fp32), then adds it to a (B, D) fp32 buffer with atomics.
//   grad_weight_kernel     backward, grid (C tiles, B splits): the same tile, accumulating
//                          grad_W~ = (Gc/||f||)^T @ f. With one B split the block owns its
//                          classes and applies eq. 4 itself, writing grad_W in the input dtype.
// A loss plugs in as an "epilogue" class (see cosine_softmax.cu and normalize_and_agents.cu).
//
// Tiles are 64 x 64, 256 threads. Operand chunks (128 bytes of D per row) are copied with
// cp.async, double buffered, when D is a multiple of 16 bytes (plain loads otherwise). The
// gradient products use the Gc tile in bf16 (also for fp16 inputs: see WmmaEngine) or fp32.
// Extra memory per call: norms and target cosines (2B + C floats), the (splits, B) partial
// states of the forward, a (B, D) fp32 buffer for grad_f~, and a (C, D) fp32 buffer for grad_W~
// only when the weight kernel cannot own whole rows of grad_W (few class tiles, or D wider than
// the shared-memory accumulator).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <type_traits>

#include "common.h"

namespace normface {
namespace cuda {

namespace wmma = nvcuda::wmma;

constexpr int kTile = 64;       // rows (samples) and columns (classes) of one cosine tile
constexpr int kThreads = 256;   // 8 warps per block
constexpr int kWarps = kThreads / 32;
constexpr int kSLd = kTile + 4; // leading dimension of fp32 tiles (padding against bank conflicts)
// Epilogue mapping: thread t handles row t / 4 of the tile and columns (t % 4) + 4k, k < 16.
constexpr int kColsPerThread = kTile / 4;

// ---------------------------------------------------------------------------------------------
// Scalars
// ---------------------------------------------------------------------------------------------

template <typename T> struct CudaType { using type = T; };
template <> struct CudaType<c10::Half> { using type = __half; };
template <> struct CudaType<c10::BFloat16> { using type = __nv_bfloat16; };

__device__ __forceinline__ float widen(float x) { return x; }
__device__ __forceinline__ double widen(double x) { return x; }
__device__ __forceinline__ float widen(__half x) { return __half2float(x); }
__device__ __forceinline__ float widen(__nv_bfloat16 x) { return __bfloat162float(x); }

// torch builds with __CUDA_NO_HALF_CONVERSIONS__: every conversion to 16 bits is explicit.
template <typename T, typename A>
__device__ __forceinline__ T narrow(A x) {
  if constexpr (std::is_same_v<T, __half>) {
    return __float2half_rn(static_cast<float>(x));
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __float2bfloat16_rn(static_cast<float>(x));
  } else {
    return static_cast<T>(x);
  }
}

template <typename A>
__device__ __forceinline__ A warp_sum(A v) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// relu that keeps NaN (docs/kernels.md: NaN must reach the loss, never be clipped to 0).
__device__ __forceinline__ float relu_nan(float x) { return x > 0.f ? x : (x != x ? x : 0.f); }

// The class of sample i inside this call's shard, or -1 (ignored, or its target lies elsewhere).
struct LabelMap {
  const int64_t* labels;
  int64_t class_start;
  int64_t ignore_index;
  int64_t C;

  __device__ __forceinline__ bool valid(int64_t i) const { return labels[i] != ignore_index; }
  __device__ __forceinline__ int64_t local(int64_t i) const {
    const int64_t label = labels[i];
    const int64_t y = label - class_start;
    return (label != ignore_index && y >= 0 && y < C) ? y : -1;
  }
};

// ---------------------------------------------------------------------------------------------
// Tile engines: C (64 x 64, fp32) += A (64 x K) B (K x 64), operands in shared memory.
// Warp w owns rows 16 (w / 2) and columns 16 (2 (w % 2) + q), q < 2, of the 64 x 64 tile.
// kARow / kBRow pick the operand layouts, so transposed products need no copy.
// ---------------------------------------------------------------------------------------------

__device__ __forceinline__ int warp_row0() { return 16 * (threadIdx.x / 32 / 2); }
__device__ __forceinline__ int warp_col0(int q) { return 16 * (2 * ((threadIdx.x / 32) % 2) + q); }

// fp16 / bf16 inputs on tensor cores, fp32 accumulation.
// The gradient products run in bf16 even for fp16 inputs: their Gc operand holds values like
// g_i p_ij (1/B times probabilities ~1/C), far below fp16's range but fine in bf16's.
template <typename In_>
struct WmmaEngine {
  using In = In_;
  using GradEngine = WmmaEngine<__nv_bfloat16>;
  struct Acc { wmma::fragment<wmma::accumulator, 16, 16, 16, float> frag[2]; };

  __device__ static void zero(Acc& acc) {
#pragma unroll
    for (int q = 0; q < 2; ++q) wmma::fill_fragment(acc.frag[q], 0.f);
  }
  __device__ static void load(Acc& acc, const float* c, int ldc) {
#pragma unroll
    for (int q = 0; q < 2; ++q)
      wmma::load_matrix_sync(acc.frag[q], c + warp_row0() * ldc + warp_col0(q), ldc,
                             wmma::mem_row_major);
  }
  __device__ static void store(const Acc& acc, float* c, int ldc) {
#pragma unroll
    for (int q = 0; q < 2; ++q)
      wmma::store_matrix_sync(c + warp_row0() * ldc + warp_col0(q), acc.frag[q], ldc,
                              wmma::mem_row_major);
  }
  template <bool kARow, bool kBRow>
  __device__ static void mma(Acc& acc, const In* a, int lda, const In* b, int ldb, int k) {
    using ALayout = std::conditional_t<kARow, wmma::row_major, wmma::col_major>;
    using BLayout = std::conditional_t<kBRow, wmma::row_major, wmma::col_major>;
    wmma::fragment<wmma::matrix_a, 16, 16, 16, In, ALayout> fa;
    wmma::fragment<wmma::matrix_b, 16, 16, 16, In, BLayout> fb;
    const int m0 = warp_row0();
    for (int k0 = 0; k0 < k; k0 += 16) {
      wmma::load_matrix_sync(fa, kARow ? a + m0 * lda + k0 : a + k0 * lda + m0, lda);
#pragma unroll
      for (int q = 0; q < 2; ++q) {
        const int n0 = warp_col0(q);
        wmma::load_matrix_sync(fb, kBRow ? b + k0 * ldb + n0 : b + n0 * ldb + k0, ldb);
        wmma::mma_sync(acc.frag[q], fa, fb, acc.frag[q]);
      }
    }
  }
};

// fp32 inputs on tensor cores as TF32 (only when torch.backends.cuda.matmul.allow_tf32).
struct Tf32Engine {
  using In = float;
  using GradEngine = Tf32Engine;
  struct Acc { wmma::fragment<wmma::accumulator, 16, 16, 8, float> frag[2]; };

  __device__ static void zero(Acc& acc) {
#pragma unroll
    for (int q = 0; q < 2; ++q) wmma::fill_fragment(acc.frag[q], 0.f);
  }
  __device__ static void load(Acc& acc, const float* c, int ldc) {
#pragma unroll
    for (int q = 0; q < 2; ++q)
      wmma::load_matrix_sync(acc.frag[q], c + warp_row0() * ldc + warp_col0(q), ldc,
                             wmma::mem_row_major);
  }
  __device__ static void store(const Acc& acc, float* c, int ldc) {
#pragma unroll
    for (int q = 0; q < 2; ++q)
      wmma::store_matrix_sync(c + warp_row0() * ldc + warp_col0(q), acc.frag[q], ldc,
                              wmma::mem_row_major);
  }
  template <bool kARow, bool kBRow>
  __device__ static void mma(Acc& acc, const float* a, int lda, const float* b, int ldb, int k) {
    using ALayout = std::conditional_t<kARow, wmma::row_major, wmma::col_major>;
    using BLayout = std::conditional_t<kBRow, wmma::row_major, wmma::col_major>;
    wmma::fragment<wmma::matrix_a, 16, 16, 8, wmma::precision::tf32, ALayout> fa;
    wmma::fragment<wmma::matrix_b, 16, 16, 8, wmma::precision::tf32, BLayout> fb;
    const int m0 = warp_row0();
    for (int k0 = 0; k0 < k; k0 += 8) {
      wmma::load_matrix_sync(fa, kARow ? a + m0 * lda + k0 : a + k0 * lda + m0, lda);
#pragma unroll
      for (int t = 0; t < fa.num_elements; ++t) fa.x[t] = wmma::__float_to_tf32(fa.x[t]);
#pragma unroll
      for (int q = 0; q < 2; ++q) {
        const int n0 = warp_col0(q);
        wmma::load_matrix_sync(fb, kBRow ? b + k0 * ldb + n0 : b + n0 * ldb + k0, ldb);
#pragma unroll
        for (int t = 0; t < fb.num_elements; ++t) fb.x[t] = wmma::__float_to_tf32(fb.x[t]);
        wmma::mma_sync(acc.frag[q], fa, fb, acc.frag[q]);
      }
    }
  }
};

// Exact fp32 (TF32 disallowed): thread t owns rows t/16 + 16i and columns t%16 + 16j, i, j < 4.
struct FmaEngine {
  using In = float;
  using GradEngine = FmaEngine;
  struct Acc { float v[4][4]; };

  __device__ static void zero(Acc& acc) {
#pragma unroll
    for (int i = 0; i < 4; ++i)
      for (int j = 0; j < 4; ++j) acc.v[i][j] = 0.f;
  }
  __device__ static void load(Acc& acc, const float* c, int ldc) {
    const int tr = threadIdx.x / 16, tc = threadIdx.x % 16;
#pragma unroll
    for (int i = 0; i < 4; ++i)
      for (int j = 0; j < 4; ++j) acc.v[i][j] = c[(tr + 16 * i) * ldc + tc + 16 * j];
  }
  __device__ static void store(const Acc& acc, float* c, int ldc) {
    const int tr = threadIdx.x / 16, tc = threadIdx.x % 16;
#pragma unroll
    for (int i = 0; i < 4; ++i)
      for (int j = 0; j < 4; ++j) c[(tr + 16 * i) * ldc + tc + 16 * j] = acc.v[i][j];
  }
  template <bool kARow, bool kBRow>
  __device__ static void mma(Acc& acc, const float* a, int lda, const float* b, int ldb, int k) {
    const int tr = threadIdx.x / 16, tc = threadIdx.x % 16;
#pragma unroll 4
    for (int kk = 0; kk < k; ++kk) {
      float av[4], bv[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int m = tr + 16 * i;
        av[i] = kARow ? a[m * lda + kk] : a[kk * lda + m];
      }
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int n = tc + 16 * j;
        bv[j] = kBRow ? b[kk * ldb + n] : b[n * ldb + kk];
      }
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc.v[i][j] = fmaf(av[i], bv[j], acc.v[i][j]);
    }
  }
};

// ---------------------------------------------------------------------------------------------
// Shared memory of one block (dynamic, carved in 128-byte aligned pieces: WMMA needs 32-byte
// aligned fragment pointers, and every offset used below is a multiple of 32 bytes).
// ---------------------------------------------------------------------------------------------

constexpr size_t round128(size_t x) { return (x + 127) / 128 * 128; }

template <class Eng>
struct TileSmem {
  using In = typename Eng::In;
  using GradIn = typename Eng::GradEngine::In;  // Gc tile and gradient-product operands
  static_assert(sizeof(GradIn) == sizeof(In), "operand buffers are shared");
  static constexpr int kPad = 16 / static_cast<int>(sizeof(In));  // keeps rows 16-byte aligned
  // D-chunk of the cosine product: 128 bytes of each row (64 fp16/bf16, 32 fp32 values).
  static constexpr int kChunk = 128 / static_cast<int>(sizeof(In));
  static constexpr int kChunkLd = kChunk + kPad;  // f and W chunks (cosines)
  static constexpr int kWideLd = kTile + kPad;    // Gc tile, 64-wide operands of the gradients
  // Two stages (double buffering with cp.async) of an f chunk and a W chunk; the two 64-wide
  // operand buffers of the gradient products alias them (never live at the same time).
  static constexpr size_t kChunkElems = size_t(kTile) * kChunkLd;
  static constexpr size_t kWideElems = size_t(kTile) * kWideLd;
  static constexpr size_t kStageElems =
      4 * kChunkElems > 2 * kWideElems ? 4 * kChunkElems : 2 * kWideElems;
  static constexpr size_t kStageBytes = round128(kStageElems * sizeof(In));
  static constexpr size_t kSBytes = round128(sizeof(float) * kTile * kSLd);
  static constexpr size_t kGBytes = round128(sizeof(In) * kWideElems);
  static constexpr size_t kNormBytes = round128(sizeof(float) * 2 * kTile);
  static constexpr size_t kFixedBytes = kStageBytes + kSBytes + kGBytes + kNormBytes;
  // The backward accumulator: 64 rows x `width` columns of fp32, leading dimension width + 4.
  static constexpr size_t acc_bytes(int width) { return sizeof(float) * kTile * (width + 4); }

  In* stage;     // chunk_f(b), chunk_w(b), wide(b) below
  float* s;      // (64, kSLd) raw dot products <f_i, W_j> of the current tile
  GradIn* g;     // (64, kWideLd) dL/dcos of the tile, scaled for the product that consumes it
  float* nw;     // (64) ||W_j|| of the tile's classes
  float* inv_nw; // (64) 1 / ||W_j||
  float* acc;    // (64, width + 4) backward accumulator

  __device__ explicit TileSmem(unsigned char* base) {
    stage = reinterpret_cast<In*>(base);
    s = reinterpret_cast<float*>(base + kStageBytes);
    g = reinterpret_cast<GradIn*>(base + kStageBytes + kSBytes);
    nw = reinterpret_cast<float*>(base + kStageBytes + kSBytes + kGBytes);
    inv_nw = nw + kTile;
    acc = reinterpret_cast<float*>(base + kFixedBytes);
  }
  // (64, kChunkLd) rows of f / of W, one D-chunk, stage b (0 or 1).
  __device__ In* chunk_f(int b) const { return stage + (2 * b) * kChunkElems; }
  __device__ In* chunk_w(int b) const { return stage + (2 * b + 1) * kChunkElems; }
  // (64, kWideLd) 64 columns of W or f: operand of the gradient products, stage b.
  __device__ In* wide(int b) const { return stage + b * kWideElems; }
};

template <typename In>
struct TileArgs {
  const In* f;       // (B, D) features, raw
  const In* w;       // (C, D) weight, raw (never a normalized copy)
  const float* nw;   // (C) ||W_j||
  int64_t B, C, D;
  bool vec;          // 16-byte loads allowed (D a multiple of 16 / sizeof(In), aligned bases):
                     // then chunks are copied with cp.async, double buffered
};

// cp.async (sm_80+): 16 bytes global -> shared without registers; size 0 writes zeros.
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
  const unsigned int d = static_cast<unsigned int>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(d), "l"(src),
               "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending));
}

// Rows [row0, row0 + 64) x columns [col0, col0 + kWidth) of a row-major (rows, D) matrix into
// shared memory (leading dimension ld); zeros outside the matrix, so padding adds nothing.
// vec: asynchronous 16-byte copies (the caller commits and waits); else plain loads.
template <typename In, int kWidth>
__device__ __forceinline__ void load_chunk(In* dst, int ld, const In* src, int64_t rows, int64_t D,
                                           int64_t row0, int64_t col0, bool vec) {
  if (vec) {
    constexpr int kVec = 16 / sizeof(In);
    constexpr int kPerRow = kWidth / kVec;
    for (int e = threadIdx.x; e < kTile * kPerRow; e += kThreads) {
      const int r = e / kPerRow, c = (e % kPerRow) * kVec;
      const int64_t row = row0 + r, col = col0 + c;
      const bool inside = row < rows && col < D;  // D % kVec == 0: a vector is all in or out
      cp_async16(dst + r * ld + c, inside ? src + row * D + col : src, inside);
    }
  } else {
    for (int e = threadIdx.x; e < kTile * kWidth; e += kThreads) {
      const int r = e / kWidth, c = e % kWidth;
      const int64_t row = row0 + r, col = col0 + c;
      dst[r * ld + c] = (row < rows && col < D) ? src[row * D + col] : narrow<In>(0.f);
    }
  }
}

// ||W_j|| and its inverse for the tile's classes (1 past C, where every dot product is 0).
__device__ __forceinline__ void load_tile_norms(float* nw, float* inv_nw, const float* norms,
                                                int64_t C, int64_t col0) {
  if (threadIdx.x < kTile) {
    const int64_t j = col0 + threadIdx.x;
    const float n = j < C ? norms[j] : 1.f;
    nw[threadIdx.x] = n;
    inv_nw[threadIdx.x] = 1.f / n;
  }
}

// S = f[row0:row0+64] W[col0:col0+64]^T (raw dot products, fp32) into sm.s. Ends synchronized.
// Double buffered: chunk n+1 is in flight (cp.async) while the tensor cores work on chunk n.
template <class Eng>
__device__ void cosine_dots(const TileSmem<Eng>& sm, const TileArgs<typename Eng::In>& args,
                            int64_t row0, int64_t col0) {
  using In = typename Eng::In;
  constexpr int kChunk = TileSmem<Eng>::kChunk;
  constexpr int ld = TileSmem<Eng>::kChunkLd;
  auto issue = [&](int b, int64_t d0) {
    load_chunk<In, kChunk>(sm.chunk_f(b), ld, args.f, args.B, args.D, row0, d0, args.vec);
    load_chunk<In, kChunk>(sm.chunk_w(b), ld, args.w, args.C, args.D, col0, d0, args.vec);
    cp_async_commit();  // an empty group on the synchronous path: harmless
  };
  typename Eng::Acc acc;
  Eng::zero(acc);
  const int64_t num_chunks = (args.D + kChunk - 1) / kChunk;
  if (num_chunks > 0) issue(0, 0);
  for (int64_t n = 0; n < num_chunks; ++n) {
    const int b = static_cast<int>(n & 1);
    if (n + 1 < num_chunks) {
      issue(b ^ 1, (n + 1) * kChunk);  // its buffer was last read before the previous barrier
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    // A = f chunk (row-major, 64 x kChunk); B(k, n) = W chunk[n][k] (column-major view).
    Eng::template mma<true, false>(acc, sm.chunk_f(b), ld, sm.chunk_w(b), ld, kChunk);
    __syncthreads();
  }
  Eng::store(acc, sm.s, kSLd);
  __syncthreads();
}

// acc(64, width) += A (64 x 64, the Gc tile in sm.g) x rows [src0, src0 + 64) of `src` (a
// row-major (rows, D) matrix), columns [d_begin, d_end): the gradient products. kARow: A is
// sm.g (grad_f: Gc/||W|| @ W); otherwise A is sm.g transposed (grad_W: (Gc/||f||)^T @ f).
// Double buffered like cosine_dots. Starts and ends synchronized.
template <class Eng, bool kARow>
__device__ void accumulate_product(const TileSmem<Eng>& sm, const TileArgs<typename Eng::In>& args,
                                   const typename Eng::In* src, int64_t rows, int64_t src0,
                                   int64_t d_begin, int64_t d_end, int acc_ld) {
  using In = typename Eng::In;
  using GradEng = typename Eng::GradEngine;
  using GradIn = typename GradEng::In;
  constexpr int kWideLd = TileSmem<Eng>::kWideLd;
  auto issue = [&](int b, int64_t dc) {
    load_chunk<In, kTile>(sm.wide(b), kWideLd, src, rows, args.D, src0, dc, args.vec);
    cp_async_commit();
  };
  if (d_begin < d_end) issue(0, d_begin);
  for (int64_t dc = d_begin, n = 0; dc < d_end; dc += kTile, ++n) {
    const int b = static_cast<int>(n & 1);
    if (dc + kTile < d_end) {
      issue(b ^ 1, dc + kTile);
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    GradIn* operand = reinterpret_cast<GradIn*>(sm.wide(b));
    if constexpr (!std::is_same_v<In, GradIn>) {
      // fp16 -> bf16 in place (same size; each thread converts the elements it reads back).
      const In* raw = sm.wide(b);
      for (int e = threadIdx.x; e < kTile * kTile; e += kThreads) {
        const int at = (e / kTile) * kWideLd + e % kTile;
        operand[at] = narrow<GradIn>(widen(raw[at]));
      }
      __syncthreads();
    }
    float* acc_tile = sm.acc + (dc - d_begin);
    typename GradEng::Acc acc;
    GradEng::load(acc, acc_tile, acc_ld);
    // kARow: A(m = row, k = class) = g[m][k]. Else A(m = class, k = row) = g[k][m], the Gc
    // tile read column-major.
    GradEng::template mma<kARow, true>(acc, sm.g, kWideLd, operand, kWideLd, kTile);
    GradEng::store(acc, acc_tile, acc_ld);
    __syncthreads();
  }
}

// ---------------------------------------------------------------------------------------------
// Forward: per-row reduction over the class tiles of one split, then an exact merge.
// An epilogue Epi provides:
//   Row row(int64_t i)                                   per-row constants
//   State init()                                         identity of the reduction
//   void reduce(State&, const Row&, const float* s_row, const float* nw, const float* inv_nw,
//               int sub, int64_t col0, int64_t C)         one thread's 16 columns of the tile
//   void merge(State&, const State&)                     associative and commutative
//   void finish(const TileArgs<In>&, int64_t i, const State&, int lane)   one warp per row
//   kStateSize: floats in State::v
// ---------------------------------------------------------------------------------------------

template <class Eng, class Epi>
__global__ void __launch_bounds__(kThreads)
    reduce_rows_kernel(const TileArgs<typename Eng::In> args, const Epi epi,
                       int64_t tiles_per_split, float* __restrict__ partial) {
  extern __shared__ __align__(128) unsigned char smem_raw[];
  const TileSmem<Eng> sm(smem_raw);
  const int r = threadIdx.x / 4, sub = threadIdx.x % 4;
  const int64_t row0 = int64_t(blockIdx.x) * kTile, i = row0 + r;
  const bool row_ok = i < args.B;
  const typename Epi::Row row = epi.row(row_ok ? i : 0);  // rows past B are never stored
  typename Epi::State st = epi.init();

  const int64_t num_tiles = (args.C + kTile - 1) / kTile;
  const int64_t t_begin = int64_t(blockIdx.y) * tiles_per_split;
  const int64_t t_end = std::min(t_begin + tiles_per_split, num_tiles);
  for (int64_t t = t_begin; t < t_end; ++t) {
    const int64_t col0 = t * kTile;
    load_tile_norms(sm.nw, sm.inv_nw, args.nw, args.C, col0);
    cosine_dots<Eng>(sm, args, row0, col0);
    if (row_ok) epi.reduce(st, row, sm.s + r * kSLd, sm.nw, sm.inv_nw, sub, col0, args.C);
    __syncthreads();  // the next tile overwrites s and the norms
  }
  // The 4 threads of a row hold disjoint columns: merge them.
  for (int offset = 1; offset < 4; offset <<= 1) {
    typename Epi::State other;
    for (int k = 0; k < Epi::kStateSize; ++k)
      other.v[k] = __shfl_xor_sync(0xffffffffu, st.v[k], offset);
    epi.merge(st, other);
  }
  if (sub == 0 && row_ok) {
    float* out = partial + (int64_t(blockIdx.y) * args.B + i) * Epi::kStateSize;
    for (int k = 0; k < Epi::kStateSize; ++k) out[k] = st.v[k];
  }
}

// One warp per row merges the (num_splits) partial states and writes the outputs.
template <typename In, class Epi>
__global__ void __launch_bounds__(kThreads)
    merge_rows_kernel(const TileArgs<In> args, const Epi epi, const float* __restrict__ partial,
                      int num_splits) {
  const int lane = threadIdx.x % 32;
  const int64_t i = int64_t(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (i >= args.B) return;
  typename Epi::State st = epi.init();
  for (int split = lane; split < num_splits; split += 32) {
    typename Epi::State other;
    const float* in = partial + (int64_t(split) * args.B + i) * Epi::kStateSize;
    for (int k = 0; k < Epi::kStateSize; ++k) other.v[k] = in[k];
    epi.merge(st, other);
  }
  for (int offset = 16; offset > 0; offset >>= 1) {
    typename Epi::State other;
    for (int k = 0; k < Epi::kStateSize; ++k)
      other.v[k] = __shfl_xor_sync(0xffffffffu, st.v[k], offset);
    epi.merge(st, other);
  }
  epi.finish(args, i, st, lane);
}

// ---------------------------------------------------------------------------------------------
// Backward. A backward epilogue provides Row row(i) and
//   float grad(const Row&, int64_t j, float cos, float nw_j, float& row_term, float& col_term)
// returning dL/dcos_ij divided by the factor k of the launcher (s for the softmax, 1 for the
// agent losses), and the terms of the row sums (grad of a_i / k) and column sums (grad of b_j / k
// and of s). Rows past B and columns past C get 0 without calling it.
// ---------------------------------------------------------------------------------------------

// Columns [d_begin, d_begin + width) of grad_f~ for one row tile and one split of the classes.
template <class Eng, class Epi>
__global__ void __launch_bounds__(kThreads)
    grad_features_kernel(const TileArgs<typename Eng::In> args, const Epi epi,
                         int64_t tiles_per_split, int64_t d_begin, int width,
                         float* __restrict__ grad_acc, float* __restrict__ row_sums) {
  using In = typename Eng::In;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  const TileSmem<Eng> sm(smem_raw);
  constexpr int kWideLd = TileSmem<Eng>::kWideLd;
  const int acc_ld = width + 4;
  const int r = threadIdx.x / 4, sub = threadIdx.x % 4;
  const int64_t row0 = int64_t(blockIdx.x) * kTile, i = row0 + r;
  const bool row_ok = i < args.B;
  const typename Epi::Row row = epi.row(row_ok ? i : 0);

  for (int e = threadIdx.x; e < kTile * acc_ld; e += kThreads) sm.acc[e] = 0.f;
  float row_sum = 0.f;
  const int64_t d_end = std::min(args.D, d_begin + width);
  const int64_t num_tiles = (args.C + kTile - 1) / kTile;
  const int64_t t_begin = int64_t(blockIdx.y) * tiles_per_split;
  const int64_t t_end = std::min(t_begin + tiles_per_split, num_tiles);
  for (int64_t t = t_begin; t < t_end; ++t) {
    const int64_t col0 = t * kTile;
    load_tile_norms(sm.nw, sm.inv_nw, args.nw, args.C, col0);
    cosine_dots<Eng>(sm, args, row0, col0);
    bool nonzero = false;
#pragma unroll
    for (int k = 0; k < kColsPerThread; ++k) {
      const int c = sub + 4 * k;
      const int64_t j = col0 + c;
      float v = 0.f;
      if (row_ok && j < args.C) {
        const float cos = sm.s[r * kSLd + c] * row.inv_nf * sm.inv_nw[c];
        float row_term = 0.f, col_term = 0.f;
        const float gc = epi.grad(row, j, cos, sm.nw[c], row_term, col_term);
        row_sum += row_term;
        v = gc * sm.inv_nw[c];  // grad_f~_i = sum_j Gc_ij W_j / ||W_j||
      }
      nonzero |= v != 0.f;  // true for NaN too
      sm.g[r * kWideLd + c] = narrow<typename TileSmem<Eng>::GradIn>(v);
    }
    // Tiles with no gradient at all (inactive hinges, ignored rows) skip the product.
    if (!__syncthreads_or(nonzero)) continue;
    accumulate_product<Eng, true>(sm, args, args.w, args.C, col0, d_begin, d_end, acc_ld);
  }
  __syncthreads();
  for (int e = threadIdx.x; e < kTile * width; e += kThreads) {
    const int rr = e / width, cc = e % width;
    const int64_t ii = row0 + rr, d = d_begin + cc;
    if (ii < args.B && d < args.D) atomicAdd(grad_acc + ii * args.D + d, sm.acc[rr * acc_ld + cc]);
  }
  row_sum += __shfl_xor_sync(0xffffffffu, row_sum, 1);
  row_sum += __shfl_xor_sync(0xffffffffu, row_sum, 2);
  if (row_sums != nullptr && d_begin == 0 && sub == 0 && row_ok) atomicAdd(row_sums + i, row_sum);
}

// Where grad_weight_kernel puts its result.
template <typename In>
struct WeightOut {
  float* acc;        // (C, D) fp32, atomically accumulated (several B splits or D passes), or
  In* grad;          // (C, D) final grad_W, written by the block itself (eq. 4 in-kernel)
  float* col_sums;   // (C) column sums (grad of b_j / k, and of s), or null
  float k;           // grad_W~ = k * accumulated product
  bool use_coef;     // add k * col_sum_j W~_j (weight norms are a factor of the logits)
};

// Columns [d_begin, d_begin + width) of grad_W~ for one class tile; B split over gridDim.y.
template <class Eng, class Epi>
__global__ void __launch_bounds__(kThreads)
    grad_weight_kernel(const TileArgs<typename Eng::In> args, const Epi epi, int64_t d_begin,
                       int width, const WeightOut<typename Eng::In> out) {
  using In = typename Eng::In;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  const TileSmem<Eng> sm(smem_raw);
  constexpr int kWideLd = TileSmem<Eng>::kWideLd;
  const int acc_ld = width + 4;
  const int r = threadIdx.x / 4, sub = threadIdx.x % 4;
  const int64_t col0 = int64_t(blockIdx.x) * kTile;

  for (int e = threadIdx.x; e < kTile * acc_ld; e += kThreads) sm.acc[e] = 0.f;
  load_tile_norms(sm.nw, sm.inv_nw, args.nw, args.C, col0);  // fixed for the whole block
  float col_sum[kColsPerThread];
#pragma unroll
  for (int k = 0; k < kColsPerThread; ++k) col_sum[k] = 0.f;
  const int64_t d_end = std::min(args.D, d_begin + width);
  const int64_t row_tiles = (args.B + kTile - 1) / kTile;
  for (int64_t rt = blockIdx.y; rt < row_tiles; rt += gridDim.y) {
    const int64_t row0 = rt * kTile, i = row0 + r;
    const bool row_ok = i < args.B;
    const typename Epi::Row row = epi.row(row_ok ? i : 0);
    cosine_dots<Eng>(sm, args, row0, col0);
    bool nonzero = false;
#pragma unroll
    for (int k = 0; k < kColsPerThread; ++k) {
      const int c = sub + 4 * k;
      const int64_t j = col0 + c;
      float v = 0.f;
      if (row_ok && j < args.C) {
        const float cos = sm.s[r * kSLd + c] * row.inv_nf * sm.inv_nw[c];
        float row_term = 0.f, col_term = 0.f;
        const float gc = epi.grad(row, j, cos, sm.nw[c], row_term, col_term);
        col_sum[k] += col_term;
        v = gc * row.inv_nf;  // grad_W~_j = sum_i Gc_ij f_i / ||f_i||
      }
      nonzero |= v != 0.f;
      sm.g[r * kWideLd + c] = narrow<typename TileSmem<Eng>::GradIn>(v);
    }
    if (!__syncthreads_or(nonzero)) continue;
    accumulate_product<Eng, false>(sm, args, args.f, args.B, row0, d_begin, d_end, acc_ld);
  }
  __syncthreads();
  // Column sums over the 64 rows of partials (s is free now); row 0 of s ends up with them.
#pragma unroll
  for (int k = 0; k < kColsPerThread; ++k) sm.s[r * kSLd + sub + 4 * k] = col_sum[k];
  __syncthreads();
  if (threadIdx.x < kTile) {
    float total = 0.f;
    for (int rr = 0; rr < kTile; ++rr) total += sm.s[rr * kSLd + threadIdx.x];
    sm.s[threadIdx.x] = total;
    const int64_t j = col0 + threadIdx.x;
    if (out.col_sums != nullptr && d_begin == 0 && j < args.C) {
      if (out.acc != nullptr) atomicAdd(out.col_sums + j, total);
      else out.col_sums[j] = total;
    }
  }
  __syncthreads();

  if (out.acc != nullptr) {
    for (int e = threadIdx.x; e < kTile * width; e += kThreads) {
      const int cc = e / width, dd = e % width;
      const int64_t j = col0 + cc, d = d_begin + dd;
      if (j < args.C && d < args.D) atomicAdd(out.acc + j * args.D + d, sm.acc[cc * acc_ld + dd]);
    }
    return;
  }
  // This block has the whole of grad_W~ for its classes (one B split, one D pass): eq. 4 here,
  //   grad_W_j = (k g - W~_j <k g, W~_j>) / ||W_j|| + coef_j W~_j,   coef_j = k col_sum_j.
  const int lane = threadIdx.x % 32;
  for (int cc = threadIdx.x / 32; cc < kTile; cc += kWarps) {
    const int64_t j = col0 + cc;
    if (j >= args.C) break;
    const In* wj = args.w + j * args.D;
    const float* gj = sm.acc + cc * acc_ld;
    float dot = 0.f;
    for (int64_t d = lane; d < args.D; d += 32) dot += gj[d] * widen(wj[d]);
    dot = warp_sum(dot);
    const float inv = sm.inv_nw[cc];
    const float proj = out.k * dot * inv * inv;
    const float coef = out.use_coef ? out.k * sm.s[cc] : 0.f;
    In* outj = out.grad + j * args.D;
    for (int64_t d = lane; d < args.D; d += 32) {
      const float x = widen(wj[d]);
      outj[d] = narrow<In>((out.k * gj[d] - x * proj) * inv + coef * x * inv);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Row kernels (one warp per row): norms, target cosines, eq. 3 and eq. 4.
// ---------------------------------------------------------------------------------------------

template <typename T>
__global__ void __launch_bounds__(kThreads)
    row_norms_kernel(const T* __restrict__ x, int64_t N, int64_t D, float* __restrict__ norms) {
  const int lane = threadIdx.x % 32;
  const int64_t row = int64_t(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (row >= N) return;
  const T* xr = x + row * D;
  float ss = 0.f;
  for (int64_t d = lane; d < D; d += 32) {
    const float v = widen(xr[d]);
    ss += v * v;
  }
  ss = warp_sum(ss);
  if (lane == 0) norms[row] = sqrtf(ss + static_cast<float>(kNormEps));
}

// cos_iy = <f_i, W_y> / (||f_i|| ||W_y||) for rows with a local target (0 otherwise).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    target_cosine_kernel(const T* __restrict__ f, const T* __restrict__ w, LabelMap labels,
                         const float* __restrict__ nf, const float* __restrict__ nw, int64_t B,
                         int64_t D, float* __restrict__ cos_y) {
  const int lane = threadIdx.x % 32;
  const int64_t i = int64_t(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (i >= B) return;
  const int64_t y = labels.local(i);
  if (y < 0) {
    if (lane == 0) cos_y[i] = 0.f;
    return;
  }
  const T* fi = f + i * D;
  const T* wy = w + y * D;
  float dot = 0.f;
  for (int64_t d = lane; d < D; d += 32) dot += widen(fi[d]) * widen(wy[d]);
  dot = warp_sum(dot);
  if (lane == 0) cos_y[i] = dot * (1.f / nf[i]) * (1.f / nw[y]);
}

// Paper eq. 3: x / sqrt(sum x^2 + eps).
template <typename T, typename Acc>
__global__ void __launch_bounds__(kThreads)
    l2_normalize_kernel(const T* __restrict__ x, int64_t N, int64_t D, double eps,
                        T* __restrict__ out) {
  const int lane = threadIdx.x % 32;
  const int64_t row = int64_t(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (row >= N) return;
  const T* xr = x + row * D;
  Acc ss = 0;
  for (int64_t d = lane; d < D; d += 32) {
    const Acc v = widen(xr[d]);
    ss += v * v;
  }
  ss = warp_sum(ss);
  const Acc inv = Acc(1) / sqrt(ss + static_cast<Acc>(eps));
  for (int64_t d = lane; d < D; d += 32) out[row * D + d] = narrow<T>(widen(xr[d]) * inv);
}

// Paper eq. 4 with a factor and a norm term:
//   out = (k g - x~ <k g, x~>) / ||x|| + coef_scale coef_i x~
// norms null: ||x|| = sqrt(sum x^2 + eps) computed here; coef null: no norm term.
template <typename T, typename G, typename Acc>
__global__ void __launch_bounds__(kThreads)
    normalize_backward_kernel(const G* __restrict__ grad, const T* __restrict__ x,
                              const float* __restrict__ norms, const float* __restrict__ coef,
                              Acc k, Acc coef_scale, double eps, int64_t N, int64_t D,
                              T* __restrict__ out) {
  const int lane = threadIdx.x % 32;
  const int64_t row = int64_t(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (row >= N) return;
  const G* gr = grad + row * D;
  const T* xr = x + row * D;
  Acc dot = 0, ss = 0;
  for (int64_t d = lane; d < D; d += 32) {
    const Acc g = widen(gr[d]), v = widen(xr[d]);
    dot += g * v;
    ss += v * v;
  }
  dot = warp_sum(dot);
  ss = warp_sum(ss);
  const Acc n = norms != nullptr ? static_cast<Acc>(norms[row]) : sqrt(ss + static_cast<Acc>(eps));
  const Acc inv = Acc(1) / n;
  const Acc proj = k * dot * inv * inv;
  const Acc c = coef != nullptr ? coef_scale * static_cast<Acc>(coef[row]) : Acc(0);
  for (int64_t d = lane; d < D; d += 32) {
    const Acc v = widen(xr[d]);
    out[row * D + d] = narrow<T>((k * widen(gr[d]) - v * proj) * inv + c * v * inv);
  }
}

// ---------------------------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------------------------

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline unsigned int row_blocks(int64_t rows) {
  return static_cast<unsigned int>(std::max<int64_t>(1, ceil_div(rows, kWarps)));
}

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

inline int sm_count() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }

inline void check_loss_dtype(const at::Tensor& features) {
  const auto t = features.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kHalf || t == at::kBFloat16,
              "normface_kernels CUDA backend: features must be float32, float16 or bfloat16, got ",
              t, " (float64 is CPU-only: use backend='cpu' or backend='reference')");
}

// Runs body(engine) with the tensor-core path for the dtype: WMMA for fp16/bf16, TF32 for fp32
// only when torch allows it (torch.backends.cuda.matmul.allow_tf32), exact fp32 FMA otherwise.
template <class F>
void dispatch_engine(at::ScalarType dtype, F&& body) {
  switch (dtype) {
    case at::kHalf: body(WmmaEngine<__half>{}); break;
    case at::kBFloat16: body(WmmaEngine<__nv_bfloat16>{}); break;
    case at::kFloat:
      if (at::globalContext().allowTF32CuBLAS()) body(Tf32Engine{});
      else body(FmaEngine{});
      break;
    default: TORCH_CHECK(false, "normface_kernels CUDA backend: unsupported dtype ", dtype);
  }
}

template <typename Kernel>
void allow_smem(Kernel kernel, size_t bytes) {
  if (bytes > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(bytes)));
  }
}

// Norms and target cosines: the B + C + B floats every loss needs, computed once per call.
struct Prep {
  at::Tensor nf;     // (B) ||f_i||
  at::Tensor nw;     // (C) ||W_j||
  at::Tensor cos_y;  // (B) cos of the local target, 0 where none
};

template <typename In>
Prep prepare(const In* f, const In* w, const LabelMap& labels, int64_t B, int64_t C, int64_t D,
             const at::TensorOptions& float_opts) {
  auto stream = at::cuda::getCurrentCUDAStream();
  Prep p{at::empty({B}, float_opts), at::empty({C}, float_opts), at::empty({B}, float_opts)};
  row_norms_kernel<In><<<row_blocks(C), kThreads, 0, stream>>>(w, C, D, p.nw.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (B > 0) {
    row_norms_kernel<In><<<row_blocks(B), kThreads, 0, stream>>>(f, B, D, p.nf.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    target_cosine_kernel<In><<<row_blocks(B), kThreads, 0, stream>>>(
        f, w, labels, p.nf.data_ptr<float>(), p.nw.data_ptr<float>(), B, D,
        p.cos_y.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return p;
}

template <typename In>
TileArgs<In> make_tile_args(const at::Tensor& f, const at::Tensor& w, const Prep& prep) {
  TileArgs<In> a;
  a.f = reinterpret_cast<const In*>(f.data_ptr());
  a.w = reinterpret_cast<const In*>(w.data_ptr());
  a.nw = prep.nw.data_ptr<float>();
  a.B = f.size(0);
  a.C = w.size(0);
  a.D = f.size(1);
  // NORMFACE_CUDA_SYNC_LOADS=1 forces the plain-load path (a debugging aid for cp.async).
  static const bool sync_loads = [] {
    const char* v = std::getenv("NORMFACE_CUDA_SYNC_LOADS");
    return v != nullptr && std::string(v) == "1";
  }();
  a.vec = !sync_loads && a.D % (16 / sizeof(In)) == 0 && aligned16(a.f) && aligned16(a.w);
  return a;
}

// Splits of the class tiles so that about target_blocks blocks run.
struct ClassSplit {
  int64_t tiles_per_split;
  int64_t num_splits;
};

inline ClassSplit plan_class_split(int64_t row_tiles, int64_t class_tiles, int64_t target_blocks) {
  int64_t splits = std::min<int64_t>(class_tiles, ceil_div(target_blocks, row_tiles));
  splits = std::max<int64_t>(1, std::min<int64_t>(splits, 65535));
  const int64_t per = ceil_div(class_tiles, splits);
  return {per, ceil_div(class_tiles, per)};
}

// Forward: reduce_rows_kernel over (B tiles, C splits), then the merge (which writes outputs).
template <class Eng, class Epi>
void reduce_rows(const TileArgs<typename Eng::In>& args, const Epi& epi,
                 const at::TensorOptions& float_opts) {
  using In = typename Eng::In;
  if (args.B == 0) return;
  auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t row_tiles = ceil_div(args.B, kTile), class_tiles = ceil_div(args.C, kTile);
  const ClassSplit split = plan_class_split(row_tiles, class_tiles, 4 * sm_count());
  at::Tensor partial = at::empty({split.num_splits, args.B, Epi::kStateSize}, float_opts);
  const size_t smem = TileSmem<Eng>::kFixedBytes;
  auto kernel = reduce_rows_kernel<Eng, Epi>;
  allow_smem(kernel, smem);
  kernel<<<dim3(row_tiles, split.num_splits), kThreads, smem, stream>>>(
      args, epi, split.tiles_per_split, partial.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  merge_rows_kernel<In, Epi><<<row_blocks(args.B), kThreads, 0, stream>>>(
      args, epi, partial.data_ptr<float>(), static_cast<int>(split.num_splits));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Width of the backward accumulator: all of D when shared memory allows (one pass), otherwise
// the widest multiple of 64 that fits (D is then covered in several passes, recomputing tiles).
template <class Eng>
int accumulator_width(int64_t D) {
  const size_t limit = at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin;
  TORCH_CHECK(limit > TileSmem<Eng>::kFixedBytes + TileSmem<Eng>::acc_bytes(kTile),
              "normface_kernels CUDA backend: not enough shared memory per block (", limit, ")");
  int64_t fit = static_cast<int64_t>((limit - TileSmem<Eng>::kFixedBytes) /
                                     (sizeof(float) * kTile)) - 4;
  fit = fit / kTile * kTile;
  const int64_t want = std::max<int64_t>(kTile, ceil_div(D, kTile) * kTile);
  return static_cast<int>(std::min(fit, want));
}

// What the dense backward of a loss produces, in the input dtype (grad_f, grad_w preallocated).
struct DenseGrads {
  at::Tensor grad_f;    // (B, D)
  at::Tensor grad_w;    // (C, D)
  at::Tensor col_sums;  // (C) fp32 when want_sums: sum_i (dL/dz_ij) a_i h_ij
};

// grad_f and grad_w of a loss whose dL/dcos the epilogue gives (divided by k), with eq. 4 applied.
// want_sums: also the row sums (used when !norm_f: grad_a) and column sums (grad_b, grad_s).
template <class Eng, class Epi>
void dense_backward(const TileArgs<typename Eng::In>& args, const Epi& epi, const Prep& prep,
                    float k, bool want_sums, bool norm_f, bool norm_w, DenseGrads& out) {
  using In = typename Eng::In;
  auto stream = at::cuda::getCurrentCUDAStream();
  const auto float_opts = prep.nw.options();
  const int64_t B = args.B, C = args.C, D = args.D;
  const int64_t row_tiles = ceil_div(B, kTile), class_tiles = ceil_div(C, kTile);
  const int width = accumulator_width<Eng>(D);
  const int64_t passes = std::max<int64_t>(1, ceil_div(D, width));
  const size_t smem = TileSmem<Eng>::kFixedBytes + TileSmem<Eng>::acc_bytes(width);
  const int sms = sm_count();
  if (want_sums) out.col_sums = at::zeros({C}, float_opts);
  if (B == 0) {
    out.grad_w.zero_();
    return;
  }

  // grad_f~ over (B tiles, C splits) into an fp32 (B, D) buffer, then eq. 4 per row.
  {
    at::Tensor acc = at::zeros({B, D}, float_opts);
    at::Tensor row_sums = want_sums ? at::zeros({B}, float_opts) : at::Tensor();
    const ClassSplit split = plan_class_split(row_tiles, class_tiles, 2 * sms);
    auto kernel = grad_features_kernel<Eng, Epi>;
    allow_smem(kernel, smem);
    for (int64_t p = 0; p < passes; ++p) {
      kernel<<<dim3(row_tiles, split.num_splits), kThreads, smem, stream>>>(
          args, epi, split.tiles_per_split, p * width, width, acc.data_ptr<float>(),
          want_sums ? row_sums.data_ptr<float>() : nullptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    normalize_backward_kernel<In, float, float><<<row_blocks(B), kThreads, 0, stream>>>(
        acc.data_ptr<float>(), args.f, prep.nf.data_ptr<float>(),
        (want_sums && !norm_f) ? row_sums.data_ptr<float>() : nullptr, k, k, kNormEps, B, D,
        reinterpret_cast<In*>(out.grad_f.data_ptr()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  // grad_W~ over (C tiles, B splits). Enough class tiles: one B split, eq. 4 in the kernel.
  {
    const int64_t b_splits = class_tiles >= 2 * sms
                                 ? 1
                                 : std::min<int64_t>(row_tiles, ceil_div(2 * sms, class_tiles));
    const bool direct = b_splits == 1 && passes == 1;
    at::Tensor acc = direct ? at::Tensor() : at::zeros({C, D}, float_opts);
    WeightOut<In> wo;
    wo.acc = direct ? nullptr : acc.data_ptr<float>();
    wo.grad = direct ? reinterpret_cast<In*>(out.grad_w.data_ptr()) : nullptr;
    wo.col_sums = want_sums ? out.col_sums.data_ptr<float>() : nullptr;
    wo.k = k;
    wo.use_coef = want_sums && !norm_w;
    auto kernel = grad_weight_kernel<Eng, Epi>;
    allow_smem(kernel, smem);
    for (int64_t p = 0; p < passes; ++p) {
      kernel<<<dim3(class_tiles, b_splits), kThreads, smem, stream>>>(args, epi, p * width, width,
                                                                     wo);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if (!direct) {
      normalize_backward_kernel<In, float, float><<<row_blocks(C), kThreads, 0, stream>>>(
          acc.data_ptr<float>(), args.w, args.nw, wo.use_coef ? wo.col_sums : nullptr, k, k,
          kNormEps, C, D, reinterpret_cast<In*>(out.grad_w.data_ptr()));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  }
}

}  // namespace cuda
}  // namespace normface
