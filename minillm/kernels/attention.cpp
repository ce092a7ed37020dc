// Causal attention of a prompt: softmax(q k^T / sqrt(hd), causal) v in float32, for the many queries of a
// prefill (speed.GQADecodeAttention takes it for more than 16 queries). PyTorch's CPU kernel (flash
// attention, blocks of 512 keys) computes every score of a 512-token prompt and masks half of them; this one
// visits only the keys a block of queries can see, so a prompt's attention costs about half.
//
// The work is split into tasks of (batch row, K/V head, block of queries). A task takes the query heads that
// share its K/V head (grouped-query attention) together, QB queries of each: up to 96 rows that reuse every
// key and value they load. Keys come in blocks of 64, as flash attention does: the block's scores (rows x 64),
// each row's running maximum and sum of exponentials (online softmax), and the output rows, rescaled when a
// row's maximum grows, then added to by the block's probabilities times its values. Scores and outputs are
// computed by one small kernel shape, rows x 16-float vectors of sums in registers (R x NV <= 24), each
// multiply-add a broadcast of a row's number times a vector of the other operand.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <cmath>
#include <vector>

#include "simd.h"

namespace {

constexpr int KB = 64, LANES = 16, RB = 6, TASK_ROWS = 96;  // keys per block, rows per kernel step, per task

// c[r, :] (+)= sum_i a[r, i] * b[i, :] for R rows and NV vectors of 16 columns, i < n: a's rows `lda` apart,
// b's rows `ldb` apart (columns beyond `cols` read as zero: the last block of keys).
template <int R, int NV, bool ADD>
inline void kernel(const float* a, int64_t lda, const float* b, int64_t ldb, int64_t n, float* c, int64_t ldc,
                   int64_t cols) {
  __m512 acc[R][NV];
  __mmask16 mask[NV];
#pragma GCC unroll 8
  for (int v = 0; v < NV; ++v) {
    mask[v] = first(cols - v * LANES);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) acc[r][v] = ADD ? _mm512_loadu_ps(c + r * ldc + v * LANES) : _mm512_setzero_ps();
  }
  for (int64_t i = 0; i < n; ++i) {
    __m512 bv[NV];
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) bv[v] = _mm512_maskz_loadu_ps(mask[v], b + i * ldb + v * LANES);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m512 av = _mm512_set1_ps(a[r * lda + i]);
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_fmadd_ps(av, bv[v], acc[r][v]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(c + r * ldc + v * LANES, acc[r][v]);
}

// The same for any number of rows and of vectors (up to 4 at a time): RB rows at a time, then the rest.
template <bool ADD>
void product(const float* a, int64_t lda, const float* b, int64_t ldb, int64_t n, float* c, int64_t ldc,
             int64_t rows, int64_t vectors, int64_t cols) {
  for (int64_t v0 = 0; v0 < vectors; v0 += 4) {
    const int nv = (int)std::min<int64_t>(4, vectors - v0);
    const float* bb = b + v0 * LANES;
    const int64_t left = cols - v0 * LANES;
    for (int64_t r0 = 0; r0 < rows; r0 += RB) {
      const int nr = (int)std::min<int64_t>(RB, rows - r0);
      const float* aa = a + r0 * lda;
      float* cc = c + r0 * ldc + v0 * LANES;
#define MINILLM_CASE(R, NV) \
  case (R) * 8 + (NV): kernel<R, NV, ADD>(aa, lda, bb, ldb, n, cc, ldc, left); break;
#define MINILLM_ROWS(R) MINILLM_CASE(R, 1) MINILLM_CASE(R, 2) MINILLM_CASE(R, 3) MINILLM_CASE(R, 4)
      switch (nr * 8 + nv) { MINILLM_ROWS(1) MINILLM_ROWS(2) MINILLM_ROWS(3) MINILLM_ROWS(4) MINILLM_ROWS(5) MINILLM_ROWS(6) }
#undef MINILLM_ROWS
#undef MINILLM_CASE
    }
  }
}

// One row's block of scores s[0..KB) -> its probabilities against the running maximum m and sum l; keys
// beyond `last` (the row's own position, relative to the block) are masked out. -> the factor by which the
// row's earlier output must be scaled (its maximum moved).
inline float softmax_block(float* s, int64_t last, float& m, float& l) {
  __mmask16 keep[KB / LANES];
  __m512 mx = _mm512_set1_ps(-INFINITY);
  for (int v = 0; v < KB / LANES; ++v) {
    keep[v] = first(last + 1 - v * LANES);
    mx = _mm512_mask_max_ps(mx, keep[v], mx, _mm512_loadu_ps(s + v * LANES));
  }
  const float m_new = std::max(m, _mm512_reduce_max_ps(mx));
  const float scale = m == -INFINITY ? 0.0f : (m == m_new ? 1.0f : _mm512_cvtss_f32(exp16(_mm512_set1_ps(m - m_new))));
  __m512 sum = _mm512_setzero_ps();
  for (int v = 0; v < KB / LANES; ++v) {
    const __m512 p = _mm512_maskz_mov_ps(keep[v], exp16(_mm512_sub_ps(_mm512_loadu_ps(s + v * LANES), _mm512_set1_ps(m_new))));
    _mm512_storeu_ps(s + v * LANES, p);
    sum = _mm512_add_ps(sum, p);
  }
  m = m_new;
  l = l * scale + _mm512_reduce_add_ps(sum);
  return scale;
}

}  // namespace

