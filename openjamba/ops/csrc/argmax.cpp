// The index of each row's largest value, as torch.argmax(x, -1) gives it: the first index of the maximum, or the
// first NaN where a row has one. A greedy decode step picks its rows' tokens this way from (rows, vocabulary)
// logits, where torch's CPU argmax reduction runs serially at a fraction of the memory's rate (for a small model's
// 16-row step, as long as a Mamba layer's whole step: docs/serving-notebook.md). Here each row is two passes of
// vector compares: its maximum (a NaN noted), then the first index holding it; an exact result, so the same tokens.
//   x: (rows, width) rows at stride x_stride;  out: (rows,) int64

#include <cmath>
#include <cstdint>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

namespace {

// The first index of row x (width values) equal to its maximum, or of its first NaN.
int64_t row_argmax(const float* x, int64_t width) {
  int64_t i = 0;
  float best = x[0];
  bool nan = false;
#ifdef __AVX512F__
  if (width >= 64) {  // four vectors of running maxima (max's latency), NaN lanes marked apart
    __m512 m[4];
    __mmask16 unordered = 0;
    for (int q = 0; q < 4; ++q) m[q] = _mm512_loadu_ps(x + 16 * q);
    for (; i + 64 <= width; i += 64)
      for (int q = 0; q < 4; ++q) {
        const __m512 v = _mm512_loadu_ps(x + i + 16 * q);
        unordered |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
        m[q] = _mm512_max_ps(m[q], v);
      }
    best = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_max_ps(m[0], m[1]), _mm512_max_ps(m[2], m[3])));
    nan = unordered != 0;
  }
#elif defined(__AVX2__)
  if (width >= 32) {  // the same with four 8-lane vectors, the NaN lanes gathered in a vector of compare masks
    __m256 m[4];
    __m256 unordered = _mm256_setzero_ps();
    for (int q = 0; q < 4; ++q) m[q] = _mm256_loadu_ps(x + 8 * q);
    for (; i + 32 <= width; i += 32)
      for (int q = 0; q < 4; ++q) {
        const __m256 v = _mm256_loadu_ps(x + i + 8 * q);
        unordered = _mm256_or_ps(unordered, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
        m[q] = _mm256_max_ps(m[q], v);
      }
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, _mm256_max_ps(_mm256_max_ps(m[0], m[1]), _mm256_max_ps(m[2], m[3])));
    best = lanes[0];
    for (int l = 1; l < 8; ++l) best = lanes[l] > best ? lanes[l] : best;
    nan = _mm256_movemask_ps(unordered) != 0;
  }
#endif
  for (; i < width; ++i) {
    nan |= std::isnan(x[i]);
    best = x[i] > best ? x[i] : best;
  }
  if (nan) {
    for (int64_t j = 0; j < width; ++j)
      if (std::isnan(x[j])) return j;
  }
  int64_t j = 0;
#ifdef __AVX512F__
  const __m512 b = _mm512_set1_ps(best);
  for (; j + 16 <= width; j += 16) {
    const __mmask16 hit = _mm512_cmp_ps_mask(_mm512_loadu_ps(x + j), b, _CMP_EQ_OQ);
    if (hit) return j + __builtin_ctz(hit);
  }
#elif defined(__AVX2__)
  const __m256 b = _mm256_set1_ps(best);
  for (; j + 8 <= width; j += 8) {
    const int hit = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(x + j), b, _CMP_EQ_OQ));
    if (hit) return j + __builtin_ctz(hit);
  }
#endif
  for (; j < width; ++j)
    if (x[j] == best) return j;
  return 0;  // not reached: the maximum is one of the values
}

}  // namespace

extern "C" {

void argmax_rows_f32(const void* x, void* out, int64_t rows, int64_t width, int64_t x_stride) {
  const float* v = static_cast<const float*>(x);
  int64_t* o = static_cast<int64_t*>(out);
  for (int64_t r = 0; r < rows; ++r) o[r] = row_argmax(v + r * x_stride, width);
}

}  // extern "C"
