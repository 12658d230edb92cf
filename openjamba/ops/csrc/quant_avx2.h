// The integer dot products of quant_linear.cpp for CPUs with AVX2 and FMA but not AVX-512 VNNI (Intel laptops since
// Alder Lake, AMD up to Zen 3): the same arithmetic as its AVX-512 VNNI and plain paths (activations quantized per
// block to int8, an exact integer dot per block, blocks summed in fp32), 32 bytes at a time. A part of
// quant_linear.cpp, included by it in place of its plain loops: it uses that file's constants and row structures.
//
// AVX2 has no `vpdpbusd`; `vpmaddubsw` multiplies unsigned by signed bytes and adds pairs into int16 (saturating),
// `vpmaddwd` against ones adds pairs of those into int32 lanes:
//   int8 weights (q in [-127, 127]): |xq| (unsigned) times q with xq's sign (`vpsignb`): each product is q * xq and
//     both factors are at most 127 in magnitude, so a pair sums to at most 2 * 127 * 127 < 2^15 (no saturation).
//   int4 weights: the nibbles (0..15, unsigned) times xq: a pair is at most 2 * 15 * 127, and a piece's four such
//     int16 sums (its two weight vectors' low and high nibbles) at most 15240 < 2^15, so they add in int16 first.
// Each (weight row, row of x) has one accumulator of 8 fp32 lanes, updated in the same sequence whatever the other
// rows of its step and pass, so a row's bits depend neither on the rows of x beside it nor on the thread count.
// AVX2 has 16 vector registers: a pass takes its weight rows in sweeps of at most 8 accumulators (four weight rows
// for one or two rows of x, two for more).
//
// Included inside quant_linear.cpp's anonymous namespace, after <immintrin.h> and its row structures.

// quant_linear.cpp's quantize_block for n a multiple of 32, with the same bits: the maximum of |x| is exact in any
// order (a NaN is skipped, as std::max(amax, NaN) does: vmaxps returns its second operand when either is NaN); each
// value is multiplied by the same inverse and rounded alone (vcvtps2dq: half to even, as nearbyint), and its int8 is
// the int32's low byte (masked, then packed without saturation), as static_cast<int8_t> takes it.
inline float quantize_block_avx2(const float* x, int64_t n, int8_t* xq, int32_t* sum) {
  const __m256 magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  __m256 m[4];
  #pragma GCC unroll 4
  for (int i = 0; i < 4; ++i) m[i] = _mm256_setzero_ps();
  for (int64_t k = 0; k < n; k += 32)
    #pragma GCC unroll 4
    for (int i = 0; i < 4; ++i) m[i] = _mm256_max_ps(_mm256_and_ps(_mm256_loadu_ps(x + k + 8 * i), magnitude), m[i]);
  const __m256 m8 = _mm256_max_ps(_mm256_max_ps(m[0], m[1]), _mm256_max_ps(m[2], m[3]));
  __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(m8), _mm256_extractf128_ps(m8, 1));
  m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
  const float amax = _mm_cvtss_f32(_mm_max_ss(m4, _mm_movehdup_ps(m4)));
  const __m256 inv = _mm256_set1_ps(amax > 0.0f ? 127.0f / amax : 0.0f);
  const __m256i low_byte = _mm256_set1_epi32(0xFF), order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  __m256i s = _mm256_setzero_si256();
  for (int64_t k = 0; k < n; k += 32) {
    __m256i v[4];
    #pragma GCC unroll 4
    for (int i = 0; i < 4; ++i) {
      v[i] = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + k + 8 * i), inv));
      s = _mm256_add_epi32(s, v[i]);
      v[i] = _mm256_and_si256(v[i], low_byte);
    }
    // per 128-bit lane: bytes of v0[0..3], v1[0..3], v2[0..3], v3[0..3], then (upper lane) their 4..7
    const __m256i bytes = _mm256_packus_epi16(_mm256_packus_epi32(v[0], v[1]), _mm256_packus_epi32(v[2], v[3]));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(xq + k), _mm256_permutevar8x32_epi32(bytes, order));
  }
  __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
  s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4E));
  *sum = _mm_cvtsi128_si32(_mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xB1)));
  return amax / 127.0f;
}

constexpr int ACCUMULATORS = 8;  // per sweep: weight rows x rows of x

