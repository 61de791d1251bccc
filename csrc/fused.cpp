// fused: one query row at a time, scores → softmax → P·V without leaving the row, so the
// only scratch is one Nk×1 row per thread instead of the Nq×Nk matrix; OpenMP over
// (batch, head, row).
#include "attention.h"
#include "parallel.h"
#include "simd.h"

namespace nanogpt {

void fused_attention(const Problem& p) {
  const int64_t threads = at::get_num_threads();
  at::Tensor rows_t = at::empty({threads, std::max<int64_t>(p.Nk, 1)}, at::kFloat);  // (threads, Nk)
  float* rows = rows_t.data_ptr<float>();
  const float c = p.scale * kLog2e;
  const int64_t BH = p.B * p.H;
  // Item t is row Nq-1-t/BH of head t%BH: the longest causal rows go first.
  parallel_items(BH * p.Nq, threads, [&](int64_t t, int64_t slot) {
    const int64_t bh = t % BH, b = bh / p.H, h = bh % p.H, i = p.Nq - 1 - t / BH;
    float* s = rows + slot * rows_t.size(1);
    const float* q = p.q.row(b, h, i);
    const int64_t end = p.key_end(i);
    for (int64_t j = 0; j < end; ++j) s[j] = c * dot(q, p.k.row(b, h, j), p.d);
    const float sum = softmax2_unnormalised(s, end);
    float* o = p.o.row(b, h, i);
    std::fill(o, o + p.d, 0.f);
    if (sum == 0.f) return;  // no visible key: a zero row, as SDPA gives
    for (int64_t j = 0; j < end; ++j) axpy(o, s[j], p.v.row(b, h, j), p.d);
    const float inv = 1.f / sum;
    for (int64_t k = 0; k < p.d; ++k) o[k] *= inv;
  });
}

}  // namespace nanogpt
