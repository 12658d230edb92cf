// The decode step of a whole layer in one call, for every weight format and both FFN kinds: a Mamba layer
// (ops/decode.py `mamba_layer_step_ref`) instead of six calls (norm, in_proj, Mamba step, out_proj, add + norm, FFN)
//
//   h = rms_norm(x, in_norm_w);  xz = in_proj(h);  y = Mamba step(xz) (conv window and SSM state in place)
//   s = x + out_proj(y);  out = s + ffn(rms_norm(s, ff_norm_w))
//
// and an attention layer (model.DecoderLayer.decode_step's ops one by one) instead of eight (norm, q, k and v
// products, the cache write, attention over the cache, o_proj, add + norm, FFN):
//
//   h = rms_norm(x, in_norm_w);  q, k, v = q_proj(h), k_proj(h), v_proj(h);  the cache's column `position` = k, v
//   s = x + o_proj(attend(q, the cache's keys up to `position`));  out = s + ffn(rms_norm(s, ff_norm_w))
//
// Small models decode at the speed of their call count, and a large one's op-by-op step spends milliseconds per token
// in Python between its kernels. Each part is the kernel its separate call runs: rms_norm.cpp, quant_linear.h's
// `product` (linear.cpp for fp32 weights, quant_linear.cpp for int8 / int4), mamba_step.cpp, and for the FFN
// ffn_step.cpp (fp32 MLP or MoE) or quant_step.cpp (an MLP with quantized weights), attend_to_all.cpp. So the result is the same bits
// as the layer's ops one by one, and as theirs, a row's bits depend on nothing but its own values.
//   x, out: (rows, hidden) contiguous;  scratch: rows * (4 hidden + 6 inner + rank + 2 state + 2 intermediate)
//   values for a Mamba layer, rows * (4 hidden + 2 heads * head_dim + 2 kv_heads * head_dim + 2 intermediate) for an
//   attention layer;  k_cache, v_cache: fp32 (rows, kv_heads, capacity, head_dim) contiguous

#include <algorithm>
#include <cstdint>

#include "attend_to_all.h"
#include "common.h"
#include "ffn_step.h"
#include "mamba_step.h"
#include "quant_linear.h"

extern "C" {  // rms_norm.cpp (spread: the product after the norm runs on several threads)
void rms_norm_rows_f32(const float* x, const float* weight, float* y, int64_t rows, int64_t width, double eps,
                       bool spread);
void add_rms_norm_rows_f32(const float* x, const float* h, const float* weight, float* s, float* y, int64_t rows,
                           int64_t width, double eps, bool spread);
}

namespace {

using openjamba::product;

// The FFN after the mixer: ffn_step's `ffn` when `quantized_mlp` is 0, else quant_step's `mlp`, each with its weights
// but its rows.
struct FfnArgs {
  int64_t quantized_mlp;
  openjamba::FfnStepArgs ffn;
  openjamba::MlpStepArgs mlp;
};

// Whether the FFN's products run on several threads (its inputs are then read on every thread).
bool ffn_spread(const FfnArgs& f) { return f.quantized_mlp ? f.mlp.gate.threads > 1 : f.ffn.threads > 1; }

// out = s + ffn(h) for rows of hidden values; scratch: rows * 2 intermediate values (a quantized MLP's).
void ffn_block(const FfnArgs& f, int64_t rows, int64_t H, const float* h, const float* s, float* out, float* scratch) {
  if (f.quantized_mlp) {
    openjamba::MlpStepArgs mlp = f.mlp;
    mlp.rows = rows, mlp.hidden = H, mlp.x_stride = H, mlp.x = h, mlp.residual = s, mlp.out = out;
    mlp.scratch = scratch;
    quant_mlp_step(&mlp);
  } else {
    openjamba::FfnStepArgs ffn = f.ffn;
    ffn.rows = rows, ffn.hidden = H, ffn.x_stride = H, ffn.x = h, ffn.residual = s, ffn.out = out;
    ffn_step_f32(&ffn);
  }
}

// `mamba` holds the Mamba step's fields but its rows (batch, xz, xz_stride, y, scratch); the rest is filled here.
struct MambaLayerArgs {
  int64_t rows, hidden, inner;
  double in_eps, ff_eps;
  openjamba::Weight in_proj, out_proj;
  const float *x, *in_norm_w, *ff_norm_w;
  float *out, *scratch;
  openjamba::MambaStepArgs mamba;
  FfnArgs ffn;
};

// `attend` holds the attention's fields but q, out and the keys' extent (rows, length), filled here; its k and v are
// the caches (their strides set by the caller), which gain this step's keys at column `position`.
struct AttentionLayerArgs {
  int64_t rows, hidden, heads, kv_heads, head_dim, position;
  double in_eps, ff_eps;
  openjamba::Weight q_proj, k_proj, v_proj, o_proj;
  const float *x, *in_norm_w, *ff_norm_w;
  float *out, *scratch;
  openjamba::AttendArgs attend;
  FfnArgs ffn;
};

}  // namespace

