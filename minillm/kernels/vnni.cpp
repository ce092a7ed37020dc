// y = x @ W^T for int4 and int8 W (quantized.py's schemes) on CPUs with AVX-512 VNNI, the way llama.cpp
// multiplies its Q4 and Q8 formats: x is rounded to int8 per block of 32 inputs (x ~ x8 * d, d = max|x| / 127),
// and the products of the codes with x8 are summed exactly in int32 by vpdpbusd, 64 at a time; floats only
// once per block. So the result is dequant(W) @ dequant(x8), which the tests check to float rounding; a
// row's numbers do not depend on the other rows of the call. Each pass over the weights serves up to 16 rows of x.
//
// Codes are unsigned bytes, as vpdpbusd wants one side: W = u * scale + base per group of g inputs, with
//   int4 (bits 4): u = q in [0, 15],       base = zero - 8 * scale   (quantized.py: W = (q - 8) * scale + zero)
//   int8 (bits 8): u = q + 128 in [1, 255], base = zero = -128 * scale, one group of all K inputs per row.
// Layout (pack() makes it): the N outputs in tiles of 16 rows; per tile, per 8 inputs k..k+7, 16 * bits bytes:
//   int4, 64 bytes, 4 per row: byte j of row r = u[r, k + j] | u[r, k + 4 + j] << 4;
//   int8, 128 bytes: 4 per row for k..k+3 (byte j of row r = u[r, k + j]), then 4 per row for k+4..k+7.
// One 64-byte load gives inputs k..k+3 of all 16 rows, 4 bytes a row as vpdpbusd wants them (int4: masked;
// shifted and masked, k+4..k+7). Scales and zeros (bf16) in tiles too: (N/16, K/g, 16, 2), 16 (scale, zero)
// pairs = 16 uint32, scale in the low half.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "simd.h"

constexpr int TILE = 16, BLOCK = 32, MAX_ROWS = 16;

// Where results go: float32, or bf16 rounded as PyTorch rounds (simd.h's to_bf16), so that
// a bf16 caller gets what y.to(bf16) would give without a float32 copy of y.
struct Out {
  void* p;
  bool bf16;
  void store(int64_t i, __m512 v) const {
    if (!bf16) return _mm512_storeu_ps((float*)p + i, v);
    _mm256_storeu_si256((__m256i*)((uint16_t*)p + i), to_bf16(v));
  }
};

// Rows 0..M-1 of x (as x8, d per block and xsum = d * sum(x8) per group) times tiles tile0..tile0+T-1.
template <int BITS, int M, int T>
static void tiles(const uint8_t* w, const uint32_t* sz, const int8_t* x8, const float* d, const float* xsum,
                  Out y, int64_t N, int64_t K, int64_t g, int64_t tile0) {
  const int64_t G = K / g, B = K / BLOCK;
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  __m512 acc[M][T];
  for (int m = 0; m < M; ++m) for (int t = 0; t < T; ++t) acc[m][t] = _mm512_setzero_ps();
  for (int64_t gi = 0; gi < G; ++gi) {
    __m512 part[M][T];  // this group's sum of q * x, in floats
    for (int m = 0; m < M; ++m) for (int t = 0; t < T; ++t) part[m][t] = _mm512_setzero_ps();
    for (int64_t k0 = gi * g; k0 < (gi + 1) * g; k0 += BLOCK) {
      __m512i dot[M][T];
      for (int m = 0; m < M; ++m) for (int t = 0; t < T; ++t) dot[m][t] = _mm512_setzero_si512();
      for (int64_t k = k0; k < k0 + BLOCK; k += 8) {
        for (int t = 0; t < T; ++t) {
          const uint8_t* b = w + ((tile0 + t) * (K / 8) + k / 8) * 16 * BITS;
          __builtin_prefetch(b + 1024);
          __m512i lo = _mm512_loadu_si512(b), hi;  // inputs k..k+3 and k+4..k+7 of the 16 rows
          if constexpr (BITS == 4) {
            hi = _mm512_and_si512(_mm512_srli_epi16(lo, 4), low4);
            lo = _mm512_and_si512(lo, low4);
          } else {
            __builtin_prefetch(b + 1088);
            hi = _mm512_loadu_si512(b + 64);
          }
          for (int m = 0; m < M; ++m) {
            int32_t a, c;
            std::memcpy(&a, x8 + m * K + k, 4);
            std::memcpy(&c, x8 + m * K + k + 4, 4);
            dot[m][t] = _mm512_dpbusd_epi32(dot[m][t], lo, _mm512_set1_epi32(a));
            dot[m][t] = _mm512_dpbusd_epi32(dot[m][t], hi, _mm512_set1_epi32(c));
          }
        }
      }
      for (int m = 0; m < M; ++m) {
        const __m512 dm = _mm512_set1_ps(d[m * B + k0 / BLOCK]);
        for (int t = 0; t < T; ++t) part[m][t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot[m][t]), dm, part[m][t]);
      }
    }
    for (int t = 0; t < T; ++t) {  // W = u * scale + base
      const __m512i pair = _mm512_loadu_si512(sz + ((tile0 + t) * G + gi) * TILE);
      const __m512 scale = _mm512_castsi512_ps(_mm512_slli_epi32(pair, 16));
      const __m512 zero = _mm512_castsi512_ps(_mm512_and_si512(pair, _mm512_set1_epi32(0xFFFF0000)));
      const __m512 base = BITS == 4 ? _mm512_fnmadd_ps(_mm512_set1_ps(8.f), scale, zero) : zero;
      for (int m = 0; m < M; ++m) {
        acc[m][t] = _mm512_fmadd_ps(part[m][t], scale, acc[m][t]);
        acc[m][t] = _mm512_fmadd_ps(base, _mm512_set1_ps(xsum[m * G + gi]), acc[m][t]);
      }
    }
  }
  for (int m = 0; m < M; ++m)
    for (int t = 0; t < T; ++t) y.store(m * N + (tile0 + t) * TILE, acc[m][t]);
}

