// A whole model's decoding step in one call: one new token per row against the KV cache.
// Per token, a small model runs ~20 torch ops per layer from Python at 2-15 µs each, which is
// most of its time (the 0.8M-parameter character model: 3.5 ms/token, attention 21%); here the
// step is plain loops over the same weights and cache tensors (no copies), the projections are
// linear.cpp's matrix-vector products and attention is the model's variant through the one
// dispatch table (flash: its decode path). Two architectures:
//   gpt:   x = wte[t] + wpe[pos]; LayerNorm (weight, bias); GELU MLP (erf or tanh); biases
//   llama: x = tok[t]; RMSNorm; rotary q, k (adjacent pairs, llama2.c's); SwiGLU; no biases;
//          n_kv_heads <= n_heads (grouped-query attention, the cache keeps the kv heads)
// Weights and the cache are float32, or all bfloat16 (a model .to(torch.bfloat16)): then they are
// widened as they are read and the step computes in float32 (the cache's new keys and values, and
// the attention's queries and output, are rounded to bfloat16), half the bytes read per token.
// The Python models (nanogpt/models) are the reference it is tested against, logits for logits.
#include <torch/extension.h>

#include <chrono>
#include <cmath>
#include <type_traits>

#include "attention.h"
#include "simd.h"
#include "vector_dot.h"

