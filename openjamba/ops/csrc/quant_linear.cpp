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
// integer dot products (AVX-512 VNNI `vpdpbusd`: 64 byte products per instruction):
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

inline __mmask64 tail_mask(int64_t bytes) { return bytes >= 64 ? ~__mmask64(0) : (__mmask64(1) << bytes) - 1; }

// The sums of four vectors' lanes (GCC's _mm512_reduce_add_ps of each) at once: the same lanes added in the same
// pairs (halves, then quarters, then pairs of pairs), so the same bits, in 11 instructions instead of four times 7
// and the extracts: for a short weight row (a Mamba dt_proj's 160 inputs) these reductions were a fifth of its work.
inline void reduce4(__m512 v0, __m512 v1, __m512 v2, __m512 v3, float* out) {
  // lanes i + (8 + i): v0's eight, then v1's; v2's, then v3's
  const __m512 a = _mm512_add_ps(_mm512_shuffle_f32x4(v0, v1, 0xEE), _mm512_shuffle_f32x4(v0, v1, 0x44));
  const __m512 b = _mm512_add_ps(_mm512_shuffle_f32x4(v2, v3, 0xEE), _mm512_shuffle_f32x4(v2, v3, 0x44));
  // quarter r: v_r's lanes i + (4 + i) of those
  const __m512 c = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0xDD), _mm512_shuffle_f32x4(a, b, 0x88));
  const __m512 d = _mm512_add_ps(c, _mm512_permute_ps(c, 0x4E));  // lanes k + (k + 2)
  const __m512 e = _mm512_add_ps(d, _mm512_permute_ps(d, 0xB1));  // lane 0 + lane 1 of each quarter
  _mm_storeu_ps(out, _mm512_castps512_ps128(
      _mm512_permutexvar_ps(_mm512_set_epi32(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 12, 8, 4, 0), e)));
}

// int8: per 64 columns, (q + 128) as unsigned bytes times xq, 16 lanes of 4 products; lanes 0-7 lie in one block
// of 32 and lanes 8-15 in the next, so one vector of per-lane scales converts both.
template <int M>
inline void int8_rows(const int8_t* const* w, const Int8Row* x, int64_t in, float out[X_PASS][ROWS]) {
  __m512 acc[ROWS][M];
  for (int r = 0; r < ROWS; ++r)
    for (int m = 0; m < M; ++m) acc[r][m] = _mm512_setzero_ps();
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  const __m512i half = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
  for (int64_t k = 0; k < in; k += 64) {
    const __mmask64 mask = tail_mask(in - k);
    __m512i xv[M];
    __m512 sv[M];
    for (int m = 0; m < M; ++m) {
      xv[m] = _mm512_loadu_si512(x[m].xq + k);
      const int64_t b = k / INT8_BLOCK;
      // lanes 0-7: block b, lanes 8-15: block b + 1 (past the last block the xq are zero, any scale will do)
      const float s1 = k + INT8_BLOCK < in ? x[m].xs[b + 1] : 0.0f;
      sv[m] = _mm512_permutexvar_ps(half, _mm512_set_ps(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, s1, x[m].xs[b]));
    }
    for (int r = 0; r < ROWS; ++r) {
      const __m512i wv = _mm512_xor_si512(_mm512_maskz_loadu_epi8(mask, w[r] + k), flip);  // q + 128
      for (int m = 0; m < M; ++m) {
        const __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), wv, xv[m]);
        acc[r][m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), sv[m], acc[r][m]);
      }
    }
  }
  static_assert(ROWS == 4, "reduce4 sums four rows");
  for (int m = 0; m < M; ++m) {
    float sums[4];
    reduce4(acc[0][m], acc[1][m], acc[2][m], acc[3][m], sums);
    for (int r = 0; r < ROWS; ++r) out[m][r] = sums[r] - x[m].offset;
  }
}

