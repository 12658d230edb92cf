// Unmasked GQA attention of a few queries over a long K/V cache (a decode step), for CPUs.
//
//   q:   (batch, kv_heads, rows, head_dim)  the query heads sharing a K/V head stacked along rows (Python folds them)
//   k, v: (batch, kv_heads, length, head_dim)  any batch/head/token strides (a view of the cache buffer); in the
//         compute type, or bf16 (a bf16 model's cache: half the bytes to read, widened exactly on load)
//   out: (batch, kv_heads, rows, head_dim) contiguous
//   starts: null (every batch row sees all `length` keys), or per batch row the first key it sees (a serving batch
//         of rows with their own lengths, right-aligned in one buffer: row b's keys are [starts[b], length))
//   out_r = sum_t softmax_t(q_r . k_t / sqrt(head_dim)) v_t
//
// A decode step should be bound by reading the cache (4 flops per 8 bytes of K/V per query row), so the cache is
// read from memory once, for all the query rows of its head (flash-decoding): the keys are cut into blocks of
// `block` tokens, and each (batch, head, block) work item computes the scores of all its rows into a small buffer,
// their exponentials against each row's block maximum, and the exp-weighted sums of the block's V rows. A second
// pass merges the blocks of each (batch, head) by their maxima and sums. Blocks give the threads work at batch 1.
// A batch row's blocks are counted from its own first key, so its result is bit for bit the one it gets alone.
// With AVX2, fp32 and head sizes that are multiples of 16 use intrinsics (the *_avx2 functions), which load each
// K and V row once for all the query rows; every other case uses plain vectorisable loops, row by row.

#include <algorithm>
#include <type_traits>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

#include "attend_to_all.h"
#include "common.h"

namespace {

using namespace openjamba;

// One block's partial result for every row of its head: max score, sum of exponentials, weighted V sum.
template <typename T>
struct Partial {
  T* max;  // [rows]
  T* sum;  // [rows]
  T* acc;  // [rows][head_dim]
};

// K/V storage: the compute type itself, or bf16 (the top half of an fp32, widened exactly by a shift).
struct bf16 {
  uint16_t bits;
};
inline float widen(float x) { return x; }
inline double widen(double x) { return x; }
inline float widen(bf16 x) { return bits_to_float(static_cast<uint32_t>(x.bits) << 16); }

// s[j] = scale * (q . k_j) for the n keys k_j = k + j * stride.
template <typename T, typename KV>
void scores_generic(const T* q, const KV* k, int64_t stride, int64_t hd, int64_t n, T scale, T* s) {
  for (int64_t j = 0; j < n; ++j) {
    const KV* kj = k + j * stride;
    T dot = 0;
#pragma omp simd reduction(+ : dot)
    for (int64_t d = 0; d < hd; ++d) dot += q[d] * widen(kj[d]);
    s[j] = dot * scale;
  }
}

// acc = sum_j w[j] v_j for the n rows v_j = v + j * stride.
template <typename T, typename KV>
void weighted_sum_generic(const T* w, const KV* v, int64_t stride, int64_t hd, int64_t n, T* acc) {
  std::fill(acc, acc + hd, T(0));
  for (int64_t j = 0; j < n; ++j) {
    const KV* vj = v + j * stride;
#pragma omp simd
    for (int64_t d = 0; d < hd; ++d) acc[d] += w[j] * widen(vj[d]);
  }
}

#if defined(__AVX2__) && defined(__FMA__)
#define OPENJAMBA_ATTEND_AVX2 1

// The fp32 code below is for head sizes that are multiples of 16, with fp32 or bf16 K/V. It is organised so that
// every K and V row comes from memory once, however many query rows share it.

inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const bf16* p) {  // 8 bf16 -> 8 fp32: zero-extend to 32 bits, shift into the high half
  const __m128i half = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(half), 16));
}

// The eight dot products of q with k_0..k_7 (k_j = k + j * stride) in one vector: eight vector accumulations, then
// one transpose-and-add (hadd); a horizontal reduction per key would cost as much as its FMAs.
template <typename KV>
inline __m256 dots8_avx2(const float* q, const KV* k, int64_t stride, int64_t hd) {
  __m256 a[8];
  for (int jj = 0; jj < 8; ++jj) a[jj] = _mm256_setzero_ps();
  for (int64_t d = 0; d < hd; d += 8) {
    const __m256 qd = _mm256_loadu_ps(q + d);
    for (int jj = 0; jj < 8; ++jj) a[jj] = _mm256_fmadd_ps(qd, load8(k + jj * stride + d), a[jj]);
  }
  // [a0 a1 a2 a3 | a0 a1 a2 a3] partial sums, then [a4..a7 | a4..a7]; adding the 128-bit halves finishes them.
  const __m256 low = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
  const __m256 high = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(low, high, 0x20), _mm256_permute2f128_ps(low, high, 0x31));
}