extern "C" {

void mamba_layer_step(const MambaLayerArgs* a) {
  const int64_t rows = a->rows, H = a->hidden, I = a->inner;
  const int64_t P = a->mamba.rank + 2 * a->mamba.state;
  float* h = a->scratch;
  float* xz = h + rows * H;
  float* y = xz + rows * 2 * I;
  float* o = y + rows * I;
  float* s = o + rows * H;
  float* h2 = s + rows * H;
  float* mamba_scratch = h2 + rows * H;
  float* ffn_scratch = mamba_scratch + rows * (P + 3 * I);
  openjamba::MambaStepArgs m = a->mamba;
  m.batch = rows, m.xz = xz, m.xz_stride = 2 * I, m.y = y, m.scratch = mamba_scratch;
  const openjamba::MlpStepArgs& f = a->ffn.mlp;
  if (a->in_proj.bits && a->out_proj.bits && m.x_bits && m.dt_bits && a->ffn.quantized_mlp && f.gate.bits &&
      f.up.bits && f.down.bits && a->in_proj.threads > 1) {
    // Every product quantized, several threads: the whole layer in one parallel region, each product's work items
    // shared by its threads (team_product), one thread for the norms, barriers where a result is read. The same
    // kernels, so the same bits; no thread start and join between the layer's eight products.
    openjamba::MlpStepArgs mlp = a->ffn.mlp;
    mlp.rows = rows, mlp.hidden = H, mlp.x_stride = H, mlp.x = h2, mlp.residual = s, mlp.out = a->out;
    mlp.scratch = ffn_scratch;
#pragma omp parallel num_threads(a->in_proj.threads)
    {
#pragma omp single
      rms_norm_rows_f32(a->x, a->in_norm_w, h, rows, H, a->in_eps, true);
      openjamba::team_product(a->in_proj, h, xz, rows, H, 2 * I, H, 2 * I);
#pragma omp barrier
      mamba_step_team_f32(&m);
      openjamba::team_product(a->out_proj, y, o, rows, I, H, I, H);
#pragma omp barrier
#pragma omp single
      add_rms_norm_rows_f32(a->x, o, a->ff_norm_w, s, h2, rows, H, a->ff_eps, ffn_spread(a->ffn));
      quant_mlp_step_team(&mlp);
    }
    return;
  }
  rms_norm_rows_f32(a->x, a->in_norm_w, h, rows, H, a->in_eps, a->in_proj.threads > 1);
  product(a->in_proj, h, xz, rows, H, 2 * I, H, 2 * I);
  mamba_step_f32(&m);
  product(a->out_proj, y, o, rows, I, H, I, H);
  add_rms_norm_rows_f32(a->x, o, a->ff_norm_w, s, h2, rows, H, a->ff_eps, ffn_spread(a->ffn));
  ffn_block(a->ffn, rows, H, h2, s, a->out, ffn_scratch);
}

void attention_layer_step(const AttentionLayerArgs* a) {
  const int64_t rows = a->rows, H = a->hidden, D = a->head_dim, Q = a->heads * D, KV = a->kv_heads * D;
  float* h = a->scratch;
  float* q = h + rows * H;
  float* k = q + rows * Q;
  float* v = k + rows * KV;
  float* att = v + rows * KV;
  float* o = att + rows * Q;
  float* s = o + rows * H;
  float* h2 = s + rows * H;
  float* ffn_scratch = h2 + rows * H;
  rms_norm_rows_f32(a->x, a->in_norm_w, h, rows, H, a->in_eps, a->q_proj.threads > 1);
  product(a->q_proj, h, q, rows, H, Q, H, Q);
  product(a->k_proj, h, k, rows, H, KV, H, KV);
  product(a->v_proj, h, v, rows, H, KV, H, KV);
  openjamba::AttendArgs at = a->attend;
  float* k_cache = static_cast<float*>(at.k);
  float* v_cache = static_cast<float*>(at.v);
  for (int64_t r = 0; r < rows; ++r)  // row r's key and value of each head, into the cache's column `position`
    for (int64_t g = 0; g < a->kv_heads; ++g) {
      std::copy(k + r * KV + g * D, k + r * KV + (g + 1) * D,
                k_cache + r * at.k_batch_stride + g * at.k_head_stride + a->position * at.k_token_stride);
      std::copy(v + r * KV + g * D, v + r * KV + (g + 1) * D,
                v_cache + r * at.v_batch_stride + g * at.v_head_stride + a->position * at.v_token_stride);
    }
  // q (rows, heads * D) as (rows, kv_heads, the heads sharing one K/V head, D); the result in the same layout,
  // which is o_proj's input row.
  const int64_t group = a->heads / a->kv_heads;
  at.batch = rows, at.kv_heads = a->kv_heads, at.rows = group, at.length = a->position + 1, at.head_dim = D;
  at.q_batch_stride = Q, at.q_head_stride = group * D, at.q_row_stride = D, at.q = q, at.out = att;
  attend_to_all_f32(&at);
  product(a->o_proj, att, o, rows, Q, H, Q, H);
  add_rms_norm_rows_f32(a->x, o, a->ff_norm_w, s, h2, rows, H, a->ff_eps, ffn_spread(a->ffn));
  ffn_block(a->ffn, rows, H, h2, s, a->out, ffn_scratch);
}

}  // extern "C"

extern "C" {

// A decode token's layers in one call: kinds[i] 0 runs args[i] as a MambaLayerArgs, 1 as an AttentionLayerArgs, in
// order (each layer's out is the next one's x). Between two of a large model's layers the interpreter's objects
// are cold in the caches (the weights streamed through them), so a Python call per layer costs tens of us.
void layer_steps(const int64_t* kinds, void* const* args, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    if (kinds[i])
      attention_layer_step(static_cast<const AttentionLayerArgs*>(args[i]));
    else
      mamba_layer_step(static_cast<const MambaLayerArgs*>(args[i]));
  }
}

}  // extern "C"
