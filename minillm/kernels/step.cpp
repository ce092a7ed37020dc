// One decode step (or the verification of a few tokens) of a LLaMA-family model whose linear layers all run
// our kernels, int4 (vnni.cpp), bf16 or float32 (rows.cpp), every block of it in one call: a torch.compile'd
// step spends as long again as its matmuls around them (the graph's own code, dynamo's checks, a Python call
// per operator: bench/README.md), and an eager step on hundreds of small PyTorch operations a token, where
// this loop spends microseconds. What it computes is model.py's Block.forward for 1..16 tokens of batch 1,
// operation by operation, with the activations and the KV cache in the model's dtype (bf16 for an int4
// model) and rounded to it where each of the reference's operations rounds its result:
//   h = RMSNorm(x)                      float32 inside, rounded once
//   q|k|v = h W_qkv (+ bias)            our kernel (the layers' stack); the bias added and rounded
//   q, k = RoPE(q), RoPE(k)             products rounded one by one, as the reference's separate operations
//   cache[pos] = k, v; y = attention    attention.cpp's few-query kernel, as the eager step calls it
//   x = x + y W_o
//   h = RMSNorm(x); g|u = h W_gate|up
//   x = x + (silu(g) * u) W_down        in bf16 silu rounded, then the product
// RMSNorm sums its squares in another order than PyTorch's and e^x is ours (simd.h): in bf16 a result can
// land one step away from the eager one's (tests/test_one_call_step.py holds the logits and greedy tokens
// to it); in float32 the eager step runs these very row functions (pointwise.cpp), so the numbers are its
// own, bit for bit. A call starts at the token ids (the embedding: a row, or an int8 row times its bf16
// scale, rounded) and ends after the final norm; the output head stays in Python (speed.OneCallStep), on
// the same kernel as the eager step's.
#include <torch/extension.h>
#include <immintrin.h>
#include <cmath>
#include <cstring>
#include <vector>

#include "simd.h"

torch::Tensor mm(torch::Tensor x, torch::Tensor packed, torch::Tensor scale_zero, int64_t g, int64_t bits);  // vnni.cpp
torch::Tensor rows_mm(torch::Tensor x, torch::Tensor w);  // rows.cpp
torch::Tensor few_query_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v);  // attention.cpp

namespace {

constexpr int LANES = 16, TILE = 16;

// A tensor's numbers as E: float for float32, uint16_t (its bits) for bf16.
template <typename E>
inline E* ptr(const torch::Tensor& t) { return (E*)t.data_ptr(); }

// out = a + b over n numbers, rounded to E (a tensor sum); out may be a.
template <typename E>
void add(const E* a, const E* b, int64_t n, E* out) {
  for (int64_t i = 0; i < n; i += LANES) {
    const __mmask16 m = first(n - i);
    store16(out + i, _mm512_add_ps(load16(a + i, m), load16(b + i, m)), m);
  }
}

// One matrix of the step: int4 codes as our kernel holds them (packed codes, scale_zero, group size; each
// layer of a stack padded to whole tiles of outputs), or a float W (N, K) as it is (rows.cpp; no scale_zero).
struct Matrix {
  torch::Tensor weight, scale_zero;
  int64_t group = 0;
  bool int4() const { return scale_zero.defined(); }
  torch::Tensor operator()(const torch::Tensor& x) const {
    return int4() ? mm(x, weight, scale_zero, group, 4) : rows_mm(x, weight);
  }
  int64_t outputs() const { return int4() ? scale_zero.size(0) * TILE : weight.size(0); }
  // Where the second of two stacked layers of n outputs each starts (gate|up's up).
  int64_t second(int64_t n) const { return int4() ? (n + TILE - 1) / TILE * TILE : n; }
  // Whether it takes rows of `inputs` numbers of this dtype: int4 codes bf16 rows (an int4 model's; the kernel
  // checks the shapes at each call), a float W rows of its own dtype.
  bool takes(int64_t inputs, c10::ScalarType dtype) const {
    return int4() ? dtype == torch::kBFloat16 : weight.scalar_type() == dtype && weight.dim() == 2 &&
                    weight.size(1) == inputs && weight.is_contiguous() && weight.device().is_cpu();
  }
};

}  // namespace

// The blocks of one model, given once (speed.OneCallStep makes it from the model's modules and makes it again
// when they change); then each call is one token's step through all of them.
struct DecodeStep {
  struct Block {
    torch::Tensor attn_norm, mlp_norm, bias[3];  // bias: q's, k's, v's, or undefined (no bias)
    Matrix qkv, o, gate_up, down;
  };
  std::vector<Block> blocks;
  torch::Tensor final_norm, embedding, scales;  // embedding (V, C): rows, or int8 codes times scales (V,) bf16
  int64_t n_head, n_kv_head, head_dim, hidden;
  float eps;
  c10::ScalarType dtype;  // of the norms, biases, activations and cache: float32, or bf16 (an int4 model's too)

