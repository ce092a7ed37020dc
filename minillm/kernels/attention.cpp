// Causal attention, softmax(q k^T / sqrt(hd), causal) v, two ways.
//
// A prompt's (causal_attention), in float32, for the many queries of a prefill (speed.GQADecodeAttention takes
// it for more than 16 queries). PyTorch's CPU kernel (flash attention, blocks of 512 keys) computes every
// score of a 512-token prompt and masks half of them; this one visits only the keys each block of queries
// can see, so a prompt's attention costs about half.
// The work is split into tasks of (batch row, K/V head, block of queries). A task takes the query heads that
// share its K/V head (grouped-query attention) together, QB queries of each: up to 96 rows that reuse every
// key and value they load. Keys come in blocks of 64, as flash attention does: the block's scores, each
// row's running maximum and sum of exponentials (online softmax), and the output rows, scaled down when a
// row's maximum grows, then added to by the block's probabilities times its values. The task's rows lie
// across the lanes of its vectors (16 rows a vector): scores are kept keys x rows and outputs hd x rows, so
// the softmax of 16 rows is a few vector operations per key, with no sums across lanes. Both products are
// one small kernel shape, R rows x NV vectors of 16 rows' sums in registers, each multiply-add a broadcast
// of a key's (or a value's) number times a vector of 16 rows' numbers.
//
// A few queries' (few_query_attention: a decode step's one, a verification's k + 1; float32 or bf16), where
// 16 rows a vector would lie mostly empty: one query row at a time, its head_dim across the vectors' lanes
// (query_row below). A row's numbers then do not depend on the other rows of its call.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <climits>
#include <cmath>
#include <type_traits>
#include <vector>

#include "simd.h"