// q (B, nh, T, hd), kt (B, nkv, hd, S) contiguous (the keys transposed), v (B, nkv, S, hd), all float32, the
// last dimension of q and v contiguous, hd a multiple of 16; query t sits at position S - T + t and sees keys
// 0..S - T + t. -> (B, T, nh, hd), the heads side by side as the output projection reads them.
torch::Tensor causal_attention(torch::Tensor q, torch::Tensor kt, torch::Tensor v) {
  TORCH_CHECK(q.dim() == 4 && kt.dim() == 4 && v.dim() == 4 && q.scalar_type() == torch::kFloat &&
              kt.scalar_type() == torch::kFloat && v.scalar_type() == torch::kFloat,
              "causal_attention: q (B, nh, T, hd), kt (B, nkv, hd, S) and v (B, nkv, S, hd), float32");
  const int64_t B = q.size(0), nh = q.size(1), T = q.size(2), hd = q.size(3), nkv = kt.size(1), S = kt.size(3);
  TORCH_CHECK(kt.is_contiguous() && kt.size(0) == B && kt.size(2) == hd && v.size(0) == B && v.size(1) == nkv &&
              v.size(2) == S && v.size(3) == hd && nh % nkv == 0 && hd % LANES == 0 && S >= T && q.stride(3) == 1 &&
              v.stride(3) == 1, "causal_attention: shapes or strides do not match");
  auto out = torch::empty({B, T, nh, hd}, q.options());
  const int64_t rep = nh / nkv, qb = std::max<int64_t>(1, TASK_ROWS / rep), blocks = (T + qb - 1) / qb;
  const int64_t offset = S - T, vectors = hd / LANES;
  const float scale = 1.0f / std::sqrt((float)hd);
  const float *qp = q.data_ptr<float>(), *ktp = kt.data_ptr<float>(), *vp = v.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, B * nkv * blocks, 1, [&](int64_t a, int64_t b) {
    std::vector<float> qs(rep * qb * hd), o(rep * qb * hd), s(rep * qb * KB), m(rep * qb), l(rep * qb);
    for (int64_t task = a; task < b; ++task) {
      const int64_t i = task % blocks, bg = task / blocks, batch = bg / nkv, g = bg % nkv;
      const int64_t block = i % 2 == 0 ? i / 2 : blocks - 1 - i / 2;  // light and heavy blocks alternate
      const int64_t t0 = block * qb, n = std::min(qb, T - t0), rows = rep * n;
      for (int64_t r = 0; r < rows; ++r) {  // row r: query head g * rep + r / n, query t0 + r % n
        const float* src = qp + batch * q.stride(0) + (g * rep + r / n) * q.stride(1) + (t0 + r % n) * q.stride(2);
        for (int64_t d = 0; d < hd; ++d) qs[r * hd + d] = src[d] * scale;
      }
      std::fill(o.begin(), o.end(), 0.0f);
      std::fill(m.begin(), m.end(), -INFINITY);
      std::fill(l.begin(), l.end(), 0.0f);
      const float* ktg = ktp + (batch * nkv + g) * hd * S;
      const float* vg = vp + batch * v.stride(0) + g * v.stride(1);
      const int64_t limit = offset + t0 + n;  // keys the block's last query sees
      for (int64_t j0 = 0; j0 < limit; j0 += KB) {
        const int64_t kn = std::min<int64_t>(KB, limit - j0);
        product<false>(qs.data(), hd, ktg + j0, S, hd, s.data(), KB, rows, KB / LANES, kn);
        for (int64_t r = 0; r < rows; ++r) {
          const float f = softmax_block(s.data() + r * KB, offset + t0 + r % n - j0, m[r], l[r]);
          if (f != 1.0f)
            for (int64_t d = 0; d < hd; ++d) o[r * hd + d] *= f;
        }
        product<true>(s.data(), KB, vg + j0 * v.stride(2), v.stride(2), kn, o.data(), hd, rows, vectors, hd);
      }
      for (int64_t r = 0; r < rows; ++r) {
        float* dst = op + ((batch * T + t0 + r % n) * nh + g * rep + r / n) * hd;
        const float inv = 1.0f / l[r];
        for (int64_t d = 0; d < hd; ++d) dst[d] = o[r * hd + d] * inv;
      }
    }
  });
  return out;
}

TORCH_LIBRARY_FRAGMENT(minillm, m) { m.def("causal_attention(Tensor q, Tensor kt, Tensor v) -> Tensor"); }
TORCH_LIBRARY_IMPL(minillm, CPU, m) { m.impl("causal_attention", &causal_attention); }
