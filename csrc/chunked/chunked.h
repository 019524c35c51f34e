// The chunked path (docs/kernels.md "Chunked path"): the classes are walked in chunks; per chunk
// the vendor library does the matrix work (at::mm into preallocated chunk buffers: cuBLAS on CUDA,
// MKL/oneDNN on CPU) and small epilogue kernels (epilogues.h) do everything else. This header is
// the shared ATen orchestration: configuration, the chunk plan and its GEMMs, labels and norms.
//
// Cost per training step: 4 GEMM-equivalents (S = f W_c^T in the forward; S again, P W_c and
// P^T f in the backward), memory O(B D + C + B Cc) for a chunk of Cc classes.
#pragma once

#include <ATen/ATen.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <tuple>
#include <vector>

#include "chunked/epilogues.h"
#include "common.h"

namespace normface {
namespace chunked {

// ---------------------------------------------------------------------------------------------
// Configuration (ops normface::set_chunk_budget / normface::set_cpu_path, registration.cpp)
// ---------------------------------------------------------------------------------------------

// Bytes of the per-chunk buffers (the (B, Cc) GEMM output and gradient operand, the (Cc, D)
// gradient of W), which set the chunk width Cc. The bound: at most 1-2% of the eager
// reference's extra memory (about 12 B C float32 values), 256 MiB at B = 1024. Within it the
// default is the device's L2 cache on CUDA (the epilogue then reads the GEMM's output from L2,
// not HBM: ~6k classes at B = 1024, D = 512, 16-bit, on an H100; not measured yet) and 4 MiB on
// CPU (a thread's chunk buffers about its L2 cache; 1-8 MiB measured alike, 256 MiB 1.5x slower
// at B = 256, D = 128, C = 50k on 2 cores).
constexpr int64_t kMaxDefaultChunkBudget = int64_t{256} << 20;
constexpr int64_t kDefaultCpuChunkBudget = int64_t{4} << 20;

// Sets the budget for every device (bytes > 0; 0 restores the defaults), returns the previous
// setting (0 for the defaults).
int64_t set_chunk_budget(int64_t bytes);
int64_t chunk_budget(const at::Device& device);

// Which kernels the loss ops run on CPU tensors: "blocked" (csrc/cpu, the default) or "chunked"
// (this path). Returns the previous setting.
std::string set_cpu_path(const std::string& path);

// ---------------------------------------------------------------------------------------------
// The chunk plan and its GEMMs
// ---------------------------------------------------------------------------------------------

inline bool is_16bit(at::ScalarType t) { return t == at::kHalf || t == at::kBFloat16; }

// One worker's chunk buffers and GEMMs.
//
// GEMM operands: on CUDA the input dtype (float16/bfloat16 GEMMs with float32 output through
// at::mm's out_dtype; float32 under the allow_tf32 rules); on CPU the acc dtype (16-bit rows of W
// are converted chunk by chunk: CPU BLAS has no fast 16-bit GEMM with a float32 output). The
// gradient operand P is cast to the input dtype on CUDA, and rounded through it on CPU, so both
// devices multiply the same values.
class ChunkWorker {
 public:
  // f_op: the features as GEMM operand (gemm_features); w: (C, D) contiguous weight.
  ChunkWorker(const at::Tensor& f_op, const at::Tensor& w, int64_t chunk);

  // S = f_op W_c^T for the classes [j0, j0 + n): (B, n) acc, a view of the chunk buffer.
  at::Tensor logits(int64_t j0, int64_t n);
  // The buffer the backward epilogue writes P into: S itself when the operand dtype is acc.
  at::Tensor grad_operand(const at::Tensor& S);
  // U += P W_c  (B, D) acc, W_c the chunk of the last logits() call.
  void add_grad_features(at::Tensor& U, const at::Tensor& P);
  // V = P^T f_op  (n, D) acc, a view of the chunk buffer.
  at::Tensor grad_weight(const at::Tensor& P);

 private:
  at::Tensor weight_chunk(int64_t j0, int64_t n);