namespace {

constexpr int KB = 64, LANES = 16, RB = 4, TASK_ROWS = 96, VMAX = TASK_ROWS / LANES;  // keys a block, kernel rows

// c[r, :] = sum_i a[r * ar + i * ai] * b[i, :] (+ c[r, :] * f, with ADD) for R rows and NV vectors of 16
// columns, i < n: b's rows ldb apart, c's ldc; f: one factor per column.
template <int R, int NV, bool ADD>
inline void kernel(const float* a, int64_t ar, int64_t ai, const float* b, int64_t ldb, int64_t n, float* c,
                   int64_t ldc, const float* f) {
  __m512 acc[R][NV];
#pragma GCC unroll 8
  for (int v = 0; v < NV; ++v)
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r)
      acc[r][v] = ADD ? _mm512_mul_ps(_mm512_loadu_ps(c + r * ldc + v * LANES), _mm512_loadu_ps(f + v * LANES))
                      : _mm512_setzero_ps();
  for (int64_t i = 0; i < n; ++i) {
    __m512 bv[NV];
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) bv[v] = _mm512_loadu_ps(b + i * ldb + v * LANES);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m512 av = _mm512_set1_ps(a[r * ar + i * ai]);
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_fmadd_ps(av, bv[v], acc[r][v]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(c + r * ldc + v * LANES, acc[r][v]);
}

// The same for any number of rows (RB at a time, then the rest) and 1..VMAX vectors.
template <bool ADD>
void product(const float* a, int64_t ar, int64_t ai, const float* b, int64_t ldb, int64_t n, float* c,
             int64_t ldc, const float* f, int64_t rows, int vectors) {
  for (int64_t r0 = 0; r0 < rows; r0 += RB) {
    const int nr = (int)std::min<int64_t>(RB, rows - r0);
    const float* aa = a + r0 * ar;
    float* cc = c + r0 * ldc;
#define MINILLM_CASE(R, NV) \
  case (R) * 8 + (NV): kernel<R, NV, ADD>(aa, ar, ai, b, ldb, n, cc, ldc, f); break;
#define MINILLM_ROWS(R) \
  MINILLM_CASE(R, 1) MINILLM_CASE(R, 2) MINILLM_CASE(R, 3) MINILLM_CASE(R, 4) MINILLM_CASE(R, 5) MINILLM_CASE(R, 6)
    switch (nr * 8 + vectors) {
      MINILLM_ROWS(1) MINILLM_ROWS(2) MINILLM_ROWS(3) MINILLM_ROWS(4)
      default: TORCH_CHECK(false, "causal_attention: ", vectors, " vectors of rows (at most ", VMAX, ")");
    }
#undef MINILLM_ROWS
#undef MINILLM_CASE
  }
}

// A block's scores s (kn keys x 16 * vectors rows, rows ld apart) -> probabilities, in place, against each
// row's running maximum m and sum l; key j0 + j is hidden from a row past its position pos (only checked
// where `masked`). -> f: per row, the factor by which its earlier output must be scaled (its maximum moved).
void softmax_block(float* s, int64_t ld, int64_t kn, int64_t j0, const int32_t* pos, bool masked, float* m,
                   float* l, float* f, int vectors) {
  for (int v = 0; v < vectors; ++v) {
    const __m512i p = _mm512_loadu_si512(pos + v * LANES);
    auto keep = [&](int64_t j) { return masked ? _mm512_cmple_epi32_mask(_mm512_set1_epi32((int)(j0 + j)), p)
                                               : (__mmask16)0xFFFF; };
    __m512 mx = _mm512_set1_ps(-INFINITY), sum = _mm512_setzero_ps();
    for (int64_t j = 0; j < kn; ++j) mx = _mm512_mask_max_ps(mx, keep(j), mx, _mm512_loadu_ps(s + j * ld + v * LANES));
    const __m512 m_old = _mm512_loadu_ps(m + v * LANES), m_new = _mm512_max_ps(m_old, mx);
    for (int64_t j = 0; j < kn; ++j) {
      float* sj = s + j * ld + v * LANES;
      const __m512 e = _mm512_maskz_mov_ps(keep(j), exp16(_mm512_sub_ps(_mm512_loadu_ps(sj), m_new)));
      _mm512_storeu_ps(sj, e);
      sum = _mm512_add_ps(sum, e);
    }
    const __m512 scale = exp16(_mm512_sub_ps(m_old, m_new));  // m_old = -inf: ~0, and nothing to scale yet
    _mm512_storeu_ps(f + v * LANES, scale);
    _mm512_storeu_ps(m + v * LANES, m_new);
    _mm512_storeu_ps(l + v * LANES, _mm512_fmadd_ps(_mm512_loadu_ps(l + v * LANES), scale, sum));
  }
}

// One query row of a few (few_query_attention): its n visible keys' scores into s, their softmax, and the
// weighted sum of their values into out. hd = 16 * NV numbers lie across NV vectors: a score is NV
// multiply-adds and one sum across lanes; a value is added to NV accumulators (for hd up to 128 two sets,
// even and odd keys, so that consecutive keys' additions do not wait on each other). float32 (E = float)
// or bf16 (its bits: E = uint16_t, widened exactly), the sums in float32, out rounded once. Every row runs
// the same operations in the same order whatever the other rows of its call: its numbers do not depend on them.
template <typename E, int NV>
void query_row(const E* q, const E* k, int64_t ks, const E* v, int64_t vs, int64_t n, float scale, float* s, E* out) {
  __m512 qv[NV], o0[NV], o1[NV];
  for (int i = 0; i < NV; ++i) qv[i] = _mm512_mul_ps(load16(q + i * LANES), _mm512_set1_ps(scale));
  for (int64_t j = 0; j < n; ++j) {  // scores: two sums of products a key (even and odd vectors), then their lanes'
    const E* kj = k + j * ks;
    __m512 acc[2] = {_mm512_setzero_ps(), _mm512_setzero_ps()};
    for (int i = 0; i < NV; ++i) acc[i & 1] = _mm512_fmadd_ps(qv[i], load16(kj + i * LANES), acc[i & 1]);
    s[j] = sum16(_mm512_add_ps(acc[0], acc[1]));
  }
  __m512 mx = _mm512_set1_ps(-INFINITY), sum = _mm512_setzero_ps();
  for (int64_t j = 0; j < n; j += LANES) mx = _mm512_max_ps(mx, _mm512_mask_loadu_ps(mx, first(n - j), s + j));
  mx = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
  for (int64_t j = 0; j < n; j += LANES) {  // probabilities (unnormalized), in place
    const __mmask16 in = first(n - j);
    const __m512 e = _mm512_maskz_mov_ps(in, exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(in, s + j), mx)));
    _mm512_mask_storeu_ps(s + j, in, e);
    sum = _mm512_add_ps(sum, e);
  }
  for (int i = 0; i < NV; ++i) o0[i] = o1[i] = _mm512_setzero_ps();
  int64_t j = 0;
  for (; j + 1 < n; j += 2) {  // values: even keys into o0, odd into o1
    const __m512 p0 = _mm512_set1_ps(s[j]), p1 = _mm512_set1_ps(s[j + 1]);
    for (int i = 0; i < NV; ++i) {
      o0[i] = _mm512_fmadd_ps(p0, load16(v + j * vs + i * LANES), o0[i]);
      if constexpr (NV <= 8) o1[i] = _mm512_fmadd_ps(p1, load16(v + (j + 1) * vs + i * LANES), o1[i]);
      else o0[i] = _mm512_fmadd_ps(p1, load16(v + (j + 1) * vs + i * LANES), o0[i]);  // wide heads: one set (registers)
    }
  }
  if (j < n)
    for (int i = 0; i < NV; ++i) o0[i] = _mm512_fmadd_ps(_mm512_set1_ps(s[j]), load16(v + j * vs + i * LANES), o0[i]);
  const __m512 inv = _mm512_set1_ps(1.0f / sum16(sum));
  for (int i = 0; i < NV; ++i) {
    const __m512 y = _mm512_mul_ps(_mm512_add_ps(o0[i], o1[i]), inv);
    store16(out + i * LANES, y);
  }
}

