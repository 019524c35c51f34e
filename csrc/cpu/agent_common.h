// Shared machinery of the agent losses on CPU (paper section 4, docs/kernels.md "Agent losses"):
// both sides are always normalized and d_ij = 2 - 2 cos_ij. Every backward is written in terms of
// Gc_ij = dL/dcos_ij and split into
//   dense terms   (c_contrastive negatives, c_triplet over all negatives): class blocks, at::mm;
//   sparse terms  (target and hardest agents): one or two rows of W per sample, no matmul.
// Rows of W that get a sparse term are held back in a compact (U, D) buffer until every term is
// in, then pushed through the normalization once (eq. 4). Extra memory O(B*D + C + B*block).
#pragma once

#include "cpu/cpu_common.h"

namespace normface {
namespace cpu {

template <typename scalar_t>
struct AgentSetup {
  using acc_t = at::opmath_type<scalar_t>;
  at::Tensor f, w;            // contiguous inputs
  at::Tensor unit_f, norm_f;  // f~ (B, D), ||f|| (B,) in the acc dtype
  std::vector<acc_t> inv_nw;  // 1 / ||W_j||
  std::vector<acc_t> d_y;     // d_iy = 2 - 2 cos_iy where the target is local, else 0
  LocalLabels labels;
  int64_t B, C, D;
  ClassSplit split;  // class blocks and workers of the dense walk

  // dense: the op walks every class (norms of all rows of W). Otherwise only the target rows are
  // normed here, and norm_rows() adds others (c_triplet's hardest): O(B * D), not O(C * D).
  AgentSetup(const at::Tensor& features, const at::Tensor& weight, const at::Tensor& labels_in,
             int64_t ignore_index, int64_t class_start, bool dense)
      : f(features.contiguous()), w(weight.contiguous()), B(features.size(0)), C(weight.size(0)),
        D(features.size(1)), split(features.size(0), weight.size(0)) {
    labels = local_labels(labels_in, ignore_index, class_start, C);
    unit_f = unit_rows<scalar_t>(f, norm_f);
    // An ignored row contributes nothing (contract), even when its features are NaN or inf: its f~
    // is zero, so that 0 * NaN in the dense products cannot spread it over grad_W.
    acc_t* up = unit_f.template data_ptr<acc_t>();
    for (int64_t i = 0; i < B; ++i) {
      if (labels.ignored[i]) std::fill(up + i * D, up + (i + 1) * D, acc_t(0));
    }
    inv_nw.assign(C, acc_t(0));
    if (dense) {
      row_norms(w.data_ptr<scalar_t>(), C, D, inv_nw.data());
      for (int64_t j = 0; j < C; ++j) inv_nw[j] = acc_t(1) / inv_nw[j];
    } else {
      norm_rows(labels.target);
    }
    d_y.assign(B, acc_t(0));
    at::parallel_for(0, B, 64, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        if (labels.target[i] >= 0) d_y[i] = distance(i, labels.target[i]);
      }
    });
  }

  // 1 / ||W_j|| for the listed local rows (-1 entries skipped), serial: O(len * D).
  void norm_rows(const std::vector<int64_t>& rows) {
    const scalar_t* wp = w.data_ptr<scalar_t>();
    for (int64_t j : rows) {
      if (j < 0 || inv_nw[j] != acc_t(0)) continue;
      acc_t norm;
      row_norms(wp + j * D, 1, D, &norm);
      inv_nw[j] = acc_t(1) / norm;
    }
  }

  // d_ij from a raw row of W (the sparse terms): 2 - 2 <f~_i, W_j> / ||W_j||.
  acc_t distance(int64_t i, int64_t j) const {
    const acc_t* fi = unit_f.data_ptr<acc_t>() + i * D;
    const scalar_t* wj = w.data_ptr<scalar_t>() + j * D;
    acc_t dot = 0;
    for (int64_t d = 0; d < D; ++d) dot += fi[d] * static_cast<acc_t>(wj[d]);
    return acc_t(2) - acc_t(2) * dot * inv_nw[j];
  }
};

// Walks the class blocks (cpu_common.h ClassSplit): for each block, on the worker t that owns it,
// tile = f~ W_block^T (BLAS), then row_fn(t, i, j0, n, row) for every row (row holds <f~_i, W_j>
// and may be overwritten), then block_fn(t, j0, n, tile, wb) (wb: the acc-dtype block of W).
// Per-row state must be kept per worker (t * B + i) and merged in worker (= class) order.
template <typename scalar_t, typename RowFn, typename BlockFn>
void walk_class_blocks(const AgentSetup<scalar_t>& st, RowFn&& row_fn, BlockFn&& block_fn) {
  using acc_t = at::opmath_type<scalar_t>;
  std::vector<TileScratch> scratch(st.split.workers);
  parallel_class_blocks(st.split, st.C, [&](int64_t t, int64_t j0, int64_t n) {
    at::Tensor wb;
    at::Tensor tile = cosine_tile(st.unit_f, st.w, j0, n, scratch[t], wb);
    acc_t* tp = tile.template data_ptr<acc_t>();
    for (int64_t i = 0; i < st.B; ++i) row_fn(t, i, j0, n, tp + i * n);
    block_fn(t, j0, n, tile, wb);
  });
}