// s[r][j] for all rows, eight keys at a time: the eight K rows stay in L1 while every query row uses them.
template <typename KV>
void block_scores_avx2(const AttendArgs& a, const float* q, const KV* k, int64_t n, float scale, float* s) {
  const __m256 vscale = _mm256_set1_ps(scale);
  int64_t j = 0;
  for (; j + 8 <= n; j += 8)
    for (int64_t r = 0; r < a.rows; ++r) {
      const __m256 dots = dots8_avx2(q + r * a.q_row_stride, k + j * a.k_token_stride, a.k_token_stride, a.head_dim);
      _mm256_storeu_ps(s + r * n + j, _mm256_mul_ps(dots, vscale));
    }
  for (int64_t r = 0; r < a.rows; ++r)  // the last n % 8 keys
    scores_generic(q + r * a.q_row_stride, k + j * a.k_token_stride, a.k_token_stride, a.head_dim, n - j, scale,
                   s + r * n + j);
}

// acc[r] = sum_j w[r][j] v_j for every row r, reading the V rows in order, each once for all the rows.
// When R rows of PR vectors (head_dim = 8 PR) fit in 8 registers (the tiny models' 2 x 32; 16 of 32 registers with
// AVX-512: 4 x 32), the sums stay there: the same multiply-adds in the same order as in L1, without a store and a
// reload between them.
template <int R, int PR, typename KV>
void weighted_sums_in_registers(const float* w, int64_t n, const KV* v, int64_t stride, float* acc) {
  __m256 sum[R][PR];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < PR; ++c) sum[r][c] = _mm256_setzero_ps();
  for (int64_t j = 0; j < n; ++j) {
    __m256 vj[PR];
    for (int c = 0; c < PR; ++c) vj[c] = load8(v + j * stride + 8 * c);
    for (int r = 0; r < R; ++r) {
      const __m256 wr = _mm256_broadcast_ss(w + r * n + j);
      for (int c = 0; c < PR; ++c) sum[r][c] = _mm256_fmadd_ps(wr, vj[c], sum[r][c]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < PR; ++c) _mm256_storeu_ps(acc + (r * PR + c) * 8, sum[r][c]);
}

// Otherwise the sums stay in L1 (rows * head_dim floats). Accumulating in registers 16 lanes at a time would read
// the V rows in strided passes instead, which measured slower from memory (4-5 GB/s against 6.5 at head size 128
// with 4 rows).
template <typename KV>
void weighted_sums_in_l1(const AttendArgs& a, const float* w, int64_t n, const KV* v, float* acc) {
  const int64_t hd = a.head_dim, R = a.rows;
  std::fill(acc, acc + R * hd, 0.0f);
  for (int64_t j = 0; j < n; ++j) {
    const KV* vj = v + j * a.v_token_stride;
    for (int64_t d = 0; d < hd; d += 16) {
      const __m256 v0 = load8(vj + d), v1 = load8(vj + d + 8);
      for (int64_t r = 0; r < R; ++r) {
        const __m256 wr = _mm256_broadcast_ss(w + r * n + j);
        float* o = acc + r * hd + d;
        _mm256_storeu_ps(o, _mm256_fmadd_ps(wr, v0, _mm256_loadu_ps(o)));
        _mm256_storeu_ps(o + 8, _mm256_fmadd_ps(wr, v1, _mm256_loadu_ps(o + 8)));
      }
    }
  }
}

template <typename KV>
void block_weighted_sums_avx2(const AttendArgs& a, const float* w, int64_t n, const KV* v, float* acc) {
  const int64_t stride = a.v_token_stride, vectors_per_row = a.head_dim / 8;  // even: head_dim % 16 == 0 here
  if (vectors_per_row == 2) {
    switch (a.rows) {
      case 1: return weighted_sums_in_registers<1, 2, KV>(w, n, v, stride, acc);
      case 2: return weighted_sums_in_registers<2, 2, KV>(w, n, v, stride, acc);
      case 3: return weighted_sums_in_registers<3, 2, KV>(w, n, v, stride, acc);
      case 4: return weighted_sums_in_registers<4, 2, KV>(w, n, v, stride, acc);
    }
  } else if (vectors_per_row == 4) {
    switch (a.rows) {
      case 1: return weighted_sums_in_registers<1, 4, KV>(w, n, v, stride, acc);
      case 2: return weighted_sums_in_registers<2, 4, KV>(w, n, v, stride, acc);
#ifdef __AVX512VL__  // 32 vector registers: 4 rows of head size 32 (16 sums) fit beside the V row
      case 3: return weighted_sums_in_registers<3, 4, KV>(w, n, v, stride, acc);
      case 4: return weighted_sums_in_registers<4, 4, KV>(w, n, v, stride, acc);
#endif
    }
  }
  weighted_sums_in_l1(a, w, n, v, acc);
}
#endif

// s[r][j] = scale * (q_r . k_j) for the block's n keys and every query row.
template <typename T, typename KV>
void block_scores(const AttendArgs& a, const T* q, const KV* k, int64_t n, T scale, T* s) {
#ifdef OPENJAMBA_ATTEND_AVX2
  if constexpr (std::is_same_v<T, float>) {
    if (a.head_dim % 16 == 0) return block_scores_avx2(a, q, k, n, scale, s);
  }
#endif
  for (int64_t r = 0; r < a.rows; ++r)
    scores_generic(q + r * a.q_row_stride, k, a.k_token_stride, a.head_dim, n, scale, s + r * n);
}

// acc[r] = sum_j w[r][j] v_j for the block's n V rows and every query row.
template <typename T, typename KV>
void block_weighted_sums(const AttendArgs& a, const T* w, int64_t n, const KV* v, T* acc) {
#ifdef OPENJAMBA_ATTEND_AVX2
  if constexpr (std::is_same_v<T, float>) {
    if (a.head_dim % 16 == 0) return block_weighted_sums_avx2(a, w, n, v, acc);
  }
#endif
  for (int64_t r = 0; r < a.rows; ++r)
    weighted_sum_generic(w + r * n, v, a.v_token_stride, a.head_dim, n, acc + r * a.head_dim);
}

// Keys [t0, t1) of head h of batch row b, for every query row of the head: the scores s [rows][n], each row's
// maximum and sum of exponentials, then the exp-weighted V sums.
template <typename T, typename KV>
void attend_block(const AttendArgs& a, int64_t b, int64_t h, int64_t t0, int64_t t1, const Partial<T>& p,
                  std::vector<T>& buffer) {
  const int64_t n = t1 - t0, R = a.rows;
  const T* q = static_cast<const T*>(a.q) + b * a.q_batch_stride + h * a.q_head_stride;
  const KV* k = static_cast<const KV*>(a.k) + b * a.k_batch_stride + h * a.k_head_stride + t0 * a.k_token_stride;
  const KV* v = static_cast<const KV*>(a.v) + b * a.v_batch_stride + h * a.v_head_stride + t0 * a.v_token_stride;
  buffer.resize(R * n);
  T* s = buffer.data();
  // Scores in the exponent's own base (Math<T>::exp_scaled), so the exponentials below need no extra multiply.
  block_scores(a, q, k, n, Math<T>::exp_scale / std::sqrt(static_cast<T>(a.head_dim)), s);
  for (int64_t r = 0; r < R; ++r) {
    T* sr = s + r * n;
    T m = -std::numeric_limits<T>::infinity();
#pragma omp simd reduction(max : m)
    for (int64_t j = 0; j < n; ++j) m = sr[j] > m ? sr[j] : m;
    T total = 0;
#pragma omp simd reduction(+ : total)
    for (int64_t j = 0; j < n; ++j) {
      sr[j] = Math<T>::exp_scaled(sr[j] - m);
      total += sr[j];
    }
    p.max[r] = m;
    p.sum[r] = total;
  }
  block_weighted_sums(a, s, n, v, p.acc);
}

template <typename T, typename KV>
void attend(const AttendArgs& a) {
  const int64_t R = a.rows, hd = a.head_dim, heads = a.batch * a.kv_heads;
  auto start = [&](int64_t b) { return a.starts ? a.starts[b] : int64_t(0); };
  auto blocks_of = [&](int64_t b) { return (a.length - start(b) + a.block - 1) / a.block; };
  int64_t blocks = 0;  // of the longest row
  for (int64_t b = 0; b < a.batch; ++b) blocks = std::max(blocks, blocks_of(b));
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
      const int64_t bh = item / blocks, blk = item % blocks, b = bh / a.kv_heads;
      const int64_t t0 = start(b) + blk * a.block, t1 = std::min(a.length, t0 + a.block);
      if (t0 < t1) attend_block<T, KV>(a, b, bh % a.kv_heads, t0, t1, partial(bh, blk), buffer);
    }
  }
  // Merge: out_r = sum_blk e^(max_blk - M) acc_blk / sum_blk e^(max_blk - M) sum_blk, M the largest block maximum.
#pragma omp parallel for num_threads(std::min<int64_t>(a.threads, heads)) schedule(static)
  for (int64_t bh = 0; bh < heads; ++bh) {
    const int64_t own_blocks = blocks_of(bh / a.kv_heads);
    T* out = static_cast<T*>(a.out) + bh * R * hd;
    for (int64_t r = 0; r < R; ++r) {
      T m = -std::numeric_limits<T>::infinity();
      for (int64_t blk = 0; blk < own_blocks; ++blk) m = std::max(m, partial(bh, blk).max[r]);
      T total = 0;
      T* o = out + r * hd;
      std::fill(o, o + hd, T(0));
      for (int64_t blk = 0; blk < own_blocks; ++blk) {
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

void attend_to_all_f32(const openjamba::AttendArgs* a) { attend<float, float>(*a); }
void attend_to_all_f64(const openjamba::AttendArgs* a) { attend<double, double>(*a); }
// bf16 K/V (a bf16 model's cache), computed in fp32, or in fp64 for exact tests.
void attend_to_all_bf16_f32(const openjamba::AttendArgs* a) { attend<float, bf16>(*a); }
void attend_to_all_bf16_f64(const openjamba::AttendArgs* a) { attend<double, bf16>(*a); }

}  // extern "C"
