// RMSNorm of a few rows (a decode step's), y = x / sqrt(mean(x^2) + eps) * weight, in one call: PyTorch's CPU
// rms_norm runs as several tensor ops (~10 us for one row), and decoding normalises twice per layer and token.
// add_rms_norm first adds a residual branch: s = x + h, y = rms_norm(s) (a layer's mixer output joining the
// residual stream, normalised for the FFN), one call instead of two.
//   x, h, s, y: (rows, width) contiguous;  weight: (width,)
//
// The one-call layer steps (layer_step.cpp) call the *_rows_f32 forms, which say whether the product after the norm
// spreads over threads: then outputs of STREAM_ROWS rows or more are written with non-temporal stores (fp32,
// AVX-512, rows 64-byte aligned). Those norms run on one thread between products that read their outputs on every
// thread, so plain stores find their lines in another core's cache and wait on taking each back (a 16 x 256 norm
// on two threads took 2-3x its one-thread time); streaming stores write whole lines without reading them. The
// same values either way.

#include <cstdint>
#include <type_traits>
#include <vector>

#ifdef __AVX512F__
#include <immintrin.h>
#endif

#include "common.h"

namespace {

constexpr int64_t STREAM_ROWS = 4;

// Whether rows of `width` values from p are written with streaming stores (spread: other threads read them next).
template <typename T>
bool streams(const T* p, int64_t rows, int64_t width, bool spread) {
#ifdef __AVX512F__
  return spread && std::is_same_v<T, float> && rows >= STREAM_ROWS && width % 16 == 0 &&
         reinterpret_cast<uintptr_t>(p) % 64 == 0;
#else
  (void)p, (void)rows, (void)width, (void)spread;
  return false;
#endif
}

// dst = src, width values, by streaming stores where `stream` (streams() said so for dst).
template <typename T>
void copy_row(const T* src, T* dst, int64_t width, bool stream) {
#ifdef __AVX512F__
  if constexpr (std::is_same_v<T, float>) {
    if (stream) {
      for (int64_t i = 0; i < width; i += 16) _mm512_stream_ps(dst + i, _mm512_loadu_ps(src + i));
      return;
    }
  }
#endif
  (void)stream;
  for (int64_t i = 0; i < width; ++i) dst[i] = src[i];
}

// y = x * scale * weight over one row, by streaming stores where `stream`: the same products either way.
template <typename T>
void scale_row(const T* xr, const T* weight, T scale, T* yr, int64_t width, bool stream) {
#ifdef __AVX512F__
  if constexpr (std::is_same_v<T, float>) {
    if (stream) {
      const __m512 s = _mm512_set1_ps(scale);
      for (int64_t i = 0; i < width; i += 16)
        _mm512_stream_ps(yr + i, _mm512_mul_ps(_mm512_mul_ps(_mm512_loadu_ps(xr + i), s), _mm512_loadu_ps(weight + i)));
      return;
    }
  }
#endif
  (void)stream;
#pragma omp simd
  for (int64_t i = 0; i < width; ++i) yr[i] = xr[i] * scale * weight[i];
}

template <typename T>
T inverse_rms(const T* xr, int64_t width, double eps) {
  T sum = T(0);
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < width; ++i) sum += xr[i] * xr[i];
  return T(1) / std::sqrt(sum / T(width) + T(eps));
}

// Streaming stores are ordered before the kernel returns (and so before another thread reads them).
inline void end_streams(bool stream) {
#ifdef __AVX512F__
  if (stream) _mm_sfence();
#endif
  (void)stream;
}

template <typename T>
void rms_norm(const T* x, const T* weight, T* y, int64_t rows, int64_t width, double eps, bool spread = false) {
  const bool stream = streams(y, rows, width, spread);
  for (int64_t r = 0; r < rows; ++r)
    scale_row(x + r * width, weight, inverse_rms(x + r * width, width, eps), y + r * width, width, stream);
  end_streams(stream);
}

template <typename T>
void add_rms_norm(const T* x, const T* h, const T* weight, T* s, T* y, int64_t rows, int64_t width, double eps,
                  bool spread = false) {
  const bool stream = streams(s, rows, width, spread) && streams(y, rows, width, spread);
  if (!stream) {
    for (int64_t r = 0; r < rows; ++r) {
      T* sr = s + r * width;
#pragma omp simd
      for (int64_t i = 0; i < width; ++i) sr[i] = x[r * width + i] + h[r * width + i];
    }
    rms_norm<T>(s, weight, y, rows, width, eps);
    return;
  }
  // Row by row through a buffer of this thread's (s is not read back from where the stores stream it).
  thread_local std::vector<T> buffer;
  buffer.resize(width);
  T* sr = buffer.data();
  for (int64_t r = 0; r < rows; ++r) {
#pragma omp simd
    for (int64_t i = 0; i < width; ++i) sr[i] = x[r * width + i] + h[r * width + i];
    copy_row(sr, s + r * width, width, true);
    scale_row(sr, weight, inverse_rms(sr, width, eps), y + r * width, width, true);
  }
  end_streams(true);
}

}  // namespace

extern "C" {

void rms_norm_f32(const void* x, const void* weight, void* y, int64_t rows, int64_t width, double eps) {
  rms_norm<float>(static_cast<const float*>(x), static_cast<const float*>(weight), static_cast<float*>(y), rows,
                  width, eps);
}
void rms_norm_f64(const void* x, const void* weight, void* y, int64_t rows, int64_t width, double eps) {
  rms_norm<double>(static_cast<const double*>(x), static_cast<const double*>(weight), static_cast<double*>(y), rows,
                   width, eps);
}

void add_rms_norm_f32(const void* x, const void* h, const void* weight, void* s, void* y, int64_t rows,
                      int64_t width, double eps) {
  add_rms_norm<float>(static_cast<const float*>(x), static_cast<const float*>(h), static_cast<const float*>(weight),
                      static_cast<float*>(s), static_cast<float*>(y), rows, width, eps);
}
void rms_norm_rows_f32(const float* x, const float* weight, float* y, int64_t rows, int64_t width, double eps,
                       bool spread) {
  rms_norm<float>(x, weight, y, rows, width, eps, spread);
}
void add_rms_norm_rows_f32(const float* x, const float* h, const float* weight, float* s, float* y, int64_t rows,
                           int64_t width, double eps, bool spread) {
  add_rms_norm<float>(x, h, weight, s, y, rows, width, eps, spread);
}

void add_rms_norm_f64(const void* x, const void* h, const void* weight, void* s, void* y, int64_t rows,
                      int64_t width, double eps) {
  add_rms_norm<double>(static_cast<const double*>(x), static_cast<const double*>(h),
                       static_cast<const double*>(weight), static_cast<double*>(s), static_cast<double*>(y), rows,
                       width, eps);
}

}  // extern "C"
