// RMSNorm of a few rows (a decode step's), y = x / sqrt(mean(x^2) + eps) * weight, in one call: PyTorch's CPU
// rms_norm runs as several tensor ops (~10 us for one row), and decoding normalises twice per layer and token.
// add_rms_norm first adds a residual branch: s = x + h, y = rms_norm(s) (a layer's mixer output joining the
// residual stream, normalised for the FFN), one call instead of two.
//   x, h, s, y: (rows, width) contiguous;  weight: (width,)

#include "common.h"

namespace {

template <typename T>
void rms_norm(const T* x, const T* weight, T* y, int64_t rows, int64_t width, double eps) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* xr = x + r * width;
    T* yr = y + r * width;
    T sum = T(0);
#pragma omp simd reduction(+ : sum)
    for (int64_t i = 0; i < width; ++i) sum += xr[i] * xr[i];
    const T scale = T(1) / std::sqrt(sum / T(width) + T(eps));
#pragma omp simd
    for (int64_t i = 0; i < width; ++i) yr[i] = xr[i] * scale * weight[i];
  }
}

template <typename T>
void add_rms_norm(const T* x, const T* h, const T* weight, T* s, T* y, int64_t rows, int64_t width, double eps) {
  for (int64_t r = 0; r < rows; ++r) {
    T* sr = s + r * width;
#pragma omp simd
    for (int64_t i = 0; i < width; ++i) sr[i] = x[r * width + i] + h[r * width + i];
  }
  rms_norm<T>(s, weight, y, rows, width, eps);
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
void add_rms_norm_f64(const void* x, const void* h, const void* weight, void* s, void* y, int64_t rows,
                      int64_t width, double eps) {
  add_rms_norm<double>(static_cast<const double*>(x), static_cast<const double*>(h),
                       static_cast<const double*>(weight), static_cast<double*>(s), static_cast<double*>(y), rows,
                       width, eps);
}

}  // extern "C"
