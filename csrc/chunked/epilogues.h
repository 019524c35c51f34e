// The device-specific half of the chunked path: small element and row kernels around the library
// GEMMs (docs/kernels.md "Chunked path"). Each entry point is implemented twice, for CPU tensors
// (csrc/chunked/cpu_epilogues.cpp, at::parallel_for) and CUDA tensors (csrc/cuda/*.cu, on the
// current stream), with the per-element math of csrc/common.h; the orchestration
// (csrc/chunked/*.cpp) calls the names below, which pick the device of their first tensor.
//
// Conventions: B rows (samples), C classes, D features; a chunk is the classes [j0, j0 + n) and
// S its (B, n) matrix of raw dot products <f_i, W_j> from the GEMM. "acc" is the accumulation
// dtype (float32; float64 for float64 inputs on CPU). Every tensor is contiguous and on one
// device; (B,) and (C,) vectors are acc unless said; `target` is int64, the local target class
// of each row or -1 (ignored, or target in another shard). An undefined optional tensor means
// "none" (a factor of 1, no output). The scale s and the fp16 gradient scale are 0-dim acc
// tensors read by pointer on the device: no host-device synchronization.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

#include "common.h"  // Margins

namespace normface {
namespace chunked {

// Columns of the per-row table of the softmax (softmax_rows), each (B,):
//   kRow   A_i = 1/||f_i|| or unnormalized_factor      -- z_ij = s A_i B_j S_ij off target
//   kZ     z_iy = s v_iy, the target logit               (0 without a local target)
//   kV     v_iy = a_i b_y t_i                            (dz_iy / ds)
//   kDt    dt_i/dcos_iy (common.h margin_target)
//   kTmc   t_i - dt_i cos_iy                             (the target terms of grad a and grad b)
//   kA     a_i = 1 or ||f_i||
//   kBy    b_y = 1 or ||W_y||
enum SoftmaxRowField : int64_t { kRow, kZ, kV, kDt, kTmc, kA, kBy, kSoftmaxRowFields };

// Row i of that table (column k at out[k * B + i]), from the target cosine cos_y, the local
// target y (-1: none), ||f_i||, the class norms nw and s. softmax_rows runs it on both devices.
template <typename T>
NF_HOST_DEVICE void softmax_row_terms(T cos_y, int64_t y, T nf, const T* nw, T s, const Margins& mg,
                                      T* out, int64_t i, int64_t B) {
  const T A = mg.normalize_features ? T(1) / nf : unnormalized_factor(nf);
  const T a = mg.normalize_features ? T(1) : nf;
  T t = 0, dt = 0, by = 0, v = 0, tmc = 0;
  if (y >= 0) {
    margin_target<T>(cos_y, T(mg.m1), T(mg.m2), T(mg.m3), T(mg.lam), &t, &dt);
    by = mg.normalize_weight ? T(1) : nw[y];
    v = (a * by) * t;
    tmc = t - dt * cos_y;
  }
  out[kRow * B + i] = A;
  out[kZ * B + i] = s * v;
  out[kV * B + i] = v;
  out[kDt * B + i] = dt;
  out[kTmc * B + i] = tmc;
  out[kA * B + i] = a;
  out[kBy * B + i] = by;
}

// The per-row and per-column terms of the softmax chunk epilogues.
struct SoftmaxTerms {
  at::Tensor target;      // (B,) int64
  at::Tensor table;       // (kSoftmaxRowFields, B), softmax_rows
  at::Tensor col_factor;  // (C,) B_j = 1/||W_j||, or common.h unnormalized_factor(||W_j||)
  at::Tensor scale;       // 0-dim s
  // Backward only.
  at::Tensor lse;       // (B,) saved logsumexp
  at::Tensor g, e;      // (B,) upstream gradients of loss (0 on ignored rows) and of lse
  at::Tensor active;    // (B,) bool: rows with a gradient; the others write exact zeros
  at::Tensor gc_scale;  // 0-dim power of two applied to P before a float16 cast, or undefined
  // The dtype of features and weight: a 16-bit P is cast to it on CUDA, and rounded through it
  // on CPU (where the GEMMs run in the acc dtype), so both devices multiply the same values.
  at::ScalarType input_dtype = at::kFloat;
};

// The per-row terms of the agent-loss chunk epilogues (both sides normalized,
// d_ij = agent_distance(scaled_dot(S_ij, 1/||f_i||, 1/||W_j||))).
struct AgentTerms {
  at::Tensor target;  // (B,) int64; the target column is not a negative
  at::Tensor inv_nf;  // (B,) 1/||f_i||
  at::Tensor inv_nw;  // (C,) 1/||W_j||
  at::Tensor bound;   // (B,) hinge bound: neg_margin, or margin + d_iy
  // Backward only.
  at::Tensor slope;        // (B,) dL/dcos_ij of an active negative: 2 g_i
  at::Tensor target_grad;  // (B,) dL/dcos_iy written in the target column (0: none)
  at::Tensor active;       // (B,) bool: rows with a gradient; the others write exact zeros
  at::Tensor gc_scale;     // as in SoftmaxTerms
  at::ScalarType input_dtype = at::kFloat;
};

// How the finished gradient of a row of U is written (finish_rows), paper eq. 4 generalized:
//   u    = U_r * u_scale * row_scale[dst]               (the factors that are defined)
//   x~   = x[dst] * inv_norm[dst]
//   out[dst] = u - x~ <u, x~>      project (the side is normalized)
//            = u + coef[dst] x~    otherwise (coef undefined: u)
// A row whose redirect[dst] >= 0 is instead stored, as u, into held[redirect[dst]]; a row whose
// keep[dst] is false gets exact zeros (a sample without gradient, whatever its features hold).
struct FinishArgs {
  at::Tensor x;         // (N, D) the input rows (features or weight), input dtype
  at::Tensor inv_norm;  // (N,)
  bool project = true;
  at::Tensor coef;       // (N,) or undefined
  at::Tensor u_scale;    // 0-dim or undefined
  at::Tensor row_scale;  // (N,) or undefined
  at::Tensor redirect;   // (N,) int64 or undefined
  at::Tensor held;       // (E, D) acc, with redirect
  at::Tensor keep;       // (N,) bool or undefined
  at::Tensor out;        // (N, D) input dtype
};

#define NF_CHUNKED_EPILOGUES(NS)                                                                 \
  namespace NS {                                                                                 \
  /* ||x_r|| = sqrt(sum_d x_rd^2 + eps) and its inverse for each row of x (N, D). */             \
  void row_norms(const at::Tensor& x, double eps, at::Tensor& norm, at::Tensor& inv_norm);       \
  /* out_r = x_r * inv_norm_r (paper eq. 3), in x's dtype. */                                    \
  void scale_rows(const at::Tensor& x, const at::Tensor& inv_norm, at::Tensor& out);             \
  /* cos_i = scaled_dot(<f_i, W_k>, inv_nf_i, inv_nw_k) for k = index_i >= 0, else 0. */         \
  void pair_cosines(const at::Tensor& f, const at::Tensor& w, const at::Tensor& index,           \
                    const at::Tensor& inv_nf, const at::Tensor& inv_nw, at::Tensor& cos);        \
  /* The softmax row table from the target cosines (SoftmaxRowField). */                         \
  void softmax_rows(const at::Tensor& cos_y, const at::Tensor& target, const at::Tensor& nf,     \
                    const at::Tensor& nw, const at::Tensor& scale, const Margins& mg,            \
                    at::Tensor& table);                                                          \
  /* Forward: z of the chunk merged into each row's running (max, sum) of exp (float64). */      \
  void softmax_forward_chunk(const at::Tensor& S, int64_t j0, const SoftmaxTerms& t,             \
                             at::Tensor& run_max, at::Tensor& run_sum);                          \
  /* Backward: P = dL/dS (times gc_scale) in P's dtype (P may alias S); row_acc_i += */          \
  /* sum_j G_ij v_ij (dL/ds of the row). */                                                      \
  void softmax_backward_chunk(const at::Tensor& S, at::Tensor& P, int64_t j0,                    \
                              const SoftmaxTerms& t, at::Tensor& row_acc);                       \
  /* Forward: hinge_sum_i += sum over the chunk's negatives of hinge(bound_i, d_ij). */          \
  void agent_forward_chunk(const at::Tensor& S, int64_t j0, const AgentTerms& t,                 \
                           at::Tensor& hinge_sum);                                               \
  /* Backward: P = dL/dS (times gc_scale); active_count_i += active hinges (if defined). */      \
  void agent_backward_chunk(const at::Tensor& S, at::Tensor& P, int64_t j0, const AgentTerms& t, \
                            at::Tensor& active_count);                                           \
  /* Running argmin over the chunk's negatives of d_ij (argmin_before order). */                 \
  void argmin_chunk(const at::Tensor& S, int64_t j0, const AgentTerms& t, at::Tensor& best_d,    \
                    at::Tensor& best_k);                                                         \
  /* Rows r of U to dst = offset + r (index undefined) or index_r (skipped when < 0). */         \
  void finish_rows(const at::Tensor& U, int64_t offset, const at::Tensor& index,                 \
                   const FinishArgs& a);                                                         \
  }

NF_CHUNKED_EPILOGUES(cpu)
#ifdef NORMFACE_WITH_CUDA
NF_CHUNKED_EPILOGUES(cuda)
namespace cuda {
// The L2 cache of a CUDA device, in bytes (the default chunk budget).
int64_t l2_cache_bytes(const at::Device& device);
}  // namespace cuda
#endif
#undef NF_CHUNKED_EPILOGUES

// Calls NAME(args...) of the device of `tensor`.
#ifdef NORMFACE_WITH_CUDA
#define NF_ON_DEVICE(tensor, NAME, ...) \
  ((tensor).is_cuda() ? cuda::NAME(__VA_ARGS__) : cpu::NAME(__VA_ARGS__))
#else
#define NF_ON_DEVICE(tensor, NAME, ...) cpu::NAME(__VA_ARGS__)
#endif

}  // namespace chunked
}  // namespace normface
