// Matrix products for decoding: y = x W^T (+ bias) for a few rows of x (one per sequence of a decode step),
// streaming W once at memory speed for all of them.
//
//   x: (rows, in) with row stride x_stride;  W: (out, in) contiguous;  bias: (out,) or null;  y: (rows, out)
//   gathered: W is a stack (E, out, in) and row r of x uses matrix index[r] (a decode step's MoE experts)
//
// A one-token step reads every weight once and does two flops per weight, so it is bound by memory bandwidth: the
// work is split by output rows over threads (each item a contiguous slice of W), and each thread walks several rows
// of W at once with vector accumulators. With several rows of x (a batch of sequences), a tile of ROWS_W rows of W
// times up to ROWS_X rows of x keeps ROWS_W * ROWS_X accumulators in registers, so each weight loaded feeds every
// row of x; an item's slice of W (ITEM_BYTES) stays in L2 while successive groups of ROWS_X rows pass over it. The
// vectors are GCC/clang vector types, so the same code compiles to AVX-512, AVX2 or SSE, whatever the build targets.
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

constexpr int ROWS_W_ONE = 8;   // rows of W per step with one row of x (eight streams keep the prefetchers busy)
constexpr int ROWS_W = 4;       // rows of W per step with several rows of x
constexpr int ROWS_X = 6;       // rows of x per tile: 4 x 6 accumulators + 4 weight vectors fit 32 AVX-512 registers
constexpr int64_t ITEM_BYTES = 1 << 20;        // W per work item with up to ROWS_X rows of x (one pass over W)
constexpr int64_t ITEM_BYTES_REUSED = 1 << 17;  // with more: the item stays in L2 while each group of ROWS_X passes

// Output rows [j0, j1) for M rows of x. The R rows of a tile come from R consecutive stretches of the span, one
// row further into each at every tile, so each of the R streams reads W sequentially across rows (a stream that
// restarted at every new row would make the hardware prefetcher ramp up again each time).
template <typename T, int M>
void span(const T* const* x, const T* w, const T* bias, T* const* y, int64_t in, int64_t j0, int64_t j1) {
  constexpr int R = M == 1 ? ROWS_W_ONE : ROWS_W;
  const int64_t stretch = (j1 - j0 + R - 1) / R;
  auto emit = [&](int m, int64_t j, T s) { y[m][j] = s + (bias ? bias[j] : T(0)); };
  for (int64_t t = 0; t < stretch; ++t) {
    int64_t js[R];
    const int nr = tile_rows<R>(j0, j1, stretch, t, js);
    tile<T, R, M>(x, w, in, js, nr, emit);
  }
}

// span<T, m> for a run-time m in [1, M].
template <typename T, int M = ROWS_X>
void span_rows(int m, const T* const* x, const T* w, const T* bias, T* const* y, int64_t in, int64_t j0,
               int64_t j1) {
  if constexpr (M == 1) {
    span<T, 1>(x, w, bias, y, in, j0, j1);
  } else {
    if (m == M) return span<T, M>(x, w, bias, y, in, j0, j1);
    span_rows<T, M - 1>(m, x, w, bias, y, in, j0, j1);
  }
}

// Passed as plain arguments rather than a struct: a decode step makes dozens of these calls, and ctypes converts
// a few integers faster than it builds a structure.
struct LinearArgs {
  const void *x, *weight, *bias, *index;  // index: int64 (rows,), only for the gathered form
  void* y;
  int64_t rows, in, out, x_stride, y_stride, matrix_stride, threads;
};

// Work items: slices of `per_item` rows of W (a multiple of ROWS_W_ONE), about ITEM_BYTES each, and at least four
// per thread when threaded, taken as threads come free: on a loaded machine a descheduled thread then delays the
// product by one item, not by its whole share.
struct Items {
  int64_t per_item, count;
  Items(int64_t rows, int64_t out, int64_t in, int64_t bytes, int64_t threads) {
    const int64_t unit = ROWS_W_ONE, units = (out + unit - 1) / unit;
    const int64_t item_bytes = rows <= ROWS_X ? ITEM_BYTES : ITEM_BYTES_REUSED;
    int64_t n = std::max<int64_t>(1, (out * in * bytes) / item_bytes);
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
      span<T, 1>(&xr, w + index[r] * a.matrix_stride, bias, &yr, a.in, j0, j1);
    }
    return;
  }
  for (int64_t r0 = 0; r0 < a.rows; r0 += ROWS_X) {
    const int m = static_cast<int>(std::min<int64_t>(ROWS_X, a.rows - r0));
    const T* xs[ROWS_X];
    T* ys[ROWS_X];
    for (int i = 0; i < m; ++i) {
      xs[i] = x + (r0 + i) * a.x_stride;
      ys[i] = y + (r0 + i) * a.y_stride;
    }
    span_rows<T>(m, xs, w, bias, ys, a.in, j0, j1);
  }
}

template <typename T>
void linear(const LinearArgs& a) {
  const Items items(a.index ? 1 : a.rows, a.out, a.in, sizeof(T), a.threads);
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