// The high nibble of every byte: with GFNI one instruction (each byte times a bit matrix that shifts it right by
// 4), else a shift and a mask. One instruction fewer per 64 weight bytes and row: one-token int4 products from
// memory ~7% faster on one thread (Zen 4).
inline __m512i high_nibbles(__m512i v) {
#if defined(__GFNI__)
  return _mm512_gf2p8affine_epi64_epi8(v, _mm512_set1_epi64(0x1020408000000000LL), 0);
#else
  return _mm512_and_si512(_mm512_srli_epi16(v, 4), _mm512_set1_epi8(0x0F));
#endif
}

// int4 weights, per piece of up to 128 columns (64 weight bytes): the low nibbles against the piece's even columns
// and the high ones against its odd columns, 16 lanes of 8 columns each. A lane's integer sum lies in one group, so
// it is scaled by that group's weight scale times its activation scale. Those combined scales (and the zeros' term,
// sum over groups of (zero - 8 scale) * xsum) are computed 16 groups at a time before the chunk's pieces, so the
// piece loop does only vector work: per row and piece a load, two unpacks, two `vpdpbusd`, a convert and one
// multiply-add. SMALL: groups of 32 or 64, several per piece (each lane takes its group's scale by a permute);
// otherwise each group spans one or more whole pieces (one broadcast per group).
constexpr int CHUNK_GROUPS = 16;

inline __m512 bf16_to_f32(__mmask16 mask, const uint16_t* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, p)), 16));
}

// Groups g0 .. g0 + ng - 1 (ng <= CHUNK_GROUPS) of every weight row and row of x: their combined scales into cs, and
// their zeros' term added to acc (lane l: group g0 + l).
template <int M, int R>
inline void chunk_scales(const uint16_t* const* scales, const uint16_t* const* zeros, const Int4Row* x, int64_t g0,
                         int64_t ng, float (&cs)[R][M][CHUNK_GROUPS], __m512 (&acc)[R][M]) {
  const __mmask16 gm = static_cast<__mmask16>((1u << ng) - 1);
  #pragma GCC unroll 4
  for (int r = 0; r < R; ++r) {
    const __m512 s = bf16_to_f32(gm, scales[r] + g0);
    const __m512 zz = _mm512_fnmadd_ps(_mm512_set1_ps(8.0f), s, bf16_to_f32(gm, zeros[r] + g0));  // zero - 8 s
    #pragma GCC unroll 4
    for (int m = 0; m < M; ++m) {
      _mm512_store_ps(cs[r][m], _mm512_mul_ps(s, _mm512_maskz_loadu_ps(gm, x[m].xs + g0)));
      acc[r][m] = _mm512_fmadd_ps(zz, _mm512_maskz_loadu_ps(gm, x[m].xsum + g0), acc[r][m]);
    }
  }
}

// One piece's dot products for R weight rows: each row's weight vector (load_w(r): 128 int4 columns, two per byte)
// unpacked into its low nibbles, against the piece's first activations xe, and its high nibbles, against the next
// ones xo; acc += each lane's integer sum * scale(r, m).
template <int M, int R, typename LoadW, typename Scale>
inline void piece_dots(const __m512i (&xe)[M], const __m512i (&xo)[M], LoadW load_w, Scale scale,
                       __m512 (&acc)[R][M]) {
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  #pragma GCC unroll 4
  for (int r = 0; r < R; ++r) {
    const __m512i wv = load_w(r);
    const __m512i lo = _mm512_and_si512(wv, low4), hi = high_nibbles(wv);
    #pragma GCC unroll 4
    for (int m = 0; m < M; ++m) {
      __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, xe[m]);
      dot = _mm512_dpbusd_epi32(dot, hi, xo[m]);
      acc[r][m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), scale(r, m), acc[r][m]);
    }
  }
}

