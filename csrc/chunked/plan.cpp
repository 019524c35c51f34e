// The chunk plan, its GEMMs, and the small helpers every op of the chunked path shares.
#include "chunked/chunked.h"

#include <algorithm>
#include <atomic>

namespace normface {
namespace chunked {

namespace {
std::atomic<int64_t>& budget_setting() {
  static std::atomic<int64_t> bytes{0};  // 0: the default
  return bytes;
}
}  // namespace

int64_t set_chunk_budget(int64_t bytes) {
  TORCH_CHECK_VALUE(bytes >= 0,
                    "set_chunk_budget: bytes must be >= 0 (0 restores the default), got ", bytes);
  return budget_setting().exchange(bytes);
}

int64_t chunk_budget(const at::Device& device) {
  const int64_t bytes = budget_setting().load(std::memory_order_relaxed);
  if (bytes > 0) return bytes;
#ifdef NORMFACE_WITH_CUDA
  if (device.is_cuda()) return std::min(kMaxDefaultChunkBudget, cuda::l2_cache_bytes(device));
#endif
  return std::min(kMaxDefaultChunkBudget, kDefaultCpuChunkBudget);
}

at::ScalarType operand_dtype(at::ScalarType dtype, const at::Device& device) {
  return device.is_cuda() && is_16bit(dtype) ? dtype : acc_dtype(dtype);
}

int64_t ChunkWalk::chunk_size(int64_t B, int64_t C, int64_t D, at::ScalarType dtype,
                              const at::Device& device) {
  const at::ScalarType acc = acc_dtype(dtype), op = operand_dtype(dtype, device);
  const int64_t acc_bytes = c10::elementSize(acc);
  // Per class: its column of S, of the 16-bit P (CUDA), its row of V and (CPU, 16-bit) of the
  // converted W chunk; on CPU every thread has its own buffers.
  int64_t per_class = B * acc_bytes + D * acc_bytes;
  if (op != acc) per_class += B * c10::elementSize(op);
  if (op == acc && dtype != acc) per_class += D * acc_bytes;
  const int64_t threads = device.is_cpu() ? std::max(1, at::get_num_threads()) : 1;
  int64_t chunk = chunk_budget(device) / std::max<int64_t>(per_class * threads, 1);
  // GEMM-friendly widths once the chunk is wide enough to care.
  if (chunk >= 256) chunk -= chunk % 128;
  return std::max<int64_t>(1, std::min(chunk, C));
}

ChunkWalk::ChunkWalk(const at::Tensor& f_op, const at::Tensor& w)
    : B(f_op.size(0)), C(w.size(0)), D(w.size(1)) {
  TORCH_INTERNAL_ASSERT(f_op.scalar_type() == operand_dtype(w.scalar_type(), w.device()));
  chunk = chunk_size(B, C, D, w.scalar_type(), w.device());
  num_chunks = (C + chunk - 1) / chunk;
  workers = w.is_cpu() ? std::min<int64_t>(std::max(1, at::get_num_threads()), num_chunks) : 1;
  workers_.reserve(workers);
  for (int64_t t = 0; t < workers; ++t) workers_.emplace_back(f_op, w, chunk);
}

ChunkWorker::ChunkWorker(const at::Tensor& f_op, const at::Tensor& w, int64_t chunk)
    : f_(f_op), w_(w), B_(f_op.size(0)), D_(w.size(1)), chunk_(chunk) {
  acc_ = acc_dtype(w.scalar_type());
  op_ = f_op.scalar_type();
  out_fp32_ = op_ != acc_;
  convert_w_ = op_ == acc_ && w.scalar_type() != acc_;
  const auto acc_opts = w.options().dtype(acc_);
  s_buf_ = at::empty({B_ * chunk_}, acc_opts);
  if (convert_w_) w_buf_ = at::empty({chunk_ * D_}, acc_opts);
}

at::Tensor ChunkWorker::weight_chunk(int64_t j0, int64_t n) {
  at::Tensor rows = w_.narrow(0, j0, n);
  if (!convert_w_) return rows;
  at::Tensor view = w_buf_.narrow(0, 0, n * D_).view({n, D_});
  view.copy_(rows);
  return view;
}

at::Tensor ChunkWorker::logits(int64_t j0, int64_t n) {
  wc_ = weight_chunk(j0, n);
  at::Tensor S = s_buf_.narrow(0, 0, B_ * n).view({B_, n});
  if (out_fp32_) {
    at::mm_out(S, f_, wc_.t(), acc_);  // mm.dtype_out: 16-bit operands, float32 output
  } else {
    at::mm_out(S, f_, wc_.t());
  }
  return S;
}

at::Tensor ChunkWorker::grad_operand(const at::Tensor& S) {
  if (op_ == acc_) return S;
  const int64_t n = S.size(1);
  if (!p_buf_.defined()) p_buf_ = at::empty({B_ * chunk_}, S.options().dtype(op_));
  return p_buf_.narrow(0, 0, B_ * n).view({B_, n});
}

void ChunkWorker::add_grad_features(at::Tensor& U, const at::Tensor& P) {
  if (out_fp32_) {
    if (!u_tmp_.defined()) u_tmp_ = at::empty_like(U);
    at::mm_out(u_tmp_, P, wc_, acc_);
    U.add_(u_tmp_);
  } else {
    U.addmm_(P, wc_);
  }
}

at::Tensor ChunkWorker::grad_weight(const at::Tensor& P) {
  const int64_t n = P.size(1);
  if (!v_buf_.defined()) v_buf_ = at::empty({chunk_ * D_}, P.options().dtype(acc_));
  at::Tensor V = v_buf_.narrow(0, 0, n * D_).view({n, D_});
  if (out_fp32_) {
    at::mm_out(V, P.t(), f_, acc_);
  } else {
    at::mm_out(V, P.t(), f_);
  }
  return V;
}

at::Tensor gemm_features(const at::Tensor& f, const at::Tensor& keep, at::ScalarType op) {
  at::Tensor out = at::empty(f.sizes(), f.options().dtype(op));
  out.copy_(f);
  // masked_fill with a Scalar: a select (0 even where f is NaN), and no host sync.
  if (keep.defined()) out.masked_fill_(keep.logical_not().unsqueeze(1), 0);
  return out;
}

Targets local_targets(const at::Tensor& labels, int64_t ignore_index, int64_t class_start,
                      int64_t C) {
  Targets t;
  t.valid = labels.ne(ignore_index);
  const at::Tensor local = labels - class_start;
  t.has = t.valid.logical_and(local.ge(0)).logical_and(local.lt(C));
  t.target = at::where(t.has, local, at::scalar_tensor(-1, labels.options()));
  return t;
}

std::tuple<at::Tensor, at::Tensor> norms(const at::Tensor& x, double eps) {
  const auto opts = x.options().dtype(acc_dtype(x.scalar_type()));
  at::Tensor norm = at::empty({x.size(0)}, opts), inv = at::empty({x.size(0)}, opts);
  if (x.size(0) > 0) NF_ON_DEVICE(x, row_norms, x, eps, norm, inv);
  return {norm, inv};
}

at::Tensor pair_cosines(const at::Tensor& f, const at::Tensor& w, const at::Tensor& index,
                        const at::Tensor& inv_nf, const at::Tensor& inv_nw) {
  at::Tensor cos = at::empty({f.size(0)}, inv_nf.options());
  if (f.size(0) > 0) NF_ON_DEVICE(f, pair_cosines, f, w, index, inv_nf, inv_nw, cos);
  return cos;
}

at::Tensor device_scale(const at::Tensor& scale, const at::Tensor& like, at::ScalarType acc) {
  // A CPU scale with CUDA inputs is copied once (host to device, no device sync).
  return scale.reshape({}).to(like.device(), acc).contiguous();
}

std::tuple<at::Tensor, at::Tensor> float16_grad_scale(at::ScalarType dtype,
                                                      const at::Tensor& bound) {
  if (dtype != at::kHalf) return {};
  // 2^e with e = 14 - ceil(log2 bound), and 2^-e, built from their bits (exact powers of two);
  // e = 0 when the bound is 0 or not finite (nothing to scale, or a NaN to propagate).
  at::Tensor e = at::ceil(at::log2(bound.to(at::kFloat)));
  e = at::where(at::isfinite(e), 14.0 - e, at::zeros_like(e)).clamp(-100, 100).to(at::kInt);
  const at::Tensor scale = (e + 127).bitwise_left_shift(23).view(at::kFloat);
  const at::Tensor inverse = (127 - e).bitwise_left_shift(23).view(at::kFloat);
  return {scale, inverse};
}

void finish_rows(const at::Tensor& U, int64_t offset, const at::Tensor& index,
                 const FinishArgs& a) {
  if (U.size(0) == 0) return;
  NF_ON_DEVICE(U, finish_rows, U, offset, index, a);
}

}  // namespace chunked
}  // namespace normface