// Gradient accumulator of an agent loss backward (see the file comment).
template <typename scalar_t>
struct AgentGrads {
  using acc_t = at::opmath_type<scalar_t>;
  const AgentSetup<scalar_t>& st;
  at::Tensor grad_unit_f;                  // (B, D) acc: sum_j Gc_ij W~_j (sparse terms, worker 0)
  std::vector<at::Tensor> grad_unit_part;  // the dense terms of workers 1.. (summed in finish)
  at::Tensor grad_w;                       // (C, D) output, input dtype
  std::vector<int64_t> slot;               // (C,) compact slot of a held row, or -1
  std::vector<int64_t> held_class;         // slot -> class
  at::Tensor held;                         // (U, D) acc: sum_i Gc_ij f~_i / ||W_j|| of held rows

  // sparse_classes: every local class that will get a sparse term (-1 entries are skipped).
  // Without a dense pass the rows no term touches have a zero gradient.
  AgentGrads(const AgentSetup<scalar_t>& setup, const std::vector<int64_t>& sparse_classes,
             bool dense)
      : st(setup), grad_unit_part(setup.split.workers), slot(setup.C, -1) {
    grad_unit_f = at::zeros({st.B, st.D}, st.unit_f.options());
    grad_w =
        dense ? at::empty({st.C, st.D}, st.w.options()) : at::zeros({st.C, st.D}, st.w.options());
    for (int64_t j : sparse_classes) {
      if (j < 0 || slot[j] >= 0) continue;
      slot[j] = static_cast<int64_t>(held_class.size());
      held_class.push_back(j);
    }
    held = at::zeros({static_cast<int64_t>(held_class.size()), st.D}, st.unit_f.options());
  }

  // A dense block of worker t whose tile holds P = Gc / ||W_j|| (kernels.md):
  // grad f~ += P @ W_block, grad W~ / ||W|| = P^T @ f~. Rows without sparse terms are finished
  // here (each class belongs to one worker), the others held.
  void add_dense_block(int64_t t, int64_t j0, int64_t n, const at::Tensor& p,
                       const at::Tensor& wb) {
    at::Tensor& part = t == 0 ? grad_unit_f : grad_unit_part[t];
    if (!part.defined()) part = at::zeros({st.B, st.D}, st.unit_f.options());
    part.addmm_(p, wb);
    const at::Tensor q = at::mm(p.t(), st.unit_f);  // (n, D)
    const acc_t* qp = q.template data_ptr<acc_t>();
    const acc_t* wbp = wb.template data_ptr<acc_t>();
    acc_t* hp = held.template data_ptr<acc_t>();
    scalar_t* gw = grad_w.template data_ptr<scalar_t>();
    const int64_t D = st.D;
    for (int64_t j = 0; j < n; ++j) {
      const int64_t u = slot[j0 + j];
      if (u >= 0) {
        std::copy(qp + j * D, qp + (j + 1) * D, hp + u * D);
      } else {
        normalize_backward_row(wbp + j * D, st.inv_nw[j0 + j], qp + j * D, acc_t(1), acc_t(0), D,
                               gw + (j0 + j) * D);
      }
    }
  }

  // One sparse term Gc_ij (dL/dcos_ij): grad f~_i += Gc W~_j and grad W~_j += Gc f~_i. Serial
  // (samples can share a class), O(D) each.
  void add_sparse(int64_t i, int64_t j, acc_t gc) {
    if (gc == acc_t(0)) return;
    const int64_t D = st.D;
    const acc_t c = gc * st.inv_nw[j];
    acc_t* gf = grad_unit_f.template data_ptr<acc_t>() + i * D;
    const scalar_t* wj = st.w.template data_ptr<scalar_t>() + j * D;
    acc_t* hj = held.template data_ptr<acc_t>() + slot[j] * D;
    const acc_t* fi = st.unit_f.template data_ptr<acc_t>() + i * D;
    for (int64_t d = 0; d < D; ++d) {
      gf[d] += c * static_cast<acc_t>(wj[d]);
      hj[d] += c * fi[d];
    }
  }

  // Held rows and the features go through the normalization backward (eq. 4).
  std::tuple<at::Tensor, at::Tensor> finish() {
    const int64_t D = st.D;
    for (const at::Tensor& part : grad_unit_part) {
      if (part.defined()) grad_unit_f.add_(part);
    }
    const acc_t* hp = held.template data_ptr<acc_t>();
    const scalar_t* wp = st.w.template data_ptr<scalar_t>();
    scalar_t* gw = grad_w.template data_ptr<scalar_t>();
    const int64_t U = static_cast<int64_t>(held_class.size());
    at::parallel_for(0, U, 16, [&](int64_t begin, int64_t end) {
      for (int64_t u = begin; u < end; ++u) {
        const int64_t j = held_class[u];
        normalize_backward_row(wp + j * D, st.inv_nw[j], hp + u * D, acc_t(1), acc_t(0), D,
                               gw + j * D);
      }
    });
    at::Tensor grad_f = at::empty(st.f.sizes(), st.f.options());
    const acc_t* guf = grad_unit_f.template data_ptr<acc_t>();
    const acc_t* nf = st.norm_f.template data_ptr<acc_t>();
    const scalar_t* fp = st.f.template data_ptr<scalar_t>();
    scalar_t* gf = grad_f.template data_ptr<scalar_t>();
    at::parallel_for(0, st.B, 16, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        if (st.labels.ignored[i]) {  // no term at all, whatever the row holds
          std::fill(gf + i * D, gf + (i + 1) * D, scalar_t(0));
          continue;
        }
        const acc_t inv = acc_t(1) / nf[i];
        normalize_backward_row(fp + i * D, inv, guf + i * D, inv, acc_t(0), D, gf + i * D);
      }
    });
    return {grad_f, grad_w};
  }
};

}  // namespace cpu
}  // namespace normface