constexpr int sweep_rows(int rows, int m) { return rows * m <= ACCUMULATORS ? rows : ACCUMULATORS / m; }

// The sum of a vector's 8 lanes, in a fixed order.
inline float sum_lanes(__m256 v) {
  const __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
  return _mm_cvtss_f32(_mm_add_ss(s2, _mm_movehdup_ps(s2)));
}

inline __m256i sum_pairs_epi16(__m256i v) { return _mm256_madd_epi16(v, _mm256_set1_epi16(1)); }

// int8: per block of 32 columns, 8 lanes of four products each, converted and scaled by the block's activation
// scale (the weight row's scale applies once, in `store`).
template <int M>
inline void int8_rows(const int8_t* const* w, const Int8Row* x, int64_t in, float out[X_PASS][ROWS]) {
  constexpr int RB = sweep_rows(ROWS, M);
  static_assert(ROWS % RB == 0, "whole sweeps");
  for (int r0 = 0; r0 < ROWS; r0 += RB) {
    __m256 acc[RB][M];
    #pragma GCC unroll 4
    for (int r = 0; r < RB; ++r)
      #pragma GCC unroll 4
      for (int m = 0; m < M; ++m) acc[r][m] = _mm256_setzero_ps();
    for (int64_t k = 0; k < in; k += INT8_BLOCK) {
      __m256i xv[M], xa[M];
      __m256 xs[M];
      #pragma GCC unroll 4
      for (int m = 0; m < M; ++m) {
        xv[m] = _mm256_load_si256(reinterpret_cast<const __m256i*>(x[m].xq + k));
        xa[m] = _mm256_abs_epi8(xv[m]);
        xs[m] = _mm256_broadcast_ss(x[m].xs + k / INT8_BLOCK);
      }
      #pragma GCC unroll 4
      for (int r = 0; r < RB; ++r) {
        const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w[r0 + r] + k));
        #pragma GCC unroll 4
        for (int m = 0; m < M; ++m) {
          const __m256i dot = sum_pairs_epi16(_mm256_maddubs_epi16(xa[m], _mm256_sign_epi8(wv, xv[m])));
          acc[r][m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), xs[m], acc[r][m]);
        }
      }
    }
    #pragma GCC unroll 4
    for (int r = 0; r < RB; ++r)
      #pragma GCC unroll 4
      for (int m = 0; m < M; ++m) out[m][r0 + r] = sum_lanes(acc[r][m]);
  }
}

// int4: the combined scales (weight scale times activation scale) of CHUNK groups and their zeros' term, sum over
// groups of (zero - 8 scale) * xsum, computed as vectors before the chunk's dot products.
constexpr int CHUNK = 8;

inline __m256 bf16x8(const uint16_t* p) {
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16));
}

// The first n (1 to CHUNK) of p's values as fp32, zero after, built in registers without branches: the pairs of
// values as 32-bit lanes of a masked load (masked lanes read nothing), and the last value again on its own (for an
// odd n the load leaves it out: its pair would read past the row). A vector load of a buffer just written element by
// element would wait for those stores (store-to-load forwarding fails): ~a third of a short row's time. FirstValues
// holds the masks of a count, for products that use one count throughout.
struct FirstValues {
  __m128i pairs;  // lanes below n / 2
  __m256i last;   // lane n - 1
};

inline FirstValues first_values(int64_t n) {
  const int h = static_cast<int>(n);
  return {_mm_cmpgt_epi32(_mm_set1_epi32(h / 2), _mm_setr_epi32(0, 1, 2, 3)),
          _mm256_cmpeq_epi32(_mm256_set1_epi32(h - 1), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7))};
}

inline __m256 bf16_first(const uint16_t* p, int64_t n, const FirstValues& f) {
  const __m128i pairs = _mm_maskload_epi32(reinterpret_cast<const int*>(p), f.pairs);
  const __m256i last = _mm256_and_si256(f.last, _mm256_set1_epi32(static_cast<int>(p[n - 1])));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_or_si256(_mm256_cvtepu16_epi32(pairs), last), 16));
}

