// Products with int8 / int4 weight-only quantized matrices: y = x W^T (+ bias), W in openjamba.quant's documented
// layout (docs/quantization.md), read where it lies:
//
//   int8  q: int8 (out, in), scales fp32 (out,)                 W[n, k] = q[n, k] * scales[n]
//   int4  q: uint8 (out, in/2), scales, zeros bf16 (out, in/g)  W[n, k] = (q[n, k] - 8) * scales[n, g] + zeros[n, g]
//         (two values per byte: column 2j in the low nibble, 2j+1 in the high one; g = k / group)
//
//   x: (rows, in) fp32 with row stride x_stride;  y: (rows, out) with row stride y_stride;  bias: (out,) or null
//   gathered: W is a stack (E, out, in) and row r of x uses matrix index[r] (a decode step's MoE experts)
//
// Activations are quantized per row to int8 in blocks (as llama.cpp's Q8 activations), so the products are
// integer dot products (AVX-512 VNNI `vpdpbusd`, 64 byte products per instruction: quant_vnni.h):
//   int8 weights: blocks of 32 inputs, x[k] ~ xs[b] * xq[k] with xs[b] = max|x in b| / 127, xq in [-127, 127];
//   int4 weights: blocks of one weight group (the group's scale and zero then apply to one integer sum).
// Per block the integer dot is exact; blocks are summed in fp32. `qlinear_quantize_*` exposes the activation
// quantization so the tests can check the kernel exactly against the same arithmetic in PyTorch.
//
// Decoding reads every weight once per token, so the work is split by output rows over threads in work items of
// about 1 MB, each read as a few sequential streams (see `for_row_blocks`), as linear.cpp does for fp32. For more
// than a few rows of x the rows are taken in passes over a block of weight rows that stays in L1, so W still streams
// from memory once.
//
// Without AVX-512 VNNI/BW (selected at compile time) the same arithmetic runs with AVX2 and FMA where the build has
// them (quant_avx2.h; AVX-512 CPUs without VNNI, such as Skylake-X, too), else as plain C++ loops the compiler
// vectorises for whatever the build targets.

#include <algorithm>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "common.h"
#include "quant_linear.h"

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define OPENJAMBA_VNNI 1
#else
#define OPENJAMBA_VNNI 0
#endif
#if defined(__AVX2__) && defined(__FMA__) && !OPENJAMBA_VNNI
#define OPENJAMBA_QUANT_AVX2 1
#else
#define OPENJAMBA_QUANT_AVX2 0
#endif

namespace {

constexpr int ROWS = 4;        // weight rows per inner step (at most; see int4_products)
constexpr int X_PASS = 4;      // rows of x per pass over a block of weight rows
constexpr int INT8_BLOCK = 32;  // activation block of int8 weights
constexpr int PIECE = 128;     // int4 columns per 64-byte piece of a weight row
constexpr int64_t ITEM_BYTES = 1 << 20;  // weight bytes per work item
constexpr int64_t SHORT_ROW = 512;  // int4 rows of at most this many inputs take ROWS per step even for one row of x
constexpr int PAD = 64;        // bytes after each quantized activation row (vector loads may run past the end)

// Quantized activation rows, each starting on a 64-byte boundary (its stride `in + PAD` rounded up to 64): the
// kernels read x in 64-byte vectors beside each weight vector, and on Zen 4 a vector that straddles two cache lines
// (a heap block is only 16-byte aligned) made the int4 one-row product ~1.25x slower from L2 (see docs/benchmarks.md).
struct ActivationRows {
  int64_t stride;
  std::vector<int8_t> bytes;
  ActivationRows(int64_t rows, int64_t in) : stride((in + PAD + 63) / 64 * 64), bytes(rows * stride + 63) {}
  int8_t* row(int64_t r) {
    const uintptr_t base = reinterpret_cast<uintptr_t>(bytes.data());
    return bytes.data() + ((64 - base % 64) % 64) + r * stride;
  }
};

inline float round_even(float v) { return std::nearbyint(v); }  // the default rounding mode: half to even

inline float bf16(uint16_t b) { return openjamba::bits_to_float(static_cast<uint32_t>(b) << 16); }

// Quantize `n` values of x in one block: xq[k] = round(x[k] * 127 / amax); returns amax / 127 (0 for a zero block).
// With AVX-512 (n a multiple of 16, as every block is) the same operations 16 at a time: the maximum is exact in any
// order and each value is rounded alone (vcvtps2dq rounds half to even, as nearbyint), so the bits are the same.
// With AVX2 (n a multiple of 32) likewise, 8 at a time (quant_avx2.h).
inline float quantize_block_avx2(const float* x, int64_t n, int8_t* xq, int32_t* sum);
inline float quantize_block(const float* x, int64_t n, int8_t* xq, int32_t* sum) {
#if OPENJAMBA_QUANT_AVX2
  if (n % 32 == 0) return quantize_block_avx2(x, n, xq, sum);
#endif
#if defined(__AVX512F__) && defined(__AVX512BW__)
  if (n % 16 == 0) {
    __m512 m = _mm512_setzero_ps();
    for (int64_t k = 0; k < n; k += 16) m = _mm512_max_ps(_mm512_abs_ps(_mm512_loadu_ps(x + k)), m);  // NaN: skipped
    const float amax = _mm512_reduce_max_ps(m);
    const __m512 inv = _mm512_set1_ps(amax > 0.0f ? 127.0f / amax : 0.0f);
    __m512i s = _mm512_setzero_si512();
    for (int64_t k = 0; k < n; k += 16) {
      const __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(x + k), inv));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(xq + k), _mm512_cvtepi32_epi8(v));
      s = _mm512_add_epi32(s, v);
    }
    *sum = _mm512_reduce_add_epi32(s);
    return amax / 127.0f;
  }
