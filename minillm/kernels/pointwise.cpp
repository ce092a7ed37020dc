// RMSNorm, RoPE and SwiGLU's silu(gate) * up in one pass each, float32: PyTorch runs them as two to seven
// separate kernels over the activations (x.pow(2), mean, rsqrt, two products; RoPE's chunks, four products,
// a sum, a difference and a concatenation), each reading and writing all of them. Here each row is read
// once and written once, by simd.h's row functions (step.cpp's one-call step uses the same). RoPE computes
// exactly the reference's operations in its order, no fused multiply-add (bit for bit the same); RMSNorm
// sums the squares in another order, and SwiGLU's exponential is ours (simd.h): within a rounding step or
// two of the reference.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include "simd.h"

// x (..., C) float32, contiguous rows, and weight (C) -> x / sqrt(mean(x^2) + eps) * weight, as model.RMSNorm.
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor weight, double eps) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat && weight.scalar_type() == torch::kFloat && weight.dim() == 1 &&
              x.size(-1) == weight.size(0) && weight.is_contiguous(),
              "rms_norm: float32 x (..., C) and weight (C)");
  auto xc = x.contiguous();
  auto y = torch::empty_like(xc);
  const int64_t C = weight.size(0), rows = xc.numel() / C;
  const float *xp = xc.data_ptr<float>(), *wp = weight.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / C), [&](int64_t a, int64_t b) {
    for (int64_t r = a; r < b; ++r) rms_norm_row(xp + r * C, wp, C, (float)eps, yp + r * C);
  });
  return y.view(x.sizes());
}

// x (B, H, T, hd) float32 with its last dimension contiguous, cos and sin (T, hd / 2) contiguous -> x rotated
// as model.apply_rope does (channel i with channel i + hd/2), as a (B, H, T, hd) view of a (B, T, H, hd) tensor:
// the layout Attention.project's heads come in.
torch::Tensor rope(torch::Tensor x, torch::Tensor cos, torch::Tensor sin) {
  TORCH_CHECK(x.dim() == 4 && x.scalar_type() == torch::kFloat && x.stride(3) == 1 && x.size(3) % 2 == 0 &&
              cos.scalar_type() == torch::kFloat && sin.scalar_type() == torch::kFloat && cos.is_contiguous() &&
              sin.is_contiguous() && cos.numel() == x.size(2) * x.size(3) / 2 && sin.numel() == cos.numel(),
              "rope: float32 x (B, H, T, hd), its last dimension contiguous, and cos, sin (T, hd / 2)");
  const int64_t B = x.size(0), H = x.size(1), T = x.size(2), hd = x.size(3), half = hd / 2;
  auto out = torch::empty({B, T, H, hd}, x.options());
  const float *xp = x.data_ptr<float>(), *cp = cos.data_ptr<float>(), *sp = sin.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, B * T, std::max<int64_t>(1, 8192 / (H * hd)), [&](int64_t a, int64_t b) {
    for (int64_t bt = a; bt < b; ++bt) {
      const int64_t batch = bt / T, t = bt % T;
      for (int64_t h = 0; h < H; ++h)
        rope_head(xp + batch * x.stride(0) + h * x.stride(1) + t * x.stride(2), cp + t * half, sp + t * half, half,
                  op + (bt * H + h) * hd);
    }
  });
  return out.transpose(1, 2);
}

// gate and up (..., H) float32 of one shape, each a view of rows H wide (its last dimension contiguous; the
// halves of a stacked gate|up product are) -> silu(gate) * up = gate / (1 + e^-gate) * up, contiguous.
torch::Tensor swiglu(torch::Tensor gate, torch::Tensor up) {
  TORCH_CHECK(gate.scalar_type() == torch::kFloat && up.scalar_type() == torch::kFloat && gate.sizes() == up.sizes() &&
              gate.dim() >= 1 && gate.stride(-1) == 1 && up.stride(-1) == 1,
              "swiglu: float32 gate and up of one shape, the last dimension contiguous");
  const int64_t H = gate.size(-1);
  const auto g2 = gate.view({-1, H}), u2 = up.view({-1, H});  // rows: fails where they are not evenly spaced
  auto out = torch::empty(gate.sizes(), gate.options());
  const int64_t rows = g2.size(0), gs = g2.stride(0), us = u2.stride(0);
  const float *gp = g2.data_ptr<float>(), *up_ = u2.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / H), [&](int64_t a, int64_t b) {
    for (int64_t r = a; r < b; ++r) swiglu_row(gp + r * gs, up_ + r * us, H, op + r * H);
  });
  return out;
}

TORCH_LIBRARY_FRAGMENT(minillm, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("rope(Tensor x, Tensor cos, Tensor sin) -> Tensor");
  m.def("swiglu(Tensor gate, Tensor up) -> Tensor");
}
TORCH_LIBRARY_IMPL(minillm, CPU, m) {
  m.impl("rms_norm", &rms_norm);
  m.impl("rope", &rope);
  m.impl("swiglu", &swiglu);
}