// Groups g0 .. g0 + ng - 1 (ng <= CHUNK) of RB weight rows and M rows of x: combined scales into cs (lane l: group
// g0 + l, zero past ng) and the zeros' term added to acc.
template <int M, int RB>
inline void chunk_scales(const uint16_t* const* scales, const uint16_t* const* zeros, const Int4Row* x, int64_t g0,
                         int64_t ng, float (&cs)[RB][M][CHUNK], __m256 (&acc)[RB][M]) {
  const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i live = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(ng)), lanes);
  __m256 xs[M], xsum[M];  // read once for all the rows (the stores to cs might alias them)
  #pragma GCC unroll 4
  for (int m = 0; m < M; ++m) {
    xs[m] = _mm256_maskload_ps(x[m].xs + g0, live);
    xsum[m] = _mm256_maskload_ps(x[m].xsum + g0, live);
  }
  #pragma GCC unroll 4
  for (int r = 0; r < RB; ++r) {
    __m256 s, z;
    if (ng == CHUNK) {
      s = bf16x8(scales[r] + g0);
      z = bf16x8(zeros[r] + g0);
    } else if (g0 + ng >= CHUNK) {  // a long row's last groups: the CHUNK ending at the row's end, moved down
      const __m256i from = _mm256_add_epi32(lanes, _mm256_set1_epi32(static_cast<int>(CHUNK - ng)));
      const __m256 keep = _mm256_castsi256_ps(live);
      s = _mm256_and_ps(_mm256_permutevar8x32_ps(bf16x8(scales[r] + g0 + ng - CHUNK), from), keep);
      z = _mm256_and_ps(_mm256_permutevar8x32_ps(bf16x8(zeros[r] + g0 + ng - CHUNK), from), keep);
    } else {  // a row of fewer than CHUNK groups
      const FirstValues first = first_values(ng);
      s = bf16_first(scales[r] + g0, ng, first);
      z = bf16_first(zeros[r] + g0, ng, first);
    }
    const __m256 zz = _mm256_fnmadd_ps(_mm256_set1_ps(8.0f), s, z);  // zero - 8 scale
    #pragma GCC unroll 4
    for (int m = 0; m < M; ++m) {
      _mm256_store_ps(cs[r][m], _mm256_mul_ps(s, xs[m]));
      acc[r][m] = _mm256_fmadd_ps(zz, xsum[m], acc[r][m]);
    }
  }
}

struct Nibbles {
  __m256i lo, hi;
};

inline Nibbles nibbles(const uint8_t* p) {
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  return {_mm256_and_si256(v, low4), _mm256_and_si256(_mm256_srli_epi16(v, 4), low4)};
}

inline __m256i load32(const int8_t* p) { return _mm256_load_si256(reinterpret_cast<const __m256i*>(p)); }

// The int32 sums (8 lanes) of one piece: its 64 weight bytes as two vectors a and b, the low nibbles against the
// piece's 64 even columns (xp) and the high ones against its 64 odd columns (xp + 64), the four int16 sums added.
inline __m256i piece_sums(const Nibbles& a, const Nibbles& b, const int8_t* xp) {
  const __m256i even = _mm256_add_epi16(_mm256_maddubs_epi16(a.lo, load32(xp)),
                                        _mm256_maddubs_epi16(b.lo, load32(xp + 32)));
  const __m256i odd = _mm256_add_epi16(_mm256_maddubs_epi16(a.hi, load32(xp + 64)),
                                       _mm256_maddubs_epi16(b.hi, load32(xp + 96)));
  return sum_pairs_epi16(_mm256_add_epi16(even, odd));
}

// Group g0 + g of PIECE columns or a multiple (whole pieces): the int32 sums of its pieces converted and scaled by
// the group's combined scale.
template <int M, int RB>
inline void int4_whole_group(const uint8_t* const* w, const Int4Row* x, int64_t g0, int64_t g, int64_t group,
                             const float (&cs)[RB][M][CHUNK], __m256 (&acc)[RB][M]) {
  const int64_t first = (g0 + g) * group;
  __m256i sums[RB][M];
  #pragma GCC unroll 4
  for (int r = 0; r < RB; ++r) {
    const Nibbles a = nibbles(w[r] + first / 2), b = nibbles(w[r] + first / 2 + 32);
    #pragma GCC unroll 4
    for (int m = 0; m < M; ++m) sums[r][m] = piece_sums(a, b, x[m].xq + first);
  }
  if (group > PIECE) {  // the group's further pieces
    for (int64_t p = first + PIECE; p < first + group; p += PIECE)
      #pragma GCC unroll 4
      for (int r = 0; r < RB; ++r) {
        const Nibbles a = nibbles(w[r] + p / 2), b = nibbles(w[r] + p / 2 + 32);
        #pragma GCC unroll 4
        for (int m = 0; m < M; ++m) sums[r][m] = _mm256_add_epi32(sums[r][m], piece_sums(a, b, x[m].xq + p));
      }
  }
  #pragma GCC unroll 4
  for (int r = 0; r < RB; ++r)
    #pragma GCC unroll 4
    for (int m = 0; m < M; ++m)
      acc[r][m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums[r][m]), _mm256_broadcast_ss(&cs[r][m][g]), acc[r][m]);
}