namespace nanogpt {
namespace {

// erf(x) on native vectors, for the GELU: std::erf one element at a time cost 12 µs of a 70–104
// µs float32 step of the 2048-context character model (in one process, alternated, on a Zen 4).
// |x| <= 0.921875: x + x·P(x²), P of degree 6; above: 1 - 2^Q(|x|), Q of degree 8 fitted to log2
// erfc on [0.921875, 3.925] (from there on erf rounds to 1), the sign put back. Least-squares fits
// (numpy, float64); checked against float64's erf at every float in [-6, 6]: within 1.64 ulp
// (std::erf: 0.97), in AVX-512 and AVX2 builds. NaN stays NaN (vexp2's), ±inf gives ±1.
inline vw verf(vw x) {
  constexpr float kSmall = 0.921875f, kBig = 3.925f;
  const vwu sign = (vwu)x & 0x80000000u;
  const vw t = (vw)((vwu)x & 0x7fffffffu);
  const vw s = x * x;
  vw p = 8.41039145598188e-05f * s - 0.0008153609232977033f;
  p = p * s + 0.005202157888561487f;
  p = p * s - 0.0268599484115839f;
  p = p * s + 0.11283708363771439f;
  p = p * s - 0.37612634897232056f;
  p = p * s + 0.12837916612625122f;
  const vw near0 = x + x * p;
  const vw c = t > kBig ? kBig : t;  // NaN stays NaN
  vw q = 2.3595907805429306e-06f * c - 6.635338650085032e-05f;
  q = q * c + 0.0008598006679676473f;
  q = q * c - 0.006859040353447199f;
  q = q * c + 0.038090482354164124f;
  q = q * c - 0.15875442326068878f;
  q = q * c - 0.9116038084030151f;
  q = q * c - 1.630534291267395f;
  q = q * c + 0.0004485880781430751f;
  const vw far = (vw)((vwu)(1.f - vexp2(q)) | sign);
  return t <= kSmall ? near0 : far;
}

// out[0:n] = GELU(u[0:n]) = u·(1 + erf(u/√2))/2, a vector at a time (the last one partial)
void gelu_erf(const float* u, int64_t n, float* out) {
  for (int64_t i = 0; i < n; i += kW) {
    const int m = int(std::min<int64_t>(kW, n - i));
    const vw v = m == kW ? wload(u + i) : wload_part(u + i, m);
    const vw g = 0.5f * v * (1.f + verf(v * 0.7071067811865476f));
    std::memcpy(out + i, &g, m * sizeof(float));
  }
}

// One layer's weights, in the Python model's layout; an empty tensor is an absent bias.
// up is c_fc (gpt) or w13 = [w1; w3] (llama), down is c_proj (gpt) or w2 (llama).
struct Layer {
  at::Tensor norm1_w, norm1_b, qkv_w, qkv_b, out_w, out_b, norm2_w, norm2_b, up_w, up_b, down_w, down_b;
};

// The tensor's elements as W (float or c10::BFloat16), or null for an empty (absent) tensor.
template <class W>
const W* data_or_null(const at::Tensor& t) { return t.defined() && t.numel() ? t.data_ptr<W>() : nullptr; }

// y[0:n] = normalised x[0:n]: LayerNorm with weight and bias (b may be null) when layer_norm,
// else RMSNorm with weight; y is zero-padded to a whole number of vectors (project reads it so).
template <class W>
void norm(const float* x, int64_t n, const W* w, const W* b, float eps, bool layer_norm, float* y) {
  double mean = 0.0, sq = 0.0;
  if (layer_norm) {
    for (int64_t i = 0; i < n; ++i) mean += x[i];
    mean /= double(n);
  }
  for (int64_t i = 0; i < n; ++i) sq += (x[i] - mean) * (x[i] - mean);
  const float inv = float(1.0 / std::sqrt(sq / double(n) + eps)), m = float(mean);
  for (int64_t i = 0; i < n; ++i) y[i] = (x[i] - m) * inv * float(w[i]) + (b ? float(b[i]) : 0.f);
  std::fill(y + n, y + round_up(n, kW), 0.f);
}

}  // namespace

class DecodeModel {
 public:
  DecodeModel(std::string arch, std::string variant, int64_t n_heads, int64_t n_kv_heads, double eps, bool gelu_tanh,
              at::Tensor tok_emb, at::Tensor pos_emb, at::Tensor rope, std::vector<std::vector<at::Tensor>> layers,
              at::Tensor final_w, at::Tensor final_b, at::Tensor classifier, std::vector<at::Tensor> k_cache,
              std::vector<at::Tensor> v_cache)
      : llama_(arch == "llama"), H_(n_heads), Hk_(n_kv_heads), eps_(float(eps)), gelu_tanh_(gelu_tanh),
        tok_emb_(tok_emb), pos_emb_(pos_emb), rope_(rope), final_w_(final_w), final_b_(final_b),
        classifier_(classifier), k_cache_(k_cache), v_cache_(v_cache) {
    TORCH_CHECK_VALUE(arch == "gpt" || arch == "llama", "arch must be 'gpt' or 'llama', got '", arch, "'");
    var_ = find_variant(variant);
    TORCH_CHECK_VALUE(var_ != nullptr, "variant must be one of the dispatch table's names, got '", variant, "'");
    TORCH_CHECK_VALUE(n_heads > 0 && n_kv_heads > 0 && n_heads % n_kv_heads == 0,
                      "n_kv_heads must divide n_heads, got ", n_kv_heads, " and ", n_heads);
    dim_ = tok_emb.size(1);
    hs_ = dim_ / H_;
    TORCH_CHECK_VALUE(hs_ * H_ == dim_, "n_heads ", H_, " must divide the model width ", dim_);
    TORCH_CHECK_VALUE(k_cache.size() == layers.size() && v_cache.size() == layers.size(),
                      "k_cache and v_cache must have one tensor per layer (", layers.size(), ")");
    for (const auto& w : layers) {
      TORCH_CHECK_VALUE(w.size() == 12, "each layer must have 12 tensors (empty for an absent bias)");
      layers_.push_back(Layer{w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7], w[8], w[9], w[10], w[11]});
    }
    bf16_ = tok_emb.scalar_type() == at::kBFloat16;
    const auto dtype = bf16_ ? at::kBFloat16 : at::kFloat;
    auto check = [dtype](const at::Tensor& t, const char* name) {
      TORCH_CHECK_VALUE(!t.defined() || !t.numel() || (t.scalar_type() == dtype && t.is_contiguous() && t.device().is_cpu()), name,
                        " must be a contiguous CPU tensor of tok_emb's dtype ", dtype,
                        " (float32, or bfloat16 throughout), got ", t.defined() ? t.scalar_type() : dtype);
    };
    for (const Layer& l : layers_)
      for (const at::Tensor* t : {&l.norm1_w, &l.norm1_b, &l.qkv_w, &l.qkv_b, &l.out_w, &l.out_b, &l.norm2_w,
                                  &l.norm2_b, &l.up_w, &l.up_b, &l.down_w, &l.down_b})
        check(*t, "every layer weight");
    check(tok_emb_, "tok_emb"), check(pos_emb_, "pos_emb"), check(final_w_, "final_w"), check(final_b_, "final_b"),
        check(classifier_, "classifier");
    for (const auto* caches : {&k_cache_, &v_cache_})
      for (const at::Tensor& c : *caches)
        TORCH_CHECK_VALUE(c.scalar_type() == dtype && c.dim() == 4 && c.device().is_cpu() && c.size(1) == Hk_ &&
                              c.size(3) == hs_ && c.stride(3) == 1 && c.sizes() == k_cache_[0].sizes(),
                          "k_cache and v_cache must be CPU tensors (B, n_kv_heads, context, head_size) = (B, ", Hk_,
                          ", context, ", hs_, "), all of one shape, of the weights' dtype ", dtype,
                          " with the last dimension contiguous; got ", c.scalar_type(), " ", c.sizes());
    TORCH_CHECK_VALUE(!rope_.defined() || !rope_.numel() || (rope_.scalar_type() == at::kFloat && rope_.is_contiguous()),
                      "rope must be a contiguous float32 table (max_seq_len, head_size/2, 2)");
    hidden_ = layers_.empty() ? 0 : layers_[0].down_w.size(1);
  }

