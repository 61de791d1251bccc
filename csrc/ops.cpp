// The op boundary: argument checks (every message names the argument), the dispatch table,
// the torch.library registration and the Python module (build info, course entry points).
#include <torch/extension.h>

#include <cmath>
#include <limits>
#include <sstream>

#include "attention.h"
#include "simd.h"

#ifdef NANOGPT_WITH_ISPC
#include "flash_tile_ispc.h"
#endif

namespace nanogpt {

// blocked and fused train with naive's backward (the materialised N×N one): only naive and
// flash have backward passes of their own.
const Variant kVariants[] = {
    {"naive", naive_attention, "materialises S = QKᵀ (N×N), row softmax, O = PV", naive_attention_backward, false,
     false},
    {"blocked", blocked_attention, "tiles both matmuls (8×8 by default); softmax still a separate N×N pass",
     naive_attention_backward, false, true},
    {"fused", fused_attention, "one row at a time with an N×1 scratch row per thread; threads over (batch, head, row)",
     naive_attention_backward, false, false},
    {"flash", flash_attention, "Br×Bc tiles, running max and sum, register-blocked SIMD tile; O(N) memory",
     flash_attention_backward, true, true, true},
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
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16, name,
                   " must be float32 or bfloat16, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.device().is_cpu(), name, " must be on the CPU, got device ", t.device());
  TORCH_CHECK_VALUE(t.layout() == at::kStrided, name, " must be a dense (strided) tensor, got layout ", t.layout());
}

// The tensor itself when its last dimension is contiguous (read in place), else one copy.
View view_of(const at::Tensor& t, at::Tensor& keep) {
  keep = t.size(3) <= 1 || t.stride(3) == 1 ? t : t.contiguous();
  return View{keep.data_ptr(), keep.stride(0), keep.stride(1), keep.stride(2)};
}

void check_tiles(int64_t br, int64_t bc) {
  TORCH_CHECK_VALUE(br >= 0, "br must be a positive tile height (or 0 for the default), got ", br);
  TORCH_CHECK_VALUE(bc >= 0, "bc must be a positive tile width (or 0 for the default), got ", bc);
}

// The checks every op makes (each message names the argument), then the Problem without o and
// lse. keep[] holds copies of inputs whose last dimension is strided.
Problem checked_problem(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                        c10::string_view variant, bool causal, std::optional<double> scale,
                        int64_t br, int64_t bc, bool enable_gqa, const Variant*& var, at::Tensor (&keep)[3]) {
  check_tensor(q, "q");
  check_tensor(k, "k");
  check_tensor(v, "v");
  TORCH_CHECK_TYPE(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
                   "k and v must have q's dtype ", q.scalar_type(), ", got k ", k.scalar_type(), " and v ",
                   v.scalar_type());
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
  var = find_variant(std::string(variant));
  TORCH_CHECK_VALUE(var != nullptr, "variant must be one of ", variant_names(), "; got '", variant, "'");
  check_tiles(br, bc);
  const double s = scale.has_value() ? *scale : 1.0 / std::sqrt(double(std::max<int64_t>(d, 1)));
  TORCH_CHECK_VALUE(std::isfinite(float(s)), "scale must be a finite number (as a float32), got ", s);
  Problem p{view_of(q, keep[0]), view_of(k, keep[1]), view_of(v, keep[2]), View{},
            B, H, Nq, Nk, d, float(s), causal, br, bc};
  p.bf16 = q.scalar_type() == at::kBFloat16;
  p.k.group = p.v.group = Hk > 0 ? H / Hk : 1;  // query heads per kv head
  return p;
}

View view_of_output(const at::Tensor& t) { return View{t.data_ptr(), t.stride(0), t.stride(1), t.stride(2)}; }

// The forward; with keep_lse also the LSE the variant's backward reads: (B, H, Nq) for variants
// that keep one (flash), else (B, H, 0), as their backward recomputes the softmax.
std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                           c10::string_view variant, bool causal, std::optional<double> scale,
                                           int64_t br, int64_t bc, bool enable_gqa, bool keep_lse) {
  const Variant* var;
  at::Tensor keep[3];
  Problem p = checked_problem(q, k, v, variant, causal, scale, br, bc, enable_gqa, var, keep);
  at::Tensor out = at::empty({p.B, p.H, p.Nq, p.d}, q.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor lse = at::empty({p.B, p.H, keep_lse && var->keeps_lse ? p.Nq : 0}, q.options().dtype(at::kFloat));
  if (out.numel() == 0 || p.Nk == 0) {  // softmax over no keys: SDPA gives zeros too
    lse.fill_(-std::numeric_limits<float>::infinity());
    return {out.zero_(), lse};
  }
  p.o = view_of_output(out);
  p.lse = lse.numel() ? lse.data_ptr<float>() : nullptr;
  run_variant(*var, p);
  return {out, lse};
}

}  // namespace