template <int BITS, int M>
static void rows(const uint8_t* w, const uint32_t* sz, const int8_t* x8, const float* d, const float* xsum,
                 Out y, int64_t N, int64_t K, int64_t g) {
  constexpr int T = M <= 2 ? 4 : (M <= 4 ? 2 : 1);  // more sums in flight for few rows
  at::parallel_for(0, N / TILE, 1, [&](int64_t a, int64_t b) {
    int64_t t = a;
    for (; t + T <= b; t += T) tiles<BITS, M, T>(w, sz, x8, d, xsum, y, N, K, g, t);
    for (; t < b; ++t) tiles<BITS, M, 1>(w, sz, x8, d, xsum, y, N, K, g, t);
  });
}

// x (M, K) float or bf16 -> x8 (M, K) int8, d (M, K/32) and xsum (M, K/g) = sum of d * x8 over each group.
// Each block: d = max|x| / 127, x8 = x * (127 / max|x|) rounded to nearest even (the CPU's default rounding);
// x finite (a NaN gives a garbage block, as it did in the scalar loop before).
template <typename X>
static void quantize_rows(const X* x, int8_t* x8, float* d, float* xsum, int64_t M, int64_t K, int64_t g) {
  using E = std::conditional_t<std::is_same_v<X, float>, float, uint16_t>;  // bf16 as its bits, for load16
  for (int64_t m = 0; m < M; ++m)
    for (int64_t b = 0; b < K / BLOCK; ++b) {
      const E* p = (const E*)x + m * K + b * BLOCK;
      const __m512 lo = load16(p), hi = load16(p + 16);
      const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(lo), _mm512_abs_ps(hi)));
      const __m512 inv = _mm512_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
      const __m512i qlo = _mm512_cvtps_epi32(_mm512_mul_ps(lo, inv)), qhi = _mm512_cvtps_epi32(_mm512_mul_ps(hi, inv));
      _mm_storeu_si128((__m128i*)(x8 + m * K + b * BLOCK), _mm512_cvtepi32_epi8(qlo));
      _mm_storeu_si128((__m128i*)(x8 + m * K + b * BLOCK + 16), _mm512_cvtepi32_epi8(qhi));
      const int sum = _mm512_reduce_add_epi32(_mm512_add_epi32(qlo, qhi));
      d[m * (K / BLOCK) + b] = amax / 127.f;
      if (b * BLOCK % g == 0) xsum[m * (K / g) + b * BLOCK / g] = 0.f;
      xsum[m * (K / g) + b * BLOCK / g] += amax / 127.f * (float)sum;
    }
}