// The whole piece at column p (of x; p / 2 of the weight rows), one group's: acc += its lanes' sums * scale(r, m).
// x's two vectors are loaded once for all R weight rows and kept in registers (the compiler would otherwise fold
// them into every row's `vpdpbusd` as memory operands: 2R loads instead of 2, ~3% more time from L2, Zen 4).
template <int M, int R, typename Scale>
inline void whole_piece(const uint8_t* const* w, const Int4Row* x, int64_t p, Scale scale, __m512 (&acc)[R][M]) {
  __m512i xe[M], xo[M];
  #pragma GCC unroll 4
  for (int m = 0; m < M; ++m) {
    xe[m] = _mm512_load_si512(x[m].xq + p);
    xo[m] = _mm512_load_si512(x[m].xq + p + PIECE / 2);
    __asm__("" : "+v"(xe[m]), "+v"(xo[m]));
  }
  piece_dots<M, R>(xe, xo, [&](int r) { return _mm512_loadu_si512(w[r] + p / 2); }, scale, acc);
}

// A piece of up to 128 columns whose weights and activations are read under `mask` (groups of 32 or 64, several per
// piece, or a row's last piece): the low nibbles against the piece's first `half` activations and the high ones
// against the next `half`; scale(r, m) gives each lane its group's combined scale.
template <int M, int R, typename Scale>
inline void masked_piece(const uint8_t* const* w, const Int4Row* x, int64_t p0, int64_t half, __mmask64 mask,
                         Scale scale, __m512 (&acc)[R][M]) {
  __m512i xe[M], xo[M];
  #pragma GCC unroll 4
  for (int m = 0; m < M; ++m) {
    xe[m] = _mm512_maskz_loadu_epi8(mask, x[m].xq + p0);
    xo[m] = _mm512_maskz_loadu_epi8(mask, x[m].xq + p0 + half);
  }
  piece_dots<M, R>(xe, xo, [&](int r) { return _mm512_maskz_loadu_epi8(mask, w[r] + p0 / 2); }, scale, acc);
}

template <int M, bool SMALL, int R>
inline void int4_rows(const uint8_t* const* w, const uint16_t* const* scales, const uint16_t* const* zeros,
                      const Int4Row* x, int64_t in, int64_t group, float out[X_PASS][ROWS]) {
  __m512 acc[R][M];
  #pragma GCC unroll 4
  for (int r = 0; r < R; ++r)
    #pragma GCC unroll 4
    for (int m = 0; m < M; ++m) acc[r][m] = _mm512_setzero_ps();
  const int64_t groups = in / group;
  alignas(64) float cs[R][M][CHUNK_GROUPS];  // the chunk's combined scales
  if (!SMALL) {  // groups of 128 or a multiple: whole pieces only
    const int64_t pieces_per_group = group / PIECE;
    for (int64_t g0 = 0; g0 < groups; g0 += CHUNK_GROUPS) {
      const int64_t ng = std::min<int64_t>(CHUNK_GROUPS, groups - g0);
      chunk_scales<M, R>(scales, zeros, x, g0, ng, cs, acc);
      if (pieces_per_group == 1) {
        #pragma GCC unroll 2
        for (int64_t g = 0; g < ng; ++g)
          whole_piece<M, R>(w, x, (g0 + g) * PIECE, [&](int r, int m) { return _mm512_set1_ps(cs[r][m][g]); }, acc);
      } else {
        for (int64_t g = 0; g < ng; ++g)
          for (int64_t p = (g0 + g) * group; p < (g0 + g + 1) * group; p += PIECE)
            whole_piece<M, R>(w, x, p, [&](int r, int m) { return _mm512_set1_ps(cs[r][m][g]); }, acc);
      }
    }
  } else {
    // lane l covers columns 8l .. 8l + 7 of its piece: group l / 4 (groups of 32) or l / 8 (64) of the piece's groups
    const __m512i lane_group = _mm512_srli_epi32(
        _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0), group == 32 ? 2 : 3);
    const __mmask16 piece_groups = group == 32 ? 0xF : 0x3;
    for (int64_t g0 = 0; g0 < groups; g0 += CHUNK_GROUPS) {
      const int64_t ng = std::min<int64_t>(CHUNK_GROUPS, groups - g0);
      chunk_scales<M, R>(scales, zeros, x, g0, ng, cs, acc);
      // The chunk's pieces: whole ones, then (at the end of a row) one of 32, 64 or 96 columns. gl: the chunk's
      // group of the piece's first column.
      const int64_t end = std::min(in, (g0 + ng) * group);
      int64_t p0 = g0 * group, gl = 0;
      auto piece = [&](__mmask64 mask, int64_t half) {
        masked_piece<M, R>(w, x, p0, half, mask, [&](int r, int m) {
          return _mm512_permutexvar_ps(lane_group, _mm512_maskz_loadu_ps(piece_groups, cs[r][m] + gl));
        }, acc);
      };
      for (; p0 + PIECE <= end; p0 += PIECE, gl += PIECE / group) piece(~__mmask64(0), PIECE / 2);
      if (p0 < end) piece(tail_mask((end - p0) / 2), (end - p0) / 2);
    }
  }
  #pragma GCC unroll 4
  for (int m = 0; m < M; ++m) {  // steps of two rows reduce each row twice in one reduce4 (no more instructions)
    float sums[4];
    reduce4(acc[0][m], acc[1 % R][m], acc[2 % R][m], acc[3 % R][m], sums);
    for (int r = 0; r < R; ++r) out[m][r] = sums[r];
  }
}

