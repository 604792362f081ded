// lorafleet's decode-layer kernels: the small ops between a decode layer's products, fused.
//
// Why: a decode step of SmolLM2 ran ~43 torch ops per layer around its 4 products (RMSNorm as
// 1-3 ops, RoPE as 5, the KV write as 4 index_puts, attention's slicing, mask, SDPA and
// reshapes, SiLU and its product, the residual adds): 1,300-1,500 ops per token at a few us of
// dispatch each, 3-5 ms of a 10-18 ms token (`lorafleet bench engine --profile`). These do the
// same work in 4 calls per layer (LlamaRunner's decode path).
//
// Semantics. T is float32 or bfloat16, every tensor argument is in T unless said otherwise,
// arithmetic is in float32, and "T(.)" rounds to T (nearest even; a no-op for float32).
//
// rms_norm(x [M, d], w [d], eps) -> y [M, d]:
//     r[m] = 1 / sqrt(sum_k x[m, k]^2 / d + eps);  y[m, k] = T(w[k] * T(x[m, k] * r[m]))
//   transformers' LlamaRMSNorm (the normalised value is rounded to T before the weight).
// add_rms_norm(h [M, d], delta [M, d], w [d], eps) -> (s, rms_norm(s, w, eps)) where
//   s = T(h + delta): a residual add and the next norm; h is not modified.
// silu_mul(gate_up [M, 2I]) -> y [M, I]:  y[m, j] = T(T(silu(g)) * u), g = gate_up[m, j],
//   u = gate_up[m, I + j], silu(g) = g / (1 + exp(-g)): LlamaMLP's act(gate) * up.
// decode_attention(q [n, H*D], k [n, Hkv*D], v [n, Hkv*D], cos [n, D], sin [n, D],
//                  k_cache [S, Hkv, L, D], v_cache [S, Hkv, L, D], slots [n] int64,
//                  positions [n] int64, scale, window) -> o [n, H*D]. For each row i, with
//   slot s = slots[i] and position p = positions[i]:
//   1. RoPE (transformers' rotate_half form) on each head x of q[i] and of k[i], rounded to T:
//        x'[j] = x[j] cos[i, j] - x[j + D/2] sin[i, j]   for j < D/2,
//        x'[j] = x[j] cos[i, j] + x[j - D/2] sin[i, j]   for j >= D/2;
//   2. k_cache[s, g, p] = k'[i, g] and v_cache[s, g, p] = v[i, g] for every KV head g;
//   3. query head h reads KV head g = h / (H / Hkv) (SDPA's enable_gqa) over the keys
//      j = first..p, first = max(0, p + 1 - window) (window <= 0: first = 0):
//        a_j = softmax_j(scale * <q'[i, h], k_cache[s, g, j]>),
//        o[i, h] = T(sum_j a_j v_cache[s, g, j]).
//   Rows hold distinct slots (one sequence each); all writes happen before any read. q, k, v
//   may be column blocks of one wider tensor (any row stride, unit column stride); the rest is
//   contiguous. D % 16 == 0.
//
// Rows of the norms and SiLU, and (row, KV head) pairs of attention, are split over torch's
// intra-op threads; each result is computed in the same order whatever the split.

#include "kernels.h"
#include "vectors.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace {

using namespace lorafleet;
using bf16 = c10::BFloat16;

inline float to_float(float v) { return v; }
inline float to_float(bf16 v) { return static_cast<float>(v); }

template <typename T>
inline T round_to(float v) {
  return static_cast<T>(v);  // float32: itself; bfloat16: nearest even
}

inline floats load_vec(const float* p) { return load(p); }
inline floats load_vec(const bf16* p) { return load(reinterpret_cast<const uint16_t*>(p)); }

// sum_j a[j] * b[j] over D (a multiple of LANES) floats, a float32 and b of type T.
template <typename T>
inline float dot(const float* a, const T* b, int64_t D) {
  floats acc = {};
  for (int64_t j = 0; j < D; j += LANES) acc += load(a + j) * load_vec(b + j);
  float s = 0.0f;
  for (int l = 0; l < LANES; ++l) s += acc[l];
  return s;
}

