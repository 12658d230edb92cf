// Matrix-vector products for decoding: y = x W^T (+ bias) for a few rows of x, streaming W once at memory speed.
//
//   x: (rows, in) with row stride x_stride;  W: (out, in) contiguous;  bias: (out,) or null;  y: (rows, out)
//   gathered: W is a stack (E, out, in) and row r of x uses matrix index[r] (a decode step's MoE experts)
//
// A one-token step reads every weight once and does two flops per weight, so it is bound by memory bandwidth:
// the work is split by output rows over threads (each streams its own contiguous slice of W), and each thread walks
// four rows of W at once with vector accumulators (four independent streams keep the prefetchers busy). The vectors
// are GCC/clang vector types, so the same code compiles to AVX-512, AVX2 or SSE, whatever the build targets.

#include <algorithm>

#include "common.h"

namespace {

using namespace openjamba;

constexpr int ROWS = 4;        // rows of W per inner step
constexpr int MAX_X_ROWS = 4;  // rows of x handled in one pass over W

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

template <typename T>
inline T hsum(typename Vec<T>::type v) {
  T s = T(0);
  for (int i = 0; i < Vec<T>::lanes; ++i) s += v[i];
  return s;
}

// y[m][j0 + r] for r < nr (nr <= ROWS) and m < M: dot products of nr rows of W with M rows of x.
template <typename T, int M>
inline void dot_rows(const T* const* x, const T* w, int64_t in, int nr, T out[MAX_X_ROWS][ROWS]) {
  using V = typename Vec<T>::type;
  constexpr int L = Vec<T>::lanes;
  V acc[ROWS][M] = {};
  const T* wr[ROWS];
  for (int r = 0; r < ROWS; ++r) wr[r] = w + std::min(r, nr - 1) * in;  // short blocks repeat their last row
  const int64_t vec_end = in / L * L;
  for (int64_t k = 0; k < vec_end; k += L) {
    V xv[M];
    for (int m = 0; m < M; ++m) xv[m] = load(x[m] + k);
    for (int r = 0; r < ROWS; ++r) {
      const V wv = load(wr[r] + k);
      for (int m = 0; m < M; ++m) acc[r][m] += wv * xv[m];
    }
  }
  for (int r = 0; r < ROWS; ++r)
    for (int m = 0; m < M; ++m) {
      T s = hsum<T>(acc[r][m]);
      for (int64_t k = vec_end; k < in; ++k) s += wr[r][k] * x[m][k];
      out[m][r] = s;
    }
}

// Output rows [j0, j1) of M rows of x against matrix w (out, in).
template <typename T, int M>
void rows_range(const T* const* x, const T* w, const T* bias, T* const* y, int64_t in, int64_t j0, int64_t j1) {
  T out[MAX_X_ROWS][ROWS];
  for (int64_t j = j0; j < j1; j += ROWS) {
    const int nr = static_cast<int>(std::min<int64_t>(ROWS, j1 - j));
    dot_rows<T, M>(x, w + j * in, in, nr, out);
    for (int m = 0; m < M; ++m)
      for (int r = 0; r < nr; ++r) y[m][j + r] = out[m][r] + (bias ? bias[j + r] : T(0));
  }
}

template <typename T>
void rows_range_any(int M, const T* const* x, const T* w, const T* bias, T* const* y, int64_t in, int64_t j0,
                    int64_t j1) {
  switch (M) {
    case 1: return rows_range<T, 1>(x, w, bias, y, in, j0, j1);
    case 2: return rows_range<T, 2>(x, w, bias, y, in, j0, j1);
    case 3: return rows_range<T, 3>(x, w, bias, y, in, j0, j1);
    default: return rows_range<T, 4>(x, w, bias, y, in, j0, j1);
  }
}

// Output rows of work item i of n: contiguous, in multiples of ROWS.
inline void item_range(int64_t out, int64_t n, int64_t i, int64_t& j0, int64_t& j1) {
  const int64_t blocks = (out + ROWS - 1) / ROWS;
  j0 = std::min(out, blocks * i / n * ROWS);
  j1 = std::min(out, blocks * (i + 1) / n * ROWS);
}

// Passed as plain arguments rather than a struct: a decode step makes dozens of these calls, and ctypes converts
// a few integers faster than it builds a structure.
struct LinearArgs {
  const void *x, *weight, *bias, *index;  // index: int64 (rows,), only for the gathered form
  void* y;
  int64_t rows, in, out, x_stride, y_stride, matrix_stride, threads;
};

template <typename T>
void linear(const LinearArgs& a) {
  const T* x = static_cast<const T*>(a.x);
  const T* w = static_cast<const T*>(a.weight);
  const T* bias = static_cast<const T*>(a.bias);
  T* y = static_cast<T*>(a.y);
  const int64_t* index = static_cast<const int64_t*>(a.index);
  // Several items per thread, taken as threads come free: on a loaded machine a descheduled thread then delays the
  // product by one item, not by its whole share.
  const int64_t items = a.threads == 1 ? 1 : std::min<int64_t>((a.out + ROWS - 1) / ROWS, 8 * a.threads);
#pragma omp parallel for num_threads(a.threads) schedule(dynamic, 1)
  for (int64_t i = 0; i < items; ++i) {
    int64_t j0, j1;
    item_range(a.out, items, i, j0, j1);
    if (index) {  // each row of x with its own matrix
      for (int64_t r = 0; r < a.rows; ++r) {
        const T* xr = x + r * a.x_stride;
        T* yr = y + r * a.y_stride;
        rows_range_any<T>(1, &xr, w + index[r] * a.matrix_stride, bias, &yr, a.in, j0, j1);
      }
    } else {
      for (int64_t r0 = 0; r0 < a.rows; r0 += MAX_X_ROWS) {
        const int M = static_cast<int>(std::min<int64_t>(MAX_X_ROWS, a.rows - r0));
        const T* xs[MAX_X_ROWS];
        T* ys[MAX_X_ROWS];
        for (int m = 0; m < M; ++m) {
          xs[m] = x + (r0 + m) * a.x_stride;
          ys[m] = y + (r0 + m) * a.y_stride;
        }
        rows_range_any<T>(M, xs, w, bias, ys, a.in, j0, j1);
      }
    }
  }
}

}  // namespace

extern "C" {

void linear_f32(const void* x, const void* weight, const void* bias, const void* index, void* y, int64_t rows,
                int64_t in, int64_t out, int64_t x_stride, int64_t y_stride, int64_t matrix_stride, int64_t threads) {
  linear<float>({x, weight, bias, index, y, rows, in, out, x_stride, y_stride, matrix_stride, threads});
}
void linear_f64(const void* x, const void* weight, const void* bias, const void* index, void* y, int64_t rows,
                int64_t in, int64_t out, int64_t x_stride, int64_t y_stride, int64_t matrix_stride, int64_t threads) {
  linear<double>({x, weight, bias, index, y, rows, in, out, x_stride, y_stride, matrix_stride, threads});
}

}  // extern "C"