// Short int4 rows (SHORT_ROW inputs or fewer) in groups of 32 or 64, ROWS at a time (a Mamba dt_proj: 160 inputs in
// groups of 32): int4_rows<M, true, ROWS>'s arithmetic in its order, so the same bits, but a row's groups are one
// chunk whose combined scales stay in registers (each piece's lanes take theirs by a permute, not through memory),
// and the four rows' sums are reduced together (reduce4): a short row's cost is its step's own work, not its bytes.
template <int M>
inline void int4_short_rows(const uint8_t* const* w, const uint16_t* const* scales, const uint16_t* const* zeros,
                            const Int4Row* x, int64_t in, int64_t group, float out[X_PASS][ROWS]) {
  constexpr int R = ROWS;
  const __mmask16 gm = static_cast<__mmask16>((1u << (in / group)) - 1);
  const __m512i lane_group = _mm512_srli_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                               group == 32 ? 2 : 3);
  __m512 acc[R][M], cs[R][M];  // cs lane g: group g's combined scale (0 past the row's groups)
  #pragma GCC unroll 4
  for (int r = 0; r < R; ++r) {
    const __m512 s = bf16_to_f32(gm, scales[r]);
    const __m512 zz = _mm512_fnmadd_ps(_mm512_set1_ps(8.0f), s, bf16_to_f32(gm, zeros[r]));  // zero - 8 s
    #pragma GCC unroll 4
    for (int m = 0; m < M; ++m) {
      cs[r][m] = _mm512_mul_ps(s, _mm512_maskz_loadu_ps(gm, x[m].xs));
      acc[r][m] = _mm512_fmadd_ps(zz, _mm512_maskz_loadu_ps(gm, x[m].xsum), _mm512_setzero_ps());
    }
  }
  for (int64_t p0 = 0; p0 < in; p0 += PIECE) {
    const int64_t half = std::min<int64_t>(PIECE, in - p0) / 2;
    const __mmask64 mask = tail_mask(half);
    const __m512i lanes = _mm512_add_epi32(lane_group, _mm512_set1_epi32(static_cast<int>(p0 / group)));
    masked_piece<M, R>(w, x, p0, half, mask, [&](int r, int m) { return _mm512_permutexvar_ps(lanes, cs[r][m]); },
                       acc);
  }
  #pragma GCC unroll 4
  for (int m = 0; m < M; ++m) {
    float sums[4];
    reduce4(acc[0][m], acc[1][m], acc[2][m], acc[3][m], sums);
    for (int r = 0; r < R; ++r) out[m][r] = sums[r];
  }
}

// Whether int4_short_rows takes a product's weight rows.
inline bool short_int4_rows(int64_t in, int64_t group) { return in <= SHORT_ROW && group < PIECE; }

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
