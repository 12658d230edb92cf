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

template <typename T>
struct Vec {
  typedef T type __attribute__((vector_size(64)));
  static constexpr int lanes = 64 / sizeof(T);
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
inline void tile(const T* const* x, const T* w, int64_t n, const int64_t* js, int nr, Emit& emit) {
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
  for (int r = 0; r < nr; ++r)
    for (int m = 0; m < M; ++m) {
      T s = sums[r * M + m];
      for (int64_t k = vec_end; k < n; ++k) s += wr[r][k] * x[m][k];
      emit(m, js[r], s);
    }
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

}  // namespace openjamba