#endif
  float amax = 0.0f;
  for (int64_t k = 0; k < n; ++k) amax = std::max(amax, std::fabs(x[k]));
  const float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
  int32_t s = 0;
  for (int64_t k = 0; k < n; ++k) {
    const int32_t v = static_cast<int32_t>(round_even(x[k] * inv));
    xq[k] = static_cast<int8_t>(v);
    s += v;
  }
  *sum = s;
  return amax / 127.0f;
}

// One row of x quantized for the int8 kernel: xq (in + PAD bytes, zero past `in`), block scales, and (for the VNNI
// path, which multiplies q + 128 as unsigned bytes) 128 * sum_b xs[b] * sum(xq in b).
struct Int8Row {
  int8_t* xq;
  float* xs;  // (in / INT8_BLOCK)
  float offset;
};

void quantize_int8_row(const float* x, int64_t in, Int8Row& row) {
  std::memset(row.xq + in, 0, PAD);
  double offset = 0.0;
  for (int64_t b = 0; b < in / INT8_BLOCK; ++b) {
    int32_t sum;
    row.xs[b] = quantize_block(x + b * INT8_BLOCK, INT8_BLOCK, row.xq + b * INT8_BLOCK, &sum);
    offset += static_cast<double>(row.xs[b]) * sum;
  }
  row.offset = static_cast<float>(128.0 * offset);
}

// One row of x quantized for the int4 kernel, in blocks of `group`, laid out in pieces of PIECE columns (the last
// piece of a row may be shorter, a multiple of 32): within a piece of P columns its P/2 even columns come first, then
// its P/2 odd ones, matching the low and high nibbles of the piece's P/2 weight bytes. xsum[g] = xs[g] * sum(xq in g)
// carries the zeros. `tmp`: `in` bytes of workspace.
struct Int4Row {
  int8_t* xq;
  float *xs, *xsum;  // (in / group) each
};