// acc[j] += a * b[j] over D floats.
template <typename T>
inline void axpy(float a, const T* b, int64_t D, float* acc) {
  for (int64_t j = 0; j < D; j += LANES) {
    floats v = load(acc + j) + a * load_vec(b + j);
    std::memcpy(acc + j, &v, sizeof v);
  }
}

template <typename T>
void norm_row(const T* x, const T* w, int64_t d, float eps, T* y) {
  float squares = 0.0f;
  for (int64_t k = 0; k < d; ++k) squares += to_float(x[k]) * to_float(x[k]);
  const float r = 1.0f / std::sqrt(squares / static_cast<float>(d) + eps);
  for (int64_t k = 0; k < d; ++k) {
    y[k] = round_to<T>(to_float(w[k]) * to_float(round_to<T>(to_float(x[k]) * r)));
  }
}

void check_rows(const torch::Tensor& x, const char* name) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2 && x.is_contiguous(), name,
              " must be a contiguous CPU [M, d] tensor");
  TORCH_CHECK(x.scalar_type() == torch::kFloat || x.scalar_type() == torch::kBFloat16, name,
              " must be float32 or bfloat16");
}

void check_like(const torch::Tensor& t, const torch::Tensor& like, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == like.scalar_type() && t.is_contiguous(),
              name, " must be a contiguous CPU tensor of ", like.scalar_type());
}

template <typename T>
void norm_rows(const torch::Tensor& x, const torch::Tensor& w, float eps, torch::Tensor& y) {
  const int64_t M = x.size(0), d = x.size(1);
  const T* xp = x.data_ptr<T>();
  const T* wp = w.data_ptr<T>();
  T* yp = y.data_ptr<T>();
  at::parallel_for(0, M, 4, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) norm_row(xp + m * d, wp, d, eps, yp + m * d);
  });
}

template <typename T>
void add_rows(const torch::Tensor& h, const torch::Tensor& delta, torch::Tensor& s) {
  const T* hp = h.data_ptr<T>();
  const T* dp = delta.data_ptr<T>();
  T* sp = s.data_ptr<T>();
  for (int64_t i = 0; i < h.numel(); ++i) sp[i] = round_to<T>(to_float(hp[i]) + to_float(dp[i]));
}

template <typename T>
void silu_rows(const torch::Tensor& gate_up, torch::Tensor& y) {
  const int64_t M = y.size(0), I = y.size(1);
  const T* gp = gate_up.data_ptr<T>();
  T* yp = y.data_ptr<T>();
  at::parallel_for(0, M * I, 8192, [&](int64_t begin, int64_t end) {
    for (int64_t e = begin; e < end; ++e) {
      const int64_t m = e / I, j = e % I;
      const float g = to_float(gp[m * 2 * I + j]);
      const T act = round_to<T>(g / (1.0f + std::exp(-g)));
      yp[e] = round_to<T>(to_float(act) * to_float(gp[m * 2 * I + I + j]));
    }
  });
}

// RoPE of one head x [D] with cos, sin [D] into out [D] (rounded to T, kept as float32).
template <typename T>
void rope_head(const T* x, const T* cos, const T* sin, int64_t D, float* out) {
  const int64_t half = D / 2;
  for (int64_t j = 0; j < half; ++j) {
    const float r = to_float(x[j]) * to_float(cos[j]) - to_float(x[j + half]) * to_float(sin[j]);
    out[j] = to_float(round_to<T>(r));
  }
  for (int64_t j = half; j < D; ++j) {
    const float r = to_float(x[j]) * to_float(cos[j]) + to_float(x[j - half]) * to_float(sin[j]);
    out[j] = to_float(round_to<T>(r));
  }
}

struct AttentionShape {
  int64_t n, heads, kv_heads, D, S, L;
};