template <int M, int RB>
inline void int4_whole_groups(const uint8_t* const* w, const Int4Row* x, int64_t g0, int64_t ng, int64_t group,
                              const float (&cs)[RB][M][CHUNK], __m256 (&acc)[RB][M]) {
  for (int64_t g = 0; g < ng; ++g) int4_whole_group<M, RB>(w, x, g0, g, group, cs, acc);
}

// A whole chunk of the default groups (one piece each), the group size a constant. One row of x takes the chunk's
// groups unrolled (its loop body is short: two weight rows' dots); for more rows an unrolled chunk is a long stretch
// of code and ran slower than the loop.
template <int M, int RB>
inline void int4_whole_chunk(const uint8_t* const* w, const Int4Row* x, int64_t g0, const float (&cs)[RB][M][CHUNK],
                             __m256 (&acc)[RB][M]) {
  if constexpr (M == 1) {
    #pragma GCC unroll 8
    for (int g = 0; g < CHUNK; ++g) int4_whole_group<M, RB>(w, x, g0, g, PIECE, cs, acc);
  } else {
    int4_whole_groups<M, RB>(w, x, g0, CHUNK, PIECE, cs, acc);
  }
}

// Groups of 32 or 64 columns (several per piece; a row's last piece may have 32, 64 or 96 columns): each piece in
// units of 32 weight bytes (64 columns; lanes 0-3 cover its first 32, lanes 4-7 the next 32) and, where 16 bytes
// remain, one of 16 (lanes 0-3). A unit's low nibbles meet the piece's even columns, its high nibbles the odd ones
// `half` (the piece's weight bytes) further on; each 4 lanes are scaled by their group's combined scale.
template <int M, int RB>
inline void int4_small_groups(const uint8_t* const* w, const Int4Row* x, int64_t in, int64_t g0, int64_t ng,
                              int64_t group, const float (&cs)[RB][M][CHUNK], __m256 (&acc)[RB][M]) {
  const int64_t end = std::min(in, (g0 + ng) * group);
  const __m128i low4 = _mm_set1_epi8(0x0F);
  for (int64_t p0 = g0 * group; p0 < end; p0 += PIECE) {
    const int64_t half = std::min<int64_t>(PIECE, in - p0) / 2;
    int64_t u = 0;
    for (; u + 32 <= half; u += 32) {
      const int64_t gl = (p0 + 2 * u) / group - g0, gh = (p0 + 2 * u + 32) / group - g0;
      #pragma GCC unroll 4
      for (int r = 0; r < RB; ++r) {
        const Nibbles n = nibbles(w[r] + p0 / 2 + u);
        #pragma GCC unroll 4
        for (int m = 0; m < M; ++m) {
          const int8_t* xp = x[m].xq + p0 + u;
          const __m256i s16 = _mm256_add_epi16(_mm256_maddubs_epi16(n.lo, load32(xp)),
                                               _mm256_maddubs_epi16(n.hi, _mm256_loadu_si256(
                                                   reinterpret_cast<const __m256i*>(xp + half))));
          const __m256 scale = _mm256_set_m128(_mm_broadcast_ss(&cs[r][m][gh]), _mm_broadcast_ss(&cs[r][m][gl]));
          acc[r][m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum_pairs_epi16(s16)), scale, acc[r][m]);
        }
      }
    }
    if (u < half) {  // 16 bytes (32 columns, one group's)
      const int64_t gl = (p0 + 2 * u) / group - g0;
      #pragma GCC unroll 4
      for (int r = 0; r < RB; ++r) {
        const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w[r] + p0 / 2 + u));
        const __m128i lo = _mm_and_si128(v, low4), hi = _mm_and_si128(_mm_srli_epi16(v, 4), low4);
        #pragma GCC unroll 4
        for (int m = 0; m < M; ++m) {
          const int8_t* xp = x[m].xq + p0 + u;
          const __m128i s16 = _mm_add_epi16(
              _mm_maddubs_epi16(lo, _mm_loadu_si128(reinterpret_cast<const __m128i*>(xp))),
              _mm_maddubs_epi16(hi, _mm_loadu_si128(reinterpret_cast<const __m128i*>(xp + half))));
          const __m128i s32 = _mm_madd_epi16(s16, _mm_set1_epi16(1));
          const __m256 scale = _mm256_zextps128_ps256(_mm_broadcast_ss(&cs[r][m][gl]));
          acc[r][m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_zextsi128_si256(s32)), scale, acc[r][m]);
        }
      }
    }
  }
}