  at::Tensor f_, w_;
  int64_t B_, D_, chunk_;
  at::ScalarType acc_, op_;
  bool out_fp32_;   // 16-bit GEMM with a float32 output (CUDA)
  bool convert_w_;  // 16-bit W converted to acc per chunk (CPU)
  at::Tensor s_buf_, p_buf_, v_buf_, w_buf_, u_tmp_;
  at::Tensor wc_;  // the current chunk's W operand
};

// The classes [0, C) in chunks of `chunk` classes, walked by `workers` workers.
//
// CUDA: one worker, the chunks in order on the current stream. CPU: the chunks are cut into
// contiguous ranges, one per thread, in one parallel region (a barrier per chunk costs dearly on a
// busy machine), each worker with its own buffers, single-threaded BLAS and its own partial
// results (indexed by worker, merged in worker = class order by the caller).
//
// The chunk size and the workers depend only on (B, C, D, dtype, device, budget, threads): the
// forward and the backward walk the same chunks with the same GEMM shapes, so the backward's
// logits are bit-identical to the forward's.
class ChunkWalk {
 public:
  ChunkWalk(const at::Tensor& f_op, const at::Tensor& w);

  int64_t B, C, D;
  int64_t chunk;  // classes per chunk (the last one may be smaller)
  int64_t num_chunks;
  int64_t workers;

  // fn(worker, ChunkWorker&, j0, n) for every chunk [j0, j0 + n).
  template <typename Fn>
  void run(Fn&& fn) {
    if (workers == 1) {
      for (int64_t c = 0; c < num_chunks; ++c) fn(int64_t{0}, workers_[0], start(c), size(c));
      return;
    }
    at::parallel_for(0, workers, 1, [&](int64_t begin, int64_t end) {
      // The dispatch state is thread-local: the pool's threads run below autograd explicitly.
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      for (int64_t t = begin; t < end; ++t) {
        const int64_t c_end = (t + 1) * num_chunks / workers;
        for (int64_t c = t * num_chunks / workers; c < c_end; ++c) {
          fn(t, workers_[t], start(c), size(c));
        }
      }
    });
  }

  static int64_t chunk_size(int64_t B, int64_t C, int64_t D, at::ScalarType dtype,
                            const at::Device& device);