  static bool held(const torch::Tensor& t, c10::ScalarType dtype) {
    return t.defined() && t.scalar_type() == dtype && t.is_contiguous() && t.device().is_cpu();
  }
  // The final norm and the embedding as the step was made for them (a model's .float() changes them in place).
  bool ends_held() const {
    return held(final_norm, dtype) && (scales.defined() ? held(embedding, torch::kChar) &&
           held(scales, torch::kBFloat16) : held(embedding, dtype));
  }

  // Whether a block's tensors fit its heads and widths and are held as the step takes them (its dtype, contiguous,
  // on the CPU): checked when the step is made and at each call (a layer's .float() changes them in place).
  bool fits(const Block& b) const {
    const int64_t C = final_norm.numel(), nq = n_head * head_dim, nkv = n_kv_head * head_dim;
    const auto of = [&](const torch::Tensor& t, int64_t n) { return held(t, dtype) && t.numel() == n; };
    return of(b.attn_norm, C) && of(b.mlp_norm, C) && b.qkv.outputs() >= nq + 2 * nkv && b.o.outputs() >= C &&
           b.gate_up.outputs() >= b.gate_up.second(hidden) + hidden && b.down.outputs() >= C &&
           b.qkv.takes(C, dtype) && b.o.takes(nq, dtype) && b.gate_up.takes(C, dtype) &&
           b.down.takes(hidden, dtype) &&
           (!b.bias[0].defined() || (of(b.bias[0], nq) && of(b.bias[1], nkv) && of(b.bias[2], nkv)));
  }

  // Per block, in order: norms (attention's, MLP's; the final norm's last), matrices (q|k|v, o, gate|up, down:
  // int4 packed codes and scale_zero each, or a float W and no scale_zero), their group sizes (0 for a float
  // W), and q's, k's and v's biases (none: an empty list); the embedding and its scales (none for float rows).
  // The final norm's dtype is the step's. The tensors are held, not copied: a change to their numbers is read
  // at the next call.
  DecodeStep(std::vector<torch::Tensor> norms, std::vector<torch::Tensor> weights,
             std::vector<std::optional<torch::Tensor>> scale_zero,
             std::vector<int64_t> groups, std::vector<torch::Tensor> biases, torch::Tensor embedding,
             std::optional<torch::Tensor> scales, int64_t n_head, int64_t n_kv_head, int64_t head_dim, int64_t hidden,
             double eps)
      : final_norm(norms.empty() ? torch::Tensor() : norms.back()), embedding(embedding),
        scales(scales.value_or(torch::Tensor())), n_head(n_head), n_kv_head(n_kv_head), head_dim(head_dim),
        hidden(hidden), eps((float)eps), dtype(norms.empty() ? torch::kBFloat16 : norms.back().scalar_type()) {
    const size_t L = norms.size() / 2;
    TORCH_CHECK(norms.size() % 2 == 1 && (dtype == torch::kBFloat16 || dtype == torch::kFloat) &&
                held(final_norm, dtype) && weights.size() == 4 * L && scale_zero.size() == 4 * L &&
                groups.size() == 4 * L && (biases.empty() || biases.size() == 3 * L) && head_dim % LANES == 0 &&
                head_dim <= 16 * LANES,
                "DecodeStep: per block 2 norms and 4 matrices, then the final norm (bf16 or float32); head_dim a "
                "multiple of 16 up to 256");
    const int64_t C = final_norm.numel();
    TORCH_CHECK(embedding.dim() == 2 && embedding.size(1) == C && ends_held() && (!this->scales.defined() ||
                (this->scales.numel() == embedding.size(0) && dtype == torch::kBFloat16)),
                "DecodeStep: the embedding (V, C) in the final norm's dtype, or (bf16 only) int8 with (V,) bf16 scales");
    for (size_t l = 0; l < L; ++l) {
      Block b{norms[2 * l], norms[2 * l + 1]};
      if (!biases.empty()) for (int i = 0; i < 3; ++i) b.bias[i] = biases[3 * l + i];
      Matrix* m[4] = {&b.qkv, &b.o, &b.gate_up, &b.down};
      for (int i = 0; i < 4; ++i)
        *m[i] = {weights[4 * l + i], scale_zero[4 * l + i].value_or(torch::Tensor()), groups[4 * l + i]};
      TORCH_CHECK(fits(b), "DecodeStep: block ", l, "'s norms, matrices or biases do not fit its heads and widths, "
                  "or not its dtype");
      blocks.push_back(b);
    }
  }

