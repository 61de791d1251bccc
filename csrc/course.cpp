// The classic course's entry points (cs149gpt), kept apart as a thin shim over the same
// kernels. The course's math: softmax(QKᵀ)V, unscaled, not causal. Its K is a transposed
// view whose last dimension is not contiguous; attention() copies such an input once.
// The scratch tensors the course allocates in Python are checked for shape and then unused:
// each kernel allocates its own scratch through ATen.
#include <torch/extension.h>

#include "attention.h"

namespace nanogpt {
namespace {

void check_qkv(const at::Tensor& Q, const at::Tensor& K, const at::Tensor& V, int64_t B,
               int64_t H, int64_t N, int64_t d) {
  TORCH_CHECK_VALUE(B > 0 && H > 0 && N > 0 && d > 0,
                    "B, H, N and d must be positive, got B=", B, " H=", H, " N=", N, " d=", d);
  const std::vector<int64_t> want{B, H, N, d};
  for (auto [t, name] : {std::pair{&Q, "Q"}, {&K, "K"}, {&V, "V"}})
    TORCH_CHECK_VALUE(t->sizes() == at::IntArrayRef(want), name, " must have shape (B, H, N, d) = ",
                      at::IntArrayRef(want), " from the B, H, N, d arguments, got ", t->sizes());
}

void check_scratch(const at::Tensor& t, const char* name, std::vector<int64_t> want) {
  TORCH_CHECK_VALUE(t.sizes() == at::IntArrayRef(want), name, " must have shape ",
                    at::IntArrayRef(want), ", got ", t.sizes());
}

at::Tensor run(const char* variant, const at::Tensor& Q, const at::Tensor& K, const at::Tensor& V,
               int64_t br = 0, int64_t bc = 0) {
  return attention(Q, K, V, variant, /*causal=*/false, /*scale=*/1.0, br, bc, /*enable_gqa=*/false);
}

}  // namespace

void add_course_entry_points(pybind11::module_& m) {
  using at::Tensor;
  using pybind11::arg;  // named, so that a wrong argument type is reported by its name
  // Parts 1 and 2 share a signature and an N×N scratch; only the variant differs.
  for (auto [entry, variant] : {std::pair{"myNaiveAttention", "naive"}, {"myUnfusedAttentionBlocked", "blocked"}})
    m.def(entry, [variant = variant](Tensor Q, Tensor K, Tensor V, Tensor QK_t, int64_t B, int64_t H,
                                     int64_t N, int64_t d) {
      check_qkv(Q, K, V, B, H, N, d);
      check_scratch(QK_t, "QK_t", {N, N});
      return run(variant, Q, K, V);
    }, arg("Q"), arg("K"), arg("V"), arg("QK_t"), arg("B"), arg("H"), arg("N"), arg("d"));
  m.def("myFusedAttention", [](Tensor Q, Tensor K, Tensor V, Tensor temp, int64_t B, int64_t H,
                               int64_t N, int64_t d) {
    check_qkv(Q, K, V, B, H, N, d);
    TORCH_CHECK_VALUE(temp.dim() == 2 && temp.size(1) == N && temp.size(0) >= 1,
                      "temp must have shape (threads, N) with N=", N, ", got ", temp.sizes());
    return run("fused", Q, K, V);
  }, arg("Q"), arg("K"), arg("V"), arg("temp"), arg("B"), arg("H"), arg("N"), arg("d"));
  // Note the course's order: Bc before Br.
  m.def("myFlashAttention", [](Tensor Q, Tensor K, Tensor V, Tensor Qi, Tensor Kj, Tensor Vj,
                               Tensor Sij, Tensor Pij, Tensor PV, Tensor Oi, Tensor L, Tensor Li,
                               Tensor Lij, Tensor Lnew, int64_t Bc, int64_t Br, int64_t B,
                               int64_t H, int64_t N, int64_t d) {
    check_qkv(Q, K, V, B, H, N, d);
    TORCH_CHECK_VALUE(Br > 0 && Bc > 0, "Br and Bc must be positive, got Br=", Br, " Bc=", Bc);
    check_scratch(Qi, "Qi", {Br, d});
    check_scratch(Kj, "Kj", {Bc, d});
    check_scratch(Vj, "Vj", {Bc, d});
    check_scratch(Sij, "Sij", {Br, Bc});
    check_scratch(Pij, "Pij", {Br, Bc});
    check_scratch(PV, "PV", {Br, d});
    check_scratch(Oi, "Oi", {Br, d});
    check_scratch(L, "L", {N});
    check_scratch(Li, "Li", {Br});
    check_scratch(Lij, "Lij", {Br});
    check_scratch(Lnew, "Lnew", {Br});
    return run("flash", Q, K, V, Br, Bc);
  }, arg("Q"), arg("K"), arg("V"), arg("Qi"), arg("Kj"), arg("Vj"), arg("Sij"), arg("Pij"), arg("PV"),
     arg("Oi"), arg("L"), arg("Li"), arg("Lij"), arg("Lnew"), arg("Bc"), arg("Br"), arg("B"), arg("H"),
     arg("N"), arg("d"));
}

}  // namespace nanogpt
