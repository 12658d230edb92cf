// Matrix products for decoding: y = x W^T (+ bias) for a few rows of x (one per sequence of a decode step),
// streaming W once at memory speed for all of them.
//
//   x: (rows, in) with row stride x_stride;  W: (out, in) contiguous;  bias: (out,) or null;  y: (rows, out)
//   gathered: W is a stack (E, out, in) and row r of x uses matrix index[r] (a decode step's MoE experts)
//
// A one-token step reads every weight once and does two flops per weight, so it is bound by memory bandwidth: the
// work is split by output rows over threads (each item a contiguous slice of W), and each thread walks several rows
// of W at once with vector accumulators. With several rows of x (a batch of sequences), every row of x passes over
// each small tile of W while it is in L1, in register tiles of a few rows of W times a few rows of x (tiles.h's
// matrix_rows), so W is read from memory once per call, prefetched ahead. The vectors are GCC/clang vector types,
// so the same code compiles to AVX-512, AVX2 or SSE, whatever the build targets.
//
// Batch invariance: every output y[m][j] is summed in the same order whatever the number of rows, the tile it falls
// in and the number of threads: one vector accumulator over k (lane l takes k = l, l + lanes, ... in order), its
// lanes added in a fixed tree, then the scalar tail in order, then the bias. So a row's output bits do not depend on
// the other rows of the call (a request decodes the same tokens alone or in a batch) nor on the thread count.

#include <algorithm>

#include "common.h"
#include "tiles.h"

namespace {

using namespace openjamba;

constexpr int64_t ITEM_BYTES = 1 << 20;  // W per work item (read from memory once for all rows of x)
constexpr int64_t MAX_ROWS = 32;         // rows of x per call at most (DECODE_MAX_ROWS); more go in passes

// Passed as plain arguments rather than a struct: a decode step makes dozens of these calls, and ctypes converts
// a few integers faster than it builds a structure.
struct LinearArgs {
  const void *x, *weight, *bias, *index;  // index: int64 (rows,), only for the gathered form
  void* y;
  int64_t rows, in, out, x_stride, y_stride, matrix_stride, threads;
};

// Work items: slices of `per_item` rows of W (a multiple of TILE_W_ONE), about ITEM_BYTES each, and at least four
// per thread when threaded, taken as threads come free: on a loaded machine a descheduled thread then delays the
// product by one item, not by its whole share.
struct Items {
  int64_t per_item, count;
  Items(int64_t out, int64_t in, int64_t bytes, int64_t threads) {
    const int64_t unit = TILE_W_ONE, units = (out + unit - 1) / unit;
    int64_t n = std::max<int64_t>(1, (out * in * bytes) / ITEM_BYTES);
    if (threads > 1) n = std::max(n, 4 * threads);
    n = std::min(n, units);
    per_item = (units + n - 1) / n * unit;
    count = (out + per_item - 1) / per_item;
  }
};

template <typename T>
void item(const LinearArgs& a, int64_t j0, int64_t j1) {
  const T* x = static_cast<const T*>(a.x);
  const T* w = static_cast<const T*>(a.weight);
  const T* bias = static_cast<const T*>(a.bias);
  T* y = static_cast<T*>(a.y);
  const int64_t* index = static_cast<const int64_t*>(a.index);
  if (index) {  // each row of x with its own matrix
    for (int64_t r = 0; r < a.rows; ++r) {
      const T* xr = x + r * a.x_stride;
      T* yr = y + r * a.y_stride;
      matrix_rows<T>(w + index[r] * a.matrix_stride, a.in, j0, j1, &xr, 1,
                     [&](int64_t, int64_t j, T s) { yr[j] = s + (bias ? bias[j] : T(0)); });
    }
    return;
  }
  for (int64_t r0 = 0; r0 < a.rows; r0 += MAX_ROWS) {
    const int64_t m = std::min(MAX_ROWS, a.rows - r0);
    const T* xs[MAX_ROWS];
    for (int64_t i = 0; i < m; ++i) xs[i] = x + (r0 + i) * a.x_stride;
    T* y0 = y + r0 * a.y_stride;
    matrix_rows<T>(w, a.in, j0, j1, xs, m,
                   [&](int64_t s, int64_t j, T v) { y0[s * a.y_stride + j] = v + (bias ? bias[j] : T(0)); });
  }
}

template <typename T>
void linear(const LinearArgs& a) {
  const Items items(a.out, a.in, sizeof(T), a.threads);
  if (a.threads <= 1 || items.count == 1) {
    for (int64_t i = 0; i < items.count; ++i) item<T>(a, i * items.per_item, std::min(a.out, (i + 1) * items.per_item));
    return;
  }
#pragma omp parallel for num_threads(a.threads) schedule(dynamic, 1)
  for (int64_t i = 0; i < items.count; ++i) item<T>(a, i * items.per_item, std::min(a.out, (i + 1) * items.per_item));
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
