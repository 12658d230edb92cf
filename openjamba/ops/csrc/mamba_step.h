// The arguments of mamba_step.cpp's one-token Mamba step (see there), shared with quant_step.cpp, whose whole-layer
// step runs it between the layer's other products.

#pragma once

#include <cstdint>

namespace openjamba {

struct MambaStepArgs {
  int64_t batch, channels, kernel, rank, state, threads, xz_stride;
  double eps;
  const void *xz, *conv_w, *conv_bias, *x_proj_w, *dt_norm_w, *B_norm_w, *C_norm_w, *dt_proj_w, *dt_bias, *A,
      *D;
  void *window, *h, *y, *scratch;
  // Quantized projections (0 bits: a plain weight matrix of the step's dtype); each product's own thread count.
  int64_t x_bits, x_group, x_threads, dt_bits, dt_group, dt_threads;
  const void *x_scales, *x_zeros, *dt_scales, *dt_zeros;
};

}  // namespace openjamba

extern "C" {
void mamba_step_f32(const openjamba::MambaStepArgs* a);
void mamba_step_team_f32(const openjamba::MambaStepArgs* a);  // quantized projections, inside a parallel region
}
