// The arguments of attend_to_all.cpp's decode attention (see there), shared with layer_step.cpp, whose attention
// layer step runs it between the layer's products.

#pragma once

#include <cstdint>

namespace openjamba {

struct AttendArgs {
  int64_t batch, kv_heads, rows, length, head_dim, block, threads;
  int64_t q_batch_stride, q_head_stride, q_row_stride;
  int64_t k_batch_stride, k_head_stride, k_token_stride;
  int64_t v_batch_stride, v_head_stride, v_token_stride;
  void *q, *k, *v, *out;
  const int64_t* starts;
};

}  // namespace openjamba

extern "C" {
void attend_to_all_f32(const openjamba::AttendArgs* a);
}
