// lorafleet's decode GEMV: y = x @ W^T (+ b) for a few rows of x, on the CPU.
//
// Semantics of linear_dense(x, W, bias): x [M, K] float32 or bfloat16 (contiguous), W [N, K]
// float32 or bfloat16 (contiguous), bias [N] or None; returns y [M, N] in x's dtype with
//     y[m, n] = sum_k x[m, k] * W[n, k] (+ bias[n]),
// accumulated in float32 (x converted to float32 first; bfloat16 outputs rounded to nearest
// even once, at the end). Each output's sum runs over k in the same order whatever M is, so a
// row's result does not depend on the other rows of the batch.
//
// linear_int8(x, q, scales, bias): the same with an int8 weight q [N, K] and per-row scales [N]
// (float32 or bfloat16; layers/quant.py's int8 layout): y[m, n] = scales[n] * sum_k x[m, k] *
// q[n, k] (+ bias[n]), q converted to float32 exactly. One byte per weight read.
//
// Why: torch's CPU GEMV (MKL sgemv for M = 1, sgemm above) streams float32 weights at 10-16
// GiB/s on this project's 2-core machines; decode reads every weight once per token, so the
// step is bandwidth-bound and this loop, split over N across torch's intra-op threads, reaches
// 30-50 GiB/s at 1-6 rows (BENCHMARKS.md, "lorafleet's own decode GEMV"). With more rows the
// product turns compute-bound and the blocked GEMMs catch up (MKL's float32 at ~24-32 rows;
// oneDNN's bfloat16, with AVX512-BF16, at ~6): the Python side (kernels/__init__.py) sends only
// M <= MAX_ROWS[dtype] here.
//
// Built once per machine by torch.utils.cpp_extension with -O3 -march=native. The loops use
// GCC's generic vectors of 16 float32 lanes (one AVX-512 register, two AVX2 ones); K % 16 == 0.
// Per weight row, x's rows go 4 at a time (the row stays in L1 between passes).

#include "kernels.h"
#include "vectors.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

using namespace lorafleet;

constexpr int BLOCK_ROWS = 4;  // rows of x per pass over a weight row (kept in L1 meanwhile)

// out[m] = sum_k x[m * K + k] * w[k] for R rows of x (float32), w of element type T: one vector
// accumulator per row, lane j summing k = j, j + LANES, ..., then the lanes summed in order.
template <int R, typename T>
inline void dot_rows(const T* __restrict w, const float* __restrict x, int64_t K, float* out) {
  floats acc[R] = {};
  for (int64_t k = 0; k < K; k += LANES) {
    const floats wk = load(w + k);
    for (int m = 0; m < R; ++m) acc[m] += load(x + m * K + k) * wk;
  }
  for (int m = 0; m < R; ++m) {
    float s = 0.0f;
    for (int j = 0; j < LANES; ++j) s += acc[m][j];
    out[m] = s;
  }
}

// y[m * N] = out[m] + add for m < rows (one output column of y), rounded to y's type.
inline void store(const float* out, int64_t rows, float add, float* y, int64_t N) {
  for (int64_t m = 0; m < rows; ++m) y[m * N] = out[m] + add;
}

inline void store(const float* out, int64_t rows, float add, c10::BFloat16* y, int64_t N) {
  for (int64_t m = 0; m < rows; ++m) y[m * N] = c10::BFloat16(out[m] + add);  // nearest even
}

// y[m, n] = dot(n, rows m..) + bias[n] for n in [0, N), split over torch's intra-op threads;
// dot(n, x0, rows, out) fills out[0..rows) for R = rows <= BLOCK_ROWS rows of x from x0.
template <typename Dot, typename Out>
void gemv(const float* x, const Dot& dot, const float* bias, Out* y, int64_t M, int64_t N,
          int64_t K) {
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    float out[BLOCK_ROWS];
    for (int64_t n = begin; n < end; ++n) {
      const float add = bias ? bias[n] : 0.0f;
      for (int64_t m0 = 0; m0 < M; m0 += BLOCK_ROWS) {
        const int64_t rows = std::min<int64_t>(BLOCK_ROWS, M - m0);
        dot(n, x + m0 * K, rows, out);
        store(out, rows, add, y + m0 * N + n, N);
      }
    }
  });
}

