// bfloat16 attention: the float32 fallback every variant can use, and flash's tile paths on AMX
// (Sapphire Rapids and later: further below) and on AVX-512 BF16 (Zen 4: where it outruns the
// FMA), chosen at run time in that order.
//
// vdpbf16ps multiplies 32 pairs of bfloat16 and adds each pair's two products into one of 16
// float32 lanes: twice an FMA's multiply-adds per instruction, from operands of half the size.
// Both matmuls of a flash tile are built from it, on operands packed so that a pair is what
// the instruction sums:
//   S = Q·Kᵀ   lane = key, pair = two adjacent features. K is packed once per call and kv head
//              in groups of 16 keys, Kp[group][c/2][16 keys] of feature pairs (a 32-bit
//              transpose: each key's pair stays together); a query's pair is broadcast:
//              S[i, 16 keys] += q_i[c:c+2]·Kp.
//   O += P·V   lane = feature, pair = two adjacent keys. V is packed once per call and kv head
//              as Vp[j/2][features] of key pairs (rows j and j+1 interleaved); P rounded to
//              bfloat16 in row order already pairs adjacent keys: O[i, 16 features] += p_i[j:j+2]·Vp.
// Scores, the running max and sum and O stay float32, as in SDPA's bfloat16 path; P is rounded
// to bfloat16 for the second matmul. Masking and the causal bookkeeping are flash.cpp's.
#include "attention.h"
#include "parallel.h"
#include "simd.h"

#include <atomic>