// Steps 1-2 of decode_attention for every row: rotated queries into q_rot [n, H, D] (float32),
// rotated keys and the values into the caches.
template <typename T>
void rope_and_write(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                    const T* cos, const T* sin, T* k_cache, T* v_cache, const int64_t* slots,
                    const int64_t* positions, const AttentionShape& a, float* q_rot) {
  std::vector<float> k_rot(a.D);
  for (int64_t i = 0; i < a.n; ++i) {
    const T* qi = q.data_ptr<T>() + i * q.stride(0);
    const T* ki = k.data_ptr<T>() + i * k.stride(0);
    const T* vi = v.data_ptr<T>() + i * v.stride(0);
    const T* ci = cos + i * a.D;
    const T* si = sin + i * a.D;
    for (int64_t h = 0; h < a.heads; ++h) {
      rope_head(qi + h * a.D, ci, si, a.D, q_rot + (i * a.heads + h) * a.D);
    }
    for (int64_t g = 0; g < a.kv_heads; ++g) {
      const int64_t at = ((slots[i] * a.kv_heads + g) * a.L + positions[i]) * a.D;
      rope_head(ki + g * a.D, ci, si, a.D, k_rot.data());
      for (int64_t j = 0; j < a.D; ++j) {
        k_cache[at + j] = round_to<T>(k_rot[j]);
        v_cache[at + j] = vi[g * a.D + j];
      }
    }
  }
}

// Step 3 for row i's query heads of KV head g, into o [n, H*D].
template <typename T>
void attend_group(int64_t i, int64_t g, const float* q_rot, const T* k_cache, const T* v_cache,
                  const int64_t* slots, const int64_t* positions, const AttentionShape& a,
                  float scale, int64_t window, T* o) {
  const int64_t p = positions[i];
  const int64_t first = window > 0 ? std::max<int64_t>(0, p + 1 - window) : 0;
  const int64_t keys = p + 1 - first;
  const int64_t base = ((slots[i] * a.kv_heads + g) * a.L + first) * a.D;
  const T* K = k_cache + base;  // [keys, D]
  const T* V = v_cache + base;  // [keys, D]
  const int64_t group = a.heads / a.kv_heads;
  std::vector<float> scores(keys), acc(a.D);
  for (int64_t h = g * group; h < (g + 1) * group; ++h) {
    const float* qh = q_rot + (i * a.heads + h) * a.D;
    float top = -std::numeric_limits<float>::infinity();
    for (int64_t j = 0; j < keys; ++j) {
      scores[j] = scale * dot(qh, K + j * a.D, a.D);
      top = std::max(top, scores[j]);
    }
    float total = 0.0f;
    for (int64_t j = 0; j < keys; ++j) {
      scores[j] = std::exp(scores[j] - top);
      total += scores[j];
    }
    std::fill(acc.begin(), acc.end(), 0.0f);
    for (int64_t j = 0; j < keys; ++j) axpy(scores[j] / total, V + j * a.D, a.D, acc.data());
    T* out = o + (i * a.heads + h) * a.D;
    for (int64_t j = 0; j < a.D; ++j) out[j] = round_to<T>(acc[j]);
  }
}

template <typename T>
void attention(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
               const torch::Tensor& cos, const torch::Tensor& sin, torch::Tensor& k_cache,
               torch::Tensor& v_cache, const int64_t* slots, const int64_t* positions,
               const AttentionShape& a, float scale, int64_t window, torch::Tensor& o) {
  std::vector<float> q_rot(a.n * a.heads * a.D);
  T* kc = k_cache.data_ptr<T>();
  T* vc = v_cache.data_ptr<T>();
  rope_and_write<T>(q, k, v, cos.data_ptr<T>(), sin.data_ptr<T>(), kc, vc, slots, positions, a,
                    q_rot.data());
  T* op = o.data_ptr<T>();
  at::parallel_for(0, a.n * a.kv_heads, 2, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      attend_group<T>(t / a.kv_heads, t % a.kv_heads, q_rot.data(), kc, vc, slots, positions, a,
                      scale, window, op);
    }
  });
}

void check_heads(const torch::Tensor& x, const torch::Tensor& like, int64_t n, const char* name) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2 && x.size(0) == n && x.stride(1) == 1 &&
                  x.scalar_type() == like.scalar_type(),
              name, " must be a CPU [n, heads * D] tensor of ", like.scalar_type(),
              " with unit column stride");
}

