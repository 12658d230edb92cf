// The integer dot products of quant_linear.cpp for CPUs with AVX-512 VNNI and BW (`vpdpbusd`: 64 byte products per
// instruction): int8 weights per 64 columns, int4 weights per piece of 128 columns. A part of quant_linear.cpp,
// included by it inside its anonymous namespace (after <immintrin.h> and its row structures) when the build has
// them; quant_avx2.h and the plain loops there are the other builds' versions of the same functions.

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