  // tokens (B,) int64 at position pos of every row; the caches hold positions [0, pos) and get
  // this step's keys and values at pos. Returns the logits (B, vocab).
  at::Tensor step(const at::Tensor& tokens_in, int64_t pos) {
    return bf16_ ? step_as<c10::BFloat16>(tokens_in, pos) : step_as<float>(tokens_in, pos);
  }

  double attention_seconds = 0.0;  // wall time spent in the attention variant, for the share printed

 private:
  // step() with weights and cache of element type W (float or c10::BFloat16); arithmetic in float32.
  template <class W>
  at::Tensor step_as(const at::Tensor& tokens_in, int64_t pos) {
    TORCH_CHECK_VALUE(tokens_in.dim() == 1 && tokens_in.scalar_type() == at::kLong, "tokens must be a 1-D int64 tensor");
    const at::Tensor tokens = tokens_in.contiguous();
    const int64_t B = tokens.size(0), D = dim_, Dp = round_up(D, kW), hid = hidden_, Hp = round_up(hid, kW);
    const int64_t qkv_n = (H_ + 2 * Hk_) * hs_, vocab = classifier_.size(0);
    for (const at::Tensor& c : k_cache_)
      TORCH_CHECK_VALUE(c.size(0) == B && pos >= 0 && pos < c.size(2), "pos must be in [0, ", c.size(2),
                        ") and the cache's batch ", c.size(0), " must be tokens' ", B, ", got pos ", pos);
    std::vector<float> x(B * D), h(B * std::max(Dp, Hp)), qkv(B * qkv_n), att(B * Dp, 0.f), up(B * 2 * hid),
        out(B * D);
    // bfloat16: the attention's queries and output (B, H, 1, hs) in the cache's dtype (a bfloat16
    // Problem takes one dtype throughout); float reads q from qkv and writes att in place
    constexpr bool kAs = !std::is_same_v<W, float>;
    std::vector<W> q_as(kAs ? B * D : 0), att_as(kAs ? B * D : 0);
    const int64_t* tok = tokens.data_ptr<int64_t>();
    for (int64_t b = 0; b < B; ++b) {
      TORCH_CHECK_VALUE(tok[b] >= 0 && tok[b] < tok_emb_.size(0), "token ", tok[b], " is outside the vocabulary");
      const W* e = tok_emb_.data_ptr<W>() + tok[b] * D;
      const W* p = data_or_null<W>(pos_emb_) ? pos_emb_.data_ptr<W>() + pos * D : nullptr;
      for (int64_t i = 0; i < D; ++i) x[b * D + i] = float(e[i]) + (p ? float(p[i]) : 0.f);
    }
    const float scale = 1.f / std::sqrt(float(hs_));
    for (size_t l = 0; l < layers_.size(); ++l) {
      const Layer& w = layers_[l];
      for (int64_t b = 0; b < B; ++b)
        norm(&x[b * D], D, w.norm1_w.data_ptr<W>(), data_or_null<W>(w.norm1_b), eps_, !llama_, &h[b * Dp]);
      project(h.data(), B, w.qkv_w.data_ptr<W>(), qkv_n, D, data_or_null<W>(w.qkv_b), qkv.data());
      if (llama_) rotate(qkv.data(), B, qkv_n, pos);
      // this step's keys and values into the cache at pos; attention over positions [0, pos]
      at::Tensor &kc = k_cache_[l], &vc = v_cache_[l];
      W *kd = kc.data_ptr<W>(), *vd = vc.data_ptr<W>();  // rounded to nearest even for bfloat16
      for (int64_t b = 0; b < B; ++b)
        for (int64_t hk = 0; hk < Hk_; ++hk) {
          const float* kv = &qkv[b * qkv_n + (H_ + hk) * hs_];
          std::copy(kv, kv + hs_, kd + b * kc.stride(0) + hk * kc.stride(1) + pos * kc.stride(2));
          std::copy(kv + Hk_ * hs_, kv + (Hk_ + 1) * hs_, vd + b * vc.stride(0) + hk * vc.stride(1) + pos * vc.stride(2));
        }
      if constexpr (kAs)
        for (int64_t b = 0; b < B; ++b) std::copy(&qkv[b * qkv_n], &qkv[b * qkv_n] + D, &q_as[b * D]);
      const View q = kAs ? View{q_as.data(), D, hs_, hs_} : View{qkv.data(), qkv_n, hs_, hs_};
      const View o = kAs ? View{att_as.data(), D, hs_, hs_} : View{att.data(), Dp, hs_, hs_};
      Problem p{q, View{kd, kc.stride(0), kc.stride(1), kc.stride(2)}, View{vd, vc.stride(0), vc.stride(1), vc.stride(2)},
                o, B, H_, 1, pos + 1, hs_, scale, true, 0, 0};
      p.k.group = p.v.group = H_ / Hk_;
      p.bf16 = bf16_;
      const auto t0 = std::chrono::steady_clock::now();
      run_variant(*var_, p);
      attention_seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      if constexpr (kAs)
        for (int64_t b = 0; b < B; ++b) std::copy(&att_as[b * D], &att_as[b * D] + D, &att[b * Dp]);
      project(att.data(), B, w.out_w.data_ptr<W>(), D, D, data_or_null<W>(w.out_b), out.data());
      for (int64_t i = 0; i < B * D; ++i) x[i] += out[i];
      for (int64_t b = 0; b < B; ++b)
        norm(&x[b * D], D, w.norm2_w.data_ptr<W>(), data_or_null<W>(w.norm2_b), eps_, !llama_, &h[b * Dp]);
      const int64_t up_n = w.up_w.size(0);  // 4·D (gpt) or 2·hidden (llama)
      project(h.data(), B, w.up_w.data_ptr<W>(), up_n, D, data_or_null<W>(w.up_b), up.data());
      for (int64_t b = 0; b < B; ++b) activate(&up[b * up_n], &h[b * Hp]);
      project(h.data(), B, w.down_w.data_ptr<W>(), D, hid, data_or_null<W>(w.down_b), out.data());
      for (int64_t i = 0; i < B * D; ++i) x[i] += out[i];
    }
    for (int64_t b = 0; b < B; ++b)
      norm(&x[b * D], D, final_w_.data_ptr<W>(), data_or_null<W>(final_b_), eps_, !llama_, &h[b * Dp]);
    at::Tensor logits = at::empty({B, vocab}, at::kFloat);
    project(h.data(), B, classifier_.data_ptr<W>(), vocab, D, static_cast<const W*>(nullptr), logits.data_ptr<float>());
    return logits;
  }