namespace nanogpt {

namespace {

constexpr int kRows = 4;          // query rows per register block (both matmuls)
constexpr int kFeats = 4;         // 16-feature vectors per register block of P·V
constexpr int64_t kMaxKeys = 64;  // keys per step at most: kRows × 4 groups of 16 score accumulators
// Default tile: 64 keys (kMaxKeys: 32 measured 10-20% slower) × 64 queries, 128 for d > 64 (fewer
// passes over the larger K and V: +9% at d = 128). Measured on a Zen 4 EPYC (2026-12-02), where
// the query rows mattered little otherwise (16 to 128 within 5% at d = 32 and 64).
constexpr int64_t kBc = 64;
int64_t default_br(int64_t d) { return d > 64 ? 128 : 64; }

std::atomic<bool> bf16_amx_enabled{true};
std::atomic<int> bf16_dot_mode{-1};  // -1: where it outruns the FMA (bf16_dot_outruns_fma), 0: never, 1: always

uint32_t bits(c10::BFloat16 x) { return x.x; }
// two bfloat16 as one 32-bit word: lo in the low half (the element at the lower address)
uint32_t pair(c10::BFloat16 lo, c10::BFloat16 hi) { return bits(lo) | bits(hi) << 16; }

// A bfloat16 (B, H, N, d) view as a float32 tensor (one contiguous copy).
at::Tensor widened(const View& v, int64_t B, int64_t H, int64_t N, int64_t d) {
  return at::empty({B, H, N, d}, at::kFloat)
      .copy_(at::from_blob(v.data, {B, H, N, d}, {v.sb, v.sh, v.sn, 1}, at::kBFloat16));
}
View view(const at::Tensor& t, int64_t group = 1) {
  return View{t.data_ptr(), t.stride(0), t.stride(1), t.stride(2), group};
}

// ---------------------------------------------------------------------------------------
// The tile paths. Shapes per head: dh = ceil(d/2) feature pairs (AMX: rounded up to 16, a tile
// row), dv = d rounded up to 16, Nkp = Nk rounded up to 16 (AMX: 64, a step) (padding is zeros,
// which meet real numbers only in products).

struct Packed {
  int64_t dh, dv, Nkp;
  at::Tensor k, v;  // (B·Hk, Nkp·dh) and (B·Hk, Nkp/2·dv) 32-bit words, from pack_kv
};

// The shapes of a path's packing: dh rounded up to pair_multiple, Nkp to key_multiple.
Packed packing(const Problem& p, int64_t pair_multiple, int64_t key_multiple) {
  return {round_up((p.d + 1) / 2, pair_multiple), round_up(p.d, 16), round_up(p.Nk, key_multiple), {}, {}};
}

// out[c2·stride] for c2 < dh: the feature pairs (x[2c2], x[2c2+1]) of a row of d values, zero
// past d; x null (a padding row): all zero. Q's rows and K's (transposed, stride 16) go through it.
NANOGPT_INLINE void pack_pairs(const c10::BFloat16* x, int64_t d, int64_t dh, uint32_t* out, int64_t stride) {
  int64_t c2 = 0;
  if (x) {
    for (; c2 < d / 2; ++c2) out[c2 * stride] = pair(x[2 * c2], x[2 * c2 + 1]);
    if (d % 2) out[c2++ * stride] = pair(x[d - 1], c10::BFloat16(0.f));
  }
  for (; c2 < dh; ++c2) out[c2 * stride] = 0;
}

// K and V of every kv head packed into pk's shapes; keys past Nk and features past d are zero.
void pack_kv(const Problem& p, Packed& pk) {
  const int64_t Hk = p.H / p.k.group, dh = pk.dh, dv = pk.dv, Nkp = pk.Nkp;
  pk.k = at::empty({p.B * Hk, Nkp * dh}, at::kInt);
  pk.v = at::empty({p.B * Hk, Nkp / 2 * dv}, at::kInt);
  at::parallel_for(0, p.B * Hk, 1, [&](int64_t h0, int64_t h1) {
    for (int64_t bh = h0; bh < h1; ++bh) {
      const int64_t b = bh / Hk, h = bh % Hk * p.k.group;  // a query head of kv head bh % Hk
      const auto key = [&](const View& t, int64_t j) { return j < p.Nk ? t.row<c10::BFloat16>(b, h, j) : nullptr; };
      uint32_t* kp = reinterpret_cast<uint32_t*>(pk.k.data_ptr<int32_t>()) + bh * Nkp * dh;
      for (int64_t j = 0; j < Nkp; ++j)  // Kp[g][c2][t] = (K[16g+t, 2c2], K[16g+t, 2c2+1])
        pack_pairs(key(p.k, j), p.d, dh, kp + j / 16 * dh * 16 + j % 16, 16);
      uint32_t* vp = reinterpret_cast<uint32_t*>(pk.v.data_ptr<int32_t>()) + bh * Nkp / 2 * dv;
      for (int64_t j2 = 0; j2 < Nkp / 2; ++j2) {  // Vp[j2][c] = (V[2j2, c], V[2j2+1, c])
        const c10::BFloat16 *even = key(p.v, 2 * j2), *odd = key(p.v, 2 * j2 + 1);
        uint32_t* out = vp + j2 * dv;
        const int64_t n = even ? p.d : 0;
        for (int64_t c = 0; c < n; ++c) out[c] = pair(even[c], odd ? odd[c] : c10::BFloat16(0.f));  // odd: loop-invariant
        std::fill(out + n, out + dv, 0u);
      }
    }
  });
}

// The two register-blocked kernels are not inlined into the tile loop: inlined, GCC spilled
// their accumulators and K vectors to the stack (perf: a third of the time in reloads).
#define NANOGPT_BF16_KERNEL NANOGPT_AVX512_BF16 __attribute__((noinline))

NANOGPT_AVX512_BF16 inline __m512bh load_bh(const uint32_t* p) { return (__m512bh)_mm512_loadu_si512(p); }
NANOGPT_AVX512_BF16 inline __m512bh bcast_bh(uint32_t x) { return (__m512bh)_mm512_set1_epi32(int(x)); }

// 2^x for x <= 0 (or NaN): a degree-3 polynomial on the fraction, 1 + f·(c1 + f·(c2 + f·c3)),
// fitted to 2^f on [-0.5, 0.5] for the least largest relative error with 2^0 = 1 exact (1.0e-4,
// far below the 2^-8 of the bfloat16 P it becomes; the degree-4 Taylor polynomial: 5.6e-5). The
// exact 1 matters: a row whose max holds rescales its sum by 2^0 at every step, and the
// log-sum-exp the backward reads would drift by the error at each. Scaled by vscalefps.
// x is clamped at -125, never left to underflow: a result under 2^-126 costs a microcode assist
// (some hundred cycles a vector on Intel cores without FTZ), which every masked lane of a causal
// step paid when x was clamped to -200 instead. Zero: x < -125 (and -inf, a masked key) gives
// exactly 0, by a mask; otherwise 2^-125, one compare fewer, for steps where every x is a score
// less its row's finite max (a weight that small is lost in a sum that holds the max's 1). NaN
// stays NaN (vmaxps returns its second operand on NaN; the unordered compare keeps the lane).
template <bool Zero>
NANOGPT_AVX512_BF16 inline __m512 exp2_le0(__m512 x) {
  const __mmask16 live = Zero ? _mm512_cmp_ps_mask(x, _mm512_set1_ps(-125.f), _CMP_NLT_UQ) : 0xffff;
  x = _mm512_max_ps(_mm512_set1_ps(-125.f), x);
  const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(x, n);  // [-0.5, 0.5]
  __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(0.05500893072f), f, _mm512_set1_ps(0.2422109594f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.6932829272f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
  return Zero ? _mm512_maskz_scalef_ps(live, p, n) : _mm512_scalef_ps(p, n);  // p·2^n >= 2^-125.5: normal
}

// Lane r of the result, for r < R (4 or 16): op (max or add) over the 16 lanes of v[r]. A
// transposing tree, v overwritten: each level pairs vectors, one shuffle of each pair meeting the
// other's in one op, until lane r holds row r. 16 rows take 45 instructions, where reducing each
// row alone (_mm512_reduce_*) takes about 8 a row, 128 in all.
struct MaxOp {
  NANOGPT_AVX512_BF16 __m512 operator()(__m512 a, __m512 b) const { return _mm512_max_ps(a, b); }
};
struct AddOp {
  NANOGPT_AVX512_BF16 __m512 operator()(__m512 a, __m512 b) const { return _mm512_add_ps(a, b); }
};
template <int R, class Op>
NANOGPT_AVX512_BF16 inline __m512 reduce_rows(__m512 (&v)[R], Op op) {
  static_assert(R == 4 || R == 16);
  for (int i = 0; i < R / 2; ++i)  // per 128-bit block: (a0·a2, b0·b2, a1·a3, b1·b3) of rows a, b
    v[i] = op(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < R / 4; ++i) {  // per 128-bit block: rows 4i..4i+3, each over that block's 4 lanes
    const __m512d x = _mm512_castps_pd(v[2 * i]), y = _mm512_castps_pd(v[2 * i + 1]);
    v[i] = op(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
  }
  if constexpr (R == 4) {  // the four blocks folded into each: lanes 0-3 (and 4k..4k+3) = rows 0-3
    v[0] = op(v[0], _mm512_shuffle_f32x4(v[0], v[0], _MM_SHUFFLE(1, 0, 3, 2)));
    return op(v[0], _mm512_shuffle_f32x4(v[0], v[0], _MM_SHUFFLE(2, 3, 0, 1)));
  } else {  // blocks (0, 2) of one vector meet (1, 3), twice: block k = rows 4k..4k+3
    for (int i = 0; i < 2; ++i)
      v[i] = op(_mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0x88), _mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0xDD));
    return op(_mm512_shuffle_f32x4(v[0], v[1], 0x88), _mm512_shuffle_f32x4(v[0], v[1], 0xDD));
  }
}

// P[r, :16·J] = 2^(es·S[r, :16·J] + neg[r]) as bfloat16 for R rows (lds and ldp apart), and
// v[r] the lanes' float32 sums of those weights (online_softmax's second pass).
template <int R, int J, bool Zero>
NANOGPT_AVX512_BF16 inline void softmax_weights(const float* S, int64_t lds, const float* neg, __m512 es,
                                                c10::BFloat16* P, int64_t ldp, __m512 (&v)[R]) {
  for (int r = 0; r < R; ++r) {
    const float* sr = S + r * lds;
    c10::BFloat16* pr = P + r * ldp;
    const __m512 mv = _mm512_set1_ps(neg[r]);
    v[r] = _mm512_setzero_ps();
    for (int jj = 0; jj < J; jj += 2) {
      const __m512 e0 = exp2_le0<Zero>(_mm512_fmadd_ps(_mm512_loadu_ps(sr + 16 * jj), es, mv));
      if (jj + 1 < J) {  // 32 keys: two vectors rounded into one (the second argument fills the low half)
        const __m512 e1 = exp2_le0<Zero>(_mm512_fmadd_ps(_mm512_loadu_ps(sr + 16 * jj + 16), es, mv));
        _mm512_storeu_si512(pr + 16 * jj, (__m512i)_mm512_cvtne2ps_pbh(e1, e0));
        v[r] = _mm512_add_ps(v[r], _mm512_add_ps(e0, e1));
      } else {
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(pr + 16 * jj), (__m256i)_mm512_cvtneps_pbh(e0));
        v[r] = _mm512_add_ps(v[r], e0);
      }
    }
  }
}

// The online softmax of one step of R query rows (4 or 16) against J groups of 16 keys, the
// scores s at S (R rows, lds floats apart; a scratch it may overwrite): lanes past vis[r] masked
// to -inf when `masked`, the rows' running max m and sum l of 2^(scale·s) updated, P =
// 2^(scale·s - m) written as bfloat16 to P + r·ldp, and alpha[r], the factor by which row r's O
// must be rescaled before this step's P·V. A NaN score is skipped by the max but makes its P,
// and so its row's output, NaN. A positive scale is folded into the exponent's FMA
// (max(scale·s) = scale·max(s) exactly); another is multiplied in first.
// l adds P in float32, before it is rounded for P·V (whose weights then differ from l's terms by
// the rounding: at most 2^-8 each, unbiased): one vaddps per 16 keys, cheaper than summing the
// rounded weights by a vdpbf16ps against ones per 32 (README, bfloat16 attention).
template <int R, int J>
NANOGPT_AVX512_BF16 inline void online_softmax(float* S, int64_t lds, float scale, const int64_t* vis, bool masked,
                                               float* m, float* l, float* alpha, c10::BFloat16* P, int64_t ldp) {
  // Branch-free across rows, so that their exponentials overlap. A row that has seen no key yet
  // subtracts 0 instead of its max (-inf): its P is 0 and alpha 0 (O = 0).
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const bool fold = scale > 0.f;
  const __mmask16 rows = __mmask16((1u << R) - 1);
  __m512 v[R];  // per row: the lanes' max, then the lanes' sum of P
  for (int r = 0; r < R; ++r) {
    v[r] = _mm512_set1_ps(kNegInf);
    for (int jj = 0; jj < J; ++jj) {
      float* sr = S + r * lds + 16 * jj;
      __m512 x = _mm512_loadu_ps(sr);
      if (!fold) x = _mm512_mul_ps(x, _mm512_set1_ps(scale));
      if (masked) {
        const __mmask16 keep = _mm512_cmplt_epi32_mask(lane, _mm512_set1_epi32(int(std::clamp<int64_t>(vis[r] - 16 * jj, 0, 16))));
        x = _mm512_mask_mov_ps(_mm512_set1_ps(kNegInf), keep, x);
      }
      if (masked || !fold) _mm512_storeu_ps(sr, x);
      v[r] = _mm512_max_ps(x, v[r]);
    }
  }
  const __m512 m_old = _mm512_maskz_loadu_ps(rows, m), top = reduce_rows(v, MaxOp());
  const __m512 m_new = _mm512_max_ps(m_old, fold ? _mm512_mul_ps(top, _mm512_set1_ps(scale)) : top);
  const __m512 sub = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(m_new, _mm512_set1_ps(kNegInf), _CMP_NEQ_OQ), m_new);
  const __m512 a = exp2_le0<true>(_mm512_sub_ps(m_old, sub));  // m_old <= sub, or -inf: 0
  _mm512_mask_storeu_ps(m, rows, m_new);
  _mm512_mask_storeu_ps(alpha, rows, a);
  alignas(64) float neg[16];
  _mm512_store_ps(neg, _mm512_sub_ps(_mm512_setzero_ps(), sub));
  const __m512 es = _mm512_set1_ps(fold ? scale : 1.f);
  // exact zeros where a lane is masked or a row's max is still -inf (its scores less 0)
  if (masked || _mm512_mask_cmp_ps_mask(rows, m_new, _mm512_set1_ps(kNegInf), _CMP_EQ_OQ))
    softmax_weights<R, J, true>(S, lds, neg, es, P, ldp, v);
  else
    softmax_weights<R, J, false>(S, lds, neg, es, P, ldp, v);
  _mm512_mask_storeu_ps(l, rows, _mm512_fmadd_ps(_mm512_maskz_loadu_ps(rows, l), a, reduce_rows(v, AddOp())));
}