  // The embeddings (T, C) of tokens (1, T), as model.tok_emb computes them (QuantEmbedding: q.to(bf16) * scale).
  template <typename E>
  torch::Tensor embed(const torch::Tensor& tokens) const {
    const int64_t T = tokens.size(1), C = final_norm.numel();
    auto x = torch::empty({T, C}, final_norm.options());
    for (int64_t t = 0; t < T; ++t) {
      const int64_t id = tokens.data_ptr<int64_t>()[t * tokens.stride(1)];
      TORCH_CHECK(id >= 0 && id < embedding.size(0), "DecodeStep: token id ", id, " is outside the vocabulary of ",
                  embedding.size(0));
      if (!scales.defined()) {
        std::memcpy(ptr<E>(x) + t * C, ptr<E>(embedding) + id * C, C * sizeof(E));
        continue;
      }
      const int8_t* q = embedding.data_ptr<int8_t>() + id * C;
      const uint32_t scale_bits = (uint32_t)ptr<uint16_t>(scales)[id] << 16;  // the bf16 scale as a float, exactly
      float scale;
      std::memcpy(&scale, &scale_bits, 4);
      for (int64_t c = 0; c < C; c += LANES) {  // the product is exact in float32 (8 bits times 8), then rounded
        const __mmask16 m = first(C - c);
        const __m512 v = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, q + c)));
        store16(ptr<E>(x) + t * C + c, _mm512_mul_ps(v, _mm512_set1_ps(scale)), m);
      }
    }
    return x;
  }

  // tokens (1, T <= 16) int64, the ids of T tokens at positions pos..pos+T-1 (a decode step: one; a
  // verification: a few), cos and sin (>= pos + T, hd/2) float32 the model's RoPE tables, k_cache and v_cache each
  // block's (1, n_kv_head, max_len, hd) in the step's dtype with max_len >= pos + T -> the final norm of what the
  // last block leaves, (T, C), or only the last token's (1, C) with last_only; each block's k, v written at
  // pos..pos+T-1. Every kernel here computes a row as it would alone (our int4 and few-row kernels, the
  // few-query attention, the row-wise pointwise work): a token's numbers do not depend on T.
  torch::Tensor operator()(torch::Tensor tokens, int64_t pos, torch::Tensor cos, torch::Tensor sin,
                           std::vector<torch::Tensor> k_cache, std::vector<torch::Tensor> v_cache, bool last_only) {
    const int64_t T = tokens.size(-1), hd = head_dim;
    TORCH_CHECK(tokens.scalar_type() == torch::kLong && tokens.device().is_cpu() && tokens.dim() == 2 &&
                tokens.size(0) == 1 && T >= 1 && T <= 16 && pos >= 0 && !blocks.empty() &&
                cos.scalar_type() == torch::kFloat && cos.dim() == 2 && cos.size(0) >= pos + T &&
                cos.size(1) == hd / 2 && sin.sizes() == cos.sizes() && sin.scalar_type() == torch::kFloat &&
                cos.device().is_cpu() && sin.device().is_cpu() && k_cache.size() == blocks.size() &&
                v_cache.size() == blocks.size(),
                "DecodeStep: tokens (1, T <= 16) int64, RoPE tables (>= pos + T, head_dim/2) float32, a K and a V "
                "cache per block");
    TORCH_CHECK(ends_held(), "DecodeStep: the final norm's weight or the embedding changed dtype, layout or device "
                "since the step was made (call compile_decode again)");
    for (size_t l = 0; l < blocks.size(); ++l) {
      TORCH_CHECK(fits(blocks[l]), "DecodeStep: block ", l, "'s norms, matrices or biases changed dtype, layout "
                  "or device since the step was made (call compile_decode again)");
      TORCH_CHECK(k_cache[l].scalar_type() == dtype && k_cache[l].device().is_cpu() &&
                  v_cache[l].device().is_cpu() && k_cache[l].dim() == 4 && k_cache[l].size(0) == 1 &&
                  k_cache[l].size(1) == n_kv_head && k_cache[l].size(2) >= pos + T && k_cache[l].size(3) == hd &&
                  k_cache[l].is_contiguous() && v_cache[l].sizes() == k_cache[l].sizes() &&
                  v_cache[l].scalar_type() == dtype && v_cache[l].is_contiguous(),
                  "DecodeStep: caches (1, n_kv_head, max_len >= pos + T, head_dim) in the step's dtype, contiguous");
    }
    return dtype == torch::kFloat ? run<float>(tokens, pos, cos, sin, k_cache, v_cache, last_only)
                                  : run<uint16_t>(tokens, pos, cos, sin, k_cache, v_cache, last_only);
  }

  // operator()'s work once its arguments are checked, the numbers as E.
  template <typename E>
  torch::Tensor run(const torch::Tensor& tokens, int64_t pos, torch::Tensor cos, torch::Tensor sin,
                    const std::vector<torch::Tensor>& k_cache, const std::vector<torch::Tensor>& v_cache,
                    bool last_only) {
    const int64_t T = tokens.size(-1), C = final_norm.numel(), hd = head_dim, nq = n_head * hd, nkv = n_kv_head * hd;
    auto x = embed<E>(tokens);  // the residual stream, added to in place
    auto h = torch::empty({T, C}, x.options()), q = torch::empty({1, n_head, T, hd}, x.options());
    auto a = torch::empty({T, hidden}, x.options());
    cos = cos.contiguous(), sin = sin.contiguous();
    const float *cp = cos.data_ptr<float>() + pos * hd / 2, *sp = sin.data_ptr<float>() + pos * hd / 2;
    for (size_t l = 0; l < blocks.size(); ++l) {
      const Block& b = blocks[l];
      const int64_t up = b.gate_up.second(hidden);  // where up's outputs start in gate|up's
      const int64_t head = k_cache[l].size(2) * hd;  // a K/V head's numbers in the cache
      for (int64_t t = 0; t < T; ++t) rms_norm_row(ptr<E>(x) + t * C, ptr<E>(b.attn_norm), C, eps, ptr<E>(h) + t * C);
      auto qkv = b.qkv(h);  // (T, outputs)
      for (int64_t t = 0; t < T; ++t) {
        E* y = ptr<E>(qkv) + t * qkv.size(1);
        const float *ct = cp + t * hd / 2, *st = sp + t * hd / 2;
        const int64_t row = (pos + t) * hd;  // position pos + t's numbers in a K/V head
        if (b.bias[0].defined()) {  // q's, k's and v's, each at its place in q|k|v's outputs
          const int64_t at[3] = {0, nq, nq + nkv}, n[3] = {nq, nkv, nkv};
          for (int i = 0; i < 3; ++i) add(y + at[i], ptr<E>(b.bias[i]), n[i], y + at[i]);
        }
        for (int64_t i = 0; i < n_head; ++i) rope_head(y + i * hd, ct, st, hd / 2, ptr<E>(q) + (i * T + t) * hd);
        for (int64_t g = 0; g < n_kv_head; ++g) {
          rope_head(y + nq + g * hd, ct, st, hd / 2, ptr<E>(k_cache[l]) + g * head + row);
          std::memcpy(ptr<E>(v_cache[l]) + g * head + row, y + nq + nkv + g * hd, hd * sizeof(E));
        }
      }
      auto att = few_query_attention(q, k_cache[l].narrow(2, 0, pos + T), v_cache[l].narrow(2, 0, pos + T));
      auto o = b.o(att.view({T, nq}));
      for (int64_t t = 0; t < T; ++t) add(ptr<E>(x) + t * C, ptr<E>(o) + t * o.size(1), C, ptr<E>(x) + t * C);
      for (int64_t t = 0; t < T; ++t) rms_norm_row(ptr<E>(x) + t * C, ptr<E>(b.mlp_norm), C, eps, ptr<E>(h) + t * C);
      auto gu = b.gate_up(h);
      for (int64_t t = 0; t < T; ++t) {
        const E* g = ptr<E>(gu) + t * gu.size(1);
        swiglu_row(g, g + up, hidden, ptr<E>(a) + t * hidden);
      }
      auto d = b.down(a);
      for (int64_t t = 0; t < T; ++t) add(ptr<E>(x) + t * C, ptr<E>(d) + t * d.size(1), C, ptr<E>(x) + t * C);
    }
    if (last_only) x = x.narrow(0, T - 1, 1);
    for (int64_t t = 0; t < x.size(0); ++t)
      rms_norm_row(ptr<E>(x) + t * C, ptr<E>(final_norm), C, eps, ptr<E>(x) + t * C);
    return x;
  }
};

void bind_step(pybind11::module& m) {
  pybind11::class_<DecodeStep>(m, "DecodeStep",
                               "1..16 tokens through every block of an int4, bf16 or float32 LLaMA-family model "
                               "(step.cpp)")
      .def(pybind11::init<std::vector<torch::Tensor>, std::vector<torch::Tensor>,
                          std::vector<std::optional<torch::Tensor>>, std::vector<int64_t>, std::vector<torch::Tensor>,
                          torch::Tensor, std::optional<torch::Tensor>, int64_t, int64_t, int64_t, int64_t, double>())
      .def("__call__", &DecodeStep::operator(), pybind11::call_guard<pybind11::gil_scoped_release>());
}
