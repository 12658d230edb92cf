// The products of quant_linear.cpp (and linear.cpp's fp32 one), for the kernels of the same library that call them
// between their own phases (mamba_step.cpp's quantized x_proj / dt_proj, quant_step.cpp's MLP block, layer_step.cpp's
// whole layer). Arguments as documented there.

#pragma once

#include <cstdint>

extern "C" {
void qlinear_int8(const void* x, const void* q, const void* scales, const void* bias, const void* index, void* y,
                  int64_t rows, int64_t in, int64_t out, int64_t x_stride, int64_t y_stride, int64_t threads);
void qlinear_int4(const void* x, const void* q, const void* scales, const void* zeros, const void* bias,
                  const void* index, void* y, int64_t rows, int64_t in, int64_t out, int64_t group, int64_t x_stride,
                  int64_t y_stride, int64_t threads);
void qlinear_team(int64_t bits, int64_t group, const void* q, const void* scales, const void* zeros, const float* x,
                  float* y, int64_t rows, int64_t in, int64_t out, int64_t x_stride, int64_t y_stride,
                  int64_t threads);
void linear_f32(const void* x, const void* weight, const void* bias, const void* index, void* y, int64_t rows,
                int64_t in, int64_t out, int64_t x_stride, int64_t y_stride, int64_t matrix_stride, int64_t threads);
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

// One weight matrix as the fused steps read it, in any of the model's formats: bits 0, a plain fp32 (out, in)
// matrix at q (scales, zeros unused); 8 or 4, a quantized weight (quantized_product's operands). threads: its
// product's own thread count (the one-call layer steps set an fp32 weight's for each call's rows).
struct Weight {
  int64_t bits, group, threads;
  const void *q, *scales, *zeros;
};

// y = x W^T for `rows` rows of x, by the product the weight's format takes in the op-by-op path (linear.cpp's for
// fp32, quant_linear.cpp's otherwise), so a fused step gives the bits of its parts.
inline void product(const Weight& w, const float* x, float* y, int64_t rows, int64_t in, int64_t out,
                    int64_t x_stride, int64_t y_stride) {
  if (w.bits == 0)
    linear_f32(x, w.q, nullptr, nullptr, y, rows, in, out, x_stride, y_stride, 0, w.threads);
  else
    quantized_product(w.bits, w.group, w.threads, w.q, w.scales, w.zeros, x, y, rows, in, out, x_stride, y_stride);
}

// `product` of a quantized weight called by every thread of an enclosing parallel region (quant_linear.cpp's
// qlinear_team): its threads share the work and nobody waits at its end (the caller's barrier does).
inline void team_product(const Weight& w, const float* x, float* y, int64_t rows, int64_t in, int64_t out,
                         int64_t x_stride, int64_t y_stride) {
  qlinear_team(w.bits, w.group, w.q, w.scales, w.zeros, x, y, rows, in, out, x_stride, y_stride, w.threads);
}

}  // namespace openjamba