  // q and k heads of each row rotated by position pos: pair (x[2j], x[2j+1]) as a complex number
  // times rope[pos, j] = (cos, sin), as llama2.c and the Python model (complex multiply) do.
  void rotate(float* qkv, int64_t B, int64_t qkv_n, int64_t pos) const {
    const float* f = rope_.data_ptr<float>() + pos * hs_;  // (max_seq_len, hs/2, 2)
    for (int64_t b = 0; b < B; ++b)
      for (int64_t h = 0; h < H_ + Hk_; ++h) {
        float* v = qkv + b * qkv_n + h * hs_;
        for (int64_t j = 0; j < hs_ / 2; ++j) {
          const float a = v[2 * j], c = v[2 * j + 1], cs = f[2 * j], sn = f[2 * j + 1];
          v[2 * j] = a * cs - c * sn;
          v[2 * j + 1] = a * sn + c * cs;
        }
      }
  }

  // the MLP's nonlinearity: GELU of the 4·D up-projection (gpt), or silu(gate)·up of [gate; up]
  // (llama); out zero-padded to whole vectors.
  void activate(const float* u, float* out) const {
    const int64_t n = hidden_;
    if (!llama_ && !gelu_tanh_) {
      gelu_erf(u, n, out);
    } else {
      for (int64_t i = 0; i < n; ++i) {
        const float v = u[i];
        if (llama_)
          out[i] = v / (1.f + std::exp(-v)) * u[n + i];
        else
          out[i] = 0.5f * v * (1.f + std::tanh(0.7978845608028654f * (v + 0.044715f * v * v * v)));
      }
    }
    std::fill(out + n, out + round_up(n, kW), 0.f);
  }

