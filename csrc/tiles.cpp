// flash's default tile sizes on this host: tuned ones when `nanogpt.tune()` has measured this
// CPU (the Python side reads its file and hands the result over at load time), else a model of
// the cache sizes. A default tuned on one host can be wrong on the next (vector width, L1 and
// L2 sizes differ between hosts of the same machine kind), so none is hard-wired here.
#include <unistd.h>

#include <mutex>
#include <vector>

#include "attention.h"

namespace nanogpt {

namespace {

struct TunedTiles {
  int64_t d_max, br, bc;  // for heads of d <= d_max (rules sorted by d_max)
};

std::mutex tuned_mutex;
std::vector<TunedTiles> tuned;  // empty: the cache model decides

int64_t cache_bytes(int name, int64_t fallback) {
  const long v = sysconf(name);
  return v > 0 ? int64_t(v) : fallback;
}

int64_t floor_pow2(int64_t x) {
  int64_t p = 1;
  while (2 * p <= x) p *= 2;
  return p;
}

}  // namespace

// The cache model. Br: 128 query rows from N = 2048 on (fewer passes over K and V), 64 below
// (less waste on the causal diagonal, more blocks for the threads to share). Bc: the largest
// power of two in [64, 1024] whose working set of one tile step, the score tile (Br×Bc) and
// the K and V blocks (2·Bc×d), takes at most half of L2 (the other half: Qᵀ, O, prefetch).
// On a 1 MiB L2 this gives Bc = 512 up to d = 64 and 256 at d = 128, what `gpt.py sweep`
// found best on such a host; on a 512 KiB L2, half of that.
std::pair<int64_t, int64_t> flash_model_tiles(int64_t Nq, int64_t d) {
  const int64_t br = Nq >= 2048 ? 128 : 64;
  const int64_t l2 = cache_bytes(_SC_LEVEL2_CACHE_SIZE, int64_t(1) << 20);
  const int64_t per_key = int64_t(sizeof(float)) * (128 + 2 * std::max<int64_t>(d, 1));
  return {br, std::clamp<int64_t>(floor_pow2(l2 / 2 / per_key), 64, 1024)};
}

std::pair<int64_t, int64_t> flash_default_tiles(int64_t Nq, int64_t /*Nk*/, int64_t d) {
  std::lock_guard<std::mutex> lock(tuned_mutex);
  for (const TunedTiles& t : tuned)
    if (d <= t.d_max) return {Nq >= 2048 ? t.br : std::min<int64_t>(t.br, 64), t.bc};
  return flash_model_tiles(Nq, d);
}

// rules: (d_max, br, bc) measured on this CPU at N = 2048; an empty list restores the model.
void set_tuned_tiles(const std::vector<std::tuple<int64_t, int64_t, int64_t>>& rules) {
  std::vector<TunedTiles> t;
  for (const auto& [d_max, br, bc] : rules) {
    TORCH_CHECK_VALUE(d_max >= 1 && br >= 1 && bc >= 1, "tuned tiles must be positive, got (d_max=", d_max,
                      ", br=", br, ", bc=", bc, ")");
    t.push_back({d_max, br, bc});
  }
  std::sort(t.begin(), t.end(), [](const TunedTiles& a, const TunedTiles& b) { return a.d_max < b.d_max; });
  std::lock_guard<std::mutex> lock(tuned_mutex);
  tuned = std::move(t);
}

}  // namespace nanogpt