at::Tensor attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     c10::string_view variant, bool causal, std::optional<double> scale,
                     int64_t br, int64_t bc, bool enable_gqa) {
  return std::get<0>(forward(q, k, v, variant, causal, scale, br, bc, enable_gqa, false));
}

// The forward for training: (out, lse), lse as the variant's backward needs it.
std::tuple<at::Tensor, at::Tensor> attention_lse(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                 c10::string_view variant, bool causal,
                                                 std::optional<double> scale, int64_t br, int64_t bc,
                                                 bool enable_gqa) {
  return forward(q, k, v, variant, causal, scale, br, bc, enable_gqa, true);
}

// (dq, dk, dv), contiguous, from dL/d(out), the inputs, and out and lse as attention_lse gave them.
std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, c10::string_view variant, bool causal,
    std::optional<double> scale, int64_t br, int64_t bc, bool enable_gqa) {
  check_tensor(q, "q");
  const std::pair<const at::Tensor*, const char*> same[] = {{&k, "k"}, {&v, "v"}, {&grad_out, "grad_out"}, {&out, "out"}};
  for (const auto& [t, name] : same) {
    check_tensor(*t, name);
    TORCH_CHECK_TYPE(t->scalar_type() == q.scalar_type(), name, " must have q's dtype ", q.scalar_type(), ", got ",
                     t->scalar_type());
  }
  if (q.scalar_type() == at::kBFloat16) {
    // bfloat16 trains on float32 copies (the backward has no bfloat16 kernel); gradients rounded back
    auto f = [](const at::Tensor& t) { return t.to(at::kFloat); };
    auto [dq, dk, dv] = attention_backward(f(grad_out), f(q), f(k), f(v), f(out), lse, variant, causal, scale, br, bc,
                                           enable_gqa);
    return {dq.to(at::kBFloat16), dk.to(at::kBFloat16), dv.to(at::kBFloat16)};
  }
  const Variant* var;
  at::Tensor keep[3], keep_g, keep_o;
  Problem p = checked_problem(q, k, v, variant, causal, scale, br, bc, enable_gqa, var, keep);
  TORCH_CHECK_VALUE(grad_out.sizes() == q.sizes(), "grad_out must have q's shape ", q.sizes(), ", got ", grad_out.sizes());
  TORCH_CHECK_VALUE(out.sizes() == q.sizes(), "out must have q's shape ", q.sizes(), ", got ", out.sizes());
  TORCH_CHECK_TYPE(lse.scalar_type() == at::kFloat, "lse must be float32, got ", lse.scalar_type());
  TORCH_CHECK_VALUE(lse.device().is_cpu(), "lse must be on the CPU, got device ", lse.device());
  const int64_t lse_rows = var->keeps_lse ? p.Nq : 0;
  TORCH_CHECK_VALUE(lse.dim() == 3 && lse.size(0) == p.B && lse.size(1) == p.H && lse.size(2) == lse_rows,
                    "lse must have shape (B, H, ", var->keeps_lse ? "Nq" : "0", ") = (", p.B, ", ", p.H, ", ",
                    lse_rows, ") as attention_lse returns it for variant '", variant, "', got ", lse.sizes());
  const auto contiguous = q.options().memory_format(at::MemoryFormat::Contiguous);
  // Grouped kv heads (K and V read in place through View::group): the kernels write each query
  // head's dK and dV, (B, H, Nk, d), and a kv head's gradient is its group's sum.
  const int64_t group = p.k.group;
  at::Tensor dq = at::empty(q.sizes(), contiguous), dk = at::empty({p.B, p.H, p.Nk, p.d}, contiguous),
             dv = at::empty({p.B, p.H, p.Nk, p.d}, contiguous);
  auto folded = [&](const at::Tensor& t) {
    return group == 1 ? t : t.view({p.B, p.H / group, group, p.Nk, p.d}).sum(2);
  };
  if (p.Nq == 0 || p.Nk == 0 || p.d == 0) {  // out does not depend on q, k, v
    dq.zero_(), dk.zero_(), dv.zero_();
    return {dq, folded(dk), folded(dv)};
  }
  p.o = view_of(out, keep_o);
  const at::Tensor lse_c = lse.contiguous();
  const Grad g{view_of(grad_out, keep_g), lse_rows ? lse_c.data_ptr<float>() : nullptr,
               view_of_output(dq), view_of_output(dk), view_of_output(dv)};
  var->backward(p, g);
  return {dq, folded(dk), folded(dv)};
}

