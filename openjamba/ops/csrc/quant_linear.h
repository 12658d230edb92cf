// The quantized products of quant_linear.cpp, for the kernels of the same library that call them between their own
// phases (mamba_step.cpp's quantized x_proj / dt_proj, quant_step.cpp's MLP block). Arguments as documented there.

#pragma once

#include <cstdint>

extern "C" {
void qlinear_int8(const void* x, const void* q, const void* scales, const void* bias, const void* index, void* y,
                  int64_t rows, int64_t in, int64_t out, int64_t x_stride, int64_t y_stride, int64_t threads);
void qlinear_int4(const void* x, const void* q, const void* scales, const void* zeros, const void* bias,
                  const void* index, void* y, int64_t rows, int64_t in, int64_t out, int64_t group, int64_t x_stride,
                  int64_t y_stride, int64_t threads);
}

namespace openjamba {

// y = x W^T for `rows` rows of x (fp32), W a quantized weight in openjamba.quant's layout: `bits` 8 or 4 (int4 in
// groups of `group`), its q, scales and zeros (int4 only); no bias, no gathering; the product's own thread count.
inline void quantized_product(int64_t bits, int64_t group, int64_t threads, const void* q, const void* scales,
                              const void* zeros, const float* x, float* y, int64_t rows, int64_t in, int64_t out,
                              int64_t x_stride, int64_t y_stride) {
  if (bits == 8)
    qlinear_int8(x, q, scales, nullptr, nullptr, y, rows, in, out, x_stride, y_stride, threads);
  else
    qlinear_int4(x, q, scales, zeros, nullptr, nullptr, y, rows, in, out, group, x_stride, y_stride, threads);
}

}  // namespace openjamba
