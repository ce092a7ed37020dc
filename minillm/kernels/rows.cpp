// y = x @ W^T for a few rows of x (1..16) and float32 or bf16 W as it is, (N, K) row-major: each weight is
// read from memory once per call, whatever the number of rows, and used for every row while in a register.
// That is what a verification of k drafts needs: decoding reads every weight per token, so one row costs
// the read of the weights, and k + 1 rows should cost the same read, not k + 1 of them (PyTorch's CPU GEMM
// takes 2-3 one-row times for 4-9 rows: `python -m bench.step_cost few-rows`).
//
// For each output n and row m, 16 lanes sum w[n, k] * x[m, k] over k = lane, lane + 16, ... in order by
// fused multiply-adds in float32, and a fixed tree adds the 16 lanes at the end: the arithmetic of (n, m)
// is the same whatever the other rows of the call, their number, the tiles, the chunks of inputs or the
// thread, so a row's numbers do not depend on the call it is in (a verification gives each position the
// numbers a one-row step gives it). bf16 weights and x become float32 exactly (a shift); the sums are
// float32, y rounded once to x's dtype.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include "simd.h"

namespace {

constexpr int MAX_ROWS = 16, LANES = 16, GROUP = 24, X_CHUNK = 4096;  // X_CHUNK floats of x: 16 KB

// Inputs k0..k1-1 of outputs n0..n0+R-1, rows 0..M-1 of xf (float32, (M, K)). The lanes' sums carry from
// chunk to chunk in `lanes` (R * M vectors); after the last chunk each (n, m) adds its lanes into y[m, n].
template <typename W, int M, int R>
void chunk(const W* w, const float* xf, float* y, __m512* lanes, int64_t N, int64_t K, int64_t n0, int64_t k0,
           int64_t k1) {
  __m512 acc[R][M];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 16
    for (int m = 0; m < M; ++m) acc[r][m] = k0 == 0 ? _mm512_setzero_ps() : lanes[r * M + m];
  auto step = [&](int64_t k, __mmask16 mask) __attribute__((always_inline)) {
    constexpr int AHEAD = 2 * R < 4 ? 4 : 2 * R;  // outputs ahead: this chunk of theirs is read a few tiles from now
    __m512 wr[R];
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const W* row = w + (n0 + r) * K + k;
      __builtin_prefetch(row + AHEAD * K);
      wr[r] = load16(row, mask);
    }
#pragma GCC unroll 16
    for (int m = 0; m < M; ++m) {
      __m512 xm = _mm512_maskz_loadu_ps(mask, xf + m * K + k);
      __asm__("" : "+v"(xm));  // loaded once into a register, not once per multiply (the load ports are busy)
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) acc[r][m] = _mm512_fmadd_ps(wr[r], xm, acc[r][m]);
    }
  };
  int64_t k = k0;
  for (; k + LANES <= k1; k += LANES) step(k, 0xFFFF);
  if (k < k1) step(k, (__mmask16)((1u << (k1 - k)) - 1));
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 16
    for (int m = 0; m < M; ++m) {
      if (k1 == K) y[m * N + n0 + r] = sum16(acc[r][m]);
      else lanes[r * M + m] = acc[r][m];
    }
}

// All outputs: groups of GROUP outputs split among the threads; within a group, chunks of inputs in order
// (the chunk of x, X_CHUNK floats for any M, stays in the core's first cache while every output of the group
// uses it), and within a chunk R outputs at a time, R * M vectors of sums in registers (with the R weight
// vectors and x's: R * M + R + 1 of the 32 registers; 33 at 3 rows, where the compiler keeps one on the stack).
template <typename W, int M>
void rows(const W* w, const float* xf, float* y, int64_t N, int64_t K) {
  constexpr int R = M <= 3 ? 8 : (M <= 4 ? 6 : (M <= 6 ? 4 : (M <= 9 ? 3 : (M <= 12 ? 2 : 1))));
  constexpr int64_t CHUNK = X_CHUNK / M / LANES * LANES;
  at::parallel_for(0, (N + GROUP - 1) / GROUP, 1, [&](int64_t a, int64_t b) {
    alignas(64) __m512 lanes[GROUP * M];
    for (int64_t g = a; g < b; ++g) {
      const int64_t n0 = g * GROUP, n1 = std::min(N, n0 + GROUP);
      for (int64_t k0 = 0; k0 < K; k0 += CHUNK) {
        const int64_t k1 = std::min(K, k0 + CHUNK);
        int64_t n = n0;
        for (; n + R <= n1; n += R) chunk<W, M, R>(w, xf, y, lanes + (n - n0) * M, N, K, n, k0, k1);
        for (; n < n1; ++n) chunk<W, M, 1>(w, xf, y, lanes + (n - n0) * M, N, K, n, k0, k1);
      }
    }
  });
}

template <typename W>
void row_block(int64_t M, const W* w, const float* xf, float* y, int64_t N, int64_t K) {
  switch (M) {
    case 1: return rows<W, 1>(w, xf, y, N, K);
    case 2: return rows<W, 2>(w, xf, y, N, K);
    case 3: return rows<W, 3>(w, xf, y, N, K);
    case 4: return rows<W, 4>(w, xf, y, N, K);
    case 5: return rows<W, 5>(w, xf, y, N, K);
    case 6: return rows<W, 6>(w, xf, y, N, K);
    case 7: return rows<W, 7>(w, xf, y, N, K);
    case 8: return rows<W, 8>(w, xf, y, N, K);
    case 9: return rows<W, 9>(w, xf, y, N, K);
    case 10: return rows<W, 10>(w, xf, y, N, K);
    case 11: return rows<W, 11>(w, xf, y, N, K);
    case 12: return rows<W, 12>(w, xf, y, N, K);
    case 13: return rows<W, 13>(w, xf, y, N, K);
    case 14: return rows<W, 14>(w, xf, y, N, K);
    case 15: return rows<W, 15>(w, xf, y, N, K);
    default: return rows<W, 16>(w, xf, y, N, K);
  }
}

}  // namespace

// x (M, K) and w (N, K), both float32 or both bf16, M <= 16 -> (M, N) in their dtype.
torch::Tensor rows_mm(torch::Tensor x, torch::Tensor w) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2, "rows_mm: x (M, K) and w (N, K) must be 2-D");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  TORCH_CHECK(w.size(1) == K && M >= 1 && M <= MAX_ROWS && x.scalar_type() == w.scalar_type() &&
              (w.scalar_type() == torch::kFloat || w.scalar_type() == torch::kBFloat16) && w.is_contiguous(),
              "rows_mm: x (M <= 16, K) and contiguous w (N, K), both float32 or both bfloat16");
  const bool bf16 = w.scalar_type() == torch::kBFloat16;
  auto xf = x.to(torch::kFloat).contiguous();  // bf16 -> float32 is exact
  auto y = torch::empty({M, N}, xf.options());
  if (bf16) row_block(M, (const uint16_t*)w.data_ptr<at::BFloat16>(), xf.data_ptr<float>(), y.data_ptr<float>(), N, K);
  else row_block(M, w.data_ptr<float>(), xf.data_ptr<float>(), y.data_ptr<float>(), N, K);
  return bf16 ? y.to(torch::kBFloat16) : y;  // rounded once, to nearest even
}

TORCH_LIBRARY_FRAGMENT(minillm, m) { m.def("rows_mm(Tensor x, Tensor w) -> Tensor"); }
TORCH_LIBRARY_IMPL(minillm, CPU, m) { m.impl("rows_mm", &rows_mm); }
