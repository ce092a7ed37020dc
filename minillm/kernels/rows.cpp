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
//
// bf16 on CPUs with AMX-BF16 (Intel's tile unit, Sapphire Rapids on), K a multiple of 32: the tile unit's
// tdpbf16ps instead, 16 outputs x 32 inputs of W against all the rows of x per instruction, so that 16 rows
// cost one row's read of W and no more multiply-add instructions than one. Each (n, m) is then summed by
// that instruction's arithmetic (the products of a pair of inputs added to a float32 sum, pair after pair in
// k order; inputs and results below float32's normal range taken as zero), the same for every row, call and
// count of rows: a row's numbers again do not depend on the call. A machine without AMX sums as above, so two
// kinds of CPU round bf16 differently (both float32 sums of the same products).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <vector>

#include "simd.h"

#if __has_include(<amxbf16intrin.h>)  // the compiler knows AMX (gcc 11 on); without it the lanes serve bf16 too
#define MINILLM_AMX 1
#endif

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

#ifdef MINILLM_AMX
// Tiles 0..2: 16 (or R) outputs' next 32 inputs of W; 3: the same 32 inputs of the M rows of x, in pairs;
// 4..6: the outputs' float32 sums for the M rows.
__attribute__((target("amx-tile,amx-bf16"))) void amx_configure(int64_t M, int R) {
  struct alignas(64) { uint8_t palette, start, zero[14]; uint16_t colsb[16]; uint8_t rows[16]; } c{};
  c.palette = 1;
  for (int i = 0; i < 3; ++i) c.colsb[i] = 64, c.rows[i] = R, c.colsb[4 + i] = 4 * M, c.rows[4 + i] = R;
  c.colsb[3] = 4 * M, c.rows[3] = 16;
  __asm__ volatile("" : : "r"(&c) : "memory");  // gcc 12 drops the stores above as unread otherwise
  _tile_loadconfig(&c);
}

__attribute__((target("amx-tile"))) void amx_release() { _tile_release(); }

// Lane i holds i * stride (a gather's indices).
inline __m512i strided(int stride) {
  return _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), _mm512_set1_epi32(stride));
}

// Tile sums (16 outputs x M rows, stored a row of 16 floats per output) into y's rows m, columns n0..n0+R-1, bf16.
inline void to_rows(const float* c, uint16_t* y, int64_t M, int64_t N, int64_t n0, int R) {
  const __m512i outputs = strided(16);
  for (int64_t m = 0; m < M; ++m) {
    const __m512i at = _mm512_add_epi32(outputs, _mm512_set1_epi32((int)m));  // row m's sums, one per output
    const __m512 v = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), first(R), at, c, 4);
    store16(y + m * N + n0, v, first(R));
  }
}

// Outputs n0..n0 + 16 T - 1 (T tiles of 16 outputs; or one tile of the last R = N % 16) for all M rows: W's
// rows as they are (bf16, stride K), xp x's inputs in pairs ((K/2, M) pairs). The tile instructions take
// the tiles' numbers as literals.
template <int T>
__attribute__((target("amx-tile,amx-bf16"))) void amx_tiles(const uint16_t* w, const uint32_t* xp, uint16_t* y,
                                                             int64_t M, int64_t N, int64_t K, int64_t n0, int R) {
  _tile_zero(4);
  if constexpr (T > 1) _tile_zero(5);
  if constexpr (T > 2) _tile_zero(6);
  const uint16_t* w0 = w + n0 * K;
  for (int64_t k = 0; k < K; k += 32) {
    _tile_loadd(3, xp + k / 2 * M, 4 * M);
    _tile_loadd(0, w0 + k, 2 * K);
    _tile_dpbf16ps(4, 0, 3);
    if constexpr (T > 1) { _tile_loadd(1, w0 + 16 * K + k, 2 * K); _tile_dpbf16ps(5, 1, 3); }
    if constexpr (T > 2) { _tile_loadd(2, w0 + 32 * K + k, 2 * K); _tile_dpbf16ps(6, 2, 3); }
  }
  alignas(64) float c[16 * 16];
  _tile_stored(4, c, 64);
  to_rows(c, y, M, N, n0, R);
  if constexpr (T > 1) { _tile_stored(5, c, 64); to_rows(c, y, M, N, n0 + 16, R); }
  if constexpr (T > 2) { _tile_stored(6, c, 64); to_rows(c, y, M, N, n0 + 32, R); }
}

