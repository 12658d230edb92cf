// Selective scan (Mamba-1) for CPUs: forward, chunk-checkpointed backward and the one-token decode step.
//
// Plain C++ with no PyTorch headers, so it builds in seconds; Python calls it through ctypes with one ScanArgs
// struct (openjamba/ops/cpu_build.py mirrors it). Layout is token-major, as in ops/scan.py:
//   u, delta, z, out, dout, du, ddelta, dz: rows (batch, length, channels), channel stride 1, any row strides
//   B, C: rows (batch, length, state), state stride 1;  A: (channels, state);  D, bias: (channels,)
//   h0, hT, dh0, dhT: (batch, channels, state);  ckpt: (batch, chunks, channels, state), the state entering each chunk
//   dB, dC: (groups, batch, length, state) partial sums over each group's channels, summed by the caller
//
// Work is split into channel blocks of W channels (the vector width; leftover channels get blocks of width 1) and
// the blocks into `groups` of consecutive channels. Time is walked in chunks of `chunk` steps, and within a chunk
// block by block, so each step's inputs are read while their cache lines and pages are hot. The state of a block is
// a small [state][W] array in L1; every per-channel loop runs over W lanes and is vectorised (exp included). Built for
// AVX2 without AVX-512, the fp32 forward of whole blocks takes forward_chunk_avx2 instead, and the backward's
// recomputation recompute_chunk_avx2: the same bits in explicit 8-lane vectors.
//
// Backward: per chunk, recompute the chunk's states from its checkpoint into a (chunk, state, W) buffer, then run
// the adjoint recurrence g_t = C_t dy_t + a_{t+1} g_{t+1} backwards. Groups own their channels, so dA, dD and dbias
// accumulate without races; dB and dC (sums over channels) go to per-group partial buffers.

#include <algorithm>
#include <type_traits>
#include <vector>

#include "avx2_math.h"
#include "common.h"

// The AVX2 passes below; OPENJAMBA_PLAIN_SCAN leaves them out (tests build both and compare their bits).
#if defined(OPENJAMBA_AVX2_MATH) && !defined(OPENJAMBA_PLAIN_SCAN)
#define OPENJAMBA_AVX2_SCAN 1
#endif

namespace {

using namespace openjamba;

struct ScanArgs {
  int64_t batch, length, channels, state, chunk, groups, threads, softplus;
  Rows u, delta, z, B, C, out, dout, du, ddelta, dz;
  void *A, *D, *bias, *h0, *hT, *ckpt;
  void *dhT, *dA, *dD, *dbias, *dh0, *dB, *dC;
};

// One block's parameters in the layout of the vector loops.
template <typename T>
struct BlockParams {
  int64_t d0;     // first channel
  const T* A;     // (state, width), times Math<T>::exp_scale
  const T* D;     // (width,), zeros when absent
  const T* bias;  // (width,), zeros when absent
};

// The blocks of one group (a work item's channels) with their parameters, laid out once per work item.
template <typename T>
struct Group {
  const Blocks& blocks;
  int64_t k0, k1, N;
  std::vector<T> A, D, bias;  // one (N, W) / (W,) slot per block

