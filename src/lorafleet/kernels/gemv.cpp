// lorafleet's decode GEMV: y = x @ W^T (+ b) for a few rows of x, on the CPU.
//
// Semantics (every entry point): x [M, K] float32 or bfloat16 (contiguous), W [N, K]
// float32 or bfloat16 (contiguous), bias [N] or None; returns y [M, N] in x's dtype with
//     y[m, n] = sum_k x[m, k] * W[n, k] (+ bias[n]),
// accumulated in float32 (x converted to float32 first; bfloat16 outputs rounded to nearest
// even once, at the end).
// Each output's sum runs over k in the same order whatever M is, so a row's result does not
// depend on the other rows of the batch.
//
// Why: torch's CPU GEMV (MKL sgemv for M = 1, sgemm above) streams the weights at 10-16 GiB/s
// on one core of this project's 2-core machines; decode reads every weight once per token, so
// the step is bandwidth-bound and this loop, split over N across torch's intra-op threads,
// reaches 25-39 GiB/s (BENCHMARKS.md). Above a handful of rows the product is compute-bound and
// the blocked GEMMs win (MKL's float32; oneDNN's bfloat16, on CPUs with AVX512-BF16, from 3
// rows): the Python side (kernels/__init__.py) sends only M <= MAX_ROWS[dtype] here.
//
// Built once per machine by torch.utils.cpp_extension with -O3 -march=native: the loops below
// are written for the compiler to vectorise (16 float32 lanes per step; K % 16 == 0 required).

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>

#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr int LANES = 16;
constexpr int BLOCK_ROWS = 4;  // rows of x per pass over a weight row (kept in L1 meanwhile)

inline float widen(float v) { return v; }
inline float widen(uint16_t bf16_bits) {  // bfloat16 -> float32 is exact: the high 16 bits
  const uint32_t u = static_cast<uint32_t>(bf16_bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// out[m] = sum_k x[m * K + k] * w[k] for R rows of x (float32), w of element type T.
template <int R, typename T>
inline void dot_rows(const T* __restrict w, const float* __restrict x, int64_t K, float* out) {
  float acc[R][LANES] = {};
  for (int64_t k = 0; k < K; k += LANES) {
    float wk[LANES];
#pragma GCC unroll 16
    for (int j = 0; j < LANES; ++j) wk[j] = widen(w[k + j]);
    for (int m = 0; m < R; ++m) {
      const float* xm = x + m * K + k;
#pragma GCC unroll 16
      for (int j = 0; j < LANES; ++j) acc[m][j] += xm[j] * wk[j];
    }
  }
  for (int m = 0; m < R; ++m) {
    float s = 0.0f;
    for (int j = 0; j < LANES; ++j) s += acc[m][j];
    out[m] = s;
  }
}

// y32[m, n] = (x[m] . w[n]) + bias[n] for n in [0, N), split over torch's intra-op threads.
template <typename T>
void gemv(const float* x, const T* w, const float* bias, float* y32,
          int64_t M, int64_t N, int64_t K) {
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    float out[BLOCK_ROWS];
    for (int64_t n = begin; n < end; ++n) {
      const T* wn = w + n * K;
      const float add = bias ? bias[n] : 0.0f;
      int64_t m0 = 0;
      for (; m0 + BLOCK_ROWS <= M; m0 += BLOCK_ROWS) {
        dot_rows<BLOCK_ROWS>(wn, x + m0 * K, K, out);
        for (int m = 0; m < BLOCK_ROWS; ++m) y32[(m0 + m) * N + n] = out[m] + add;
      }
      for (; m0 < M; ++m0) {  // the last M % 4 rows, one at a time (same per-row sum order)
        dot_rows<1>(wn, x + m0 * K, K, out);
        y32[m0 * N + n] = out[0] + add;
      }
    }
  });
}

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

void check_inputs(const torch::Tensor& x, const torch::Tensor& w) {
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), "CPU tensors only");
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1),
              "x [M, K] and W [N, K] expected");
  TORCH_CHECK(x.is_contiguous() && w.is_contiguous(), "contiguous x and W expected");
  TORCH_CHECK(x.size(1) % LANES == 0, "K must be a multiple of ", LANES);
}

torch::Tensor finish(const torch::Tensor& y32, const torch::Tensor& x) {
  return x.scalar_type() == torch::kFloat ? y32 : y32.to(x.scalar_type());
}

template <typename T>
torch::Tensor run(const torch::Tensor& x, const T* w, int64_t N,
                  const c10::optional<torch::Tensor>& bias) {
  const int64_t M = x.size(0), K = x.size(1);
  std::vector<float> xbuf, bbuf;
  const float* xf = as_float(x, xbuf);
  const float* bf = nullptr;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->numel() == N && bias->is_contiguous(), "bias [N] expected");
    bf = as_float(*bias, bbuf);
  }
  auto y32 = torch::empty({M, N}, x.options().dtype(torch::kFloat));
  gemv<T>(xf, w, bf, y32.data_ptr<float>(), M, N, K);
  return finish(y32, x);
}

}  // namespace

torch::Tensor linear_dense(torch::Tensor x, torch::Tensor w, c10::optional<torch::Tensor> bias) {
  check_inputs(x, w);
  const int64_t N = w.size(0);
  if (w.scalar_type() == torch::kFloat) return run<float>(x, w.data_ptr<float>(), N, bias);
  TORCH_CHECK(w.scalar_type() == torch::kBFloat16, "W must be float32 or bfloat16");
  return run<uint16_t>(x, reinterpret_cast<const uint16_t*>(w.data_ptr()), N, bias);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "lorafleet's decode GEMV kernels (see gemv.cpp's header for the semantics)";
  m.def("linear_dense", &linear_dense, "y = x @ W^T (+ b); W float32 or bfloat16");
}
