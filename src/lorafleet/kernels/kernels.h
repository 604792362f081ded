// lorafleet's CPU kernels: the functions module.cpp binds (semantics in each source's header).
#pragma once

#include <torch/extension.h>

#include <tuple>
#include <vector>

// gemv.cpp
torch::Tensor linear_dense(torch::Tensor x, torch::Tensor w, c10::optional<torch::Tensor> bias);
torch::Tensor linear_int8(torch::Tensor x, torch::Tensor q, torch::Tensor scales,
                          c10::optional<torch::Tensor> bias);

// decode.cpp
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor w, double eps);
std::tuple<torch::Tensor, torch::Tensor> add_rms_norm(torch::Tensor h, torch::Tensor delta,
                                                      torch::Tensor w, double eps);
torch::Tensor silu_mul(torch::Tensor gate_up);
torch::Tensor decode_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v,
                               torch::Tensor cos, torch::Tensor sin, torch::Tensor k_cache,
                               torch::Tensor v_cache, torch::Tensor slots,
                               torch::Tensor positions, double scale, int64_t window);

// stack.cpp
torch::Tensor decode_stack(torch::Tensor h, torch::Tensor cos, torch::Tensor sin,
                           torch::Tensor slots, torch::Tensor positions,
                           std::vector<torch::Tensor> weights, torch::Tensor k_all,
                           torch::Tensor v_all, std::vector<double> eps,
                           std::vector<double> scales, std::vector<int64_t> windows);