  Group(const ScanArgs& a, const Blocks& blocks, int64_t g)
      : blocks(blocks), k0(blocks.first_of_group(g, a.groups)), k1(blocks.first_of_group(g + 1, a.groups)),
        N(a.state), A((k1 - k0) * N * W), D((k1 - k0) * W, T(0)), bias((k1 - k0) * W, T(0)) {
    for (int64_t k = k0; k < k1; ++k) {
      const int64_t j = k - k0, d0 = blocks.start(k), wb = blocks.width(k);
      for (int64_t w = 0; w < wb; ++w) {
        for (int64_t n = 0; n < N; ++n)
          A[j * N * W + n * wb + w] = static_cast<const T*>(a.A)[(d0 + w) * N + n] * Math<T>::exp_scale;
        if (a.D) D[j * W + w] = static_cast<const T*>(a.D)[d0 + w];
        if (a.bias) bias[j * W + w] = static_cast<const T*>(a.bias)[d0 + w];
      }
    }
  }
  int64_t size() const { return k1 - k0; }
  bool full(int64_t j) const { return blocks.width(k0 + j) == W; }
  BlockParams<T> params(int64_t j) const {
    return {blocks.start(k0 + j), A.data() + j * N * W, D.data() + j * W, bias.data() + j * W};
  }
};

// Row `index` of a (rows, channels, state) tensor (the batch, or batch * chunks + chunk) <-> a block's [state][lane]
// array. A null source reads as zeros.
template <typename T, int WB>
void load_state(const ScanArgs& a, const void* src, int64_t index, int64_t d0, T* h) {
  if (!src) {
    std::fill(h, h + a.state * WB, T(0));
    return;
  }
  const T* s = static_cast<const T*>(src) + (index * a.channels + d0) * a.state;
  for (int w = 0; w < WB; ++w)
    for (int64_t n = 0; n < a.state; ++n) h[n * WB + w] = s[w * a.state + n];
}

template <typename T, int WB>
void store_state(const ScanArgs& a, void* dst, int64_t index, int64_t d0, const T* h) {
  T* s = static_cast<T*>(dst) + (index * a.channels + d0) * a.state;
  for (int w = 0; w < WB; ++w)
    for (int64_t n = 0; n < a.state; ++n) s[w * a.state + n] = h[n * WB + w];
}

// dt = softplus(delta + bias) (or delta + bias) for one step of a block.
template <typename T, int WB>
inline void step_dt(const ScanArgs& a, const BlockParams<T>& p, const T* delta, T* dt) {
  if (a.softplus) {
#pragma omp simd
    for (int w = 0; w < WB; ++w) dt[w] = Math<T>::softplus(delta[w] + p.bias[w]);
  } else {
#pragma omp simd
    for (int w = 0; w < WB; ++w) dt[w] = delta[w] + p.bias[w];
  }
}

// One step of the recurrence for a block: h_out = exp(dt A) h_in + dt u B_t (h_out may be h_in); returns
// sum_n C_t h_out in y. With KEEP, the decays exp(dt A) are written to `decay` (the backward reuses them).
template <typename T, int WB, bool KEEP>
inline void step_state(int64_t N, const T* A, const T* dt, const T* du, const T* Bt, const T* Ct, const T* h_in,
                       T* h_out, T* y, T* decay) {
  for (int w = 0; w < WB; ++w) y[w] = T(0);
  for (int64_t n = 0; n < N; ++n) {
    const T bn = Bt[n], cn = Ct[n];
    const T* An = A + n * WB;
#pragma omp simd
    for (int w = 0; w < WB; ++w) {
      const T an = Math<T>::exp_scaled(dt[w] * An[w]);
      const T hv = an * h_in[n * WB + w] + du[w] * bn;
      h_out[n * WB + w] = hv;
      y[w] += cn * hv;
      if (KEEP) decay[n * WB + w] = an;
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Forward.

// Steps [t0, t1) of one block, state h ([state][WB]) carried in and out.
template <typename T, int WB>
void forward_chunk(const ScanArgs& a, const BlockParams<T>& p, int64_t b, int64_t t0, int64_t t1, T* h) {
  const int64_t d0 = p.d0;
  T dt[WB], du[WB], y[WB];
  for (int64_t t = t0; t < t1; ++t) {
    const T* ut = row<T>(a.u, b, t) + d0;
    step_dt<T, WB>(a, p, row<T>(a.delta, b, t) + d0, dt);
#pragma omp simd
    for (int w = 0; w < WB; ++w) du[w] = dt[w] * ut[w];
    step_state<T, WB, false>(a.state, p.A, dt, du, row<T>(a.B, b, t), row<T>(a.C, b, t), h, h, y, nullptr);
    T* ot = row_out<T>(a.out, b, t) + d0;
    if (a.z.ptr) {
      const T* zt = row<T>(a.z, b, t) + d0;
#pragma omp simd
      for (int w = 0; w < WB; ++w) ot[w] = (y[w] + p.D[w] * ut[w]) * zt[w] * Math<T>::sigmoid(zt[w]);
    } else {
#pragma omp simd
      for (int w = 0; w < WB; ++w) ot[w] = y[w] + p.D[w] * ut[w];
    }
  }
}

#ifdef OPENJAMBA_AVX2_SCAN
// forward_chunk for a whole block in fp32 with AVX2 (W / 8 vectors of 8 lanes): the same operations in the same order
// (so the same bits), arranged for the core. Steps go in passes of AVX2_STEPS: dt and dt u of every step of the pass,
// then the states (update_states_avx2), then every step's output. forward_chunk's steps each wait on their dt (softplus:
// two divisions deep) and then on their sums before the output, chains the core cannot overlap with the state update
// around them (hundreds of instructions per step); in passes they overlap from step to step. Within a pass, several
// independent vectors go through each step of the math together (avx2_math.h's exp2_vectors, softplus_vectors,
// sigmoid_vectors): a long chain per vector leaves the core little to overlap otherwise.
constexpr int AVX2_STEPS = 16;
constexpr int AVX2_V = W / 8;
// Which blocks take the AVX2 passes (forward and the backward's recomputation): whole blocks in fp32.
template <typename T, int WB>
constexpr bool AVX2_BLOCK = std::is_same_v<T, float> && WB == W && W % 8 == 0;
constexpr int AVX2_G = 2;  // states per update_states_group, their exponentials side by side (more: spills)

// States [n, n + G) of one step: h_out = exp2(dt A_n) h_in + du B_n (step_state's multiply-add: the product du B_n
// added to exp2 * h_in in one rounding), then y += C_n h_out by a multiply-add; the G * AVX2_V exponentials side by
// side through exp2_vectors. KEEP: the decays exp2(dt A_n) to `decay` too (step_state's KEEP).
template <int G, bool NONPOSITIVE, bool KEEP>
inline void update_states_group(int64_t n, const float* A, const __m256* dtv, const __m256* duv, const float* Bt,
                                const float* Ct, const float* h_in, float* h_out, float* decay, __m256* yv) {
  __m256 e[G * AVX2_V];
  for (int g = 0; g < G; ++g)
    for (int v = 0; v < AVX2_V; ++v)
      e[g * AVX2_V + v] = _mm256_mul_ps(dtv[v], _mm256_loadu_ps(A + (n + g) * W + 8 * v));
  exp2_vectors<G * AVX2_V, NONPOSITIVE>(e);
  for (int g = 0; g < G; ++g) {
    const __m256 bn = _mm256_broadcast_ss(Bt + n + g), cn = _mm256_broadcast_ss(Ct + n + g);
    for (int v = 0; v < AVX2_V; ++v) {
      const int64_t at = (n + g) * W + 8 * v;
      const __m256 hn = _mm256_fmadd_ps(e[g * AVX2_V + v], _mm256_loadu_ps(h_in + at), _mm256_mul_ps(duv[v], bn));
      _mm256_storeu_ps(h_out + at, hn);
      if (KEEP) _mm256_storeu_ps(decay + at, e[g * AVX2_V + v]);
      yv[v] = _mm256_fmadd_ps(cn, hn, yv[v]);
    }
  }
}

// The recurrence of steps [t0, t0 + len) of a block (dt, du: (len, W); sums y, from zero, to (len, W)). Step i reads
// the states at h + i h_step and writes them h_step further on: in place (0, the forward) or into the next step's slot
// (N W: the backward's recomputation, which keeps every step's states, and its decays, (len, N, W) from `decay`).
// NONPOSITIVE: every exponent dt A_n is <= 0 or NaN (exp2_vectors' hint).
template <bool NONPOSITIVE, bool KEEP>
void update_states_avx2(const ScanArgs& a, const float* A, int64_t b, int64_t t0, int64_t len, const float* dt,
                        const float* du, float* h, int64_t h_step, float* y, float* decay) {
  const int64_t N = a.state;
  for (int64_t i = 0; i < len; ++i) {
    const float* Bt = row<float>(a.B, b, t0 + i);
    const float* Ct = row<float>(a.C, b, t0 + i);
    const float* h_in = h + i * h_step;
    float* h_out = h + (i + 1) * h_step;
    float* decay_i = KEEP ? decay + i * N * W : nullptr;
    __m256 dtv[AVX2_V], duv[AVX2_V], yv[AVX2_V];
    for (int v = 0; v < AVX2_V; ++v) {
      dtv[v] = _mm256_loadu_ps(dt + i * W + 8 * v);
      duv[v] = _mm256_loadu_ps(du + i * W + 8 * v);
      yv[v] = _mm256_setzero_ps();
    }
    int64_t n = 0;
    for (; n + AVX2_G <= N; n += AVX2_G)
      update_states_group<AVX2_G, NONPOSITIVE, KEEP>(n, A, dtv, duv, Bt, Ct, h_in, h_out, decay_i, yv);
    for (; n < N; ++n) update_states_group<1, NONPOSITIVE, KEEP>(n, A, dtv, duv, Bt, Ct, h_in, h_out, decay_i, yv);
    for (int v = 0; v < AVX2_V; ++v) _mm256_storeu_ps(y + i * W + 8 * v, yv[v]);
  }
}

// update_states_avx2 with the hint where it holds (exponents_nonpositive).
template <bool KEEP>
void states_avx2(const ScanArgs& a, const BlockParams<float>& p, int64_t b, int64_t t0, int64_t len, const float* dt,
                 const float* du, float* h, int64_t h_step, float* y, float* decay, bool nonpositive) {
  if (nonpositive)
    update_states_avx2<true, KEEP>(a, p.A, b, t0, len, dt, du, h, h_step, y, decay);
  else
    update_states_avx2<false, KEEP>(a, p.A, b, t0, len, dt, du, h, h_step, y, decay);
}

// Whether every exponent dt A_n of the block is <= 0 or NaN: softplus makes dt >= 0 (or NaN), and no A is > 0.
inline bool exponents_nonpositive(const ScanArgs& a, const BlockParams<float>& p) {
  return a.softplus && none_positive(p.A, a.state * W);
}

// Vectors [0, count) of the (len, W) arrays of a pass, AVX2_P at a time: vector q is step q / AVX2_V, lanes
// 8 (q % AVX2_V) on. A short last group repeats its last vector (computed, not stored twice).
constexpr int AVX2_P = 4;
template <typename F>
inline void pass_groups(int64_t len, F f) {
  const int64_t count = len * AVX2_V;
  for (int64_t q0 = 0; q0 < count; q0 += AVX2_P) {
    int64_t step[AVX2_P], lane[AVX2_P];
    const int g = static_cast<int>(std::min<int64_t>(AVX2_P, count - q0));
    for (int k = 0; k < AVX2_P; ++k) {
      const int64_t q = q0 + std::min(k, g - 1);
      step[k] = q / AVX2_V, lane[k] = 8 * (q % AVX2_V);
    }
    f(step, lane, g);
  }
}

// step_dt and dt u (forward_chunk's) of steps [t0, t0 + len) of a block, AVX2_P vectors at a time: dt, du (len, W).
void step_inputs_avx2(const ScanArgs& a, const BlockParams<float>& p, int64_t b, int64_t t0, int64_t len, float* dt,
                      float* du) {
  pass_groups(len, [&](const int64_t* step, const int64_t* lane, int g) {
    __m256 x[AVX2_P];
    for (int k = 0; k < AVX2_P; ++k)
      x[k] = _mm256_add_ps(_mm256_loadu_ps(row<float>(a.delta, b, t0 + step[k]) + p.d0 + lane[k]),
                           _mm256_loadu_ps(p.bias + lane[k]));
    if (a.softplus) softplus_vectors<AVX2_P>(x);
    for (int k = 0; k < g; ++k) {
      const __m256 u = _mm256_loadu_ps(row<float>(a.u, b, t0 + step[k]) + p.d0 + lane[k]);
      _mm256_storeu_ps(dt + step[k] * W + lane[k], x[k]);
      _mm256_storeu_ps(du + step[k] * W + lane[k], _mm256_mul_ps(x[k], u));
    }
  });
}

// forward_chunk's outputs of steps [t0, t0 + len) of a block from their sums y (len, W), AVX2_P vectors
// at a time: y + D u by a multiply-add, then times z, times sigmoid(z).
void step_outputs_avx2(const ScanArgs& a, const BlockParams<float>& p, int64_t b, int64_t t0, int64_t len,
                       const float* y) {
  pass_groups(len, [&](const int64_t* step, const int64_t* lane, int g) {
    __m256 o[AVX2_P], z[AVX2_P], sg[AVX2_P];
    for (int k = 0; k < AVX2_P; ++k) {
      const __m256 u = _mm256_loadu_ps(row<float>(a.u, b, t0 + step[k]) + p.d0 + lane[k]);
      o[k] = _mm256_fmadd_ps(_mm256_loadu_ps(p.D + lane[k]), u, _mm256_loadu_ps(y + step[k] * W + lane[k]));
      if (a.z.ptr) sg[k] = z[k] = _mm256_loadu_ps(row<float>(a.z, b, t0 + step[k]) + p.d0 + lane[k]);
    }
    if (a.z.ptr) {
      sigmoid_vectors<AVX2_P>(sg);
      for (int k = 0; k < AVX2_P; ++k) o[k] = _mm256_mul_ps(_mm256_mul_ps(o[k], z[k]), sg[k]);
    }
    for (int k = 0; k < g; ++k) _mm256_storeu_ps(row_out<float>(a.out, b, t0 + step[k]) + p.d0 + lane[k], o[k]);
  });
}

void forward_chunk_avx2(const ScanArgs& a, const BlockParams<float>& p, int64_t b, int64_t t0, int64_t t1, float* h) {
  const bool nonpositive = exponents_nonpositive(a, p);
  alignas(32) float dt[AVX2_STEPS * W], du[AVX2_STEPS * W], y[AVX2_STEPS * W];
  for (int64_t s0 = t0; s0 < t1; s0 += AVX2_STEPS) {
    const int64_t len = std::min<int64_t>(AVX2_STEPS, t1 - s0);
    step_inputs_avx2(a, p, b, s0, len, dt, du);
    states_avx2<false>(a, p, b, s0, len, dt, du, h, 0, y, nullptr, nonpositive);
    step_outputs_avx2(a, p, b, s0, len, y);
  }
}
#endif

template <typename T, int WB>
void forward_block_chunk(const ScanArgs& a, const BlockParams<T>& p, int64_t b, int64_t c, T* h) {
  const int64_t t0 = c * a.chunk, t1 = std::min(a.length, t0 + a.chunk);
  if (c == 0) load_state<T, WB>(a, a.h0, b, p.d0, h);
  if (a.ckpt) store_state<T, WB>(a, a.ckpt, b * ((a.length + a.chunk - 1) / a.chunk) + c, p.d0, h);
#ifdef OPENJAMBA_AVX2_SCAN
  if constexpr (AVX2_BLOCK<T, WB>)
    forward_chunk_avx2(a, p, b, t0, t1, h);
  else
#endif
    forward_chunk<T, WB>(a, p, b, t0, t1, h);
  if (t1 == a.length && a.hT) store_state<T, WB>(a, a.hT, b, p.d0, h);
}

template <typename T>
void forward(const ScanArgs& a) {
  const Blocks blocks(a.channels);
  const int64_t chunks = (a.length + a.chunk - 1) / a.chunk;
#pragma omp parallel for num_threads(a.threads) schedule(static)
  for (int64_t item = 0; item < a.batch * a.groups; ++item) {
    const int64_t b = item / a.groups;
    const Group<T> group(a, blocks, item % a.groups);
    std::vector<T> states(group.size() * a.state * W);  // one [state][W] slot per block
    for (int64_t c = 0; c < chunks; ++c)
      for (int64_t j = 0; j < group.size(); ++j) {
        T* h = states.data() + j * a.state * W;
        if (group.full(j))
          forward_block_chunk<T, W>(a, group.params(j), b, c, h);
        else
          forward_block_chunk<T, 1>(a, group.params(j), b, c, h);
      }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Backward.

// Per-thread buffers for one chunk of one block, plus the group's lane partials of dB and dC for the chunk.
template <typename T>
struct Scratch {
  int64_t N;
  std::vector<T> h, decay, dt, y, dB, dC;  // h: (chunk + 1, N, W); decay: (chunk, N, W); dt, y: (chunk, W)
  Scratch(int64_t chunk, int64_t N)
      : N(N), h((chunk + 1) * N * W), decay(chunk * N * W), dt(chunk * W), y(chunk * W),
        dB(chunk * N * W), dC(chunk * N * W) {}
};

// Per-block accumulators carried across chunks (adjoint g, dA) and across the batch (dA, dD, dbias).
template <typename T>
struct Carry {
  T* g;   // (N, W): dL/dh entering the step after the current one, already multiplied by its decay
  T* dA;  // (N, W)
  T* dD;  // (W,)
  T* dbias;
};

// Recompute a chunk's states, decays, dt and pre-gate outputs from its checkpoint.
template <typename T, int WB>
void recompute_chunk(const ScanArgs& a, const BlockParams<T>& p, int64_t b, int64_t c, int64_t len, Scratch<T>& s) {
  const int64_t N = a.state, d0 = p.d0, t0 = c * a.chunk, chunks = (a.length + a.chunk - 1) / a.chunk;
  load_state<T, WB>(a, a.ckpt, b * chunks + c, d0, s.h.data());
  T du[WB];
  for (int64_t i = 0; i < len; ++i) {
    const T* ut = row<T>(a.u, b, t0 + i) + d0;
    T* dt = s.dt.data() + i * W;
    step_dt<T, WB>(a, p, row<T>(a.delta, b, t0 + i) + d0, dt);
    for (int w = 0; w < WB; ++w) du[w] = dt[w] * ut[w];
    T* h = s.h.data() + i * N * WB;
    step_state<T, WB, true>(N, p.A, dt, du, row<T>(a.B, b, t0 + i), row<T>(a.C, b, t0 + i), h, h + N * WB,
                            s.y.data() + i * W, s.decay.data() + i * N * WB);
  }
}

// Gradient of the gated output at one step: returns dy (w.r.t. the pre-gate output) and writes dz.
template <typename T, int WB>
inline void gate_backward(const ScanArgs& a, const BlockParams<T>& p, int64_t b, int64_t t, int64_t d0,
                          const T* ut, const T* y, T* dy) {
  const T* go = row<T>(a.dout, b, t) + d0;
  if (!a.z.ptr) {
    for (int w = 0; w < WB; ++w) dy[w] = go[w];
    return;
  }
  const T* zt = row<T>(a.z, b, t) + d0;
  T* dz = row_out<T>(a.dz, b, t) + d0;
#pragma omp simd
  for (int w = 0; w < WB; ++w) {
    const T sg = Math<T>::sigmoid(zt[w]);
    const T pre = y[w] + p.D[w] * ut[w];
    dy[w] = go[w] * zt[w] * sg;
    dz[w] = go[w] * pre * sg * (T(1) + zt[w] * (T(1) - sg));
  }
}

// The adjoint recurrence over one chunk of one block, newest step first.
template <typename T, int WB>
void adjoint_chunk(const ScanArgs& a, const BlockParams<T>& p, int64_t b, int64_t c, int64_t len, Scratch<T>& s,
                   Carry<T>& carry) {
  const int64_t N = a.state, t0 = c * a.chunk, d0 = p.d0;
  T dy[WB], du[WB], sum_gB[WB], sum_gAah[WB];
  for (int64_t i = len - 1; i >= 0; --i) {
    const int64_t t = t0 + i;
    const T* ut = row<T>(a.u, b, t) + d0;
    const T* dt = s.dt.data() + i * W;
    gate_backward<T, WB>(a, p, b, t, d0, ut, s.y.data() + i * W, dy);
    const T* Bt = row<T>(a.B, b, t);
    const T* Ct = row<T>(a.C, b, t);
    const T* h_prev = s.h.data() + i * N * WB;
    const T* h_now = h_prev + N * WB;
    const T* decay = s.decay.data() + i * N * WB;
    T* dB_lanes = s.dB.data() + i * N * W;
    T* dC_lanes = s.dC.data() + i * N * W;
    for (int w = 0; w < WB; ++w) {
      sum_gB[w] = sum_gAah[w] = T(0);
      du[w] = dt[w] * ut[w];
    }
    for (int64_t n = 0; n < N; ++n) {
      const T bn = Bt[n], cn = Ct[n];
      T* g = carry.g + n * WB;
      T* dA = carry.dA + n * WB;
      const T* An = p.A + n * WB;
#pragma omp simd
      for (int w = 0; w < WB; ++w) {
        const int64_t nw = n * WB + w;
        const T gv = g[w] + cn * dy[w];                // dL/dh_t
        const T sv = gv * decay[nw] * h_prev[nw];      // dL/d(dt A)
        dC_lanes[n * W + w] += dy[w] * h_now[nw];
        dB_lanes[n * W + w] += gv * du[w];
        sum_gB[w] += gv * bn;
        sum_gAah[w] += sv * An[w];  // An is A * exp_scale
        dA[w] += sv * dt[w];
        g[w] = decay[nw] * gv;
      }
    }
    const T* delta = row<T>(a.delta, b, t) + d0;
    T* grad_u = row_out<T>(a.du, b, t) + d0;
    T* grad_delta = row_out<T>(a.ddelta, b, t) + d0;
#pragma omp simd
    for (int w = 0; w < WB; ++w) {
      const T ddt = ut[w] * sum_gB[w] + sum_gAah[w] / Math<T>::exp_scale;
      const T ddelta = a.softplus ? ddt * Math<T>::softplus_grad(delta[w] + p.bias[w]) : ddt;
      grad_u[w] = dt[w] * sum_gB[w] + p.D[w] * dy[w];
      grad_delta[w] = ddelta;
      carry.dbias[w] += ddelta;
      carry.dD[w] += dy[w] * ut[w];
    }
  }
}

#ifdef OPENJAMBA_AVX2_SCAN
// recompute_chunk for a whole block in fp32 with AVX2: forward_chunk_avx2's passes, each step's states and decays kept
// (the same bits as recompute_chunk).
void recompute_chunk_avx2(const ScanArgs& a, const BlockParams<float>& p, int64_t b, int64_t c, int64_t len,
                          Scratch<float>& s) {
  const int64_t N = a.state, t0 = c * a.chunk, chunks = (a.length + a.chunk - 1) / a.chunk;
  load_state<float, W>(a, a.ckpt, b * chunks + c, p.d0, s.h.data());
  const bool nonpositive = exponents_nonpositive(a, p);
  alignas(32) float du[AVX2_STEPS * W];
  for (int64_t i0 = 0; i0 < len; i0 += AVX2_STEPS) {
    const int64_t n = std::min<int64_t>(AVX2_STEPS, len - i0);
    float* dt = s.dt.data() + i0 * W;
    step_inputs_avx2(a, p, b, t0 + i0, n, dt, du);
    states_avx2<true>(a, p, b, t0 + i0, n, dt, du, s.h.data() + i0 * N * W, N * W, s.y.data() + i0 * W,
                      s.decay.data() + i0 * N * W, nonpositive);
  }
}
#endif

template <typename T, int WB>
void backward_block_chunk(const ScanArgs& a, const BlockParams<T>& p, int64_t b, int64_t c, Scratch<T>& s,
                          Carry<T>& carry) {
  const int64_t t0 = c * a.chunk, len = std::min(a.length, t0 + a.chunk) - t0;
  if (t0 + len == a.length) load_state<T, WB>(a, a.dhT, b, p.d0, carry.g);
#ifdef OPENJAMBA_AVX2_SCAN
  if constexpr (AVX2_BLOCK<T, WB>)
    recompute_chunk_avx2(a, p, b, c, len, s);
  else
#endif
    recompute_chunk<T, WB>(a, p, b, c, len, s);
  adjoint_chunk<T, WB>(a, p, b, c, len, s, carry);
  if (c == 0) store_state<T, WB>(a, a.dh0, b, p.d0, carry.g);
}

// Sum the lanes of the chunk's dB/dC partials into the group's (batch, length, state) slices, then clear them.
template <typename T>
void flush_lanes(const ScanArgs& a, int64_t g, int64_t b, int64_t t0, int64_t len, Scratch<T>& s) {
  const int64_t N = a.state, offset = ((g * a.batch + b) * a.length + t0) * N;
  T* dB = static_cast<T*>(a.dB) + offset;
  T* dC = static_cast<T*>(a.dC) + offset;
  for (int64_t i = 0; i < len * N; ++i) {
    T sb = T(0), sc = T(0);
    for (int w = 0; w < W; ++w) {
      sb += s.dB[i * W + w];
      sc += s.dC[i * W + w];
    }
    dB[i] = sb;
    dC[i] = sc;
  }
  std::fill(s.dB.begin(), s.dB.end(), T(0));
  std::fill(s.dC.begin(), s.dC.end(), T(0));
}

template <typename T>
void backward(const ScanArgs& a) {
  const Blocks blocks(a.channels);
  const int64_t chunks = (a.length + a.chunk - 1) / a.chunk, N = a.state;
#pragma omp parallel for num_threads(a.threads) schedule(static)
  for (int64_t g = 0; g < a.groups; ++g) {
    const Group<T> group(a, blocks, g);
    const int64_t nb = group.size();
    Scratch<T> s(a.chunk, N);
    std::vector<T> g_state(nb * N * W), dA(nb * N * W, T(0)), dD(nb * W, T(0)), dbias(nb * W, T(0));
    for (int64_t b = 0; b < a.batch; ++b) {
      std::fill(g_state.begin(), g_state.end(), T(0));
      for (int64_t c = chunks - 1; c >= 0; --c) {
        for (int64_t j = 0; j < nb; ++j) {
          Carry<T> carry{g_state.data() + j * N * W, dA.data() + j * N * W, dD.data() + j * W, dbias.data() + j * W};
          if (group.full(j))
            backward_block_chunk<T, W>(a, group.params(j), b, c, s, carry);
          else
            backward_block_chunk<T, 1>(a, group.params(j), b, c, s, carry);
        }
        flush_lanes<T>(a, g, b, c * a.chunk, std::min(a.length, (c + 1) * a.chunk) - c * a.chunk, s);
      }
    }
    // Per-channel sums over batch and time: this group's channels only, so no other thread writes them.
    for (int64_t j = 0; j < nb; ++j) {
      const int64_t d0 = group.params(j).d0, wb = blocks.width(group.k0 + j);
      for (int64_t w = 0; w < wb; ++w) {
        static_cast<T*>(a.dD)[d0 + w] = dD[j * W + w];
        static_cast<T*>(a.dbias)[d0 + w] = dbias[j * W + w];
        for (int64_t n = 0; n < N; ++n) static_cast<T*>(a.dA)[(d0 + w) * N + n] = dA[j * N * W + n * wb + w];
      }
    }
  }
}

}  // namespace

extern "C" {

int openjamba_abi_version() { return 6; }
int openjamba_lanes() { return W; }

void scan_forward_f32(const ScanArgs* a) { forward<float>(*a); }
void scan_forward_f64(const ScanArgs* a) { forward<double>(*a); }
void scan_backward_f32(const ScanArgs* a) { backward<float>(*a); }
void scan_backward_f64(const ScanArgs* a) { backward<double>(*a); }

}  // extern "C"
