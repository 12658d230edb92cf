// Unmasked GQA attention of a few queries over a long K/V cache (a decode step), for CPUs.
//
//   q:   (batch, kv_heads, rows, head_dim)  the query heads sharing a K/V head stacked along rows (Python folds them)
//   k, v: (batch, kv_heads, length, head_dim)  any batch/head/token strides (a view of the cache buffer)
//   out: (batch, kv_heads, rows, head_dim) contiguous
//   out_r = sum_t softmax_t(q_r . k_t / sqrt(head_dim)) v_t
//
// A decode step should be bound by reading the cache (4 flops per 8 bytes of K/V), so the cache is read from memory
// once, for all the query rows of its head (flash-decoding): the keys are cut into blocks of `block` tokens, and
// each (batch, head, block) work item computes, row by row while the block stays in cache, the scores into a small
// buffer, their exponentials against the block's maximum, and the exp-weighted sum of the block's V rows. A second
// pass merges the blocks of each (batch, head) by their maxima and sums. Blocks give the threads work at batch 1.
// With AVX2 the fp32 dot products and V sums use intrinsics (see scores_avx2); elsewhere plain vectorisable loops.

#include <algorithm>
#include <type_traits>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

#include "common.h"

namespace {

using namespace openjamba;

struct AttendArgs {
  int64_t batch, kv_heads, rows, length, head_dim, block, threads;
  int64_t q_batch_stride, q_head_stride, q_row_stride;
  int64_t k_batch_stride, k_head_stride, k_token_stride;
  int64_t v_batch_stride, v_head_stride, v_token_stride;
  void *q, *k, *v, *out;
};

// One block's partial result for every row of its head: max score, sum of exponentials, weighted V sum.
template <typename T>
struct Partial {
  T* max;  // [rows]
  T* sum;  // [rows]
  T* acc;  // [rows][head_dim]
};

// s[j] = scale * (q . k_j) for the n keys k_j = k + j * stride.
template <typename T>
void scores_generic(const T* q, const T* k, int64_t stride, int64_t hd, int64_t n, T scale, T* s) {
  for (int64_t j = 0; j < n; ++j) {
    const T* kj = k + j * stride;
    T dot = 0;
#pragma omp simd reduction(+ : dot)
    for (int64_t d = 0; d < hd; ++d) dot += q[d] * kj[d];
    s[j] = dot * scale;
  }
}

// acc = sum_j w[j] v_j for the n rows v_j = v + j * stride.
template <typename T>
void weighted_sum_generic(const T* w, const T* v, int64_t stride, int64_t hd, int64_t n, T* acc) {
  std::fill(acc, acc + hd, T(0));
  for (int64_t j = 0; j < n; ++j) {
    const T* vj = v + j * stride;
#pragma omp simd
    for (int64_t d = 0; d < hd; ++d) acc[d] += w[j] * vj[d];
  }
}

#if defined(__AVX2__) && defined(__FMA__)
#define OPENJAMBA_ATTEND_AVX2 1

// fp32, head_dim a multiple of 8. Eight keys at a time: eight vector dot products, then one transpose-and-add
// (hadd) yields their eight sums in one vector; a horizontal reduction per key would cost as much as its FMAs.
void scores_avx2(const float* q, const float* k, int64_t stride, int64_t hd, int64_t n, float scale, float* s) {
  const __m256 vscale = _mm256_set1_ps(scale);
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    __m256 a[8];
    for (int jj = 0; jj < 8; ++jj) a[jj] = _mm256_setzero_ps();
    for (int64_t d = 0; d < hd; d += 8) {
      const __m256 qd = _mm256_loadu_ps(q + d);
      for (int jj = 0; jj < 8; ++jj) a[jj] = _mm256_fmadd_ps(qd, _mm256_loadu_ps(k + (j + jj) * stride + d), a[jj]);
    }
    // [a0 a1 a2 a3 | a0 a1 a2 a3] partial sums, then [a4..a7 | a4..a7]; adding the 128-bit halves finishes them.
    const __m256 low = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
    const __m256 high = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
    const __m256 dots = _mm256_add_ps(_mm256_permute2f128_ps(low, high, 0x20), _mm256_permute2f128_ps(low, high, 0x31));
    _mm256_storeu_ps(s + j, _mm256_mul_ps(dots, vscale));
  }
  scores_generic(q, k + j * stride, stride, hd, n - j, scale, s + j);
}

// Up to 32 output lanes (M vectors) stay in registers over all n rows, in two sets of accumulators (even and odd
// rows) so that consecutive FMAs into one register do not wait for each other.
template <int M>
void weighted_sum_avx2_lanes(const float* w, const float* v, int64_t stride, int64_t n, float* acc) {
  __m256 even[M], odd[M];
  for (int i = 0; i < M; ++i) even[i] = odd[i] = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 2 <= n; j += 2) {
    const __m256 w0 = _mm256_broadcast_ss(w + j), w1 = _mm256_broadcast_ss(w + j + 1);
    const float* v0 = v + j * stride;
    for (int i = 0; i < M; ++i) {
      even[i] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(v0 + 8 * i), even[i]);
      odd[i] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(v0 + stride + 8 * i), odd[i]);
    }
  }
  if (j < n) {
    const __m256 w0 = _mm256_broadcast_ss(w + j);
    for (int i = 0; i < M; ++i) even[i] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(v + j * stride + 8 * i), even[i]);
  }
  for (int i = 0; i < M; ++i) _mm256_storeu_ps(acc + 8 * i, _mm256_add_ps(even[i], odd[i]));
}

