// GCC generic vectors of float32 lanes and the bfloat16 loads the kernels share.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace lorafleet {

constexpr int LANES = 16;

// LANES float32 values as one vector (GCC's generic vectors: one zmm with AVX-512, two ymm with
// AVX2); loads go through memcpy, so no alignment is assumed.
typedef float floats __attribute__((vector_size(LANES * sizeof(float))));
typedef uint32_t words __attribute__((vector_size(LANES * sizeof(uint32_t))));
typedef uint16_t halves __attribute__((vector_size(LANES * sizeof(uint16_t))));

inline floats load(const float* p) {
  floats v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline floats load(const uint16_t* bf16_bits) {  // bfloat16 -> float32 is exact: the high 16 bits
  halves h;
  std::memcpy(&h, bf16_bits, sizeof h);
  const words u = __builtin_convertvector(h, words) << 16;
  floats v;
  std::memcpy(&v, &u, sizeof v);
  return v;
}

typedef int8_t bytes __attribute__((vector_size(LANES)));

typedef int32_t ints __attribute__((vector_size(LANES * sizeof(int32_t))));

inline floats load(const int8_t* p) {  // int8 -> int32 -> float32: exact (sign-extend, convert)
#if defined(__AVX512F__)
  // GCC scalarises the generic conversion below (measured 3.6x slower than torch's int8 GEMV)
  const __m512 v = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(
      reinterpret_cast<const __m128i*>(p))));
  floats f;
  std::memcpy(&f, &v, sizeof f);
  return f;
#else
  bytes b;
  std::memcpy(&b, p, sizeof b);
  return __builtin_convertvector(__builtin_convertvector(b, ints), floats);
#endif
}

inline float widen(uint16_t bf16_bits) {
  const uint32_t u = static_cast<uint32_t>(bf16_bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

}  // namespace lorafleet
