// The few-row product tile shared by linear.cpp and ffn_step.cpp: R rows of a weight matrix times M rows of x,
// R x M vector accumulators in registers, every sum in one fixed order (so a row's bits never depend on the other
// rows of a call, the tile it falls in, or the thread count), and the R weight rows taken from R sequential
// streams. The vectors are GCC/clang vector types: the same code compiles to AVX-512, AVX2 or SSE.

#pragma once

#include <algorithm>
#include <cstring>
#include <utility>

#include "common.h"

namespace openjamba {

// One vector register of the build: wider GCC vectors compile to pairs of registers, and a tile of them no longer
// fits the register file (AVX2 has 16).
#if defined(__AVX512F__)
constexpr int VEC_BYTES = 64;
#else
constexpr int VEC_BYTES = 32;
#endif
template <typename T>
struct Vec {
  typedef T type __attribute__((vector_size(VEC_BYTES)));
  static constexpr int lanes = VEC_BYTES / sizeof(T);
};

template <typename T>
inline typename Vec<T>::type load(const T* p) {
  typename Vec<T>::type v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// The lane sums of many vectors at once, each as one fixed tree (lane i + lane i + L/2 first, then the halves of
// those, down to one lane), by a transposing network: each level adds the halves of two vectors into one, so L
// vectors give one vector of their L sums in L - 1 vector adds (log2(L) per vector when summed one at a time).
template <int Half>
constexpr int source_lane(int out_lane, int upper) {  // a lane of (a, b) concatenated, in blocks of 2 * Half
  return out_lane / Half * 2 * Half + upper * Half + out_lane % Half;
}

template <typename T, int Half, std::size_t... Lane>
inline typename Vec<T>::type pair_sums(typename Vec<T>::type a, typename Vec<T>::type b,
                                       std::index_sequence<Lane...>) {
  return __builtin_shufflevector(a, b, source_lane<Half>(Lane, 0)...) +
         __builtin_shufflevector(a, b, source_lane<Half>(Lane, 1)...);
}

// buf[0..count) -> buf[0..count / 2), level after level, until lane i of buf[0] holds the sum of input i.
template <typename T, int Half = Vec<T>::lanes / 2>
inline void lane_sums(typename Vec<T>::type* buf, int count) {
  if constexpr (Half >= 1) {
    for (int i = 0; i < count / 2; ++i)
      buf[i] = pair_sums<T, Half>(buf[2 * i], buf[2 * i + 1], std::make_index_sequence<Vec<T>::lanes>());
    lane_sums<T, Half / 2>(buf, count / 2);
  }
}

// sums[i] = the lane sum of v[i] for i < N: the same tree for every i, whatever N.
template <typename T, int N>
inline void lane_sums_of(const typename Vec<T>::type* v, T* sums) {
  constexpr int L = Vec<T>::lanes;
  for (int g = 0; g < N; g += L) {
    typename Vec<T>::type buf[L];
    for (int i = 0; i < L; ++i) buf[i] = g + i < N ? v[g + i] : typename Vec<T>::type{};
    lane_sums<T>(buf, L);
    std::memcpy(sums + g, &buf[0], sizeof(T) * std::min(L, N - g));
  }
}

// emit(m, js[r], w_js[r] . x_m) for r < nr <= R weight rows (row length n) and M rows of x. Each sum is one chain
// of vector multiply-adds over k, then its lanes in a fixed tree (lane_sums), then the scalar tail: the same whatever R, M, nr.
template <typename T, int R, int M, typename Emit>
inline void tile(const T* const* x, const T* w, int64_t n, const int64_t* js, int nr, Emit& emit,
                 const T* const* ahead) {
  using V = typename Vec<T>::type;
  constexpr int L = Vec<T>::lanes;
  V acc[R][M] = {};
  const T* wr[R];
  for (int r = 0; r < R; ++r) wr[r] = w + js[std::min(r, nr - 1)] * n;  // a short tile repeats its last row
  const int64_t vec_end = n / L * L;
  for (int64_t k = 0; k < vec_end; k += L) {
    V wv[R];
    // Each vector loaded once and held in a register (keep_in_register): otherwise GCC folds the loads of w or of x
    // into every multiply-add that uses them, and the loop becomes load-bound (20 loads for 16 multiply-adds in a
    // 4 x 4 tile).
    // ahead: lines further on (a later tile's rows, or further along the same rows), one per row and step, into L2
    // (prefetcht1).
    for (int r = 0; r < R; ++r) __builtin_prefetch(ahead[r] + k, 0, 2);
    for (int r = 0; r < R; ++r) {
      V w_r = load(wr[r] + k);
      if constexpr (M > 1) keep_in_register(w_r);
      wv[r] = w_r;
    }
    for (int m = 0; m < M; ++m) {
      V xv = load(x[m] + k);
      if constexpr (M > 1) keep_in_register(xv);
      for (int r = 0; r < R; ++r) acc[r][m] += wv[r] * xv;
    }
  }
  T sums[R * M];
  lane_sums_of<T, R * M>(&acc[0][0], sums);
  if (vec_end < n)  // the scalar tail apart, so that the usual case (n a multiple of the lanes) emits in a tight loop
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < M; ++m)
        for (int64_t k = vec_end; k < n; ++k) sums[r * M + m] += wr[r][k] * x[m][k];
  for (int r = 0; r < nr; ++r)
    for (int m = 0; m < M; ++m) emit(m, js[r], sums[r * M + m]);
}

// R consecutive stretches of the rows [j0, j1) (R of them when the span is long enough), one tile per step t: row
// j0 + r * stretch + t of each, so each of the R streams reads w sequentially.
template <int R>
inline int tile_rows(int64_t j0, int64_t j1, int64_t stretch, int64_t t, int64_t* js) {
  int nr = 0;
  for (int r = 0; r < R; ++r)
    if (j0 + r * stretch + t < j1) js[nr++] = j0 + r * stretch + t;
  return nr;
}

constexpr int TILE_W_ONE = 8;  // weight rows per tile for one vector (eight sequential streams keep prefetchers busy)
#if defined(__AVX512F__)
constexpr int TILE_W = 4;  // weight rows per tile for several vectors
constexpr int TILE_X = 4;  // vectors per tile at most: 4 x 4 sums fill one reduction network
#else
// 16 vector registers: 3 x 4 accumulators, the 3 weight vectors and one x vector fill them exactly, with 7 loads per
// 12 multiply-adds (4 x 2 tiles: 6 loads per 8, and fewer independent sums to hide the multiply-add latency).
constexpr int TILE_W = 3;
constexpr int TILE_X = 4;
#endif
constexpr int PREFETCH_TILES = 2;  // how far ahead the weight rows are prefetched (1 to 16 measure alike)
// How far ahead each stream of a one-vector product prefetches: 1 KB measured best of 0.5, 1 and 2 KB (8192 x 2560
// and 2560 x 8192 fp32, 1 thread: 1.18-1.29x the GB/s without, on 4 KB and 2 MB pages alike).
constexpr int64_t PREFETCH_ONE_BYTES = 1024;

// tile<T, TILE_W, m> for a run-time m in [1, M].
template <typename T, int M = TILE_X, typename Emit>
inline void tile_m(int m, const T* const* x, const T* w, int64_t n, const int64_t* js, int nr, Emit& emit,
                   const T* const* ahead) {
  if constexpr (M == 1) {
    tile<T, TILE_W, 1>(x, w, n, js, nr, emit, ahead);
  } else {
    if (m == M) return tile<T, TILE_W, M>(x, w, n, js, nr, emit, ahead);
    tile_m<T, M - 1>(m, x, w, n, js, nr, emit, ahead);
  }
}

// Rows [j0, j1) of matrix w (row length n) against the vectors xs[0..count): emit(s, j, w_j . xs[s]) for each
// vector s. With several vectors, each tile of TILE_W weight rows is read from memory once (prefetched while an
// earlier tile computes) and every vector passes over it while it is in L1, in groups of at most TILE_X of nearly
// equal size (6 vectors: two groups of 3).
template <typename T, typename Emit>
void matrix_rows(const T* w, int64_t n, int64_t j0, int64_t j1, const T* const* xs, int64_t count, Emit emit) {
  if (count == 1) {
    // Each of the R streams also prefetches (into L2) the line PREFETCH_ONE_BYTES ahead of the one it reads: the
    // hardware prefetchers alone leave a one-vector product at ~0.85x of a plain read of the same memory on 2 MB
    // pages, and stop at each 4 KB page boundary on small pages.
    constexpr int R = TILE_W_ONE;
    constexpr int64_t ahead_by = PREFETCH_ONE_BYTES / sizeof(T);
    const int64_t stretch = (j1 - j0 + R - 1) / R;
    for (int64_t t = 0; t < stretch; ++t) {
      int64_t js[R];
      const int nr = tile_rows<R>(j0, j1, stretch, t, js);
      const T* ahead[R];
      for (int r = 0; r < R; ++r) ahead[r] = w + js[std::min(r, nr - 1)] * n + ahead_by;
      tile<T, R, 1>(xs, w, n, js, nr, emit, ahead);
    }
    return;
  }
  const int64_t groups = (count + TILE_X - 1) / TILE_X;
  const int64_t stretch = (j1 - j0 + TILE_W - 1) / TILE_W;
  for (int64_t t = 0; t < stretch; ++t) {
    int64_t js[TILE_W], far[TILE_W];
    const int nr = tile_rows<TILE_W>(j0, j1, stretch, t, js);
    // Every group's pass also prefetches the rows of the tile PREFETCH_TILES ahead (its own near the end), a cache
    // line of each row per step, into L2 rather than L1: 4 x 4 lines in flight per step would crowd out the tile's
    // own loads (measured at 16 vectors: prefetching into L1 gains nothing, into L2 about 25%). Every pass, not the
    // first alone, measured faster on weights streamed from memory (a repeat of a line in flight or in L2 is cheap).
    const int64_t t_far = t + PREFETCH_TILES;
    const int far_nr = t_far < stretch ? tile_rows<TILE_W>(j0, j1, stretch, t_far, far) : 0;
    const T* ahead[TILE_W];
    for (int r = 0; r < TILE_W; ++r) ahead[r] = w + (far_nr ? far[std::min(r, far_nr - 1)] : js[0]) * n;
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t s0 = count * g / groups, s1 = count * (g + 1) / groups;
      auto shifted = [&](int64_t m, int64_t j, T v) { emit(s0 + m, j, v); };
      tile_m<T>(static_cast<int>(s1 - s0), xs + s0, w, n, js, nr, shifted, ahead);
    }
  }
}

}  // namespace openjamba