// y = x @ W^T through the tile unit, all bf16 (as their bits), K % 32 == 0.
void amx_rows(const uint16_t* w, const uint16_t* x, uint16_t* y, int64_t M, int64_t N, int64_t K) {
  thread_local std::vector<uint32_t> xp;  // x's inputs 2r, 2r + 1 of row m at xp[r * M + m]
  xp.resize(K / 2 * M);
  const __m512i row_starts = strided((int)(K / 2));
  for (int64_t r = 0; r < K / 2; ++r)
    _mm512_mask_storeu_epi32(xp.data() + r * M, first(M), _mm512_mask_i32gather_epi32(
        _mm512_setzero_si512(), first(M), _mm512_add_epi32(row_starts, _mm512_set1_epi32((int)r)), x, 4));
  const uint32_t* xd = xp.data();  // xp is thread_local: the workers below read the caller's through xd
  constexpr int T = 3;
  const int64_t tiles = N / 16;
  at::parallel_for(0, (tiles + T - 1) / T, 1, [&](int64_t a, int64_t b) {
    amx_configure(M, 16);
    for (int64_t g = a; g < b; ++g) {
      const int64_t t0 = g * T, n = std::min<int64_t>(T, tiles - t0);
      if (n == 3) amx_tiles<3>(w, xd, y, M, N, K, t0 * 16, 16);
      else for (int64_t t = t0; t < t0 + n; ++t) amx_tiles<1>(w, xd, y, M, N, K, t * 16, 16);
    }
    amx_release();
  });
  if (N % 16) {  // the last outputs, fewer than a tile's 16 rows
    amx_configure(M, N % 16);
    amx_tiles<1>(w, xd, y, M, N, K, tiles * 16, N % 16);
    amx_release();
  }
}
#endif

}  // namespace

// Whether this CPU has AMX-BF16 and Linux lets this process use the tiles (asked once).
bool amx_bf16() {
#ifdef MINILLM_AMX
  static const bool ok = [] {
    unsigned a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || !(d & (1u << 22)) || !(d & (1u << 24))) return false;
    return syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XFEATURE_XTILEDATA */) == 0;
  }();
  return ok;
#else
  return false;
#endif
}

// x (M, K) and w (N, K), both float32 or both bf16, M <= 16 -> (M, N) in their dtype.
torch::Tensor rows_mm(torch::Tensor x, torch::Tensor w) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2, "rows_mm: x (M, K) and w (N, K) must be 2-D");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  TORCH_CHECK(w.size(1) == K && M >= 1 && M <= MAX_ROWS && x.scalar_type() == w.scalar_type() &&
              (w.scalar_type() == torch::kFloat || w.scalar_type() == torch::kBFloat16) && w.is_contiguous(),
              "rows_mm: x (M <= 16, K) and contiguous w (N, K), both float32 or both bfloat16");
  const bool bf16 = w.scalar_type() == torch::kBFloat16;
#ifdef MINILLM_AMX
  if (bf16 && K % 32 == 0 && amx_bf16()) {
    auto xc = x.contiguous();
    auto y = torch::empty({M, N}, x.options());  // the float32 sums rounded once, to nearest even
    amx_rows((const uint16_t*)w.data_ptr<at::BFloat16>(), (const uint16_t*)xc.data_ptr<at::BFloat16>(),
             (uint16_t*)y.data_ptr<at::BFloat16>(), M, N, K);
    return y;
  }
#endif
  auto xf = x.to(torch::kFloat).contiguous();  // bf16 -> float32 is exact
  auto y = torch::empty({M, N}, xf.options());
  if (bf16) row_block(M, (const uint16_t*)w.data_ptr<at::BFloat16>(), xf.data_ptr<float>(), y.data_ptr<float>(), N, K);
  else row_block(M, w.data_ptr<float>(), xf.data_ptr<float>(), y.data_ptr<float>(), N, K);
  return bf16 ? y.to(torch::kBFloat16) : y;  // rounded once, to nearest even
}

TORCH_LIBRARY_FRAGMENT(minillm, m) { m.def("rows_mm(Tensor x, Tensor w) -> Tensor"); }
TORCH_LIBRARY_IMPL(minillm, CPU, m) { m.impl("rows_mm", &rows_mm); }
