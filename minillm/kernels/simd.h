// Vector helpers shared by our kernels: the mask of a vector's first lanes, 16 float32 or bf16 numbers as
// floats and floats rounded to bf16 (loaded, stored), two products summed as separate operations round them,
// RoPE of one head, a vector's sum, e^x, and one row's RMSNorm and silu(gate) * up (pointwise.cpp's float32
// kernels and step.cpp's one-call step compute a row with the same code, so with the same numbers).
#pragma once
#include <immintrin.h>
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <type_traits>

namespace {

// The first n of a vector's 16 lanes (n may be <= 0 or >= 16: none or all).
inline __mmask16 first(int64_t n) { return n >= 16 ? 0xFFFF : (n <= 0 ? 0 : (__mmask16)((1u << n) - 1)); }

// 16 numbers from p as float32 (mask: which of them exist; the others 0): float32 as they are, bf16 (its bits
// as uint16_t) widened exactly, a shift.
inline __m512 load16(const float* p, __mmask16 mask = 0xFFFF) { return _mm512_maskz_loadu_ps(mask, p); }
inline __m512 load16(const uint16_t* p, __mmask16 mask = 0xFFFF) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, p)), 16));
}

// 16 floats rounded to bf16, to nearest even as PyTorch rounds (NaN -> 0x7FC0): what y.to(bfloat16) gives.
inline __m256i to_bf16(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i bias = _mm512_add_epi32(_mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1)),
                                        _mm512_set1_epi32(0x7FFF));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, bias), 16);
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
  return _mm512_cvtepi32_epi16(r);
}

// a * b + sign * c * d with each product rounded before the sum, as separate tensor operations round them (the
// empty asm keeps the compiler from fusing a product into the sum).
template <bool ADD>
inline __m512 products(__m512 a, __m512 b, __m512 c, __m512 d) {
  __m512 ab = _mm512_mul_ps(a, b), cd = _mm512_mul_ps(c, d);
  __asm__("" : "+v"(ab), "+v"(cd));
  return ADD ? _mm512_add_ps(ab, cd) : _mm512_sub_ps(ab, cd);
}

// 16 floats stored to p's first lanes (mask): float32 as they are, bf16 (its bits as uint16_t) rounded by to_bf16.
inline void store16(float* p, __m512 v, __mmask16 mask = 0xFFFF) { _mm512_mask_storeu_ps(p, mask, v); }
inline void store16(uint16_t* p, __m512 v, __mmask16 mask = 0xFFFF) { _mm256_mask_storeu_epi16(p, mask, to_bf16(v)); }

// One head of 2 * half numbers x (float32, or bf16 as uint16_t) rotated as model.apply_rope rotates it (channel
// i with channel i + half) by its position's angles cos and sin (half float32 each), into out: the reference's
// operations in its order, each product rounded before the sum (products), then rounded once to E.
template <typename E>
inline void rope_head(const E* x, const float* cos, const float* sin, int64_t half, E* out) {
  for (int64_t i = 0; i < half; i += 16) {
    const __mmask16 m = first(half - i);
    const __m512 x1 = load16(x + i, m), x2 = load16(x + half + i, m);
    const __m512 c = load16(cos + i, m), s = load16(sin + i, m);
    store16(out + i, products<false>(x1, c, x2, s), m);  // x1 cos - x2 sin
    store16(out + half + i, products<true>(x2, c, x1, s), m);  // x2 cos + x1 sin
  }
}

// The sum of a vector's 16 lanes, in one fixed order.
inline float sum16(__m512 v) {
  __m256 h = _mm256_add_ps(_mm512_castps512_ps256(v), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
  __m128 q = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
  q = _mm_add_ps(q, _mm_movehl_ps(q, q));
  q = _mm_add_ss(q, _mm_movehdup_ps(q));
  return _mm_cvtss_f32(q);
}

// e^x to about one unit in the last place (infinity past 88.7; below -87, e^-87): x = n ln 2 + r with
// |r| <= ln 2 / 2, e^r by its Taylor polynomial to r^7 (remainder below 2^-26), times 2^n by scalef.
inline __m512 exp16(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));  // e^-87 is about float32's smallest normal
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145752f), x);  // ln 2 in two parts: n * hi is exact
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.42860677e-6f), r);
  __m512 p = _mm512_set1_ps(1.0f / 5040);
  for (float c : {1.0f / 720, 1.0f / 120, 1.0f / 24, 1.0f / 6, 0.5f, 1.0f, 1.0f}) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
  return _mm512_scalef_ps(p, n);
}

// v rounded to bf16 and widened again: the number a bf16 tensor holds for it.
inline __m512 rounded(__m512 v) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(to_bf16(v)), 16)); }

// One row of C numbers x (float32, or bf16 as uint16_t) -> x * (1 / sqrt(mean(x^2) + eps)) * w into out, as
// model.RMSNorm computes it in float32, rounded once to E. The squares summed lane by lane by fused
// multiply-adds, then across the lanes (sum16): PyTorch sums in another order, so a result can land a
// rounding step away from its.
template <typename E>
inline void rms_norm_row(const E* x, const E* w, int64_t C, float eps, E* out) {
  __m512 ss = _mm512_setzero_ps();
  for (int64_t c = 0; c < C; c += 16) {
    const __m512 v = load16(x + c, first(C - c));
    ss = _mm512_fmadd_ps(v, v, ss);
  }
  const __m512 inv = _mm512_set1_ps(1.0f / std::sqrt(sum16(ss) / C + eps));
  for (int64_t c = 0; c < C; c += 16) {
    const __mmask16 m = first(C - c);
    store16(out + c, _mm512_mul_ps(_mm512_mul_ps(load16(x + c, m), inv), load16(w + c, m)), m);
  }
}

// n numbers of gate g and up u -> silu(g) * u into out, silu(g) = g / (1 + e^-g) (exp16). In bf16 silu(g) is
// rounded before the product, as F.silu(gate) * up rounds it; in float32 neither rounds.
template <typename E>
inline void swiglu_row(const E* g, const E* u, int64_t n, E* out) {
  const __m512 one = _mm512_set1_ps(1.0f);
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = first(n - i);
    const __m512 x = load16(g + i, m);
    __m512 silu = _mm512_div_ps(x, _mm512_add_ps(one, exp16(_mm512_sub_ps(_mm512_setzero_ps(), x))));
    if constexpr (std::is_same_v<E, uint16_t>) silu = rounded(silu);
    store16(out + i, _mm512_mul_ps(silu, load16(u + i, m)), m);
  }
}

}  // namespace
