// A decode step's feed-forward block in one call: a SwiGLU MLP, or a MoE layer (router, softmax, top-k, the chosen
// experts and their weighted sum), plus the residual add. ops/decode.py has the plain PyTorch references
// (`mlp_step_ref`, `moe_step_ref`) and the contract:
//
//   p      = softmax(router_w @ x) in fp32 (E experts); the top_k largest (ties: lower index first), unrenormalised
//   a_k    = silu(gate_e @ x) * (up_e @ x)          for each chosen expert e = index_k   (inner values)
//   out    = residual + sum_k p_k * (down_e @ a_k)  (slots in top-k order, from zero)
//
// An MLP is the same with one expert, no router and p = 1 (a product by 1 is exact).
//
// For a few rows (a serving batch), the rows are grouped by expert so that each chosen expert's weights stream from
// memory once per step, not once per row. Every value is computed by one dot product whose order depends on nothing
// but its own two vectors, so a row's result bits do not depend on the other rows of the batch, nor on the threads.
//   x, residual, out: (rows, hidden) with row strides x_stride / hidden;  out may alias residual
//   router_w: (experts, hidden) or null;  gate_w, up_w: (inner, hidden) of expert 0, then every expert_stride
//   down_w: (hidden, inner) of expert 0, then every down_stride

#include <algorithm>
#include <cmath>
#include <vector>

#include "common.h"
#include "ffn_step.h"
#include "tiles.h"