  bool llama_;
  int64_t H_, Hk_, dim_ = 0, hs_ = 0, hidden_ = 0;
  float eps_;
  bool gelu_tanh_, bf16_ = false;  // bf16_: weights and cache are bfloat16
  const Variant* var_ = nullptr;
  at::Tensor tok_emb_, pos_emb_, rope_, final_w_, final_b_, classifier_;
  std::vector<at::Tensor> k_cache_, v_cache_;
  std::vector<Layer> layers_;
};

void add_decode_model(pybind11::module_& m) {
  using namespace pybind11::literals;
  pybind11::class_<DecodeModel>(m, "DecodeModel", "A model's decoding step in one call (decode_model.cpp)")
      .def(pybind11::init<std::string, std::string, int64_t, int64_t, double, bool, at::Tensor, at::Tensor, at::Tensor,
                          std::vector<std::vector<at::Tensor>>, at::Tensor, at::Tensor, at::Tensor,
                          std::vector<at::Tensor>, std::vector<at::Tensor>>(),
           "arch"_a, "variant"_a, "n_heads"_a, "n_kv_heads"_a, "eps"_a, "gelu_tanh"_a, "tok_emb"_a, "pos_emb"_a,
           "rope"_a, "layers"_a, "final_w"_a, "final_b"_a, "classifier"_a, "k_cache"_a, "v_cache"_a)
      .def("step", &DecodeModel::step, "tokens"_a, "pos"_a, pybind11::call_guard<pybind11::gil_scoped_release>())
      .def_readwrite("attention_seconds", &DecodeModel::attention_seconds);
  m.def("gelu_erf", [](const at::Tensor& x) {
    TORCH_CHECK_VALUE(x.scalar_type() == at::kFloat, "x must be float32, got ", x.scalar_type());
    const at::Tensor xc = x.contiguous(), y = at::empty_like(xc);
    gelu_erf(xc.data_ptr<float>(), xc.numel(), y.data_ptr<float>());
    return y;
  }, "x"_a, "the decoding step's erf GELU, x·(1 + erf(x/√2))/2, on a float32 tensor (for tests)");
}

}  // namespace nanogpt
