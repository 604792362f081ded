// lorafleet's decode stack: every layer of a Llama-layout decoder for a few decode rows, in one
// call (no Python between the layers' kernels).
//
// Semantics of decode_stack(h, cos, sin, slots, positions, weights, k_all, v_all, eps, scales,
// windows) for decode rows h [n, d] (embedded tokens, float32 or bfloat16), cos, sin [n, D],
// slots, positions [n] int64, k_all, v_all [layers, S, Hkv, L, D] (the KV cache), and per layer l
// the tensors weights[8 l .. 8 l + 7] =
//     (input norm w [d], fused q/k/v W [(H + 2 Hkv) D, d], its bias or an empty tensor,
//      o_proj W [d, H D], post-attention norm w [d], fused gate/up W [2 I, d], down W [d, I],
//      the next norm's w [d]: layer l + 1's input norm, or the final norm after the last layer)
// and eps[2 l], eps[2 l + 1] (the input and post-attention norms' epsilons; eps[2 layers] the
// final norm's), scales[l], windows[l] (0: none); it returns the final norm of the last hidden
// states, [n, d], exactly as this sequence of the kernels' own calls (gemv.cpp, decode.cpp):
//     x = rms_norm(h, w_in[0])
//     for l: qkv = linear_dense(x, W_qkv, b_qkv); q, k, v = its column blocks
//            o = decode_attention(q, k, v, cos, sin, k_all[l], v_all[l], slots, positions,
//                                 scales[l], windows[l])
//            h, x = add_rms_norm(h, linear_dense(o, W_o), w_post)
//            h, x = add_rms_norm(h, linear_dense(silu_mul(linear_dense(x, W_gu)), W_down), w_next)
// (the caches are written as decode_attention writes them). Weights are dense, contiguous and in
// h's dtype; o_proj, gate/up and down have no bias. Python keeps every other case
// (serve/runners/llama.py).

#include "kernels.h"

#include <vector>

namespace {

constexpr int PER_LAYER = 8;

c10::optional<torch::Tensor> maybe(const torch::Tensor& t) {
  if (t.numel() == 0) return c10::nullopt;
  return t;
}

}  // namespace

torch::Tensor decode_stack(torch::Tensor h, torch::Tensor cos, torch::Tensor sin,
                           torch::Tensor slots, torch::Tensor positions,
                           std::vector<torch::Tensor> weights, torch::Tensor k_all,
                           torch::Tensor v_all, std::vector<double> eps,
                           std::vector<double> scales, std::vector<int64_t> windows) {
  const int64_t layers = k_all.size(0);
  TORCH_CHECK(static_cast<int64_t>(weights.size()) == PER_LAYER * layers,
              "weights must hold ", PER_LAYER, " tensors per layer");
  TORCH_CHECK(static_cast<int64_t>(eps.size()) == 2 * layers + 1 &&
                  static_cast<int64_t>(scales.size()) == layers &&
                  static_cast<int64_t>(windows.size()) == layers,
              "eps, scales, windows must match the layers");
  const int64_t kv_width = k_all.size(2) * k_all.size(4);  // Hkv * D
  torch::Tensor x = rms_norm(h, weights[0], eps[0]);
  for (int64_t l = 0; l < layers; ++l) {
    const torch::Tensor* w = weights.data() + PER_LAYER * l;
    const torch::Tensor qkv = linear_dense(x, w[1], maybe(w[2]));  // [n, (H + 2 Hkv) D]
    const int64_t q_width = qkv.size(1) - 2 * kv_width;
    const torch::Tensor q = qkv.narrow(1, 0, q_width);  // [n, H D]
    const torch::Tensor k = qkv.narrow(1, q_width, kv_width);  // [n, Hkv D]
    const torch::Tensor v = qkv.narrow(1, q_width + kv_width, kv_width);
    const torch::Tensor o = decode_attention(q, k, v, cos, sin, k_all.select(0, l),
                                             v_all.select(0, l), slots, positions, scales[l],
                                             windows[l]);  // [n, H D]
    auto [h1, x1] = add_rms_norm(h, linear_dense(o, w[3], c10::nullopt), w[4], eps[2 * l + 1]);
    const torch::Tensor act = silu_mul(linear_dense(x1, w[5], c10::nullopt));  // [n, I]
    const double next_eps = l + 1 < layers ? eps[2 * (l + 1)] : eps[2 * layers];
    auto [h2, x2] = add_rms_norm(h1, linear_dense(act, w[6], c10::nullopt), w[7], next_eps);
    h = h2;
    x = x2;
  }
  return x;
}
