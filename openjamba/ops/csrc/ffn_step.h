// The arguments of a decode step's feed-forward kernels (ffn_step.cpp: an MLP or a MoE block with fp32 weights;
// quant_step.cpp: an MLP with weights in any format), shared with layer_step.cpp, whose whole-layer step runs one of
// them after the mixer.

#pragma once

#include <cstdint>

#include "quant_linear.h"

namespace openjamba {

// ffn_step.cpp's: see there.
struct FfnStepArgs {
  int64_t rows, hidden, inner, experts, top_k, threads, x_stride, expert_stride, down_stride;
  const void *x, *residual, *router_w, *gate_w, *up_w, *down_w;
  void* out;
};

// quant_step.cpp's: see there.
struct MlpStepArgs {
  int64_t rows, hidden, inner, x_stride;
  Weight gate, up, down;
  const float *x, *residual;
  float *out, *scratch;
};

}  // namespace openjamba

extern "C" {
void ffn_step_f32(const openjamba::FfnStepArgs* a);
void quant_mlp_step(const openjamba::MlpStepArgs* a);
void quant_mlp_step_team(const openjamba::MlpStepArgs* a);  // every weight quantized, inside a parallel region
}