void weighted_sum_avx2(const float* w, const float* v, int64_t stride, int64_t hd, int64_t n, float* acc) {
  int64_t d = 0;
  for (; d + 32 <= hd; d += 32) weighted_sum_avx2_lanes<4>(w, v + d, stride, n, acc + d);
  switch ((hd - d) / 8) {
    case 3: return weighted_sum_avx2_lanes<3>(w, v + d, stride, n, acc + d);
    case 2: return weighted_sum_avx2_lanes<2>(w, v + d, stride, n, acc + d);
    case 1: return weighted_sum_avx2_lanes<1>(w, v + d, stride, n, acc + d);
    default: return;
  }
}
#endif

template <typename T>
void scores(const T* q, const T* k, int64_t stride, int64_t hd, int64_t n, T scale, T* s) {
#ifdef OPENJAMBA_ATTEND_AVX2
  if constexpr (std::is_same_v<T, float>) {
    if (hd % 8 == 0) return scores_avx2(q, k, stride, hd, n, scale, s);
  }
#endif
  scores_generic(q, k, stride, hd, n, scale, s);
}

template <typename T>
void weighted_sum(const T* w, const T* v, int64_t stride, int64_t hd, int64_t n, T* acc) {
#ifdef OPENJAMBA_ATTEND_AVX2
  if constexpr (std::is_same_v<T, float>) {
    if (hd % 8 == 0) return weighted_sum_avx2(w, v, stride, hd, n, acc);
  }
#endif
  weighted_sum_generic(w, v, stride, hd, n, acc);
}

// Keys [t0, t1) of head h of batch row b, for every query row of the head.
template <typename T>
void attend_block(const AttendArgs& a, int64_t b, int64_t h, int64_t t0, int64_t t1, const Partial<T>& p,
                  std::vector<T>& buffer) {
  const int64_t hd = a.head_dim, n = t1 - t0;
  const T* q = static_cast<const T*>(a.q) + b * a.q_batch_stride + h * a.q_head_stride;
  const T* k = static_cast<const T*>(a.k) + b * a.k_batch_stride + h * a.k_head_stride + t0 * a.k_token_stride;
  const T* v = static_cast<const T*>(a.v) + b * a.v_batch_stride + h * a.v_head_stride + t0 * a.v_token_stride;
  // Scores in the exponent's own base (Math<T>::exp_scaled), so the exponentials below need no extra multiply.
  const T scale = Math<T>::exp_scale / std::sqrt(static_cast<T>(hd));
  buffer.resize(n);
  T* s = buffer.data();
  for (int64_t r = 0; r < a.rows; ++r) {  // the block's K and V rows stay in cache across the query rows
    scores(q + r * a.q_row_stride, k, a.k_token_stride, hd, n, scale, s);
    T m = -std::numeric_limits<T>::infinity();
#pragma omp simd reduction(max : m)
    for (int64_t j = 0; j < n; ++j) m = s[j] > m ? s[j] : m;
    T total = 0;
#pragma omp simd reduction(+ : total)
    for (int64_t j = 0; j < n; ++j) {
      s[j] = Math<T>::exp_scaled(s[j] - m);
      total += s[j];
    }
    p.max[r] = m;
    p.sum[r] = total;
    weighted_sum(s, v, a.v_token_stride, hd, n, p.acc + r * hd);
  }
}

template <typename T>
void attend(const AttendArgs& a) {
  const int64_t R = a.rows, hd = a.head_dim;
  const int64_t blocks = (a.length + a.block - 1) / a.block, heads = a.batch * a.kv_heads;
  // Partials of every (batch, head, block): [heads][blocks] x (max [R], sum [R], acc [R][hd]).
  std::vector<T> partials(heads * blocks * R * (hd + 2));
  auto partial = [&](int64_t bh, int64_t blk) {
    T* base = partials.data() + (bh * blocks + blk) * R * (hd + 2);
    return Partial<T>{base, base + R, base + 2 * R};
  };
#pragma omp parallel num_threads(a.threads)
  {
    std::vector<T> buffer;  // one block's scores, per thread
#pragma omp for schedule(static)
    for (int64_t item = 0; item < heads * blocks; ++item) {
      const int64_t bh = item / blocks, blk = item % blocks;
      const int64_t t0 = blk * a.block, t1 = std::min(a.length, t0 + a.block);
      attend_block<T>(a, bh / a.kv_heads, bh % a.kv_heads, t0, t1, partial(bh, blk), buffer);
    }
  }
  // Merge: out_r = sum_blk e^(max_blk - M) acc_blk / sum_blk e^(max_blk - M) sum_blk, M the largest block maximum.
#pragma omp parallel for num_threads(std::min<int64_t>(a.threads, heads)) schedule(static)
  for (int64_t bh = 0; bh < heads; ++bh) {
    T* out = static_cast<T*>(a.out) + bh * R * hd;
    for (int64_t r = 0; r < R; ++r) {
      T m = -std::numeric_limits<T>::infinity();
      for (int64_t blk = 0; blk < blocks; ++blk) m = std::max(m, partial(bh, blk).max[r]);
      T total = 0;
      T* o = out + r * hd;
      std::fill(o, o + hd, T(0));
      for (int64_t blk = 0; blk < blocks; ++blk) {
        const Partial<T> p = partial(bh, blk);
        const T w = Math<T>::exp_scaled(p.max[r] - m);
        total += w * p.sum[r];
        const T* acc = p.acc + r * hd;
#pragma omp simd
        for (int64_t d = 0; d < hd; ++d) o[d] += w * acc[d];
      }
      const T inv = T(1) / total;
#pragma omp simd
      for (int64_t d = 0; d < hd; ++d) o[d] *= inv;
    }
  }
}

}  // namespace

extern "C" {

void attend_to_all_f32(const AttendArgs* a) { attend<float>(*a); }
void attend_to_all_f64(const AttendArgs* a) { attend<double>(*a); }

}  // extern "C"