// Rows a..b-1 of a few-query call (row r: batch row, query head, query, in the output's order) of q, k and v's
// elements E.
template <typename E>
void query_rows(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v, torch::Tensor& out,
                int64_t a, int64_t b) {
  const int64_t nh = q.size(1), T = q.size(2), hd = q.size(3), S = k.size(2), rep = nh / k.size(1);
  const float scale = 1.0f / std::sqrt((float)hd);
  const E *qp = (const E*)q.data_ptr(), *kp = (const E*)k.data_ptr(), *vp = (const E*)v.data_ptr();
  std::vector<float> s(S);
  for (int64_t r = a; r < b; ++r) {
    const int64_t t = (r / nh) % T, batch = r / (nh * T), h = r % nh, g = h / rep;
    const E* qr = qp + batch * q.stride(0) + h * q.stride(1) + t * q.stride(2);
    const E* kg = kp + batch * k.stride(0) + g * k.stride(1);
    const E* vg = vp + batch * v.stride(0) + g * v.stride(1);
    const int64_t n = S - T + t + 1;  // the keys query t sees
    E* dst = (E*)out.data_ptr() + r * hd;
#define MINILLM_CASE(NV) \
  case NV: query_row<E, NV>(qr, kg, k.stride(2), vg, v.stride(2), n, scale, s.data(), dst); break;
    switch (hd / LANES) {
      MINILLM_CASE(1) MINILLM_CASE(2) MINILLM_CASE(3) MINILLM_CASE(4) MINILLM_CASE(5) MINILLM_CASE(6)
      MINILLM_CASE(7) MINILLM_CASE(8) MINILLM_CASE(9) MINILLM_CASE(10) MINILLM_CASE(11) MINILLM_CASE(12)
      MINILLM_CASE(13) MINILLM_CASE(14) MINILLM_CASE(15) MINILLM_CASE(16)
    }
#undef MINILLM_CASE
  }
}

}  // namespace