// dot_rows for 1..BLOCK_ROWS rows, the count known at run time.
template <typename T>
inline void dot_some_rows(const T* w, const float* x, int64_t K, int64_t rows, float* out) {
  if (rows == 4) dot_rows<4>(w, x, K, out);
  if (rows == 3) dot_rows<3>(w, x, K, out);
  if (rows == 2) dot_rows<2>(w, x, K, out);
  if (rows == 1) dot_rows<1>(w, x, K, out);
}

// The row-dot of a dense weight W [N, K] of element type T.
template <typename T>
struct DenseDot {
  const T* w;
  int64_t K;
  void operator()(int64_t n, const float* x, int64_t rows, float* out) const {
    dot_some_rows(w + n * K, x, K, rows, out);
  }
};

// The row-dot of an int8 weight q [N, K] with per-row scales: scale[n] * sum_k x[k] q[n, k].
struct Int8Dot {
  const int8_t* q;
  const float* scales;
  int64_t K;
  void operator()(int64_t n, const float* x, int64_t rows, float* out) const {
    dot_some_rows(q + n * K, x, K, rows, out);
    for (int64_t m = 0; m < rows; ++m) out[m] *= scales[n];
  }
};

// A float32 copy of t (x or bias: small), or t's own data when it is float32 already.
const float* as_float(const torch::Tensor& t, std::vector<float>& buffer) {
  if (t.scalar_type() == torch::kFloat) return t.data_ptr<float>();
  TORCH_CHECK(t.scalar_type() == torch::kBFloat16, "expected float32 or bfloat16, got ",
              t.scalar_type());
  const auto* bits = reinterpret_cast<const uint16_t*>(t.data_ptr());
  buffer.resize(t.numel());
  for (int64_t i = 0; i < t.numel(); ++i) buffer[i] = widen(bits[i]);
  return buffer.data();
}

void check_inputs(const torch::Tensor& x, int64_t K) {
  TORCH_CHECK(x.device().is_cpu(), "CPU tensors only");
  TORCH_CHECK(x.dim() == 2 && x.size(1) == K && x.is_contiguous(), "contiguous x [M, K] expected");
  TORCH_CHECK(K % LANES == 0, "K must be a multiple of ", LANES);
}

template <typename Dot>
torch::Tensor run(const torch::Tensor& x, const Dot& dot, int64_t N,
                  const c10::optional<torch::Tensor>& bias) {
  const int64_t M = x.size(0), K = x.size(1);
  std::vector<float> xbuf, bbuf;
  const float* xf = as_float(x, xbuf);
  const float* bf = nullptr;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->numel() == N && bias->is_contiguous(), "bias [N] expected");
    bf = as_float(*bias, bbuf);
  }
  auto y = torch::empty({M, N}, x.options());  // x's dtype: float32 or bfloat16
  if (x.scalar_type() == torch::kFloat) {
    gemv(xf, dot, bf, y.data_ptr<float>(), M, N, K);
  } else {
    gemv(xf, dot, bf, y.data_ptr<c10::BFloat16>(), M, N, K);
  }
  return y;
}

}  // namespace

torch::Tensor linear_dense(torch::Tensor x, torch::Tensor w, c10::optional<torch::Tensor> bias) {
  check_inputs(x, w.size(1));
  TORCH_CHECK(w.device().is_cpu() && w.dim() == 2 && w.is_contiguous(),
              "contiguous CPU W [N, K] expected");
  const int64_t N = w.size(0), K = w.size(1);
  if (w.scalar_type() == torch::kFloat) {
    return run(x, DenseDot<float>{w.data_ptr<float>(), K}, N, bias);
  }
  TORCH_CHECK(w.scalar_type() == torch::kBFloat16, "W must be float32 or bfloat16");
  const auto* bits = reinterpret_cast<const uint16_t*>(w.data_ptr());
  return run(x, DenseDot<uint16_t>{bits, K}, N, bias);
}

torch::Tensor linear_int8(torch::Tensor x, torch::Tensor q, torch::Tensor scales,
                          c10::optional<torch::Tensor> bias) {
  check_inputs(x, q.size(1));
  TORCH_CHECK(q.device().is_cpu() && q.dim() == 2 && q.is_contiguous() &&
                  q.scalar_type() == torch::kChar,
              "contiguous CPU int8 q [N, K] expected");
  const int64_t N = q.size(0), K = q.size(1);
  TORCH_CHECK(scales.numel() == N && scales.is_contiguous(), "scales [N] expected");
  std::vector<float> sbuf;
  const float* sf = as_float(scales, sbuf);
  return run(x, Int8Dot{q.data_ptr<int8_t>(), sf, K}, N, bias);
}