template <int M, bool SMALL, int R>
inline void int4_rows(const uint8_t* const* w, const uint16_t* const* scales, const uint16_t* const* zeros,
                      const Int4Row* x, int64_t in, int64_t group, float out[X_PASS][ROWS]) {
  constexpr int RB = sweep_rows(R, M);
  static_assert(R % RB == 0, "whole sweeps");
  const int64_t groups = in / group;
  for (int r0 = 0; r0 < R; r0 += RB) {
    __m256 acc[RB][M];
    #pragma GCC unroll 4
    for (int r = 0; r < RB; ++r)
      #pragma GCC unroll 4
      for (int m = 0; m < M; ++m) acc[r][m] = _mm256_setzero_ps();
    alignas(32) float cs[RB][M][CHUNK];
    for (int64_t g0 = 0; g0 < groups; g0 += CHUNK) {
      const int64_t ng = std::min<int64_t>(CHUNK, groups - g0);
      chunk_scales<M, RB>(scales + r0, zeros + r0, x, g0, ng, cs, acc);
      if (SMALL)
        int4_small_groups<M, RB>(w + r0, x, in, g0, ng, group, cs, acc);
      else if (group == PIECE && ng == CHUNK)  // the default groups, a whole chunk
        int4_whole_chunk<M, RB>(w + r0, x, g0, cs, acc);
      else
        int4_whole_groups<M, RB>(w + r0, x, g0, ng, group, cs, acc);
    }
    #pragma GCC unroll 4
    for (int r = 0; r < RB; ++r)
      #pragma GCC unroll 4
      for (int m = 0; m < M; ++m) out[m][r0 + r] = sum_lanes(acc[r][m]);
  }
}


