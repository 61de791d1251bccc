// The classic course's entry points (cs149gpt), kept apart as a thin shim over the same
// kernels, and its warm-up's tensor accessors (the harness's `4Daccess` test calls fourDimRead). The course's math: softmax(QKᵀ)V, unscaled, not causal. Its K is a transposed
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

// ---------------------------------------------------------------------------------------
// The warm-up's accessors: a row-major tensor flattened into a Python list (the harness passes
// Q.flatten().tolist()). 2D (rows, sizeX) element (x, y) is at x·sizeX + y; 4D (B, sizeX,
// sizeY, sizeZ) element (x, y, z, b) is at ((x·sizeX + y)·sizeY + z)·sizeZ + b. Every index is
// checked against its size and the list's length: a wrong one is an error, never a wrong read.

void check_index(const char* name, int64_t i, const char* size_name, int64_t size) {
  TORCH_CHECK_VALUE(size >= 1, size_name, " must be at least 1, got ", size);
  TORCH_CHECK_INDEX(i >= 0 && i < size, name, "=", i, " is outside [0, ", size_name, "=", size, ")");
}

// Row-major flat index of `idx` in a tensor of `sizes`, checked against the list's length at
// every step: each partial index is below the length (< 2⁶³) and each size is below 2⁶³, so
// the 128-bit products cannot wrap around into range.
int64_t flat_index(const pybind11::list& tensor, std::initializer_list<int64_t> idx,
                   std::initializer_list<int64_t> sizes) {
  const __int128 n = static_cast<int64_t>(tensor.size());
  auto index = idx.begin();
  __int128 i = *index;
  for (auto size = sizes.begin(); ; ++size) {
    TORCH_CHECK_INDEX(i < n, "the indices address an element past the end of a tensor of ",
                      tensor.size(), " elements (is x within the tensor's first dimension?)");
    if (++index == idx.end()) break;
    i = i * *size + *index;  // idx has one more entry than sizes
  }
  return static_cast<int64_t>(i);
}

int64_t index2(const pybind11::list& tensor, int64_t x, int64_t y, int64_t sizeX) {
  TORCH_CHECK_INDEX(x >= 0, "x must be non-negative, got ", x);
  check_index("y", y, "sizeX", sizeX);
  return flat_index(tensor, {x, y}, {sizeX});
}

int64_t index4(const pybind11::list& tensor, int64_t x, int64_t y, int64_t z, int64_t b,
               int64_t sizeX, int64_t sizeY, int64_t sizeZ) {
  TORCH_CHECK_INDEX(x >= 0, "x must be non-negative, got ", x);
  check_index("y", y, "sizeX", sizeX);
  check_index("z", z, "sizeY", sizeY);
  check_index("b", b, "sizeZ", sizeZ);
  return flat_index(tensor, {x, y, z, b}, {sizeX, sizeY, sizeZ});
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

  // The accessors read from and write into the caller's list in place (the course's C++
  // versions take a std::vector<float>&; a Python list is the harness's equivalent).
  using pybind11::list;
  m.def("twoDimRead", [](const list& tensor, int64_t x, int64_t y, int64_t sizeX) {
    return tensor[index2(tensor, x, y, sizeX)].cast<float>();
  }, arg("tensor"), arg("x"), arg("y"), arg("sizeX"), "tensor[x·sizeX + y]");
  m.def("twoDimWrite", [](list& tensor, int64_t x, int64_t y, int64_t sizeX, float val) {
    tensor[index2(tensor, x, y, sizeX)] = val;
  }, arg("tensor"), arg("x"), arg("y"), arg("sizeX"), arg("val"), "tensor[x·sizeX + y] = val");
  m.def("fourDimRead", [](const list& tensor, int64_t x, int64_t y, int64_t z, int64_t b,
                          int64_t sizeX, int64_t sizeY, int64_t sizeZ) {
    return tensor[index4(tensor, x, y, z, b, sizeX, sizeY, sizeZ)].cast<float>();
  }, arg("tensor"), arg("x"), arg("y"), arg("z"), arg("b"), arg("sizeX"), arg("sizeY"), arg("sizeZ"),
     "tensor[((x·sizeX + y)·sizeY + z)·sizeZ + b]");
  m.def("fourDimWrite", [](list& tensor, int64_t x, int64_t y, int64_t z, int64_t b, int64_t sizeX,
                           int64_t sizeY, int64_t sizeZ, float val) {
    tensor[index4(tensor, x, y, z, b, sizeX, sizeY, sizeZ)] = val;
  }, arg("tensor"), arg("x"), arg("y"), arg("z"), arg("b"), arg("sizeX"), arg("sizeY"), arg("sizeZ"),
     arg("val"), "tensor[((x·sizeX + y)·sizeY + z)·sizeZ + b] = val");
}

}  // namespace nanogpt