 private:
  int64_t start(int64_t c) const { return c * chunk; }
  int64_t size(int64_t c) const { return std::min(chunk, C - c * chunk); }
  std::vector<ChunkWorker> workers_;
};

// The features as GEMM operand: a fresh contiguous (B, D) tensor in the operand dtype, with the
// rows where `keep` is false set to exactly 0 by a select (a NaN in an ignored row must not reach
// the GEMM, where 0 * NaN = NaN). Fresh in both passes: the same layout and alignment for the
// forward and backward GEMMs.
at::Tensor gemm_features(const at::Tensor& f, const at::Tensor& keep, at::ScalarType op);

// The GEMM operand dtype for inputs of `dtype` on `device`.
at::ScalarType operand_dtype(at::ScalarType dtype, const at::Device& device);

// ---------------------------------------------------------------------------------------------
// Labels and norms
// ---------------------------------------------------------------------------------------------

// Labels -> local targets (registration.cpp "shards"): valid = label != ignore_index; a valid
// label inside [class_start, class_start + C) has its target here. All (B,) tensors on the device,
// computed without reading their values on the host (an out-of-range label that the switched-off
// data checks let through reads as a target elsewhere).
struct Targets {
  at::Tensor valid;   // (B,) bool
  at::Tensor has;     // (B,) bool: target in this call
  at::Tensor target;  // (B,) int64: local target or -1
};
Targets local_targets(const at::Tensor& labels, int64_t ignore_index, int64_t class_start,
                      int64_t C);

// ||x_r|| (eps inside the root) and 1/||x_r|| per row, acc dtype.
std::tuple<at::Tensor, at::Tensor> norms(const at::Tensor& x, double eps = kNormEps);

// cos(f_i, W_k) for the listed k (-1: none, 0 there), from a direct dot product.
at::Tensor pair_cosines(const at::Tensor& f, const at::Tensor& w, const at::Tensor& index,
                        const at::Tensor& inv_nf, const at::Tensor& inv_nw);

// The scale as a 0-dim acc tensor on the device of `like` (read by pointer in the epilogues).
at::Tensor device_scale(const at::Tensor& scale, const at::Tensor& like, at::ScalarType acc);

// The 0-dim power of two by which a float16 gradient operand P is multiplied before its cast, so
// that its largest possible entry (bound, a 0-dim tensor) lands near 2^14: gradients far below
// float16's smallest subnormal (6e-8, e.g. mean reduction over many classes) survive the cast.
// Returns (scale, inverse); the GEMM outputs are multiplied back by the inverse (u_scale): exact,
// both are powers of two. Both undefined (no scaling) for other dtypes.
std::tuple<at::Tensor, at::Tensor> float16_grad_scale(at::ScalarType dtype,
                                                      const at::Tensor& bound);

// The rows of U (B, D) or (n, D) through the normalization backward (epilogues.h FinishArgs).
void finish_rows(const at::Tensor& U, int64_t offset, const at::Tensor& index, const FinishArgs& a);

// The loss ops of the chunked path, with the schemas of csrc/registration.cpp.
std::tuple<at::Tensor, at::Tensor> cosine_softmax_forward(
    const at::Tensor& features, const at::Tensor& weight, const at::Tensor& labels,
    const at::Tensor& scale, double m1, double m2, double m3, double lam, bool normalize_features,
    bool normalize_weight, int64_t ignore_index, int64_t class_start, int64_t num_classes);
std::tuple<at::Tensor, at::Tensor, at::Tensor> cosine_softmax_backward(
    const at::Tensor& grad_loss, const at::Tensor& grad_lse, const at::Tensor& features,
    const at::Tensor& weight, const at::Tensor& labels, const at::Tensor& scale,
    const at::Tensor& lse, double m1, double m2, double m3, double lam, bool normalize_features,
    bool normalize_weight, int64_t ignore_index, int64_t class_start, int64_t num_classes,
    bool check_data);
at::Tensor c_contrastive(const at::Tensor& features, const at::Tensor& weight,
                         const at::Tensor& labels, double pos_margin, double neg_margin,
                         int64_t ignore_index, int64_t class_start, int64_t num_classes);
std::tuple<at::Tensor, at::Tensor> c_contrastive_backward(
    const at::Tensor& grad_loss, const at::Tensor& features, const at::Tensor& weight,
    const at::Tensor& labels, double pos_margin, double neg_margin, int64_t ignore_index,
    int64_t class_start, int64_t num_classes, bool check_data);
std::tuple<at::Tensor, at::Tensor> c_triplet_forward(
    const at::Tensor& features, const at::Tensor& weight, const at::Tensor& labels, double margin,
    bool hardest_only, bool center, int64_t ignore_index, int64_t class_start, int64_t num_classes);
std::tuple<at::Tensor, at::Tensor> c_triplet_backward(
    const at::Tensor& grad_loss, const at::Tensor& features, const at::Tensor& weight,
    const at::Tensor& labels, const at::Tensor& hardest, double margin, bool hardest_only,
    bool center, int64_t ignore_index, int64_t class_start, int64_t num_classes, bool check_data);
at::Tensor center_loss(const at::Tensor& features, const at::Tensor& weight,
                       const at::Tensor& labels, int64_t ignore_index, int64_t class_start,
                       int64_t num_classes);
std::tuple<at::Tensor, at::Tensor> center_loss_backward(const at::Tensor& grad_loss,
                                                        const at::Tensor& features,
                                                        const at::Tensor& weight,
                                                        const at::Tensor& labels,
                                                        int64_t ignore_index, int64_t class_start,
                                                        int64_t num_classes, bool check_data);
at::Tensor l2_normalize(const at::Tensor& x, double eps);
at::Tensor l2_normalize_backward(const at::Tensor& grad, const at::Tensor& x, double eps);

}  // namespace chunked
}  // namespace normface