// Short int4 rows in groups of 32 or 64 whose groups fit one chunk (at most CHUNK: a Mamba dt_proj, 160 inputs in
// groups of 32), ROWS weight rows at a time: int4_rows<M, true, ROWS>'s arithmetic in its order, so the same bits,
// but the chunk's combined scales stay in a register (each unit's lanes take theirs by a permute, not through a stack
// array) and the group is a constant: a short row's cost is its step's own work, not its 80 bytes.
template <int M, int GROUP>
inline void int4_short_rows(const uint8_t* const* w, const uint16_t* const* scales, const uint16_t* const* zeros,
                            const Int4Row* x, int64_t in, float out[X_PASS][ROWS]) {
  constexpr int R = ROWS;
  const int64_t ng = in / GROUP;
  const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i live = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(ng)), lanes);
  const __m256 low_half = _mm256_castsi256_ps(_mm256_setr_epi32(-1, -1, -1, -1, 0, 0, 0, 0));
  __m256 xs[M], xsum[M];
  #pragma GCC unroll 4
  for (int m = 0; m < M; ++m) {
    xs[m] = _mm256_maskload_ps(x[m].xs, live);
    xsum[m] = _mm256_maskload_ps(x[m].xsum, live);
  }
  const FirstValues first = first_values(ng);
  __m256 acc[R][M], cs[R][M];  // cs lane g: group g's combined scale (0 past the row's groups)
  #pragma GCC unroll 4
  for (int r = 0; r < R; ++r) {
    const __m256 s = bf16_first(scales[r], ng, first), z = bf16_first(zeros[r], ng, first);
    const __m256 zz = _mm256_fnmadd_ps(_mm256_set1_ps(8.0f), s, z);  // zero - 8 scale
    #pragma GCC unroll 4
    for (int m = 0; m < M; ++m) {
      cs[r][m] = _mm256_mul_ps(s, xs[m]);
      acc[r][m] = _mm256_fmadd_ps(zz, xsum[m], _mm256_setzero_ps());
    }
  }
  const __m128i low4 = _mm_set1_epi8(0x0F);
  for (int64_t p0 = 0; p0 < in; p0 += PIECE) {
    const int64_t half = std::min<int64_t>(PIECE, in - p0) / 2;
    int64_t u = 0;
    for (; u + 32 <= half; u += 32) {  // lanes 0-3: group gl's 32 columns, lanes 4-7: gh's
      const int gl = static_cast<int>((p0 + 2 * u) / GROUP), gh = static_cast<int>((p0 + 2 * u + 32) / GROUP);
      const __m256i pick = _mm256_setr_epi32(gl, gl, gl, gl, gh, gh, gh, gh);
      #pragma GCC unroll 4
      for (int r = 0; r < R; ++r) {
        const Nibbles n = nibbles(w[r] + p0 / 2 + u);
        #pragma GCC unroll 4
        for (int m = 0; m < M; ++m) {
          const int8_t* xp = x[m].xq + p0 + u;
          const __m256i s16 = _mm256_add_epi16(_mm256_maddubs_epi16(n.lo, load32(xp)),
                                               _mm256_maddubs_epi16(n.hi, _mm256_loadu_si256(
                                                   reinterpret_cast<const __m256i*>(xp + half))));
          const __m256 scale = _mm256_permutevar8x32_ps(cs[r][m], pick);
          acc[r][m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum_pairs_epi16(s16)), scale, acc[r][m]);
        }
      }
    }
    if (u < half) {  // 16 bytes (32 columns, one group's): lanes 0-3, the others zero
      const __m256i pick = _mm256_set1_epi32(static_cast<int>((p0 + 2 * u) / GROUP));
      #pragma GCC unroll 4
      for (int r = 0; r < R; ++r) {
        const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w[r] + p0 / 2 + u));
        const __m128i lo = _mm_and_si128(v, low4), hi = _mm_and_si128(_mm_srli_epi16(v, 4), low4);
        #pragma GCC unroll 4
        for (int m = 0; m < M; ++m) {
          const int8_t* xp = x[m].xq + p0 + u;
          const __m128i s16 = _mm_add_epi16(
              _mm_maddubs_epi16(lo, _mm_loadu_si128(reinterpret_cast<const __m128i*>(xp))),
              _mm_maddubs_epi16(hi, _mm_loadu_si128(reinterpret_cast<const __m128i*>(xp + half))));
          const __m128i s32 = _mm_madd_epi16(s16, _mm_set1_epi16(1));
          const __m256 scale = _mm256_and_ps(_mm256_permutevar8x32_ps(cs[r][m], pick), low_half);
          acc[r][m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_zextsi128_si256(s32)), scale, acc[r][m]);
        }
      }
    }
  }
  #pragma GCC unroll 4
  for (int r = 0; r < R; ++r)
    #pragma GCC unroll 4
    for (int m = 0; m < M; ++m) out[m][r] = sum_lanes(acc[r][m]);
}

template <int GROUP>
inline void int4_short_pass(int64_t count, const uint8_t* const* w, const uint16_t* const* s,
                            const uint16_t* const* z, const Int4Row* x, int64_t in, float out[X_PASS][ROWS]) {
  switch (count) {
    case 1: int4_short_rows<1, GROUP>(w, s, z, x, in, out); break;
    case 2: int4_short_rows<2, GROUP>(w, s, z, x, in, out); break;
    case 3: int4_short_rows<3, GROUP>(w, s, z, x, in, out); break;
    default: int4_short_rows<4, GROUP>(w, s, z, x, in, out); break;
  }
}

// Whether int4_short_rows takes a product's weight rows: groups of 32 or 64, all in one chunk.
inline bool short_int4_rows(int64_t in, int64_t group) { return group < PIECE && in / group <= CHUNK; }

// int4_short_rows for a pass of `count` rows of x.
inline void int4_short_pass(int64_t count, const uint8_t* const* w, const uint16_t* const* s,
                            const uint16_t* const* z, const Int4Row* x, int64_t in, int64_t group,
                            float out[X_PASS][ROWS]) {
  if (group == 32)
    int4_short_pass<32>(count, w, s, z, x, in, out);
  else
    int4_short_pass<64>(count, w, s, z, x, in, out);
}