// ---------------------------------------------------------------------------------------
// Registration

TORCH_LIBRARY(nanogpt, m) {
  m.def("attention(Tensor q, Tensor k, Tensor v, str variant='flash', bool causal=False, "
        "float? scale=None, int br=0, int bc=0, bool enable_gqa=False) -> Tensor");
  m.def("attention_lse(Tensor q, Tensor k, Tensor v, str variant='flash', bool causal=False, "
        "float? scale=None, int br=0, int bc=0, bool enable_gqa=False) -> (Tensor, Tensor)");
  m.def("attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
        "str variant='flash', bool causal=False, float? scale=None, int br=0, int bc=0, bool enable_gqa=False) "
        "-> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(nanogpt, CPU, m) {
  m.impl("attention", &attention);
  m.impl("attention_lse", &attention_lse);
  m.impl("attention_backward", &attention_backward);
}

void add_course_entry_points(pybind11::module_& m);  // course.cpp
void add_peak_entry_points(pybind11::module_& m);    // peak.cpp
void add_decode_model(pybind11::module_& m);         // decode_model.cpp

}  // namespace nanogpt

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using namespace nanogpt;
  m.doc() = "nanogpt-flash attention kernels (the ops live in torch.ops.nanogpt)";
  m.def("variants", [] {
    std::vector<std::pair<std::string, std::string>> out;
    for (const Variant& v : kVariants) out.emplace_back(v.name, v.adds);
    return out;
  }, "(name, what it adds) for each variant, in ladder order: the one dispatch table");
  // The inference forward without the dispatcher: torch.ops' Python path (argument parsing, and
  // the autograd kernel registered in Python) costs ~15 µs a call, more than a short decoding
  // step. nanogpt.attention calls this when nothing needs a gradient and nothing is compiling.
  m.def("attention", [](const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::string& variant,
                        bool causal, std::optional<double> scale, int64_t br, int64_t bc, bool enable_gqa) {
    pybind11::gil_scoped_release released;
    return attention(q, k, v, variant, causal, scale, br, bc, enable_gqa);
  }, "torch.ops.nanogpt.attention's CPU kernel, called directly");
  m.def("default_tiles", &flash_default_tiles, "flash's default (Br, Bc) for (Nq, Nk, d) on this host");
  m.def("model_tiles", &flash_model_tiles, "flash's (Br, Bc) for (Nq, d) from the model of the cache sizes");
  m.def("set_tuned_tiles", &set_tuned_tiles, "flash's tiles measured on this CPU: [(d_max, br, bc)]; [] for the model");
  m.def("flash_path", [](int64_t Nq, int64_t br, int64_t bc) {
    TORCH_CHECK_VALUE(Nq >= 0, "Nq must be >= 0, got ", Nq);
    check_tiles(br, bc);
    return flash_path(Nq, br, bc);
  }, "flash's code path for an inference call (Nq, br, bc): 'decode' or 'tiles' (a float32 forward for training takes the tiles)");
  m.def("set_bf16_amx", &set_bf16_amx, "False: bfloat16 flash tiles never on AMX (tests); True: where the CPU has it");
  m.def("set_bf16_dot", &set_bf16_dot, pybind11::arg("on") = pybind11::none(),
        "bfloat16 flash tiles on vdpbf16ps: None (default) where it outruns the FMA, True wherever the CPU has it, "
        "False never (float32 copies)");
  m.def("tiled", [] {
    std::vector<std::string> out;
    for (const Variant& v : kVariants)
      if (v.tiled) out.emplace_back(v.name);
    return out;
  }, "the variants that take tile sizes (br, bc)");
  m.def("training", [] {
    std::vector<std::tuple<std::string, std::string, bool>> out;
    for (const Variant& v : kVariants) {
      const Variant* owner = &v;  // the first variant with this backward is the one it belongs to
      for (const Variant& w : kVariants)
        if (w.backward == v.backward) { owner = &w; break; }
      out.emplace_back(v.name, owner->name, v.keeps_lse);
    }
    return out;
  }, "(name, the variant whose backward it trains with, whether attention_lse returns an LSE) per variant");
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
    info["avx512_bf16"] = cpu_has_avx512_bf16();
    info["bf16_amx_cpu"] = bf16_amx_ready();  // this CPU and the OS let us use AMX's tiles
    info["bf16_amx"] = has_bf16_amx();  // bfloat16 flash tiles on AMX (checked at run time)
    info["bf16_dot"] = has_bf16_dot();  // else on vdpbf16ps (checked at run time)
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
  add_peak_entry_points(m);
  add_decode_model(m);
}
