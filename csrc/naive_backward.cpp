// naive backward: the materialised N×N version, the readable rung of the ladder. For one
// (batch, head) at a time it recomputes the full Nq×Nk matrices
//   P = softmax(Q Kᵀ·scale + mask),  dP = dO Vᵀ,  dS = scale·P∘(dP − rowsum(P∘dP))
// row by row, then dQ = dS K (by rows), and dK = dSᵀ Q, dV = Pᵀ dO (by rows of the transposes).
// The textbook softmax backward: no LSE from the forward, so it serves any forward; blocked
// and fused train with it too (the dispatch table in ops.cpp says so). O(N²) memory.
#include <unistd.h>

#include "attention.h"
#include "parallel.h"
#include "simd.h"

namespace nanogpt {

void naive_attention_backward(const Problem& p, const Grad& g) {
  // P and dS and their transposes: four Nq×Nk matrices, refused (pointing at flash) when they
  // could not safely fit, as the forward refuses its score matrix.
  const double bytes = 4.0 * double(p.Nq) * double(p.Nk) * sizeof(float);
  const double ram = double(sysconf(_SC_PHYS_PAGES)) * double(sysconf(_SC_PAGESIZE));
  TORCH_CHECK_WITH(OutOfMemoryError, bytes <= 0.25 * ram, "naive's backward materialises four Nq×Nk matrices (",
                   p.Nq, "×", p.Nk, ": ", bytes / double(1 << 30), " GiB), more than a quarter of this machine's ",
                   ram / double(1 << 30), " GiB; use variant='flash', whose backward memory is O(N)");
  at::Tensor P_t = at::empty({p.Nq, p.Nk}, at::kFloat), dS_t = at::empty({p.Nq, p.Nk}, at::kFloat);
  float *P = P_t.data_ptr<float>(), *dS = dS_t.data_ptr<float>();
  Problem values = p;
  values.k = p.v;
  const at::Tensor Kt_t = keys_transposed(p), Vt_t = keys_transposed(values);  // (B, Hk, d, ld)
  const int64_t ld = Kt_t.size(3);
  const float c = p.scale * kLog2e;

  for (int64_t b = 0; b < p.B; ++b)
    for (int64_t h = 0; h < p.H; ++h) {
      const float *Kt = Kt_t[b][h / p.k.group].data_ptr<float>(), *Vt = Vt_t[b][h / p.v.group].data_ptr<float>();
      at::parallel_for(0, p.Nq, 16, [&](int64_t i0, int64_t i1) {  // rows of P and dS, and dQ
        for (int64_t i = i0; i < i1; ++i) {
          float *pi = P + i * p.Nk, *dsi = dS + i * p.Nk, *dq = g.dq.row(b, h, i);
          const int64_t end = p.key_end(i);  // keys past it are masked: P = dS = 0 there
          std::fill(pi + end, pi + p.Nk, 0.f);
          std::fill(dsi + end, dsi + p.Nk, 0.f);
          std::fill(dq, dq + p.d, 0.f);
          scores_row(p.q.row(b, h, i), Kt, ld, p.d, c, pi, end);
          const float sum = softmax2_unnormalised(pi, end);
          if (sum == 0.f) {  // a row that sees no key: its output is a constant 0, its gradient 0
            std::fill(dsi, dsi + end, 0.f);
            continue;
          }
          const float inv = 1.f / sum;
          for (int64_t j = 0; j < end; ++j) pi[j] *= inv;
          scores_row(g.dout.row(b, h, i), Vt, ld, p.d, 1.f, dsi, end);  // dP
          float D = 0.f;
          for (int64_t j = 0; j < end; ++j) D += pi[j] * dsi[j];
          for (int64_t j = 0; j < end; ++j) dsi[j] = p.scale * pi[j] * (dsi[j] - D);
          pv_row(dsi, p.k.row(b, h, 0), p.k.sn, end, p.d, dq);  // dq_i = Σ_j dS_ij k_j
        }
      });
      const at::Tensor Pt_t = P_t.t().contiguous(), dSt_t = dS_t.t().contiguous();  // (Nk, Nq)
      const float *Pt = Pt_t.data_ptr<float>(), *dSt = dSt_t.data_ptr<float>();
      at::parallel_for(0, p.Nk, 16, [&](int64_t j0, int64_t j1) {  // dK and dV by key rows
        for (int64_t j = j0; j < j1; ++j) {
          float *dk = g.dk.row(b, h, j), *dv = g.dv.row(b, h, j);
          std::fill(dk, dk + p.d, 0.f);
          std::fill(dv, dv + p.d, 0.f);
          const int64_t i_first = p.causal ? std::clamp<int64_t>(j + p.Nq - p.Nk, 0, p.Nq) : 0;  // first query seeing j
          const int64_t n = p.Nq - i_first;
          pv_row(Pt + j * p.Nq + i_first, g.dout.row(b, h, i_first), g.dout.sn, n, p.d, dv);  // Σ_i P_ij do_i
          pv_row(dSt + j * p.Nq + i_first, p.q.row(b, h, i_first), p.q.sn, n, p.d, dk);      // Σ_i dS_ij q_i
        }
      });
    }
}

}  // namespace nanogpt
