// nanogpt::linear: y = x Wᵀ + b, the projections of a decoding step. With one to a few rows
// of x the product is a matrix-vector product: every weight is read once and used M times, so
// its speed is the memory's, not the FMA units'. torch's mv runs such a product on one thread
// (a 32000×288 classifier: 3.1 ms on 1 or 2 threads, 12 GB/s, where two threads stream 26);
// this one splits the weight's rows over the threads, each streaming its own rows once.
// Prefill and training (more rows) go to at::linear, whose blocked sgemm is the right tool.
#include <omp.h>
#include <torch/extension.h>

#include "attention.h"
#include "simd.h"
#include "vector_dot.h"

namespace nanogpt {
namespace {

constexpr int64_t kMaxRows = 4;            // rows of x taken here; more go to at::linear
constexpr int64_t kChunk = 64;             // weight rows per work item
constexpr int64_t kSerialBytes = 1 << 17;  // weights smaller than this: one thread

}  // namespace

template <class T>
void project(const float* xp, int64_t M, const T* wp, int64_t N, int64_t K, const T* bp, float* yp) {
  const int64_t kp = round_up(K, kW);
  auto rows = [&](int64_t n0, int64_t n1) {
    for (int64_t c = n0; c < n1; c += kChunk) {
      const int64_t n = std::min(n1, c + kChunk) - c;
      for (int64_t m = 0; m < M; ++m) {  // a chunk of W (64 rows) stays in L2 for the next m
        float* ym = yp + m * N + c;
        dot_rows(xp + m * kp, wp + c * K, K, int(K), ym, n);
        if (bp)
          for (int64_t j = 0; j < n; ++j) ym[j] += float(bp[c + j]);
      }
    }
  };
  const int64_t threads = N * K * int64_t(sizeof(T)) < kSerialBytes || at::in_parallel_region() ? 1 : at::get_num_threads();
  if (threads == 1) return rows(0, N);
  // one contiguous range of rows per thread (equal work, one stream each for the prefetchers)
#pragma omp parallel num_threads(threads)
  {
    const int64_t t = omp_get_thread_num(), nt = omp_get_num_threads();
    const int64_t per = round_up((N + nt - 1) / nt, kW);
    rows(std::min(N, t * per), std::min(N, (t + 1) * per));
  }
}

template void project<float>(const float*, int64_t, const float*, int64_t, int64_t, const float*, float*);
template void project<c10::BFloat16>(const float*, int64_t, const c10::BFloat16*, int64_t, int64_t,
                                     const c10::BFloat16*, float*);

// x (..., K), weight (N, K), bias (N) or None -> (..., N), as torch.nn.functional.linear.
at::Tensor linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK_VALUE(x.dim() >= 1, "x must have at least one dimension (..., in_features), got a scalar");
  TORCH_CHECK_VALUE(weight.dim() == 2, "weight must have shape (out_features, in_features), got ", weight.sizes());
  TORCH_CHECK_VALUE(x.size(-1) == weight.size(1), "x's last dimension must be weight's in_features ",
                    weight.size(1), ", got x of shape ", x.sizes());
  if (bias.has_value())
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == weight.size(0), "bias must have shape (",
                      weight.size(0), ",) to match weight ", weight.sizes(), ", got ", bias->sizes());
  const int64_t K = weight.size(1), N = weight.size(0), M = K ? x.numel() / K : 0;
  const bool ours = M >= 1 && M <= kMaxRows && K > 0 && x.scalar_type() == at::kFloat &&
                    weight.scalar_type() == at::kFloat && x.device().is_cpu() && weight.device().is_cpu() &&
                    (!bias.has_value() || (bias->scalar_type() == at::kFloat && bias->device().is_cpu()));
  if (!ours) return at::linear(x, weight, bias);  // prefill, other dtypes: torch's sgemm

  const at::Tensor xc = x.contiguous(), wc = weight.contiguous();
  const at::Tensor bc = bias.has_value() ? bias->contiguous() : at::Tensor();
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = N;
  at::Tensor y = at::empty(shape, x.options().memory_format(at::MemoryFormat::Contiguous));
  // x's rows zero-padded to a whole number of vectors (dot_rows reads q that way), (M, kp)
  const int64_t kp = round_up(K, kW);
  std::vector<float> xpad(M * kp, 0.f);
  for (int64_t m = 0; m < M; ++m) std::memcpy(&xpad[m * kp], xc.data_ptr<float>() + m * K, K * sizeof(float));
  project<float>(xpad.data(), M, wc.data_ptr<float>(), N, K, bc.defined() ? bc.data_ptr<float>() : nullptr,
                 y.data_ptr<float>());
  return y;
}

TORCH_LIBRARY_FRAGMENT(nanogpt, m) {
  m.def("linear(Tensor x, Tensor weight, Tensor? bias=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(nanogpt, CPU, m) {
  m.impl("linear", &linear);
}

}  // namespace nanogpt