void quantize_int4_row(const float* x, int64_t in, int64_t group, int8_t* tmp, Int4Row& row) {
  std::memset(row.xq + in, 0, PAD);
  for (int64_t g = 0; g < in / group; ++g) {
    int32_t sum;
    row.xs[g] = quantize_block(x + g * group, group, tmp + g * group, &sum);
    row.xsum[g] = row.xs[g] * static_cast<float>(sum);
  }
  for (int64_t p0 = 0; p0 < in; p0 += PIECE) {
    const int64_t P = std::min<int64_t>(PIECE, in - p0);
    int8_t* dst = row.xq + p0;
#if defined(__AVX512VBMI__)
    if (P == PIECE) {  // bytes 0, 2, .. 126 of the two 64-byte halves, then 1, 3, .. 127
      const __m512i even = _mm512_set_epi8(126, 124, 122, 120, 118, 116, 114, 112, 110, 108, 106, 104, 102, 100, 98,
                                           96, 94, 92, 90, 88, 86, 84, 82, 80, 78, 76, 74, 72, 70, 68, 66, 64, 62, 60,
                                           58, 56, 54, 52, 50, 48, 46, 44, 42, 40, 38, 36, 34, 32, 30, 28, 26, 24, 22,
                                           20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
      const __m512i odd = _mm512_add_epi8(even, _mm512_set1_epi8(1));
      const __m512i a = _mm512_loadu_si512(tmp + p0), b = _mm512_loadu_si512(tmp + p0 + 64);
      _mm512_storeu_si512(dst, _mm512_permutex2var_epi8(a, even, b));
      _mm512_storeu_si512(dst + 64, _mm512_permutex2var_epi8(a, odd, b));
      continue;
    }
#endif
    for (int64_t j = 0; j < P / 2; ++j) {
      dst[j] = tmp[p0 + 2 * j];
      dst[P / 2 + j] = tmp[p0 + 2 * j + 1];
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Dot products of ROWS (int4: R) weight rows with M quantized rows of x: out[m][r] (before the per-row int8 scale).

#if OPENJAMBA_VNNI

#include "quant_vnni.h"

#elif OPENJAMBA_QUANT_AVX2

#include "quant_avx2.h"

#else  // plain C++: per block, an integer dot product, then one fp32 multiply-add

template <int M>
inline void int8_rows(const int8_t* const* w, const Int8Row* x, int64_t in, float out[X_PASS][ROWS]) {
  for (int r = 0; r < ROWS; ++r)
    for (int m = 0; m < M; ++m) {
      float acc = 0.0f;
      for (int64_t b = 0; b < in / INT8_BLOCK; ++b) {
        const int8_t* wb = w[r] + b * INT8_BLOCK;
        const int8_t* xb = x[m].xq + b * INT8_BLOCK;
        int32_t dot = 0;
        for (int k = 0; k < INT8_BLOCK; ++k) dot += static_cast<int32_t>(wb[k]) * xb[k];
        acc += x[m].xs[b] * static_cast<float>(dot);
      }
      out[m][r] = acc;
    }
}

// int4: per group, the integer sum over its columns, piece by piece (a group of 32 or 64 lies in one piece; one of
// 256 or more spans several), each piece's stretch of weight bytes against its even and odd activations.
template <int M, bool SMALL, int R>
inline void int4_rows(const uint8_t* const* w, const uint16_t* const* scales, const uint16_t* const* zeros,
                      const Int4Row* x, int64_t in, int64_t group, float out[X_PASS][ROWS]) {
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) {
      float acc = 0.0f;
      for (int64_t g = 0; g < in / group; ++g) {
        int32_t dot = 0;
        for (int64_t c = g * group; c < (g + 1) * group;) {
          const int64_t p0 = c / PIECE * PIECE, half = std::min<int64_t>(PIECE, in - p0) / 2;
          const int64_t stop = std::min((g + 1) * group, p0 + PIECE);
          const uint8_t* wb = w[r] + c / 2;
          const int8_t* xe = x[m].xq + p0 + (c - p0) / 2;
          const int8_t* xo = xe + half;
          for (int64_t j = 0; j < (stop - c) / 2; ++j) dot += (wb[j] & 15) * xe[j] + (wb[j] >> 4) * xo[j];
          c = stop;
        }
        const float sg = bf16(scales[r][g]);
        acc += sg * x[m].xs[g] * static_cast<float>(dot) + (bf16(zeros[r][g]) - 8.0f * sg) * x[m].xsum[g];
      }
      out[m][r] = acc;
    }
}

#endif

// ---------------------------------------------------------------------------------------------------------------
// Threading and the two entry points.

struct QArgs {
  const float* x;
  const void *q, *scales, *zeros;  // scales: fp32 (int8) or bf16 (int4); zeros: bf16
  const float* bias;
  const int64_t* index;
  float* y;
  int64_t rows, in, out, group, x_stride, y_stride, threads;
  bool team = false;  // called by every thread of the caller's parallel region (qlinear_team)
};

// Work items: slices of whole steps of R output rows, about ITEM_BYTES of weights each, at least four per thread
// when threaded, taken as threads come free (a descheduled thread delays one item, not its share). When threaded,
// the last `threads` items' rows are cut into quarters, so that the threads finish a product within about a quarter
// item of each other (a decode step runs a few hundred products per token; a whole 1 MB item left to one thread at
// the end of each costs it a few milliseconds per token).
// Within an item the R rows of a step come from R consecutive stretches of the item, one row further into each at
// every step, so each of the R streams reads W straight through across rows: a quantized row is short (2.5 KB
// int8, 1.25 KB int4 at 2560 inputs), and a stream that jumped to a new place at every row would make the hardware
// prefetcher ramp up again each time. Read so, W needs no software prefetch (it only slowed the products).
// A row's result does not depend on which rows share its step, nor on the items or the thread count.
template <int R, typename Block>
void for_row_blocks(const QArgs& a, int64_t row_bytes, Block block) {
  static_assert(R <= ROWS, "steps of at most ROWS rows");
  const int64_t units = (a.out + R - 1) / R;  // steps of R rows
  int64_t n = std::max<int64_t>(1, a.out * row_bytes / ITEM_BYTES);
  if (a.threads > 1) n = std::max<int64_t>(n, 4 * a.threads);
  n = std::min(n, units);
  const int64_t per = (units + n - 1) / n, whole = (units + per - 1) / per;
  const int64_t head = a.threads > 1 ? std::max<int64_t>(0, whole - a.threads) : whole;  // items of `per` steps
  const int64_t tail_per = a.threads > 1 ? (per + 3) / 4 : per, head_units = std::min(units, head * per);
  const int64_t items = head + (units - head_units + tail_per - 1) / tail_per;
  auto item = [&](int64_t i) {
    const int64_t u0 = i < head ? i * per : head_units + (i - head) * tail_per;
    const int64_t u1 = std::min(units, i < head ? u0 + per : u0 + tail_per);
    const int64_t j0 = u0 * R, j1 = std::min(a.out, u1 * R), stretch = (j1 - j0 + R - 1) / R;
    for (int64_t t = 0; t < stretch; ++t) {
      int64_t js[ROWS];
      int nr = 0;
      for (int r = 0; r < R; ++r)
        if (j0 + r * stretch + t < j1) js[nr++] = j0 + r * stretch + t;
      block(js, nr);
    }
  };
  if (a.team) {  // the caller's threads share the items; it waits for them where it needs the result
#pragma omp for schedule(dynamic, 1) nowait
    for (int64_t i = 0; i < items; ++i) item(i);
    return;
  }
  if (a.threads <= 1 || items == 1) {
    for (int64_t i = 0; i < items; ++i) item(i);
    return;
  }
#pragma omp parallel for num_threads(a.threads) schedule(dynamic, 1)
  for (int64_t i = 0; i < items; ++i) item(i);
}

// The rows of x that go through one matrix in one pass: all of them, or (gathered) the one row that chose it.
struct Pass {
  int64_t first, count, matrix;
};

std::vector<Pass> passes(const QArgs& a) {
  std::vector<Pass> out;
  for (int64_t r = 0; r < a.rows; r += (a.index ? 1 : X_PASS))
    out.push_back({r, a.index ? 1 : std::min<int64_t>(X_PASS, a.rows - r), a.index ? a.index[r] : 0});
  return out;
}

inline void store(const QArgs& a, const Pass& p, const int64_t* js, int nr, const float out[X_PASS][ROWS],
                  const float* row_scale) {
  for (int64_t m = 0; m < p.count; ++m)
    for (int r = 0; r < nr; ++r) {
      const int64_t j = js[r];
      const float v = row_scale ? row_scale[j] * out[m][r] : out[m][r];
      a.y[(p.first + m) * a.y_stride + j] = v + (a.bias ? a.bias[j] : 0.0f);
    }
}

void linear_int8(const QArgs& a) {
  ActivationRows xq(a.rows, a.in);
  std::vector<float> xs(a.rows * (a.in / INT8_BLOCK));
  std::vector<Int8Row> xrows(a.rows);
  for (int64_t r = 0; r < a.rows; ++r) {
    xrows[r] = {xq.row(r), xs.data() + r * (a.in / INT8_BLOCK), 0.0f};
    quantize_int8_row(a.x + r * a.x_stride, a.in, xrows[r]);
  }
  const std::vector<Pass> todo = passes(a);
  const int8_t* q = static_cast<const int8_t*>(a.q);
  for_row_blocks<ROWS>(a, a.in, [&](const int64_t* js, int nr) {
    for (const Pass& p : todo) {
      const int8_t* wq = q + p.matrix * a.out * a.in;
      const int8_t* w[ROWS];
      for (int r = 0; r < ROWS; ++r) w[r] = wq + js[std::min(r, nr - 1)] * a.in;  // short steps repeat a row
      float out[X_PASS][ROWS];
      const Int8Row* x = xrows.data() + p.first;
      switch (p.count) {
        case 1: int8_rows<1>(w, x, a.in, out); break;
        case 2: int8_rows<2>(w, x, a.in, out); break;
        case 3: int8_rows<3>(w, x, a.in, out); break;
        default: int8_rows<4>(w, x, a.in, out); break;
      }
      store(a, p, js, nr, out, static_cast<const float*>(a.scales) + p.matrix * a.out);
    }
  });
}

// int4_rows (int4_short_rows for short rows) for a pass of `count` rows of x.
template <bool SMALL, int R>
inline void int4_pass(int64_t count, const uint8_t* const* w, const uint16_t* const* s, const uint16_t* const* z,
                      const Int4Row* x, int64_t in, int64_t group, float out[X_PASS][ROWS]) {
#if OPENJAMBA_VNNI
  if constexpr (SMALL && R == ROWS) {
    if (short_int4_rows(in, group)) {
      switch (count) {
        case 1: int4_short_rows<1>(w, s, z, x, in, group, out); return;
        case 2: int4_short_rows<2>(w, s, z, x, in, group, out); return;
        case 3: int4_short_rows<3>(w, s, z, x, in, group, out); return;
        default: int4_short_rows<4>(w, s, z, x, in, group, out); return;
      }
    }
  }
#elif OPENJAMBA_QUANT_AVX2
  if constexpr (SMALL && R == ROWS)
    if (short_int4_rows(in, group)) return int4_short_pass(count, w, s, z, x, in, group, out);
#endif
  switch (count) {
    case 1: int4_rows<1, SMALL, R>(w, s, z, x, in, group, out); break;
    case 2: int4_rows<2, SMALL, R>(w, s, z, x, in, group, out); break;
    case 3: int4_rows<3, SMALL, R>(w, s, z, x, in, group, out); break;
    default: int4_rows<4, SMALL, R>(w, s, z, x, in, group, out); break;
  }
}

// One row of x streams the weight rows two at a time: with four, a one-row product read its weights and their
// scales and zeros as twelve streams, and measured 0.9x the GB/s of two (one thread from memory, 3B shapes). More
// rows of x pass over four weight rows at a time (each x vector serves more rows), and so do short weight rows
// (SHORT_ROW inputs or fewer), whose cost is each step's own work (pointers, scales, sums, stores) rather than
// their few bytes: a Mamba dt_proj (5120 x 160 in groups of 32) took 0.76x the CPU time in steps of four.
template <int R>
void int4_products(const QArgs& a, const std::vector<Pass>& todo, const Int4Row* xrows) {
  const int64_t groups = a.in / a.group;
  const uint8_t* q = static_cast<const uint8_t*>(a.q);
  for_row_blocks<R>(a, a.in / 2 + 4 * groups, [&](const int64_t* js, int nr) {
    for (const Pass& p : todo) {
      const uint8_t* w[R];
      const uint16_t *s[R], *z[R];
      for (int r = 0; r < R; ++r) {
        const int64_t n = p.matrix * a.out + js[std::min(r, nr - 1)];  // short steps repeat a row
        w[r] = q + n * (a.in / 2);
        s[r] = static_cast<const uint16_t*>(a.scales) + n * groups;
        z[r] = static_cast<const uint16_t*>(a.zeros) + n * groups;
      }
      float out[X_PASS][ROWS];
      if (a.group < PIECE)
        int4_pass<true, R>(p.count, w, s, z, xrows + p.first, a.in, a.group, out);
      else
        int4_pass<false, R>(p.count, w, s, z, xrows + p.first, a.in, a.group, out);
      store(a, p, js, nr, out, nullptr);
    }
  });
}

#if OPENJAMBA_QUANT_AVX2
// int4_products<2> for one row of x through one matrix in the default groups (a decode step's long products), the
// same steps and arithmetic (so the same bits) with nothing per step but the two rows' pointers, their dots and
// their outputs: the general step's loop over passes, its dispatch on the pass's rows and group size and `store`
// are a visible part of a step's time when the dots are AVX2's.
void int4_one_row(const QArgs& a, const Pass& p, const Int4Row* x) {
  const int64_t groups = a.in / PIECE, row_q = a.in / 2;
  const uint8_t* q = static_cast<const uint8_t*>(a.q) + p.matrix * a.out * row_q;
  const uint16_t* scales = static_cast<const uint16_t*>(a.scales) + p.matrix * a.out * groups;
  const uint16_t* zeros = static_cast<const uint16_t*>(a.zeros) + p.matrix * a.out * groups;
  float* y = a.y + p.first * a.y_stride;
  for_row_blocks<2>(a, row_q + 4 * groups, [&](const int64_t* js, int nr) {
    const int64_t j0 = js[0], j1 = js[nr - 1];  // a short step repeats its row
    const uint8_t* w[2] = {q + j0 * row_q, q + j1 * row_q};
    const uint16_t* s[2] = {scales + j0 * groups, scales + j1 * groups};
    const uint16_t* z[2] = {zeros + j0 * groups, zeros + j1 * groups};
    float out[X_PASS][ROWS];
    int4_rows<1, false, 2>(w, s, z, x + p.first, a.in, PIECE, out);
    y[j0] = out[0][0] + (a.bias ? a.bias[j0] : 0.0f);
    y[j1] = out[0][1] + (a.bias ? a.bias[j1] : 0.0f);
  });
}
#endif

void linear_int4(const QArgs& a) {
  const int64_t groups = a.in / a.group;
  ActivationRows xq(a.rows, a.in);
  std::vector<int8_t> tmp(a.in);
  std::vector<float> xs(a.rows * groups), xsum(a.rows * groups);
  std::vector<Int4Row> xrows(a.rows);
  for (int64_t r = 0; r < a.rows; ++r) {
    xrows[r] = {xq.row(r), xs.data() + r * groups, xsum.data() + r * groups};
    quantize_int4_row(a.x + r * a.x_stride, a.in, a.group, tmp.data(), xrows[r]);
  }
  const std::vector<Pass> todo = passes(a);
  const bool one_row = std::all_of(todo.begin(), todo.end(), [](const Pass& p) { return p.count == 1; });
#if OPENJAMBA_QUANT_AVX2
  if (one_row && a.in > SHORT_ROW && todo.size() == 1 && a.group == PIECE)
    return int4_one_row(a, todo[0], xrows.data());
#endif
  if (one_row && a.in > SHORT_ROW)
    int4_products<2>(a, todo, xrows.data());
  else
    int4_products<ROWS>(a, todo, xrows.data());
}

}  // namespace

extern "C" {

// x, q, scales, bias, index, y; rows, in, out, x_stride, y_stride, threads. `in` a multiple of 32.
void qlinear_int8(const void* x, const void* q, const void* scales, const void* bias, const void* index, void* y,
                  int64_t rows, int64_t in, int64_t out, int64_t x_stride, int64_t y_stride, int64_t threads) {
  linear_int8({static_cast<const float*>(x), q, scales, nullptr, static_cast<const float*>(bias),
               static_cast<const int64_t*>(index), static_cast<float*>(y), rows, in, out, 0, x_stride, y_stride,
               threads});
}

// x, q, scales (bf16), zeros (bf16), bias, index, y; rows, in, out, group, x_stride, y_stride, threads. `group` a
// multiple of 32 dividing `in`, and (when above 128) a multiple of 128.
void qlinear_int4(const void* x, const void* q, const void* scales, const void* zeros, const void* bias,
                  const void* index, void* y, int64_t rows, int64_t in, int64_t out, int64_t group, int64_t x_stride,
                  int64_t y_stride, int64_t threads) {
  linear_int4({static_cast<const float*>(x), q, scales, zeros, static_cast<const float*>(bias),
               static_cast<const int64_t*>(index), static_cast<float*>(y), rows, in, out, group, x_stride, y_stride,
               threads});
}

// A product (int8 or int4 weights, no bias, no gathering; arguments as quant_linear.h's `quantized_product`) called
// by every thread of the caller's parallel region, which share its work items (each thread quantizes the rows of x
// itself: a few microseconds, the same bits) and do not wait for each other at its end: the caller puts a barrier
// where it reads the result, so a thread done with its items goes on to the next independent work (an MLP's up
// product after its gate) instead of idling. The same bits as the call alone.
void qlinear_team(int64_t bits, int64_t group, const void* q, const void* scales, const void* zeros, const float* x,
                  float* y, int64_t rows, int64_t in, int64_t out, int64_t x_stride, int64_t y_stride,
                  int64_t threads) {
  QArgs a{x, q, scales, zeros, nullptr, nullptr, y, rows, in, out, group, x_stride, y_stride, threads};
  a.team = true;
#ifdef _OPENMP
  a.threads = omp_get_num_threads();  // the items as for a product of the team's threads
#endif
  if (bits == 8)
    linear_int8(a);
  else
    linear_int4(a);
}

// The activation quantization alone (for tests): x (rows, in) -> xq (rows, in) int8 and scales (rows, in / block).
void qlinear_quantize_activations(const void* x, void* xq, void* scales, int64_t rows, int64_t in, int64_t block) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t b = 0; b < in / block; ++b) {
      int32_t sum;
      static_cast<float*>(scales)[r * (in / block) + b] =
          quantize_block(static_cast<const float*>(x) + r * in + b * block, block,
                         static_cast<int8_t*>(xq) + r * in + b * block, &sum);
    }
}

// Rows of a quantized table dequantized (a tied embedding's lookup into the LM head's int8 / int4 tensors): out row i =
// W[ids[i]], `in` values, W[n, k] = q[n, k] * scales[n] (int8, fp32 scales) or (q[n, k] - 8) * scales[n, g] +
// zeros[n, g] (int4, bf16 scales and zeros in groups of `group`), each product and sum rounded to fp32 on its own,
// as `openjamba.quant.dequantize` computes them (so no fused multiply-add). One call instead of a dozen tensor ops per
// decoded token. Returns -1, or the position of the first id outside [0, out) (nothing written from there on).
#if defined(__GNUC__) && !defined(__clang__)
__attribute__((optimize("fp-contract=off")))
#endif
int64_t qembedding_rows(const void* ids, int64_t n, const void* q, const void* scales, const void* zeros, void* out,
                        int64_t rows, int64_t in, int64_t bits, int64_t group) {
  const int64_t* id = static_cast<const int64_t*>(ids);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t r = id[i];
    if (r < 0 || r >= rows) return i;
    float* y = static_cast<float*>(out) + i * in;
    if (bits == 8) {
      const int8_t* w = static_cast<const int8_t*>(q) + r * in;
      const float s = static_cast<const float*>(scales)[r];
      for (int64_t k = 0; k < in; ++k) y[k] = static_cast<float>(w[k]) * s;
      continue;
    }
    const uint8_t* w = static_cast<const uint8_t*>(q) + r * (in / 2);
    const uint16_t* sr = static_cast<const uint16_t*>(scales) + r * (in / group);
    const uint16_t* zr = static_cast<const uint16_t*>(zeros) + r * (in / group);
    for (int64_t g = 0; g < in / group; ++g) {
      const float s = bf16(sr[g]), z = bf16(zr[g]);
      for (int64_t k = g * group; k < (g + 1) * group; k += 2) {
        const uint8_t b = w[k / 2];
        const float lo = (static_cast<float>(b & 15) - 8.0f) * s, hi = (static_cast<float>(b >> 4) - 8.0f) * s;
        y[k] = lo + z;
        y[k + 1] = hi + z;
      }
    }
  }
  return -1;
}

// 1 when the integer dot products use AVX-512 VNNI, 0 otherwise; qlinear_avx2: 1 when they use AVX2 (quant_avx2.h).
int qlinear_vnni() { return OPENJAMBA_VNNI; }
int qlinear_avx2() { return OPENJAMBA_QUANT_AVX2; }

}  // extern "C"
