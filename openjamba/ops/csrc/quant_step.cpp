// A decode step's SwiGLU MLP block with quantized weights, in one call (ops/decode.py `mlp_step_ref` is the plain
// reference, its weights applied by their own products):
//
//   out = residual + down(silu(gate(x)) * up(x))
//
// Each product is quant_linear.cpp's (`qlinear_int8` / `qlinear_int4`, the weights in openjamba.quant's layout, all
// the call's threads); what lies between them (the gate, the residual add) runs here, so the block costs one call
// from Python instead of three products and three tensor ops. A row's bits depend on nothing but its own values
// (each product is batch-invariant, the rest is per element).
//   x, residual, out: (rows, hidden), rows at stride x_stride / hidden;  gate, up: (inner, hidden);  down: (hidden,
//   inner);  scratch: (rows, 2 * inner) values of workspace

#include <cstdint>

#include "common.h"
#include "quant_linear.h"

namespace {

// One quantized weight: bits 8 or 4, the int4 group, the product's thread count, its tensors.
struct QuantWeight {
  int64_t bits, group, threads;
  const void *q, *scales, *zeros;
};

struct QuantMlpArgs {
  int64_t rows, hidden, inner, x_stride;
  QuantWeight gate, up, down;
  const float *x, *residual;
  float *out, *scratch;
};

void product(const QuantWeight& w, const float* x, float* y, int64_t rows, int64_t in, int64_t out, int64_t x_stride,
             int64_t y_stride) {
  openjamba::quantized_product(w.bits, w.group, w.threads, w.q, w.scales, w.zeros, x, y, rows, in, out, x_stride,
                               y_stride);
}

inline float silu(float v) { return v * openjamba::Math<float>::sigmoid(v); }

}  // namespace

extern "C" {

void quant_mlp_step(const QuantMlpArgs* a) {
  const int64_t rows = a->rows, H = a->hidden, I = a->inner;
  float* s = a->scratch;  // per row: gate(x), then up(x)
  product(a->gate, a->x, s, rows, H, I, a->x_stride, 2 * I);
  product(a->up, a->x, s + I, rows, H, I, a->x_stride, 2 * I);
  for (int64_t r = 0; r < rows; ++r) {
    float* g = s + r * 2 * I;
#pragma omp simd
    for (int64_t i = 0; i < I; ++i) g[i] = silu(g[i]) * g[I + i];
  }
  product(a->down, s, a->out, rows, I, H, 2 * I, H);
  for (int64_t r = 0; r < rows; ++r) {
    float* o = a->out + r * H;
    const float* res = a->residual + r * H;
#pragma omp simd
    for (int64_t j = 0; j < H; ++j) o[j] = res[j] + o[j];
  }
}

}  // extern "C"