// Rows m0.. of a call, up to MAX_ROWS of them, through the template for their count.
template <int BITS>
static void row_block(int64_t rows_here, const uint8_t* w, const uint32_t* sz, const int8_t* x8, const float* d,
                      const float* xsum, Out y, int64_t N, int64_t K, int64_t g) {
  switch (rows_here) {
    case 1: return rows<BITS, 1>(w, sz, x8, d, xsum, y, N, K, g);
    case 2: return rows<BITS, 2>(w, sz, x8, d, xsum, y, N, K, g);
    case 3: return rows<BITS, 3>(w, sz, x8, d, xsum, y, N, K, g);
    case 4: return rows<BITS, 4>(w, sz, x8, d, xsum, y, N, K, g);
    case 5: return rows<BITS, 5>(w, sz, x8, d, xsum, y, N, K, g);
    case 6: return rows<BITS, 6>(w, sz, x8, d, xsum, y, N, K, g);
    case 7: return rows<BITS, 7>(w, sz, x8, d, xsum, y, N, K, g);
    case 8: return rows<BITS, 8>(w, sz, x8, d, xsum, y, N, K, g);
    case 9: return rows<BITS, 9>(w, sz, x8, d, xsum, y, N, K, g);
    case 10: return rows<BITS, 10>(w, sz, x8, d, xsum, y, N, K, g);
    case 11: return rows<BITS, 11>(w, sz, x8, d, xsum, y, N, K, g);
    case 12: return rows<BITS, 12>(w, sz, x8, d, xsum, y, N, K, g);
    case 13: return rows<BITS, 13>(w, sz, x8, d, xsum, y, N, K, g);
    case 14: return rows<BITS, 14>(w, sz, x8, d, xsum, y, N, K, g);
    case 15: return rows<BITS, 15>(w, sz, x8, d, xsum, y, N, K, g);
    default: return rows<BITS, 16>(w, sz, x8, d, xsum, y, N, K, g);
  }
}

// x (M, K) float32 or bf16 (others are converted to float32 first); packed and scale_zero from pack() with
// these bits -> (M, N) in x's dtype. The rounded rows live in a scratch buffer kept per thread.
torch::Tensor mm(torch::Tensor x, torch::Tensor packed, torch::Tensor scale_zero, int64_t g, int64_t bits) {
  const int64_t M = x.size(0), K = x.size(1), N = scale_zero.size(0) * TILE;
  TORCH_CHECK((bits == 4 || bits == 8) && K % g == 0 && g % BLOCK == 0 && packed.numel() == N * K * bits / 8 &&
              scale_zero.numel() == N * K / g * 2, "vnni mm: bad shapes");
  const bool bf16 = x.scalar_type() == torch::kBFloat16;
  auto xc = bf16 ? x.contiguous() : x.to(torch::kFloat).contiguous();
  thread_local std::vector<float> scratch;  // d, xsum, then x8's bytes
  scratch.resize(M * (K / BLOCK + K / g) + (M * K + 3) / 4);
  float *d = scratch.data(), *xsum = d + M * (K / BLOCK);
  int8_t* x8 = (int8_t*)(xsum + M * (K / g));
  if (bf16) quantize_rows(xc.data_ptr<at::BFloat16>(), x8, d, xsum, M, K, g);
  else quantize_rows(xc.data_ptr<float>(), x8, d, xsum, M, K, g);
  auto y = torch::empty({M, N}, xc.options());
  const uint8_t* w = packed.data_ptr<uint8_t>();
  const uint32_t* sz = (const uint32_t*)scale_zero.data_ptr<at::BFloat16>();
  const auto block = bits == 4 ? row_block<4> : row_block<8>;
  for (int64_t m0 = 0; m0 < M; m0 += MAX_ROWS) {
    const Out out{(char*)y.data_ptr() + m0 * N * y.element_size(), bf16};
    block(std::min<int64_t>(MAX_ROWS, M - m0), w, sz, x8 + m0 * K, d + m0 * (K / BLOCK), xsum + m0 * (K / g), out, N, K, g);
  }
  return x.scalar_type() == xc.scalar_type() ? y : y.to(x.scalar_type());
}

