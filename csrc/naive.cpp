// naive: S = QKᵀ as a full Nq×Nk matrix, one row at a time; row softmax; O = PV.
// The textbook algorithm; O(N²) memory. The three passes are in unfused.h.
#include "unfused.h"

namespace nanogpt {

void naive_attention(const Problem& p) {
  unfused::run(p, "naive", 1, p.Nk, [&](const unfused::Head& x, int64_t i0, int64_t i1) {
    unfused::scores(p, x, i0, i1, 0, p.Nk);
  });
}

}  // namespace nanogpt