// q (B, nh, T, hd), k and v (B, nkv, S, hd), all float32, the last dimension of each contiguous, hd a multiple
// of 16; query t sits at position S - T + t and sees keys 0..S - T + t. -> (B, T, nh, hd), the heads side
// by side as the output projection reads them.
torch::Tensor causal_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4 && q.scalar_type() == torch::kFloat &&
              k.scalar_type() == torch::kFloat && v.scalar_type() == torch::kFloat,
              "causal_attention: q (B, nh, T, hd), k and v (B, nkv, S, hd), float32");
  const int64_t B = q.size(0), nh = q.size(1), T = q.size(2), hd = q.size(3), nkv = k.size(1), S = k.size(2);
  TORCH_CHECK(k.sizes() == v.sizes() && k.size(0) == B && k.size(3) == hd && nh % nkv == 0 && hd % LANES == 0 &&
              S >= T && q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1,
              "causal_attention: shapes or strides do not match");
  TORCH_CHECK(nh / nkv <= TASK_ROWS && S < INT_MAX, "causal_attention: at most ", TASK_ROWS,
              " query heads a K/V head and 2^31 positions (got ", nh / nkv, ", ", S, ")");
  auto out = torch::empty({B, T, nh, hd}, q.options());
  const int64_t rep = nh / nkv, qb = std::max<int64_t>(1, TASK_ROWS / rep), blocks = (T + qb - 1) / qb;
  const int64_t offset = S - T;
  const float scale = 1.0f / std::sqrt((float)hd);
  const float *qp = q.data_ptr<float>(), *kp = k.data_ptr<float>(), *vp = v.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, B * nkv * blocks, 1, [&](int64_t a, int64_t b) {
    const int64_t ld = ((rep * qb + LANES - 1) / LANES) * LANES;  // rows, padded to whole vectors
    std::vector<float> qt(hd * ld), o(hd * ld), s(KB * ld), m(ld), l(ld), f(ld);
    std::vector<int32_t> pos(ld);
    for (int64_t task = a; task < b; ++task) {
      const int64_t i = task % blocks, bg = task / blocks, batch = bg / nkv, g = bg % nkv;
      const int64_t block = i % 2 == 0 ? i / 2 : blocks - 1 - i / 2;  // light and heavy blocks alternate
      const int64_t t0 = block * qb, n = std::min(qb, T - t0), rows = rep * n;
      const int vectors = (int)((rows + LANES - 1) / LANES);
      std::fill(qt.begin(), qt.end(), 0.0f);  // padding rows: zero queries that see every key, never read out
      std::fill(pos.begin(), pos.end(), INT_MAX);
      for (int64_t r = 0; r < rows; ++r) {  // row r: query head g * rep + r / n, query t0 + r % n
        const float* src = qp + batch * q.stride(0) + (g * rep + r / n) * q.stride(1) + (t0 + r % n) * q.stride(2);
        for (int64_t d = 0; d < hd; ++d) qt[d * ld + r] = src[d] * scale;
        pos[r] = (int32_t)(offset + t0 + r % n);
      }
      std::fill(m.begin(), m.end(), -INFINITY);
      std::fill(l.begin(), l.end(), 0.0f);
      const float* kg = kp + batch * k.stride(0) + g * k.stride(1);
      const float* vg = vp + batch * v.stride(0) + g * v.stride(1);
      const int64_t limit = offset + t0 + n;  // keys the block's last query sees
      for (int64_t j0 = 0; j0 < limit; j0 += KB) {
        const int64_t kn = std::min<int64_t>(KB, limit - j0);
        product<false>(kg + j0 * k.stride(2), k.stride(2), 1, qt.data(), ld, hd, s.data(), ld, nullptr, kn, vectors);
        softmax_block(s.data(), ld, kn, j0, pos.data(), j0 + kn - 1 > offset + t0, m.data(), l.data(), f.data(),
                      vectors);
        if (j0 == 0)
          product<false>(vg, 1, v.stride(2), s.data(), ld, kn, o.data(), ld, nullptr, hd, vectors);
        else
          product<true>(vg + j0 * v.stride(2), 1, v.stride(2), s.data(), ld, kn, o.data(), ld, f.data(), hd, vectors);
      }
      for (int64_t r = 0; r < rows; ++r) {
        float* dst = op + ((batch * T + t0 + r % n) * nh + g * rep + r / n) * hd;
        const float inv = 1.0f / l[r];
        for (int64_t d = 0; d < hd; ++d) dst[d] = o[d * ld + r] * inv;
      }
    }
  });
  return out;
}

// The same attention for a few queries (see the top): each query row on its own (query_row), the rows of a call
// shared among the threads when there is enough work for two. Same arguments and result, float32 or bf16.
torch::Tensor few_query_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v) {
  const auto dtype = q.scalar_type();
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4 && (dtype == torch::kFloat || dtype == torch::kBFloat16) &&
              k.scalar_type() == dtype && v.scalar_type() == dtype,
              "few_query_attention: q (B, nh, T, hd), k and v (B, nkv, S, hd), all float32 or all bf16");
  const int64_t B = q.size(0), nh = q.size(1), T = q.size(2), hd = q.size(3), nkv = k.size(1), S = k.size(2);
  TORCH_CHECK(k.sizes() == v.sizes() && k.size(0) == B && k.size(3) == hd && nh % nkv == 0 && hd % LANES == 0 &&
              hd <= 16 * LANES && S >= T && q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1,
              "few_query_attention: shapes or strides do not match (head_dim a multiple of 16, at most 256)");
  auto out = torch::empty({B, T, nh, hd}, q.options());
  if (out.numel() == 0) return out;
  at::parallel_for(0, B * nh * T, std::max<int64_t>(1, (1 << 16) / (S * hd)), [&](int64_t a, int64_t b) {
    if (dtype == torch::kFloat) query_rows<float>(q, k, v, out, a, b);
    else query_rows<uint16_t>(q, k, v, out, a, b);
  });
  return out;
}

TORCH_LIBRARY_FRAGMENT(minillm, m) {
  m.def("causal_attention(Tensor q, Tensor k, Tensor v) -> Tensor");
  m.def("few_query_attention(Tensor q, Tensor k, Tensor v) -> Tensor");
}
TORCH_LIBRARY_IMPL(minillm, CPU, m) {
  m.impl("causal_attention", &causal_attention);
  m.impl("few_query_attention", &few_query_attention);
}
