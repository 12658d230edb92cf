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
#include "mamba_step.h"
#include "quant_linear.h"

extern "C" {  // rms_norm.cpp
void rms_norm_f32(const void* x, const void* weight, void* y, int64_t rows, int64_t width, double eps);
void add_rms_norm_f32(const void* x, const void* h, const void* weight, void* s, void* y, int64_t rows, int64_t width,
                      double eps);
}

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

// A whole Mamba layer with an MLP, its projections quantized (x_proj and dt_proj as `mamba` says): `mamba` holds
// the step's fields but its rows (batch, xz, xz_stride, y, scratch), `mlp` its weights; the rest is filled here.
struct QuantMambaLayerArgs {
  int64_t rows, hidden, inner;
  double in_eps, ff_eps;
  QuantWeight in_proj, out_proj;
  const float *x, *in_norm_w, *ff_norm_w;
  float *out, *scratch;
  openjamba::MambaStepArgs mamba;
  QuantMlpArgs mlp;
};

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

// The decode step of a Mamba layer followed by an MLP, all its products quantized (ops/decode.py
// `mamba_layer_step_ref`), in one call instead of six (norm, in_proj, Mamba step, out_proj, add + norm, MLP):
//
//   h = rms_norm(x, in_norm_w);  xz = in_proj(h);  y = Mamba step(xz) (conv window and SSM state in place)
//   s = x + out_proj(y);  out = s + mlp(rms_norm(s, ff_norm_w))
//
// Each part is the kernel the separate calls run (rms_norm.cpp, quant_linear.cpp, mamba_step.cpp, the MLP above),
// so the result is the same bits. scratch: rows * (4 hidden + 6 inner + rank + 2 state + 2 intermediate) values.
void quant_mamba_layer_step(const QuantMambaLayerArgs* a) {
  const int64_t rows = a->rows, H = a->hidden, I = a->inner;
  const int64_t P = a->mamba.rank + 2 * a->mamba.state;
  float* h = a->scratch;
  float* xz = h + rows * H;
  float* y = xz + rows * 2 * I;
  float* o = y + rows * I;
  float* s = o + rows * H;
  float* h2 = s + rows * H;
  float* mamba_scratch = h2 + rows * H;
  float* mlp_scratch = mamba_scratch + rows * (P + 3 * I);
  rms_norm_f32(a->x, a->in_norm_w, h, rows, H, a->in_eps);
  product(a->in_proj, h, xz, rows, H, 2 * I, H, 2 * I);
  openjamba::MambaStepArgs m = a->mamba;
  m.batch = rows, m.xz = xz, m.xz_stride = 2 * I, m.y = y, m.scratch = mamba_scratch;
  mamba_step_f32(&m);
  product(a->out_proj, y, o, rows, I, H, I, H);
  add_rms_norm_f32(a->x, o, a->ff_norm_w, s, h2, rows, H, a->ff_eps);
  QuantMlpArgs mlp = a->mlp;
  mlp.rows = rows, mlp.hidden = H, mlp.x_stride = H, mlp.x = h2, mlp.residual = s, mlp.out = a->out;
  mlp.scratch = mlp_scratch;
  quant_mlp_step(&mlp);
}

}  // extern "C"
