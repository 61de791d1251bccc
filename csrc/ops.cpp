// The op boundary: argument checks (every message names the argument), the dispatch table,
// the torch.library registration and the Python module (build info, course entry points).
#include <torch/extension.h>

#include <cmath>
#include <sstream>

#include "attention.h"

#ifdef NANOGPT_WITH_ISPC
#include "flash_tile_ispc.h"
#endif

namespace nanogpt {

const Variant kVariants[] = {
    {"naive", naive_attention, "materialises S = QKᵀ (N×N), row softmax, O = PV"},
    {"blocked", blocked_attention, "tiles both matmuls (8×8 by default); softmax still a separate N×N pass"},
    {"fused", fused_attention, "one row at a time with an N×1 scratch row per thread; threads over (batch, head, row)"},
    {"flash", flash_attention, "Br×Bc tiles, running max and sum, register-blocked SIMD tile; O(N) memory"},
};

const Variant* find_variant(const std::string& name) {
  for (const Variant& v : kVariants)
    if (name == v.name) return &v;
  return nullptr;
}

namespace {

std::string variant_names() {
  std::string s;
  for (const Variant& v : kVariants) s += (s.empty() ? "" : ", ") + std::string(v.name);
  return s;
}

void check_tensor(const at::Tensor& t, const char* name) {
  TORCH_CHECK_TYPE(t.defined(), name, " must be a tensor, got None");
  TORCH_CHECK_VALUE(t.dim() == 4, name, " must have 4 dimensions (B, H, N, d), got shape ", t.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat, name, " must be float32, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.device().is_cpu(), name, " must be on the CPU, got device ", t.device());
}

// The tensor itself when its last dimension is contiguous (read in place), else one copy.
View view_of(const at::Tensor& t, at::Tensor& keep) {
  keep = t.size(3) <= 1 || t.stride(3) == 1 ? t : t.contiguous();
  return View{keep.data_ptr<float>(), keep.stride(0), keep.stride(1), keep.stride(2)};
}

}  // namespace

at::Tensor attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     c10::string_view variant, bool causal, std::optional<double> scale,
                     int64_t br, int64_t bc, bool enable_gqa) {
  check_tensor(q, "q");
  check_tensor(k, "k");
  check_tensor(v, "v");
  const int64_t B = q.size(0), H = q.size(1), Nq = q.size(2), d = q.size(3), Nk = k.size(2), Hk = k.size(1);
  if (enable_gqa) {
    TORCH_CHECK_VALUE(k.size(0) == B && (Hk == H || (Hk > 0 && H % Hk == 0)) && k.size(3) == d,
                      "k must have shape (B, Hk, Nk, d) with Hk dividing H (enable_gqa=True), with B=", B,
                      " H=", H, " d=", d, " from q of shape ", q.sizes(), ", got ", k.sizes());
  } else {
    TORCH_CHECK_VALUE(k.size(0) == B && Hk == H && k.size(3) == d,
                      "k must have shape (B, H, Nk, d) = (", B, ", ", H, ", Nk, ", d,
                      ") to match q of shape ", q.sizes(), ", got ", k.sizes(),
                      Hk != H ? " (for fewer kv heads, grouped-query attention, pass enable_gqa=True)" : "");
  }
  TORCH_CHECK_VALUE(v.sizes() == k.sizes(), "v must have the same shape as k ", k.sizes(), ", got ", v.sizes());
  const Variant* var = find_variant(std::string(variant));
  TORCH_CHECK_VALUE(var != nullptr, "variant must be one of ", variant_names(), "; got '", variant, "'");
  TORCH_CHECK_VALUE(br >= 0, "br must be a positive tile height (or 0 for the default), got ", br);
  TORCH_CHECK_VALUE(bc >= 0, "bc must be a positive tile width (or 0 for the default), got ", bc);
  const double s = scale.has_value() ? *scale : 1.0 / std::sqrt(double(std::max<int64_t>(d, 1)));
  TORCH_CHECK_VALUE(std::isfinite(float(s)), "scale must be a finite number (as a float32), got ", s);

  at::Tensor out = at::empty({B, H, Nq, d}, q.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  if (Nk == 0) return out.zero_();  // softmax over no keys: SDPA gives zeros too

  at::Tensor qk, kk, vk;
  const View o{out.data_ptr<float>(), out.stride(0), out.stride(1), out.stride(2)};
  Problem p{view_of(q, qk), view_of(k, kk), view_of(v, vk), o,
            B, H, Nq, Nk, d, float(s), causal, br, bc};
  p.k.group = p.v.group = H / Hk;  // query heads per kv head
  var->run(p);
  return out;
}

// ---------------------------------------------------------------------------------------
// Registration

TORCH_LIBRARY(nanogpt, m) {
  m.def("attention(Tensor q, Tensor k, Tensor v, str variant='flash', bool causal=False, "
        "float? scale=None, int br=0, int bc=0, bool enable_gqa=False) -> Tensor");
}

TORCH_LIBRARY_IMPL(nanogpt, CPU, m) { m.impl("attention", &attention); }

void add_course_entry_points(pybind11::module_& m);  // course.cpp

}  // namespace nanogpt

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using namespace nanogpt;
  m.doc() = "nanogpt-flash attention kernels (the ops live in torch.ops.nanogpt)";
  m.def("variants", [] {
    std::vector<std::pair<std::string, std::string>> out;
    for (const Variant& v : kVariants) out.emplace_back(v.name, v.adds);
    return out;
  }, "(name, what it adds) for each variant, in ladder order: the one dispatch table");
  m.def("default_tiles", &flash_default_tiles, "flash's default (Br, Bc) for (Nq, Nk, d)");
  m.def("flash_path", &flash_path, "flash's code path for (Nq, br, bc): 'decode' or 'tiles'");
  m.def("compiled_info", [] {
    pybind11::dict info;
#ifdef NANOGPT_WITH_ISPC
    int lanes = 0, version = 0;
    ispc::flash_ispc_info(&lanes, &version);
    info["tile_kernel"] = "ispc";
    info["ispc_lanes"] = lanes;  // the target ispc's runtime dispatch chose: 16 = avx512skx, 8 = avx2
    info["ispc_version"] = std::to_string(version / 100) + "." + std::to_string(version % 100);
#else
    info["tile_kernel"] = "c++";
#endif
    info["compiler"] = __VERSION__;
#ifdef __AVX512F__
    info["cxx_simd"] = "avx512";
#elif defined(__AVX2__)
    info["cxx_simd"] = "avx2";
#else
    info["cxx_simd"] = "generic";
#endif
    return info;
  }, "what this binary was compiled with");
  add_course_entry_points(m);
}
