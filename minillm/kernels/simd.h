// Vector helpers shared by attention.cpp and pointwise.cpp: the mask of a vector's first lanes, and e^x.
#pragma once
#include <immintrin.h>
#include <cstdint>

namespace {

// The first n of a vector's 16 lanes (n may be <= 0 or >= 16: none or all).
inline __mmask16 first(int64_t n) { return n >= 16 ? 0xFFFF : (n <= 0 ? 0 : (__mmask16)((1u << n) - 1)); }

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

}  // namespace