AttentionShape attention_shape(const torch::Tensor& q, const torch::Tensor& k,
                               const torch::Tensor& v, const torch::Tensor& cos,
                               const torch::Tensor& sin, const torch::Tensor& k_cache,
                               const torch::Tensor& v_cache, const torch::Tensor& slots,
                               const torch::Tensor& positions) {
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes(),
              "k_cache, v_cache must be [S, Hkv, L, D] of one shape");
  check_like(k_cache, k_cache, "k_cache");
  check_like(v_cache, k_cache, "v_cache");
  AttentionShape a{q.size(0), 0, k_cache.size(1), k_cache.size(3), k_cache.size(0),
                   k_cache.size(2)};
  TORCH_CHECK(a.D % LANES == 0, "head dim must be a multiple of ", LANES);
  check_heads(q, k_cache, a.n, "q");
  check_heads(k, k_cache, a.n, "k");
  check_heads(v, k_cache, a.n, "v");
  a.heads = q.size(1) / a.D;
  TORCH_CHECK(q.size(1) == a.heads * a.D && a.heads % a.kv_heads == 0,
              "q must hold a multiple of k's heads");
  TORCH_CHECK(k.size(1) == a.kv_heads * a.D && v.size(1) == a.kv_heads * a.D,
              "k, v must be [n, Hkv * D]");
  for (const auto* t : {&cos, &sin}) {
    check_like(*t, k_cache, "cos, sin");
    TORCH_CHECK(t->dim() == 2 && t->size(0) == a.n && t->size(1) == a.D, "cos, sin: [n, D]");
  }
  for (const auto* t : {&slots, &positions}) {
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == torch::kLong && t->dim() == 1 &&
                    t->size(0) == a.n && t->is_contiguous(),
                "slots, positions must be contiguous int64 [n]");
  }
  const int64_t* sp = slots.data_ptr<int64_t>();
  const int64_t* pp = positions.data_ptr<int64_t>();
  for (int64_t i = 0; i < a.n; ++i) {
    TORCH_CHECK(sp[i] >= 0 && sp[i] < a.S && pp[i] >= 0 && pp[i] < a.L,
                "slot or position out of the cache");
  }
  return a;
}

}  // namespace

torch::Tensor rms_norm(torch::Tensor x, torch::Tensor w, double eps) {
  check_rows(x, "x");
  check_like(w, x, "w");
  TORCH_CHECK(w.dim() == 1 && w.size(0) == x.size(1), "w must be [d]");
  auto y = torch::empty_like(x);
  if (x.scalar_type() == torch::kFloat) {
    norm_rows<float>(x, w, static_cast<float>(eps), y);
  } else {
    norm_rows<bf16>(x, w, static_cast<float>(eps), y);
  }
  return y;
}

std::tuple<torch::Tensor, torch::Tensor> add_rms_norm(torch::Tensor h, torch::Tensor delta,
                                                      torch::Tensor w, double eps) {
  check_rows(h, "h");
  check_like(delta, h, "delta");
  TORCH_CHECK(delta.sizes() == h.sizes(), "delta must have h's shape");
  auto s = torch::empty_like(h);
  if (h.scalar_type() == torch::kFloat) {
    add_rows<float>(h, delta, s);
  } else {
    add_rows<bf16>(h, delta, s);
  }
  return {s, rms_norm(s, w, eps)};
}

torch::Tensor silu_mul(torch::Tensor gate_up) {
  check_rows(gate_up, "gate_up");
  TORCH_CHECK(gate_up.size(1) % 2 == 0, "gate_up must be [M, 2I]");
  auto y = torch::empty({gate_up.size(0), gate_up.size(1) / 2}, gate_up.options());
  if (gate_up.scalar_type() == torch::kFloat) {
    silu_rows<float>(gate_up, y);
  } else {
    silu_rows<bf16>(gate_up, y);
  }
  return y;
}

torch::Tensor decode_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v,
                               torch::Tensor cos, torch::Tensor sin, torch::Tensor k_cache,
                               torch::Tensor v_cache, torch::Tensor slots,
                               torch::Tensor positions, double scale, int64_t window) {
  const AttentionShape a =
      attention_shape(q, k, v, cos, sin, k_cache, v_cache, slots, positions);
  auto o = torch::empty({a.n, a.heads * a.D}, k_cache.options());
  const int64_t* sp = slots.data_ptr<int64_t>();
  const int64_t* pp = positions.data_ptr<int64_t>();
  const float s = static_cast<float>(scale);
  if (k_cache.scalar_type() == torch::kFloat) {
    attention<float>(q, k, v, cos, sin, k_cache, v_cache, sp, pp, a, s, window, o);
  } else {
    attention<bf16>(q, k, v, cos, sin, k_cache, v_cache, sp, pp, a, s, window, o);
  }
  return o;
}
