// fp32 math on 8-lane AVX2 vectors, shared by the kernels' AVX2 paths (builds with AVX2 and FMA but not AVX-512,
// whose paths are their own): exp2_f32 (common.h) on whole vectors, step by step, and the test behind the hint that
// lets it skip its upper clamp. Empty in other builds.

#pragma once

#if defined(__AVX2__) && defined(__FMA__) && !defined(__AVX512F__)
#define OPENJAMBA_AVX2_MATH 1

#include <immintrin.h>

#include <cstdint>
#include <limits>

#include "common.h"

namespace openjamba {

// exp2_f32 (common.h) of n vectors, its steps in its order, each step on all n: the clamps (max(lo, x) is x < lo ? lo
// : x, NaN kept; min(hi, x) likewise), the rounding to k, the polynomial by multiply-adds, the scale, then inf from
// 128 up. kb - magic, the rounded xc that r subtracts, is taken as round(xc) (to nearest even, as adding magic
// rounds; the same value for every clamped xc, NaN included) beside kb rather than after it: a shorter chain.
// NONPOSITIVE: every x is <= 0 or NaN, where the upper clamp and the inf step change nothing (min(hi, NaN) is NaN,
// NaN >= 128 is false), so they are left out: the same bits in fewer instructions.
template <int n, bool NONPOSITIVE>
inline void exp2_vectors(__m256* x) {
  const __m256 magic = _mm256_set1_ps(EXP2_MAGIC);
  __m256 r[n];
  __m256i k[n];
  for (int q = 0; q < n; ++q) {
    __m256 xc = _mm256_max_ps(_mm256_set1_ps(EXP2_LO), x[q]);
    if constexpr (!NONPOSITIVE) xc = _mm256_min_ps(_mm256_set1_ps(EXP2_HI), xc);
    const __m256 kb = _mm256_add_ps(xc, magic);
    k[q] = _mm256_sub_epi32(_mm256_castps_si256(kb), _mm256_castps_si256(magic));
    r[q] = _mm256_sub_ps(xc, _mm256_round_ps(xc, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  __m256 p[n];
  for (int q = 0; q < n; ++q) p[q] = _mm256_fmadd_ps(_mm256_set1_ps(EXP2_POLY[0]), r[q], _mm256_set1_ps(EXP2_POLY[1]));
  for (int i = 2; i < 7; ++i)
    for (int q = 0; q < n; ++q) p[q] = _mm256_fmadd_ps(p[q], r[q], _mm256_set1_ps(EXP2_POLY[i]));
  const __m256 inf = _mm256_set1_ps(std::numeric_limits<float>::infinity());
  for (int q = 0; q < n; ++q) {
    const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(k[q], _mm256_set1_epi32(127)), 23);
    const __m256 y = _mm256_mul_ps(p[q], _mm256_castsi256_ps(bits));
    x[q] = NONPOSITIVE ? y : _mm256_blendv_ps(y, inf, _mm256_cmp_ps(x[q], _mm256_set1_ps(128.0f), _CMP_GE_OQ));
  }
}

// Whether none of the n values from v is > 0 (NaN is not).
inline bool none_positive(const float* v, int64_t n) {
  __m256 positive = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    positive = _mm256_or_ps(positive, _mm256_cmp_ps(_mm256_loadu_ps(v + i), _mm256_setzero_ps(), _CMP_GT_OQ));
  bool rest = false;
  for (; i < n; ++i) rest |= v[i] > 0.0f;
  return _mm256_movemask_ps(positive) == 0 && !rest;
}

// Math<float>::softplus (common.h) of n vectors, the same bits: max(x, 0) + log1p_unit_f32(exp_f32(-|x|)), each step
// on all n. exp's argument |x| * -log2(e) is <= 0 or NaN (exp2_vectors' hint holds). The log takes only the branch each
// lane needs (m = v / 2 where v > sqrt(2): exact, so m - 1 and m + 1 round as the compiled code's multiply-adds
// v / 2 -+ 1 do), then Goldberg's correction w / (v - 1), with 1 for the divisor where v - 1 = 0 (w itself there).
// max(0, x) keeps a NaN x, as x < 0 ? 0 : x does.
template <int n>
inline void softplus_vectors(__m256* x) {
  const __m256 one = _mm256_set1_ps(1.0f), zero = _mm256_setzero_ps();
  __m256 w[n], v[n], big[n], s[n];
  for (int q = 0; q < n; ++q) w[q] = _mm256_mul_ps(_mm256_andnot_ps(_mm256_set1_ps(-0.0f), x[q]), _mm256_set1_ps(-LOG2E));
  exp2_vectors<n, true>(w);
  for (int q = 0; q < n; ++q) {
    v[q] = _mm256_add_ps(one, w[q]);
    big[q] = _mm256_cmp_ps(v[q], _mm256_set1_ps(1.41421356f), _CMP_GT_OQ);
    const __m256 m = _mm256_blendv_ps(v[q], _mm256_mul_ps(_mm256_set1_ps(0.5f), v[q]), big[q]);
    s[q] = _mm256_div_ps(_mm256_sub_ps(m, one), _mm256_add_ps(m, one));
  }
  for (int q = 0; q < n; ++q) {
    const __m256 s2 = _mm256_mul_ps(s[q], s[q]);
    __m256 p = _mm256_fmadd_ps(_mm256_set1_ps(1.0f / 9.0f), s2, _mm256_set1_ps(1.0f / 7.0f));
    p = _mm256_fmadd_ps(p, s2, _mm256_set1_ps(1.0f / 5.0f));
    p = _mm256_fmadd_ps(p, s2, _mm256_set1_ps(1.0f / 3.0f));
    p = _mm256_fmadd_ps(p, s2, one);
    const __m256 log_v = _mm256_fmadd_ps(_mm256_add_ps(s[q], s[q]), p, _mm256_and_ps(big[q], _mm256_set1_ps(0.69314718056f)));
    const __m256 dv = _mm256_sub_ps(v[q], one);
    const __m256 exact = _mm256_cmp_ps(dv, zero, _CMP_EQ_OQ);
    const __m256 ratio = _mm256_div_ps(w[q], _mm256_blendv_ps(dv, one, exact));
    const __m256 log1p = _mm256_blendv_ps(_mm256_mul_ps(log_v, ratio), w[q], exact);
    x[q] = _mm256_add_ps(_mm256_max_ps(zero, x[q]), log1p);
  }
}

// Math<float>::sigmoid (common.h) of n vectors, the same bits: 1 / (1 + exp2_f32(-log2(e) x)).
template <int n>
inline void sigmoid_vectors(__m256* x) {
  const __m256 one = _mm256_set1_ps(1.0f);
  __m256 e[n];
  for (int q = 0; q < n; ++q) e[q] = _mm256_mul_ps(_mm256_set1_ps(-LOG2E), x[q]);
  exp2_vectors<n, false>(e);
  for (int q = 0; q < n; ++q) x[q] = _mm256_div_ps(one, _mm256_add_ps(one, e[q]));
}

}  // namespace openjamba

#endif