// u (N, K) uint8 codes as above, scale_zero (K/g, N, 2) as quantized.py keeps it, N % 16 == 0, K % 32 == 0
// -> (packed (N * K * bits / 8,) uint8, scale_zero (N/16, K/g, 16, 2)): the layouts above.
std::vector<torch::Tensor> pack(torch::Tensor u, torch::Tensor scale_zero, int64_t bits) {
  const int64_t N = u.size(0), K = u.size(1), G = scale_zero.size(0);
  TORCH_CHECK(N % TILE == 0 && K % BLOCK == 0 && scale_zero.size(1) == N, "vnni pack: N must be a multiple of 16, K of 32");
  auto eights = u.reshape({N / TILE, TILE, K / 8, 2, 4});  // (tile, row, k / 8, first or second four, j)
  auto packed = bits == 4 ? (eights.select(3, 0) + eights.select(3, 1) * 16).permute({0, 2, 1, 3})  // (tile, k / 8, row, j)
                          : eights.permute({0, 2, 3, 1, 4});  // (tile, k / 8, four, row, j)
  return {packed.contiguous().reshape({-1}), scale_zero.reshape({G, N / TILE, TILE, 2}).transpose(0, 1).contiguous()};
}

// pack()'s inverse: -> (u (N, K) uint8, scale_zero (K/g, N, 2)).
std::vector<torch::Tensor> unpack(torch::Tensor packed, torch::Tensor scale_zero, int64_t K, int64_t bits) {
  const int64_t N = scale_zero.size(0) * TILE, G = scale_zero.size(1);
  torch::Tensor u;
  if (bits == 4) {
    auto bytes = packed.reshape({N / TILE, K / 8, TILE, 4}).permute({0, 2, 1, 3});  // (tile, row, k / 8, j)
    u = torch::stack({bytes.bitwise_and(15), bytes.bitwise_right_shift(4)}, 3);
  } else {
    u = packed.reshape({N / TILE, K / 8, 2, TILE, 4}).permute({0, 3, 1, 2, 4});  // (tile, row, k / 8, four, j)
  }
  return {u.reshape({N, K}).contiguous(), scale_zero.transpose(0, 1).reshape({G, N, 2}).contiguous()};
}

// As an operator too, which a compiled graph calls without going through Python (kernels/__init__.py
// gives it the shape function torch.compile needs).
TORCH_LIBRARY(minillm, m) { m.def("vnni_mm(Tensor x, Tensor packed, Tensor scale_zero, int group_size, int bits) -> Tensor"); }
TORCH_LIBRARY_IMPL(minillm, CPU, m) { m.impl("vnni_mm", &mm); }

torch::Tensor rows_mm(torch::Tensor x, torch::Tensor w);  // rows.cpp, built into the same module
bool amx_bf16();
torch::Tensor causal_attention(torch::Tensor q, torch::Tensor kt, torch::Tensor v);  // attention.cpp, likewise
torch::Tensor few_query_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v);
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor weight, double eps);  // pointwise.cpp, likewise
torch::Tensor rope(torch::Tensor x, torch::Tensor cos, torch::Tensor sin);
torch::Tensor swiglu(torch::Tensor gate, torch::Tensor up);
void bind_step(pybind11::module& m);  // step.cpp, likewise

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("mm", &mm, "x @ W^T for int4 or int8 W in this file's layout, x rounded to int8 per 32 inputs");
  m.def("pack", &pack, "unsigned codes and scale_zero -> this file's layouts");
  m.def("unpack", &unpack, "this file's layouts -> unsigned codes (N, K) and scale_zero (K/g, N, 2)");
  m.def("rows_mm", &rows_mm, "x @ W^T for up to 16 rows of float32 or bf16 x and W (rows.cpp)");
  m.def("amx_bf16", &amx_bf16, "whether rows_mm multiplies bf16 on the AMX tile unit here (rows.cpp)");
  m.def("causal_attention", &causal_attention, "a prompt's causal attention, float32 (attention.cpp)");
  m.def("few_query_attention", &few_query_attention, "causal attention of a few queries, float32 or bf16 (attention.cpp)");
  m.def("rms_norm", &rms_norm, "RMSNorm in one pass, float32 (pointwise.cpp)");
  m.def("rope", &rope, "RoPE in one pass, float32, the reference's numbers (pointwise.cpp)");
  m.def("swiglu", &swiglu, "silu(gate) * up in one pass, float32 (pointwise.cpp)");
  bind_step(m);
}
