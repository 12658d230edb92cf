// The decode step of a whole Mamba layer (ops/decode.py `mamba_layer_step_ref`) in one call instead of six (norm,
// in_proj, Mamba step, out_proj, add + norm, FFN), for every weight format and both FFN kinds:
//
//   h = rms_norm(x, in_norm_w);  xz = in_proj(h);  y = Mamba step(xz) (conv window and SSM state in place)
//   s = x + out_proj(y);  out = s + ffn(rms_norm(s, ff_norm_w))
//
// Small models decode at the speed of their call count, and a large one's op-by-op step spends milliseconds per token
// in Python between its kernels. Each part is the kernel its separate call runs: rms_norm.cpp, quant_linear.h's
// `product` (linear.cpp for fp32 weights, quant_linear.cpp for int8 / int4), mamba_step.cpp, and for the FFN
// ffn_step.cpp (fp32 MLP or MoE) or quant_step.cpp (an MLP with quantized weights). So the result is the same bits
// as the layer's ops one by one, and as theirs, a row's bits depend on nothing but its own values.
//   x, out: (rows, hidden) contiguous;  scratch: rows * (4 hidden + 6 inner + rank + 2 state + 2 intermediate) values

#include <cstdint>

#include "common.h"
#include "ffn_step.h"
#include "mamba_step.h"
#include "quant_linear.h"

extern "C" {  // rms_norm.cpp
void rms_norm_f32(const void* x, const void* weight, void* y, int64_t rows, int64_t width, double eps);
void add_rms_norm_f32(const void* x, const void* h, const void* weight, void* s, void* y, int64_t rows, int64_t width,
                      double eps);
}

namespace {

// `mamba` holds the Mamba step's fields but its rows (batch, xz, xz_stride, y, scratch); the FFN is ffn_step's
// `ffn` when `quantized_mlp` is 0, else quant_step's `mlp`, each with its weights but its rows; the rest is filled here.
struct MambaLayerArgs {
  int64_t rows, hidden, inner, quantized_mlp;
  double in_eps, ff_eps;
  openjamba::Weight in_proj, out_proj;
  const float *x, *in_norm_w, *ff_norm_w;
  float *out, *scratch;
  openjamba::MambaStepArgs mamba;
  openjamba::FfnStepArgs ffn;
  openjamba::MlpStepArgs mlp;
};

}  // namespace

extern "C" {

void mamba_layer_step(const MambaLayerArgs* a) {
  using openjamba::product;
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
  if (a->quantized_mlp) {
    openjamba::MlpStepArgs mlp = a->mlp;
    mlp.rows = rows, mlp.hidden = H, mlp.x_stride = H, mlp.x = h2, mlp.residual = s, mlp.out = a->out;
    mlp.scratch = mlp_scratch;
    quant_mlp_step(&mlp);
  } else {
    openjamba::FfnStepArgs ffn = a->ffn;
    ffn.rows = rows, ffn.hidden = H, ffn.x_stride = H, ffn.x = h2, ffn.residual = s, ffn.out = a->out;
    ffn_step_f32(&ffn);
  }
}

}  // extern "C"
