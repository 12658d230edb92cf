// A decode step's SwiGLU MLP block in one call, its weights in any format (ops/decode.py `mlp_step_ref` is the plain
// reference, its weights applied by their own products); the quantized MLP's kernel (an fp32 MLP takes ffn_step.cpp,
// which also serves the MoE):
//
//   out = residual + down(silu(gate(x)) * up(x))
//
// Each product is quant_linear.h's `product` (quant_linear.cpp's `qlinear_int8` / `qlinear_int4` for quantized
// weights, all the call's threads; with several threads and every weight quantized, the three in one parallel
// region by `team_product`); what lies between them (the gate, the residual add) runs here, so the block costs
// one call from Python instead of three products and three tensor ops. A row's bits depend on nothing but its own
// values (each product is batch-invariant, the rest is per element).
//   x, residual, out: (rows, hidden), rows at stride x_stride / hidden;  gate, up: (inner, hidden);  down: (hidden,
//   inner);  scratch: (rows, 2 * inner) values of workspace

#include <cstdint>

#include "common.h"
#include "ffn_step.h"

namespace {

inline float silu(float v) { return v * openjamba::Math<float>::sigmoid(v); }

// Per row of scratch: gate(x) (I values), then up(x); the gate's values become silu(gate) * up.
void gate_rows(float* s, int64_t rows, int64_t I) {
  for (int64_t r = 0; r < rows; ++r) {
    float* g = s + r * 2 * I;
#pragma omp simd
    for (int64_t i = 0; i < I; ++i) g[i] = silu(g[i]) * g[I + i];
  }
}

void add_residual(float* out, const float* residual, int64_t rows, int64_t H) {
  for (int64_t r = 0; r < rows; ++r) {
    float* o = out + r * H;
    const float* res = residual + r * H;
#pragma omp simd
    for (int64_t j = 0; j < H; ++j) o[j] = res[j] + o[j];
  }
}

}  // namespace

extern "C" {

// The block called by every thread of the caller's parallel region (every weight quantized): the threads share each
// product's work items, and up's items follow gate's with no barrier between them; the gate and the residual add,
// a few microseconds, run on one thread exactly as in the call-by-call block (so the same bits). The caller's
// region ends after it (the residual add is not waited for here).
void quant_mlp_step_team(const openjamba::MlpStepArgs* a) {
  using openjamba::team_product;
  const int64_t rows = a->rows, H = a->hidden, I = a->inner;
  float* s = a->scratch;
  team_product(a->gate, a->x, s, rows, H, I, a->x_stride, 2 * I);
  team_product(a->up, a->x, s + I, rows, H, I, a->x_stride, 2 * I);
#pragma omp barrier
#pragma omp single
  gate_rows(s, rows, I);
  team_product(a->down, s, a->out, rows, I, H, 2 * I, H);
#pragma omp barrier
#pragma omp single nowait
  add_residual(a->out, a->residual, rows, H);
}

void quant_mlp_step(const openjamba::MlpStepArgs* a) {
  using openjamba::product;
  const int64_t rows = a->rows, H = a->hidden, I = a->inner;
  if (a->gate.bits && a->up.bits && a->down.bits && a->gate.threads > 1) {
#pragma omp parallel num_threads(a->gate.threads)
    quant_mlp_step_team(a);
    return;
  }
  float* s = a->scratch;  // per row: gate(x), then up(x)
  product(a->gate, a->x, s, rows, H, I, a->x_stride, 2 * I);
  product(a->up, a->x, s + I, rows, H, I, a->x_stride, 2 * I);
  gate_rows(s, rows, I);
  product(a->down, s, a->out, rows, I, H, 2 * I, H);
  add_residual(a->out, a->residual, rows, H);
}

}  // extern "C"