namespace {

using namespace openjamba;

template <typename T>
inline T silu(T v) {
  return v * Math<T>::sigmoid(v);
}

// The slots (row, k) that chose one expert.
struct Group {
  int64_t expert;
  std::vector<int64_t> slots;  // row * top_k + k
};

// s + a * b as one fused multiply-add where the hardware has one, as the compiler contracts the plain expression in
// a scalar loop (spelled out because it does not contract the same expression once it vectorizes a loop).
template <typename T>
inline T mul_add(T a, T b, T s) {
#if defined(__FP_FAST_FMAF) && defined(__FP_FAST_FMA)
  return std::fma(a, b, s);
#else
  return s + a * b;
#endif
}

constexpr int64_t ROUTE_ROWS = 4;    // rows whose logits are summed side by side
constexpr int64_t ROUTE_EXPERTS = 4;  // experts per pass over those rows

// logits[r * E + e] = router_w[e] . x_r for the NR rows from r0, each one sum in order over i. NR x ROUTE_EXPERTS
// sums side by side, so that they overlap instead of each waiting on its own previous add (the order within each
// sum is the same whatever NR, so the same bits).
template <typename T, int64_t NR>
void router_logits(const FfnStepArgs& a, int64_t r0, float* logits) {
  const int64_t E = a.experts, H = a.hidden;
  const T* rw = static_cast<const T*>(a.router_w);
  const T* xr[NR];
  for (int64_t r = 0; r < NR; ++r) xr[r] = static_cast<const T*>(a.x) + (r0 + r) * a.x_stride;
  for (int64_t e0 = 0; e0 < E; e0 += ROUTE_EXPERTS) {
    const T* we[ROUTE_EXPERTS];
    for (int64_t e = 0; e < ROUTE_EXPERTS; ++e) we[e] = rw + std::min(e0 + e, E - 1) * H;  // a short pass repeats
    T s[NR][ROUTE_EXPERTS] = {};
    for (int64_t i = 0; i < H; ++i)
      for (int64_t r = 0; r < NR; ++r)
        for (int64_t e = 0; e < ROUTE_EXPERTS; ++e) s[r][e] = mul_add(we[e][i], xr[r][i], s[r][e]);
    for (int64_t r = 0; r < NR; ++r)
      for (int64_t e = 0; e < std::min(ROUTE_EXPERTS, E - e0); ++e)
        logits[(r0 + r) * E + e0 + e] = static_cast<float>(s[r][e]);
  }
}

// Routing of rows [r0, r1): probabilities in fp32 as the model computes them (correctly rounded from a double
// softmax), the top_k kept in descending order. Each row's result depends on its own x alone, so the rows can be
// split over threads.
template <typename T>
void route_rows(const FfnStepArgs& a, int64_t K, int64_t r0, int64_t r1, float* logits, int64_t* index, T* weight) {
  const int64_t E = a.experts;
  int64_t r = r0;
  for (; r + ROUTE_ROWS <= r1; r += ROUTE_ROWS) router_logits<T, ROUTE_ROWS>(a, r, logits);
  for (; r < r1; ++r) router_logits<T, 1>(a, r, logits);
  thread_local std::vector<int64_t> order;
  thread_local std::vector<double> ex;
  order.resize(E), ex.resize(E);
  for (r = r0; r < r1; ++r) {
    const float* lr = logits + r * E;
    const double top = *std::max_element(lr, lr + E);
    double sum = 0.0;
    for (int64_t e = 0; e < E; ++e) sum += ex[e] = std::exp(static_cast<double>(lr[e]) - top);
    for (int64_t e = 0; e < E; ++e) order[e] = e;
    std::stable_sort(order.begin(), order.end(), [&](int64_t i, int64_t j) { return lr[i] > lr[j]; });
    for (int64_t k = 0; k < K; ++k) {
      index[r * K + k] = order[k];
      weight[r * K + k] = static_cast<T>(static_cast<float>(ex[order[k]] / sum));
    }
  }
}

// Work items: [begin, end) output rows of one group's matrix, in multiples of TILE_W_ONE.
struct Item {
  int64_t group, begin, end;
};

void split(int64_t groups, int64_t rows_per_group, int64_t threads, std::vector<Item>& items) {
  const int64_t blocks = (rows_per_group + TILE_W_ONE - 1) / TILE_W_ONE;
  const int64_t per_group = threads == 1 ? 1 : std::max<int64_t>(1, std::min(blocks, 8 * threads / groups));
  items.clear();
  for (int64_t g = 0; g < groups; ++g)
    for (int64_t i = 0; i < per_group; ++i)
      items.push_back({g, std::min(rows_per_group, blocks * i / per_group * TILE_W_ONE),
                       std::min(rows_per_group, blocks * (i + 1) / per_group * TILE_W_ONE)});
}

// The calling thread's workspace, kept between calls: a decode step calls ffn_step once per layer, and fresh
// vectors each time cost allocations, page faults and zeroing (~5-8 us a call at 16 rows for the activations).
// The groups are flat: group g's slots (row * top_k + k, in (row, k) order) are slots[start[g] .. start[g + 1]), with
// their rows of x and of the activations at the same positions of x_rows and act_rows.
template <typename T>
struct Workspace {
  std::vector<T> act, up_out, expert_out, weight;
  std::vector<float> logits;
  std::vector<int64_t> index, slots, start, expert;
  std::vector<const T*> x_rows, act_rows;
  std::vector<Item> up_items, down_items;
};

// v with at least n elements, whatever they hold (each is written before it is read).
template <typename T>
T* at_least(std::vector<T>& v, int64_t n) {
  if (static_cast<int64_t>(v.size()) < n) v.resize(n);
  return v.data();
}

// The chosen experts in ascending order, each with its slots, and the work items of both products.
template <typename T>
void group(const FfnStepArgs& a, int64_t K, Workspace<T>& w) {
  const int64_t R = a.rows, H = a.hidden, I = a.inner;
  const T* x = static_cast<const T*>(a.x);
  w.slots.clear(), w.start.assign(1, 0), w.expert.clear(), w.x_rows.clear(), w.act_rows.clear();
  for (int64_t e = 0; e < std::max<int64_t>(1, a.experts); ++e) {
    for (int64_t s = 0; s < R * K; ++s)
      if (w.index[s] == e) {
        w.slots.push_back(s);
        w.x_rows.push_back(x + (s / K) * a.x_stride);
        w.act_rows.push_back(w.act.data() + s * I);
      }
    if (static_cast<int64_t>(w.slots.size()) > w.start.back()) w.expert.push_back(e), w.start.push_back(w.slots.size());
  }
  const int64_t G = static_cast<int64_t>(w.expert.size());
  split(G, I, a.threads, w.up_items);
  split(G, H, a.threads, w.down_items);
}

template <typename T>
void ffn_step(const FfnStepArgs& a) {
  const int64_t H = a.hidden, I = a.inner, K = a.router_w ? a.top_k : 1, R = a.rows, E = a.experts;
  thread_local Workspace<T> workspace;
  Workspace<T>& w = workspace;
  T* act = at_least(w.act, R * K * I);
  T* up_out = at_least(w.up_out, R * K * I);
  T* expert_out = at_least(w.expert_out, R * K * H);
  T* weight = at_least(w.weight, R * K);
  int64_t* index = at_least(w.index, R * K);
  float* logits = at_least(w.logits, R * std::max<int64_t>(1, E));
  if (a.router_w == nullptr) {  // an MLP: one expert, weight 1
    for (int64_t r = 0; r < R; ++r) index[r] = 0, weight[r] = T(1);
    group<T>(a, K, w);
  }
  const T* residual = static_cast<const T*>(a.residual);
  T* out = static_cast<T*>(a.out);
  const int64_t route_blocks = (R + ROUTE_ROWS - 1) / ROUTE_ROWS;

#pragma omp parallel num_threads(a.threads)
  {
    // 0. a MoE's routing, its rows split over the threads (each row's the same whatever thread routes it), then
    // the groups and work items (one thread; the end of `single` is a barrier).
    if (a.router_w != nullptr) {
#pragma omp for schedule(static)
      for (int64_t b = 0; b < route_blocks; ++b)
        route_rows<T>(a, K, b * ROUTE_ROWS, std::min(R, (b + 1) * ROUTE_ROWS), logits, index, weight);
#pragma omp single
      group<T>(a, K, w);
    }
    const int64_t n_up = static_cast<int64_t>(w.up_items.size()), n_down = static_cast<int64_t>(w.down_items.size());
    // 1. gate and up products of each chosen expert over its rows, then act = silu(gate) * up.
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < n_up; ++i) {
      const Item& it = w.up_items[i];
      const int64_t e = w.expert[it.group], s0 = w.start[it.group], n_slots = w.start[it.group + 1] - s0;
      const int64_t* slots = w.slots.data() + s0;
      const T* gate = static_cast<const T*>(a.gate_w) + e * a.expert_stride;
      const T* up = static_cast<const T*>(a.up_w) + e * a.expert_stride;
      matrix_rows<T>(gate, H, it.begin, it.end, w.x_rows.data() + s0, n_slots,
                     [&](int64_t s, int64_t j, T v) { act[slots[s] * I + j] = v; });
      matrix_rows<T>(up, H, it.begin, it.end, w.x_rows.data() + s0, n_slots,
                     [&](int64_t s, int64_t j, T v) { up_out[slots[s] * I + j] = v; });
      for (int64_t q = 0; q < n_slots; ++q) {  // a separate loop, so that silu is vectorised
        T* a_s = act + slots[q] * I;
        const T* u_s = up_out + slots[q] * I;
        for (int64_t j = it.begin; j < it.end; ++j) a_s[j] = silu(a_s[j]) * u_s[j];
      }
    }
    // 2. down products of each chosen expert over its rows' activations.
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < n_down; ++i) {
      const Item& it = w.down_items[i];
      const int64_t e = w.expert[it.group], s0 = w.start[it.group], n_slots = w.start[it.group + 1] - s0;
      const int64_t* slots = w.slots.data() + s0;
      const T* down = static_cast<const T*>(a.down_w) + e * a.down_stride;
      matrix_rows<T>(down, I, it.begin, it.end, w.act_rows.data() + s0, n_slots,
                     [&](int64_t s, int64_t j, T v) { expert_out[slots[s] * H + j] = v; });
    }
    // 3. each row's weighted sum over its slots, plus the residual.
#pragma omp for schedule(static)
    for (int64_t r = 0; r < R; ++r)
      for (int64_t j = 0; j < H; ++j) {
        T acc = T(0);
        for (int64_t k = 0; k < K; ++k) acc += weight[r * K + k] * expert_out[(r * K + k) * H + j];
        out[r * H + j] = residual[r * H + j] + acc;
      }
  }
}

}  // namespace

extern "C" {

void ffn_step_f32(const openjamba::FfnStepArgs* a) { ffn_step<float>(*a); }
void ffn_step_f64(const openjamba::FfnStepArgs* a) { ffn_step<double>(*a); }

}  // extern "C"
