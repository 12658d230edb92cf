// Shared by the CPU kernels: vectorisable math, strided row access, channel blocks.

#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

namespace openjamba {

#ifndef OPENJAMBA_LANES
#define OPENJAMBA_LANES 16
#endif
constexpr int W = OPENJAMBA_LANES;

// Holds a vector in a register: an empty asm that takes it in one, so GCC cannot fold its load into every
// multiply-add that uses it (a tile loop then becomes load-bound). Only where a 64-byte vector is one register
// (AVX-512); elsewhere the constraint would be impossible, so it does nothing.
template <typename V>
inline void keep_in_register(V& v) {
#if defined(__AVX512F__)
  if constexpr (sizeof(V) == 64) asm("" : "+v"(v));
#elif defined(__AVX__)
  if constexpr (sizeof(V) == 32) asm("" : "+x"(v));
#else
  (void)v;
#endif
}

// ---------------------------------------------------------------------------------------------------------------
// Math. fp32 uses inline, branch-free versions the compiler can vectorise (libm calls cannot be, and a call in the
// state loop would also spill every register); fp64 uses libm, since it exists for exact comparisons in tests.

inline float bits_to_float(uint32_t b) {
  float f;
  std::memcpy(&f, &b, sizeof f);
  return f;
}

inline uint32_t float_to_bits(float f) {
  uint32_t b;
  std::memcpy(&b, &f, sizeof b);
  return b;
}

// exp2_f32's constants (mamba_step.cpp's exp2_nonpositive and avx2_math.h's exp2_vectors repeat its steps 16 and 8
// lanes at a time).
constexpr float EXP2_LO = -127.0f;
constexpr float EXP2_HI = 127.49f;
constexpr float EXP2_MAGIC = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer kept in the low mantissa bits
constexpr float EXP2_POLY[7] = {1.5370715e-4f, 1.3399858e-3f, 9.6183736e-3f, 5.5503290e-2f,
                                2.4022648e-1f, 6.9314718e-1f, 1.0f};  // highest degree first

// 2^x = 2^k 2^r with k = round(x), |r| <= 1/2, 2^r by a degree-6 polynomial (least-squares fit for relative
// error: 2e-9 in exact arithmetic, ~1e-7 = 1.5 ulp after fp32 rounding). Limits: 0 below -126.5 (no denormals), inf
// from 128 (up, 2^127.49 for x in (127.49, 128)), NaN stays NaN. Branch-free so loops over it vectorise.
inline float exp2_f32(float x) {
  const float lo = EXP2_LO, hi = EXP2_HI;
  float xc = x < lo ? lo : x;
  xc = xc > hi ? hi : xc;
  const float magic = EXP2_MAGIC;
  const float kb = xc + magic;
  const int32_t k = static_cast<int32_t>(float_to_bits(kb)) - static_cast<int32_t>(float_to_bits(magic));
  const float r = xc - (kb - magic);
  float p = EXP2_POLY[0];
  p = p * r + EXP2_POLY[1];
  p = p * r + EXP2_POLY[2];
  p = p * r + EXP2_POLY[3];
  p = p * r + EXP2_POLY[4];
  p = p * r + EXP2_POLY[5];
  p = p * r + EXP2_POLY[6];
  const float y = p * bits_to_float(static_cast<uint32_t>(k + 127) << 23);  // k = -127 gives the scale 0
  return x >= 128.0f ? std::numeric_limits<float>::infinity() : y;
}

constexpr float LOG2E = 1.44269504088896341f;
constexpr float LN2 = 0.69314718055994531f;

inline float exp_f32(float x) { return exp2_f32(x * LOG2E); }

// log(1 + w) for w in [0, 1]: log of v = 1 + w as 2 atanh(s) with s = (m - 1) / (m + 1) after scaling v into
// [0.707, 1.414] (|s| < 0.172, series to s^9), then Goldberg's correction w / (v - 1) for the rounding of 1 + w.
inline float log1p_unit_f32(float w) {
  const float v = 1.0f + w;
  const bool big = v > 1.41421356f;
  const float m = big ? 0.5f * v : v;
  const float s = (m - 1.0f) / (m + 1.0f);
  const float s2 = s * s;
  float p = 1.0f / 9.0f;
  p = p * s2 + 1.0f / 7.0f;
  p = p * s2 + 1.0f / 5.0f;
  p = p * s2 + 1.0f / 3.0f;
  p = p * s2 + 1.0f;
  const float log_v = 2.0f * s * p + (big ? 0.69314718056f : 0.0f);
  const float dv = v - 1.0f;
  return dv == 0.0f ? w : log_v * (w / (dv == 0.0f ? 1.0f : dv));
}

template <typename T>
struct Math;

// exp_scaled(x) = exp(x / exp_scale): the state loop stores A * exp_scale once and saves a multiply per element.
template <>
struct Math<float> {
  static constexpr float exp_scale = LOG2E;
  static float exp_scaled(float x) { return exp2_f32(x); }
  // softplus(x) = max(x, 0) + log1p(exp(-|x|)): no overflow, and equal to x in fp32 for x > 17.
  static float softplus(float x) { return (x < 0.0f ? 0.0f : x) + log1p_unit_f32(exp_f32(-std::fabs(x))); }
  static float sigmoid(float x) { return 1.0f / (1.0f + exp2_f32(-LOG2E * x)); }
  static float softplus_grad(float x) { return sigmoid(x); }  // already 1 in fp32 where torch switches to 1
};

template <>
struct Math<double> {
  static constexpr double exp_scale = 1.0;
  static double exp_scaled(double x) { return std::exp(x); }
  static double softplus(double x) { return x > 20.0 ? x : std::log1p(std::exp(x)); }
  static double sigmoid(double x) { return 1.0 / (1.0 + std::exp(-x)); }
  static double softplus_grad(double x) { return x > 20.0 ? 1.0 : sigmoid(x); }  // torch's threshold, exactly
};

// ---------------------------------------------------------------------------------------------------------------
// Arguments come from Python as ctypes structures (cpu_build.py mirrors them: same fields, same order).

struct Rows {
  void* ptr;
  int64_t batch_stride, token_stride;  // in elements
};

template <typename T>
inline const T* row(const Rows& r, int64_t b, int64_t t) {
  return static_cast<const T*>(r.ptr) + b * r.batch_stride + t * r.token_stride;
}

template <typename T>
inline T* row_out(const Rows& r, int64_t b, int64_t t) {
  return static_cast<T*>(r.ptr) + b * r.batch_stride + t * r.token_stride;
}

// Channel blocks: blocks [0, full) have W channels, the rest one channel each.
struct Blocks {
  int64_t channels, full, count;
  explicit Blocks(int64_t channels) : channels(channels), full(channels / W), count(full + channels % W) {}
  int64_t start(int64_t k) const { return k < full ? k * W : full * W + (k - full); }
  int64_t width(int64_t k) const { return k < full ? W : 1; }
  // Blocks of group g: those starting in channels [g * channels / groups, (g + 1) * channels / groups).
  int64_t first_of_group(int64_t g, int64_t groups) const {
    const int64_t c = (g * channels + groups - 1) / groups;
    return c <= full * W ? (c + W - 1) / W : full + (c - full * W);
  }
};

}  // namespace openjamba