// One step of kRows query rows against J groups of 16 keys: S = Q·Kᵀ in registers, stored to a
// small stack array (L1) for online_softmax, which reads it twice (max, then exponentials).
template <int J>
NANOGPT_BF16_KERNEL void scores_softmax(const uint32_t* Qp, int64_t dh, const uint32_t* Kp, float scale,
                                        const int64_t* vis, bool masked, float* m, float* l, float* alpha,
                                        c10::BFloat16* P, int64_t ldp) {
  __m512 s[kRows][J];
  for (int r = 0; r < kRows; ++r)
    for (int jj = 0; jj < J; ++jj) s[r][jj] = _mm512_setzero_ps();
  for (int64_t c2 = 0; c2 < dh; ++c2) {
    __m512bh k[J];
    for (int jj = 0; jj < J; ++jj) k[jj] = load_bh(Kp + (jj * dh + c2) * 16);
    for (int r = 0; r < kRows; ++r) {
      const __m512bh q = bcast_bh(Qp[r * dh + c2]);
      for (int jj = 0; jj < J; ++jj) s[r][jj] = _mm512_dpbf16_ps(s[r][jj], q, k[jj]);
    }
  }
  alignas(64) float S[kRows][16 * J];
  for (int r = 0; r < kRows; ++r)
    for (int jj = 0; jj < J; ++jj) _mm512_store_ps(&S[r][16 * jj], s[r][jj]);
  online_softmax<kRows, J>(&S[0][0], 16 * J, scale, vis, masked, m, l, alpha, P, ldp);
}

// O[r, 16·ff + t] = alpha[r]·O[r, 16·ff + t] + Σ_j2 Pp[r, j2]·Vp[j2, 16·ff + t] for r < R, ff < F.
// R·F accumulators: R = 8 rows where F <= 2, so that 16 dot products are in flight.
template <int R, int F>
NANOGPT_BF16_KERNEL void pv_block(const uint32_t* Pp, int64_t ldp, int64_t pairs, const uint32_t* Vp, int64_t dv,
                                  const float* alpha, float* O) {
  __m512 acc[R][F];
  for (int r = 0; r < R; ++r)
    for (int ff = 0; ff < F; ++ff) acc[r][ff] = _mm512_mul_ps(_mm512_loadu_ps(O + r * dv + ff * 16), _mm512_set1_ps(alpha[r]));
  for (int64_t j2 = 0; j2 < pairs; ++j2) {
    __m512bh v[F];
    for (int ff = 0; ff < F; ++ff) v[ff] = load_bh(Vp + j2 * dv + ff * 16);
    for (int r = 0; r < R; ++r) {
      const __m512bh pr = bcast_bh(Pp[r * ldp + j2]);
      for (int ff = 0; ff < F; ++ff) acc[r][ff] = _mm512_dpbf16_ps(acc[r][ff], pr, v[ff]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int ff = 0; ff < F; ++ff) _mm512_storeu_ps(O + r * dv + ff * 16, acc[r][ff]);
}

// One thread's scratch for a query block of br rows: packed Q, O and the row state, then `extra`
// floats of the tile path's own (P; on AMX also the step's S and P·V).
struct Scratch {
  uint32_t* Qp;              // (br, dh) feature pairs of the block's queries, zero rows past `rows`
  float *O, *m, *l, *alpha;  // (br, dv) unnormalised output; per row: max, sum, rescale factor
  int64_t* vis;              // per row: keys of the step it sees (an int64, aligned: br is even)
  float* extra;
  static int64_t floats(int64_t br, int64_t dh, int64_t dv, int64_t extra) { return br * (dh + dv + 5) + extra; }
  Scratch(float* base, int64_t br, int64_t dh, int64_t dv)
      : Qp(reinterpret_cast<uint32_t*>(base)), O(base + br * dh), m(O + br * dv), l(m + br), alpha(l + br),
        vis(reinterpret_cast<int64_t*>(alpha + br)), extra(alpha + 3 * br) {}
};

// vis[r] for rows [r0, r1) of a step of `cols` keys (diag: Problem::diag of the step; rows past
// `rows` see none). Returns whether some row sees fewer than `full` keys: the step's lanes past
// vis must then be masked.
bool set_visible(int64_t* vis, int64_t r0, int64_t r1, int64_t rows, int64_t diag, int64_t cols, int64_t full) {
  bool masked = false;
  for (int64_t r = r0; r < r1; ++r) {
    vis[r] = r < rows ? std::clamp<int64_t>(r + diag, 0, cols) : 0;  // row r sees keys [j0, j0 + vis)
    masked |= vis[r] < full;
  }
  return masked;
}

// A query block as a tile path's steps see it: rows [i0, i0 + rows) of head (b, h), padded to
// rows_p; keys [0, kend) visible to some row; the packed K and V of its kv head (Packed's shapes).
struct Block {
  int64_t b, h, i0, rows, rows_p, kend, dh, dv;
  const uint32_t *Kp, *Vp;
};

// The frame both tile paths share: K and V packed (pair_multiple, key_multiple: packing's), one
// Scratch per thread with `extra` floats, and for each query block of br rows (rows_p a multiple
// of row_multiple): Q packed, the row state set, steps(w, block) over the keys, then O
// normalised and rounded into the output.
template <class Steps>
void tile_frame(const Problem& p, int64_t br, int64_t row_multiple, int64_t pair_multiple, int64_t key_multiple,
                int64_t extra, const Steps& steps) {
  Packed pk = packing(p, pair_multiple, key_multiple);  // the scratch is checked before anything is packed
  const int64_t dh = pk.dh, dv = pk.dv, Hk = p.H / p.k.group;
  const int64_t threads = at::get_num_threads(), per_thread = round_up(Scratch::floats(br, dh, dv, extra), 16);
  const double bytes = double(threads) * double(per_thread) * sizeof(float);
  TORCH_CHECK_WITH(OutOfMemoryError, bytes <= double(1) * (1 << 30), "flash tiles br=", br, " need ",
                   bytes / double(1 << 30), " GiB of scratch (", threads, " threads × ", per_thread,
                   " floats, mostly br·(d + d/2) for O and Q); choose a smaller br (the bfloat16 default is ",
                   default_br(p.d), ")");
  pack_kv(p, pk);
  at::Tensor scratch_t = at::empty({threads, per_thread}, at::kFloat);
  float* scratch = scratch_t.data_ptr<float>();
  const uint32_t* Kall = reinterpret_cast<const uint32_t*>(pk.k.data_ptr<int32_t>());
  const uint32_t* Vall = reinterpret_cast<const uint32_t*>(pk.v.data_ptr<int32_t>());

  const int64_t blocks = (p.Nq + br - 1) / br;
  parallel_blocks(p.B, p.H, blocks, threads, 2 * br * p.Nk * p.d, [&](int64_t b, int64_t h, int64_t blk, int64_t slot) {
    Scratch w(scratch + slot * per_thread, br, dh, dv);
    const int64_t i0 = blk * br, rows = std::min(br, p.Nq - i0), kvh = b * Hk + h / p.k.group;
    const Block k{b, h, i0, rows, round_up(rows, row_multiple), p.key_end(i0 + rows - 1), dh, dv,
                  Kall + kvh * pk.Nkp * dh, Vall + kvh * pk.Nkp / 2 * dv};
    for (int64_t r = 0; r < k.rows_p; ++r)
      pack_pairs(r < rows ? p.q.row<c10::BFloat16>(b, h, i0 + r) : nullptr, p.d, dh, w.Qp + r * dh, 1);
    std::fill(w.O, w.O + k.rows_p * dv, 0.f);
    std::fill(w.m, w.m + k.rows_p, kNegInf);
    std::fill(w.l, w.l + k.rows_p, 0.f);
    steps(w, k);
    for (int64_t r = 0; r < rows; ++r) {  // normalise (l = 0: saw no key, zeros) and round
      float* o = w.O + r * dv;
      normalise_row(o, o, w.l[r], p.d);
      std::copy(o, o + p.d, p.o.row<c10::BFloat16>(b, h, i0 + r));
      if (p.lse) p.lse[(b * p.H + h) * p.Nq + i0 + r] = lse_from(w.m[r], w.l[r]);
    }
  });
}

void tiles_avx512bf16(const Problem& p) {
  // br: a multiple of kRows; bc: 16 to kMaxKeys keys, a multiple of 16 (whole key groups in
  // registers); neither past the problem
  const int64_t br = round_up(std::min(p.br ? p.br : default_br(p.d), p.Nq), kRows);
  const int64_t bc = std::min(round_up(std::min(p.bc ? p.bc : kBc, p.Nk), 16), kMaxKeys);
  const float qscale = p.scale * kLog2e;
  tile_frame(p, br, kRows, 1, 16, br * bc / 2, [&](Scratch& w, const Block& k) {
    c10::BFloat16* Pb = reinterpret_cast<c10::BFloat16*>(w.extra);  // (br, bc) probabilities: (br, bc/2) key pairs
    const int64_t rows = k.rows, rows_p = k.rows_p, dh = k.dh, dv = k.dv;
    for (int64_t j0 = 0; j0 < k.kend; j0 += bc) {
      const int64_t cols = std::min(bc, k.kend - j0), colsp = round_up(cols, 16), diag = p.diag(k.i0, rows, j0, cols);
      const bool masked = set_visible(w.vis, 0, rows_p, rows, diag, cols, colsp);
      const uint32_t* Kb = k.Kp + j0 * dh;  // groups j0/16.. of 16·dh words each
      for (int64_t r = 0; r < rows_p; r += kRows) {
        auto step = [&](auto groups) {
          scores_softmax<decltype(groups)::value>(w.Qp + r * dh, dh, Kb, qscale, w.vis + r, masked, w.m + r, w.l + r,
                                                  w.alpha + r, Pb + r * bc, bc);
        };
        switch (colsp / 16) {
          case 1: step(std::integral_constant<int, 1>{}); break;
          case 2: step(std::integral_constant<int, 2>{}); break;
          case 3: step(std::integral_constant<int, 3>{}); break;
          default: step(std::integral_constant<int, 4>{}); break;
        }
      }
      const uint32_t* P = reinterpret_cast<const uint32_t*>(Pb);
      const uint32_t* Vb = k.Vp + j0 / 2 * dv;
      for (int64_t f = 0; f < dv / 16; f += kFeats) {
        const int64_t nf = std::min<int64_t>(kFeats, dv / 16 - f);
        int64_t r = 0;
        auto block = [&](auto rows_c, auto feats_c) {
          pv_block<decltype(rows_c)::value, decltype(feats_c)::value>(P + r * bc / 2, bc / 2, colsp / 2, Vb + f * 16, dv,
                                                                      w.alpha + r, w.O + r * dv + f * 16);
        };
        using I1 = std::integral_constant<int, 1>;
        using I2 = std::integral_constant<int, 2>;
        using I3 = std::integral_constant<int, 3>;
        using I4 = std::integral_constant<int, 4>;
        using I8 = std::integral_constant<int, 8>;
        for (; nf <= 2 && r + 8 <= rows_p; r += 8) nf == 1 ? block(I8{}, I1{}) : block(I8{}, I2{});
        for (; r < rows_p; r += kRows) {
          switch (nf) {
            case 1: block(I4{}, I1{}); break;
            case 2: block(I4{}, I2{}); break;
            case 3: block(I4{}, I3{}); break;
            default: block(I4{}, I4{}); break;
          }
        }
      }
    }
  });
}

// ---------------------------------------------------------------------------------------
// The AMX path (Sapphire Rapids and later). TDPBF16PS multiplies a tile A of 16 rows × 32
// bfloat16 by a tile B of 32 × 16 stored as 16 rows of 16 pairs, into a 16 × 16 float32 tile C:
// 8192 multiply-adds per instruction. The packing above is already B's layout: a 16-key group
// of Kp is a B tile of Q·Kᵀ (each row one feature pair of the 16 keys, 16 rows a tile: dh is
// rounded up to 16), and 16 rows of Vp (32 keys) × 16 features a B tile of P·V. A step is 16
// query rows × 64 keys, whatever bc asks for: S = Q·Kᵀ in four C tiles, stored to L1 and taken
// by online_softmax, all 16 rows at once (P to bfloat16, row-major: the A tiles of P·V as they are),
// then P·V into up to four C tiles, added to O after its rescaling. Tile registers: 0-3 C, 4 A,
// 5-7 B.

constexpr int64_t kAmxRows = 16;  // query rows per step: a tile's rows
constexpr int64_t kAmxKeys = 64;  // keys per step: four C tiles of scores

// Zeroes the C tiles 0-3. Also a memory barrier for the caller's tile loads: GCC's _tile_loadd is
// an asm that names no memory, so nothing would tell the compiler they read what was stored before.
NANOGPT_AMX void amx_zero_c() {
  __asm__ volatile("" ::: "memory");
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
}

// S[16][64] = Q·Kᵀ for 16 query rows (Qp, dh words a row) and 64 keys (four 16-key groups of Kp).
NANOGPT_AMX void amx_scores(const uint32_t* Qp, int64_t dh, const uint32_t* Kp, float* S) {
  amx_zero_c();
  for (int64_t c = 0; c < dh; c += 16) {  // 32 features a pass
    _tile_loadd(4, Qp + c, dh * 4);
    _tile_loadd(5, Kp + (0 * dh + c) * 16, 64);
    _tile_loadd(6, Kp + (1 * dh + c) * 16, 64);
    _tile_loadd(7, Kp + (2 * dh + c) * 16, 64);
    _tile_dpbf16ps(0, 4, 5);
    _tile_dpbf16ps(1, 4, 6);
    _tile_dpbf16ps(2, 4, 7);
    _tile_loadd(5, Kp + (3 * dh + c) * 16, 64);
    _tile_dpbf16ps(3, 4, 5);
  }
  _tile_stored(0, S, 256);
  _tile_stored(1, S + 16, 256);
  _tile_stored(2, S + 32, 256);
  _tile_stored(3, S + 48, 256);
}

// T[16][16·nf] = P·V for 16 rows of P (64 keys, pairs words of them) and nf <= 4 16-feature
// columns of V (Vp at the step's first key pair and the first of the columns, dv words a row).
NANOGPT_AMX void amx_pv(const c10::BFloat16* P, int64_t pairs, const uint32_t* Vp, int64_t dv, int nf, float* T) {
  amx_zero_c();
  for (int64_t j2 = 0; j2 < pairs; j2 += 16) {  // 32 keys a pass
    _tile_loadd(4, P + 2 * j2, kAmxKeys * 2);
    const uint32_t* v = Vp + j2 * dv;
    _tile_loadd(5, v, dv * 4);
    _tile_dpbf16ps(0, 4, 5);
    if (nf > 1) {
      _tile_loadd(6, v + 16, dv * 4);
      _tile_dpbf16ps(1, 4, 6);
    }
    if (nf > 2) {
      _tile_loadd(7, v + 32, dv * 4);
      _tile_dpbf16ps(2, 4, 7);
    }
    if (nf > 3) {
      _tile_loadd(5, v + 48, dv * 4);
      _tile_dpbf16ps(3, 4, 5);
    }
  }
  _tile_stored(0, T, 256);
  if (nf > 1) _tile_stored(1, T + 16, 256);
  if (nf > 2) _tile_stored(2, T + 32, 256);
  if (nf > 3) _tile_stored(3, T + 48, 256);
}

// O[r, 0:16·nf] = alpha[r]·O[r, 0:16·nf] + T[r, 0:16·nf] for 16 rows (O's dv floats apart).
NANOGPT_AVX512_BF16 __attribute__((noinline)) void amx_add(const float* T, const float* alpha, int nf, int64_t dv,
                                                            float* O) {
  for (int64_t r = 0; r < kAmxRows; ++r) {
    float* o = O + r * dv;
    const __m512 a = _mm512_set1_ps(alpha[r]);
    for (int i = 0; i < nf; ++i)
      _mm512_storeu_ps(o + 16 * i, _mm512_fmadd_ps(_mm512_loadu_ps(o + 16 * i), a, _mm512_loadu_ps(T + r * kAmxKeys + 16 * i)));
  }
}

void tiles_amx(const Problem& p) {
  // br: a multiple of 16 rows, not past the problem (rounded up); steps of 64 keys
  const int64_t br = round_up(std::min(p.br ? p.br : default_br(p.d), p.Nq), kAmxRows);
  const float qscale = p.scale * kLog2e;
  constexpr int64_t kStep = kAmxRows * kAmxKeys;  // the step's S, P·V (floats) and P (bfloat16)
  tile_frame(p, br, kAmxRows, 16, kAmxKeys, 2 * kStep + kStep / 2, [&](Scratch& w, const Block& k) {
    amx_begin();  // per block: other code on this thread (oneDNN's, in SDPA) configures tiles its own way
    float *S = w.extra, *T = S + kStep;
    c10::BFloat16* P = reinterpret_cast<c10::BFloat16*>(T + kStep);
    const int64_t rows = k.rows, rows_p = k.rows_p, dh = k.dh, dv = k.dv;
    for (int64_t j0 = 0; j0 < k.kend; j0 += kAmxKeys) {
      const int64_t cols = std::min(kAmxKeys, k.kend - j0), diag = p.diag(k.i0, rows, j0, cols);
      for (int64_t r0 = 0; r0 < rows_p; r0 += kAmxRows) {
        const bool masked = set_visible(w.vis, r0, r0 + kAmxRows, rows, diag, cols, kAmxKeys);
        amx_scores(w.Qp + r0 * dh, dh, k.Kp + j0 * dh, S);
        online_softmax<kAmxRows, kAmxKeys / 16>(S, kAmxKeys, qscale, w.vis + r0, masked, w.m + r0, w.l + r0,
                                                         w.alpha + r0, P, kAmxKeys);
        const int64_t pairs = round_up(cols, 32) / 2;  // keys past cols have P = 0: whole 32-key passes
        for (int64_t f = 0; f < dv / 16; f += 4) {
          const int nf = int(std::min<int64_t>(4, dv / 16 - f));
          amx_pv(P, pairs, k.Vp + j0 / 2 * dv + f * 16, dv, nf, T);
          amx_add(T, w.alpha + r0, nf, dv, w.O + r0 * dv + f * 16);
        }
      }
    }
    amx_end();
  });
}

// ---------------------------------------------------------------------------------------
// The decode path's scores (decode.cpp) on vdpbf16ps: one query against a span of keys, read in
// place. A row of K is NV vectors of 32 features; each vdpbf16ps takes 32 of one key's products
// (16 lanes of feature pairs), so a key's dot product is NV instructions into one vector of 16
// partial sums, and 16 keys' vectors are reduced at once by reduce_rows (lane r = key r). Against
// the FMA on widened rows: no widening (two integer ops per 16 features) and half the multiplies.
// The products are exact in float32 (8-bit mantissas), as in the widened path; the sums' order
// differs (pairs first, then lanes), and scale multiplies the sum instead of the query.

// A row's NV vectors of 32 bfloat16: the last one, where Tail, partial (`last`: its elements
// below d), by a masked load: elements past d are zeros, never read.
template <int NV, bool Tail>
NANOGPT_AVX512_BF16 inline __m512bh load_row(const c10::BFloat16* x, int i, __mmask32 last) {
  return (__m512bh)(Tail && i == NV - 1 ? _mm512_maskz_loadu_epi16(last, x + 32 * i) : _mm512_loadu_si512(x + 32 * i));
}
// the 16 lanes whose sum is q·k for the row k
template <int NV, bool Tail>
NANOGPT_AVX512_BF16 inline __m512 row_products(const __m512bh (&qv)[NV], const c10::BFloat16* k, __mmask32 last) {
  __m512 a = _mm512_setzero_ps();
  for (int i = 0; i < NV; ++i) a = _mm512_dpbf16_ps(a, qv[i], load_row<NV, Tail>(k, i, last));
  return a;
}

template <int NV, bool Tail>
NANOGPT_BF16_KERNEL void dot_rows_dp(const c10::BFloat16* q, const c10::BFloat16* K, int64_t ldk, int d, float scale,
                                     float* s, int64_t n) {
  const __mmask32 last = __mmask32((1ull << (d - 32 * (NV - 1))) - 1);  // (all 32 where d fills the row)
  __m512bh qv[NV];
  for (int i = 0; i < NV; ++i) qv[i] = load_row<NV, Tail>(q, i, last);
  const __m512 sc = _mm512_set1_ps(scale);
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    __m512 acc[16];
    for (int r = 0; r < 16; ++r) acc[r] = row_products<NV, Tail>(qv, K + (j + r) * ldk, last);
    _mm512_storeu_ps(s + j, _mm512_mul_ps(reduce_rows(acc, AddOp()), sc));
  }
  for (; j < n; ++j) s[j] = _mm512_reduce_add_ps(row_products<NV, Tail>(qv, K + j * ldk, last)) * scale;
}

}  // namespace

void dot_rows_bf16_dot(const c10::BFloat16* q, const c10::BFloat16* K, int64_t ldk, int d, float scale, float* s,
                       int64_t n) {
  const auto rows = [&](auto nv) {  // NV = ceil(d / 32) vectors a row, as dot_rows' short_rows
    constexpr int NV = decltype(nv)::value;
    d % 32 ? dot_rows_dp<NV, true>(q, K, ldk, d, scale, s, n) : dot_rows_dp<NV, false>(q, K, ldk, d, scale, s, n);
  };
  switch ((d + 31) / 32) {
    case 1: return rows(std::integral_constant<int, 1>{});
    case 2: return rows(std::integral_constant<int, 2>{});
    case 3: return rows(std::integral_constant<int, 3>{});
    case 4: return rows(std::integral_constant<int, 4>{});
    default: TORCH_CHECK(false, "dot_rows_bf16_dot: d = ", d, " > ", kBf16DotMaxD);
  }
}

bool has_bf16_dot() {
  static const bool cpu = cpu_has_avx512_bf16();
  const int mode = bf16_dot_mode.load();
  return cpu && (mode < 0 ? bf16_dot_outruns_fma() : mode == 1);
}

void set_bf16_dot(std::optional<bool> on) { bf16_dot_mode = on.has_value() ? int(*on) : -1; }

bool has_bf16_amx() { return bf16_amx_enabled.load() && bf16_amx_ready(); }

void set_bf16_amx(bool on) { bf16_amx_enabled = on; }

void run_in_float32(const Problem& p, Kernel run) {
  const int64_t Hk = p.H / p.k.group;
  const at::Tensor q = widened(p.q, p.B, p.H, p.Nq, p.d), k = widened(p.k, p.B, Hk, p.Nk, p.d),
                   v = widened(p.v, p.B, Hk, p.Nk, p.d), o = at::empty({p.B, p.H, p.Nq, p.d}, at::kFloat);
  Problem f = p;
  f.q = view(q), f.k = view(k, p.k.group), f.v = view(v, p.v.group), f.o = view(o), f.bf16 = false;
  run(f);
  at::from_blob(p.o.data, {p.B, p.H, p.Nq, p.d}, {p.o.sb, p.o.sh, p.o.sn, 1}, at::kBFloat16).copy_(o);
}

void flash_tiles_bf16(const Problem& p) {
  if (has_bf16_amx())
    tiles_amx(p);
  else if (has_bf16_dot())
    tiles_avx512bf16(p);
  else
    run_in_float32(p, flash_attention);
}

}  // namespace nanogpt
