// The Mamba mixer's one-token decoding step between in_proj and out_proj, in one call (ops/decode.py has the
// plain PyTorch reference, `mamba_step_ref`, and the contract):
//
//   u, z  = the two halves of in_proj's output row             (channels each)
//   u     = silu(conv_bias + sum_k conv_w[:, k] * [window, u][k]); window shifted by one, u appended (in place)
//   dt, B, C = x_proj_w @ u, split (rank, N, N); each RMS-normalised with its weight
//   dt    = softplus(dt_proj_w @ dt + dt_bias)
//   h     = exp(dt * A) * h + dt * u * B   (A = -exp(A_log), given; h the (channels, N) SSM state, in place)
//   y     = (C . h + D * u) * silu(z)
//
// Decoding is bound by per-call overhead for small models: this replaces ~25 tensor ops per layer and token. Each
// phase covers all the batch's rows, so a serving batch reads each weight once; a row's arithmetic never depends on
// the other rows or the thread count. A comes in ready (the model keeps -exp(A_log) between steps: recomputing
// channels x N exponentials per layer and token cost as much as the state update itself). The work is split over
// threads by channels (conv, state update), by rows of x_proj and by batch rows (the norms).
//   xz: (batch, 2 * channels) rows, row stride xz_stride;  window: (batch, K - 1, channels);  conv_w: (channels, K)
//   x_proj_w: (rank + 2N, channels);  dt_proj_w: (channels, rank);  A: (channels, N);  h: (batch, channels, N)
//   y: (batch, channels);  scratch: (batch, rank + 2N + 3 channels) values of workspace
//
// x_proj and dt_proj may instead be quantized weights (openjamba.quant's int8 / int4 layout; fp32 only): x_bits or
// dt_bits is then 8 or 4, the weight pointer holds q, and *_scales / *_zeros / *_group the rest of the format. Their
// products are those of quant_linear.cpp (on several threads run inside the step's one parallel region by
// quant_linear.h's team_product, its threads sharing each product's work items; on one, qlinear_int8 / qlinear_int4
// between the phases), so a quantized step computes exactly what the quantized layer computes product by product.

#include <algorithm>
#include <limits>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#endif

#include "avx2_math.h"
#include "common.h"
#include "mamba_step.h"
#include "quant_linear.h"
#include "tiles.h"

namespace {

using namespace openjamba;

template <typename T>
inline T silu(T x) {
  return x * Math<T>::sigmoid(x);
}

template <typename T>
void rms_norm(T* v, const T* weight, int64_t n, double eps) {
  T sum = T(0);
  for (int64_t i = 0; i < n; ++i) sum += v[i] * v[i];
  const T scale = T(1) / std::sqrt(sum / T(n) + T(eps));
  for (int64_t i = 0; i < n; ++i) v[i] = v[i] * scale * weight[i];
}

// Sums of products in lanes, the lanes then added as a tree: a per-channel reduction over a few dozen values
// (`omp simd reduction` adds the lanes one after another, a chain as long as the lanes, for every channel).
template <typename T>
constexpr int kLanes = Vec<T>::lanes;  // one vector of the build (tiles.h): 64 bytes with AVX-512, else 32

template <typename T>
inline T tree_sum(T* part) {
  for (int w = kLanes<T> / 2; w > 0; w /= 2)
    for (int i = 0; i < w; ++i) part[i] += part[i + w];
  return part[0];
}

#ifdef __AVX512F__
// The same tree in registers: the loops above compile to narrowing stores and reloads through the stack, which
// stall store forwarding once per channel (most of the state update's time).
template <>
inline float tree_sum<float>(float* part) {
  return _mm512_reduce_add_ps(_mm512_loadu_ps(part));
}
#endif

// Channels [c0, c1) of item i of n, in multiples of W.
inline void channel_range(int64_t channels, int64_t n, int64_t i, int64_t& c0, int64_t& c1) {
  const int64_t blocks = (channels + W - 1) / W;
  c0 = std::min(channels, blocks * i / n * W);
  c1 = std::min(channels, blocks * (i + 1) / n * W);
}

// A's factor in the state update, A * exp_scale: prepared (SCALED: the argument is already that product) or taken
// where it is used (the same product, so the same bits).
template <typename T, bool SCALED>
inline T scaled_rate(T a) {
  if constexpr (SCALED)
    return a;
  else
    return a * Math<T>::exp_scale;
}

// dt of row b's channels [c0, c0 + w): dt_proj's product (in the row's scratch) plus the bias (the reference's
// order), then softplus.
template <typename T>
inline void block_dt(const MambaStepArgs& a, int64_t b, int64_t c0, int64_t w, T* dt) {
  const int64_t D_ = a.channels, P = a.rank + 2 * a.state;
  const T* dt_proj = static_cast<const T*>(a.scratch) + b * (P + 3 * D_) + P + D_ + c0;
  const T* dt_bias = static_cast<const T*>(a.dt_bias);
#pragma omp simd
  for (int64_t j = 0; j < w; ++j) dt[j] = dt_proj[j] + (dt_bias ? dt_bias[c0 + j] : T(0));
#pragma omp simd
  for (int64_t j = 0; j < w; ++j) dt[j] = Math<T>::softplus(dt[j]);
}

// y of row b's channels [c0, c0 + w) from the sums C . h (out): skip connection, then the gate.
template <typename T>
inline void block_output(const MambaStepArgs& a, int64_t b, int64_t c0, int64_t w, const T* out) {
  const int64_t D_ = a.channels, P = a.rank + 2 * a.state;
  const T* z = static_cast<const T*>(a.xz) + b * a.xz_stride + D_ + c0;
  const T* u = static_cast<const T*>(a.scratch) + b * (P + 3 * D_) + P + c0;
  const T* Dp = static_cast<const T*>(a.D);
  T* y = static_cast<T*>(a.y) + b * D_ + c0;
#pragma omp simd
  for (int64_t j = 0; j < w; ++j) y[j] = (out[j] + (Dp ? Dp[c0 + j] : T(0)) * u[j]) * silu(z[j]);
}

#ifdef OPENJAMBA_AVX2_MATH
#define OPENJAMBA_AVX2_STATE 1
// The fp32 state update with 8-lane vectors (AVX2) when the state is a whole number of them (NV vectors, N = 8 NV):
// every row, one or several, takes it (so a row's bits never depend on the rows beside it). The generic loop below
// runs one channel at a time (a dependency chain of ~50 cycles the core overlaps little) and sums each channel's
// lanes through the stack; here AVX2_G channels go through each step of the exponential together, and the block's
// sums C . h are added in one transposing network (tiles.h's lane_sums_of).
constexpr int AVX2_G = 4;

// The 8 rates from As + i as A * exp_scale: prepared (SCALED) or taken here (the same product, so the same bits).
template <bool SCALED>
inline __m256 rate_vector(const float* As, int64_t i) {
  const __m256 a = _mm256_loadu_ps(As + i);
  return SCALED ? a : _mm256_mul_ps(a, _mm256_set1_ps(Math<float>::exp_scale));
}

// The w channels from c0 of row b (w <= W; dt: block_dt's): h = exp2(dt * As) h + (dt u) B in place, and the sums
// C . h (vector 0's products, then each further vector's by a multiply-add, then the lanes by lane_sums_of) to out.
// NONPOSITIVE: no rate As is > 0; dt (softplus) is >= 0 or NaN, so every exponent is <= 0 or NaN.
template <bool SCALED, int NV, bool NONPOSITIVE>
void update_block_avx2(const MambaStepArgs& a, int64_t b, int64_t c0, int64_t w, const float* As, const float* dt,
                       float* out) {
  constexpr int N = 8 * NV;
  const int64_t D_ = a.channels, R = a.rank, P = R + 2 * N;
  const float* proj = static_cast<const float*>(a.scratch) + b * (P + 3 * D_);
  const float* u = proj + P + c0;
  __m256 Bv[NV], Cv[NV];
  for (int v = 0; v < NV; ++v) Bv[v] = _mm256_loadu_ps(proj + R + 8 * v), Cv[v] = _mm256_loadu_ps(proj + R + N + 8 * v);
  float* h = static_cast<float*>(a.h) + (b * D_ + c0) * N;
  Vec<float>::type prod[W] = {};
  for (int64_t j0 = 0; j0 < w; j0 += AVX2_G) {
    const int g = static_cast<int>(std::min<int64_t>(AVX2_G, w - j0));
    __m256 e[AVX2_G * NV];
    for (int q = 0; q < AVX2_G; ++q) {
      const int64_t j = j0 + std::min(q, g - 1);  // a short group repeats its last channel (not stored twice)
      for (int v = 0; v < NV; ++v)
        e[q * NV + v] = _mm256_mul_ps(_mm256_set1_ps(dt[j]), rate_vector<SCALED>(As, j * N + 8 * v));
    }
    exp2_vectors<AVX2_G * NV, NONPOSITIVE>(e);
    for (int q = 0; q < g; ++q) {
      const int64_t j = j0 + q;
      const __m256 du = _mm256_set1_ps(dt[j] * u[j]);
      __m256 sum = _mm256_setzero_ps();
      for (int v = 0; v < NV; ++v) {
        float* hv = h + j * N + 8 * v;
        const __m256 hn = _mm256_fmadd_ps(e[q * NV + v], _mm256_loadu_ps(hv), _mm256_mul_ps(du, Bv[v]));
        _mm256_storeu_ps(hv, hn);
        sum = v == 0 ? _mm256_mul_ps(Cv[v], hn) : _mm256_fmadd_ps(Cv[v], hn, sum);
      }
      prod[j] = static_cast<Vec<float>::type>(sum);
    }
  }
  lane_sums_of<float, W>(prod, out);
}

// update_block_avx2 for the state sizes it covers (N = 8 or 16); false for the others.
template <bool SCALED, bool NONPOSITIVE>
bool update_block_sizes(const MambaStepArgs& a, int64_t b, int64_t c0, int64_t w, const float* As, const float* dt,
                        float* out) {
  if (a.state == 16) return update_block_avx2<SCALED, 2, NONPOSITIVE>(a, b, c0, w, As, dt, out), true;
  if (a.state == 8) return update_block_avx2<SCALED, 1, NONPOSITIVE>(a, b, c0, w, As, dt, out), true;
  return false;
}

template <bool SCALED>
bool update_block_vectors(const MambaStepArgs& a, int64_t b, int64_t c0, int64_t w, const float* As, const float* dt,
                          float* out, bool nonpositive) {
  return nonpositive ? update_block_sizes<SCALED, true>(a, b, c0, w, As, dt, out)
                     : update_block_sizes<SCALED, false>(a, b, c0, w, As, dt, out);
}

#endif

// The state update of row b over channels [c0, c0 + w), w <= W, given As for those channels (SCALED: A * exp_scale,
// prepared once per call and shared by every row; else A itself, for one row, where preparing it was a pass of its
// own over A, written and read back) and dt_proj's product already in the row's scratch. Each channel's arithmetic
// is the same whatever the block, the row count or the thread count (batch invariance).
// nonpositive: no value of As is > 0 (a hint for the AVX2 path; the result is the same either way).
template <typename T, bool SCALED>
void update_block(const MambaStepArgs& a, int64_t b, int64_t c0, int64_t w, const T* As, bool nonpositive = false) {
  const int64_t D_ = a.channels, R = a.rank, N = a.state, P = R + 2 * N;
  const T* proj = static_cast<const T*>(a.scratch) + b * (P + 3 * D_);
  const T* u = proj + P + c0;
  const T* Bv = proj + R;
  const T* Cv = proj + R + N;
  T* h = static_cast<T*>(a.h) + (b * D_ + c0) * N;
  T dt[W], out[W];
  block_dt<T>(a, b, c0, w, dt);
#ifdef OPENJAMBA_AVX2_STATE
  if constexpr (std::is_same_v<T, float>) {
    if (update_block_vectors<SCALED>(a, b, c0, w, As, dt, out, nonpositive)) return block_output<T>(a, b, c0, w, out);
  }
#endif
  // The state update, vectorised over each channel's states; when N is a whole number of lanes, the products
  // C * h of the block's channels are summed together after (tiles.h's lane_sums_of: the tree of tree_sum, in
  // about a third of the instructions), so the channels' sums overlap instead of waiting on each other.
  constexpr int L = kLanes<T>;
  if (N == L) {
    using V = typename Vec<T>::type;
    V prod[W];
    for (int64_t j = w; j < W; ++j) prod[j] = V{};  // a short block's unused sums
    for (int64_t j = 0; j < w; ++j) {
      const T dtj = dt[j];
      const T du = dtj * u[j];
      T* hc = h + j * L;
      const T* aj = As + j * L;
      alignas(64) T p[L];
#pragma omp simd
      for (int i = 0; i < L; ++i) {
        const T hn = Math<T>::exp_scaled(dtj * scaled_rate<T, SCALED>(aj[i])) * hc[i] + du * Bv[i];
        hc[i] = hn;
        p[i] = Cv[i] * hn;
      }
      prod[j] = load(p);
    }
    lane_sums_of<T, W>(prod, out);  // the block's W sums at once, each by tree_sum's tree
  } else {
    for (int64_t j = 0; j < w; ++j) {
      const T dtj = dt[j];
      const T du = dtj * u[j];
      T* hc = h + j * N;
      const T* aj = As + j * N;
      T part[L] = {};
      int64_t n0 = 0;
      for (; n0 + L <= N; n0 += L)
#pragma omp simd
        for (int i = 0; i < L; ++i) {
          const int64_t n = n0 + i;
          const T hn = Math<T>::exp_scaled(dtj * scaled_rate<T, SCALED>(aj[n])) * hc[n] + du * Bv[n];
          hc[n] = hn;
          part[i] += Cv[n] * hn;
        }
      T acc = tree_sum(part);
      for (int64_t n = n0; n < N; ++n) {
        const T hn = Math<T>::exp_scaled(dtj * scaled_rate<T, SCALED>(aj[n])) * hc[n] + du * Bv[n];
        hc[n] = hn;
        acc += Cv[n] * hn;
      }
      out[j] = acc;
    }
  }
  block_output<T>(a, b, c0, w, out);
}

#ifdef __AVX512F__
// The fast path of several rows, fp32, 16 states (N one vector): update_block<float, true>'s arithmetic, element by
// element the same operations in the same order (so the same bits as one row alone), where every exponent dt * As is
// finite and <= 0, which holds when the row's dt (softplus: >= 0) is finite and the block's A (-exp(A_log)) is finite
// and <= 0 (rows_fit_fast). There exp2_f32's upper clamp and infinity never apply, and the compiled loop, which
// blends them in per lane, spends a third of its instructions on them; and its one channel per iteration is a
// dependency chain ~50 cycles long, of which the core overlaps only about two. Here G channels go through each step
// together (G independent chains, interleaved in the instruction stream).
constexpr int FAST_G = 4;

// exp2_f32 of G vectors of values that are finite and <= 0: each step of exp2_f32 (common.h), in order, on all G.
inline void exp2_nonpositive(__m512* x) {
  const __m512 magic = _mm512_set1_ps(EXP2_MAGIC), lo = _mm512_set1_ps(EXP2_LO);
  __m512 r[FAST_G];
  __m512i k[FAST_G];
#pragma GCC unroll 8
  for (int q = 0; q < FAST_G; ++q) {
    const __m512 xc = _mm512_max_ps(x[q], lo);  // x < lo ? lo : x, for x not NaN
    const __m512 kb = _mm512_add_ps(xc, magic);
    k[q] = _mm512_sub_epi32(_mm512_castps_si512(kb), _mm512_castps_si512(magic));
    r[q] = _mm512_sub_ps(xc, _mm512_sub_ps(kb, magic));
  }
  __m512 p[FAST_G];
#pragma GCC unroll 8
  for (int q = 0; q < FAST_G; ++q) p[q] = _mm512_fmadd_ps(_mm512_set1_ps(EXP2_POLY[0]), r[q], _mm512_set1_ps(EXP2_POLY[1]));
#pragma GCC unroll 8
  for (int i = 2; i < 7; ++i)
#pragma GCC unroll 8
    for (int q = 0; q < FAST_G; ++q) p[q] = _mm512_fmadd_ps(p[q], r[q], _mm512_set1_ps(EXP2_POLY[i]));
#pragma GCC unroll 8
  for (int q = 0; q < FAST_G; ++q) {
    const __m512i bits = _mm512_slli_epi32(_mm512_add_epi32(k[q], _mm512_set1_epi32(127)), 23);
    x[q] = _mm512_mul_ps(p[q], _mm512_castsi512_ps(bits));
  }
}

// Whether the n values from v are all in [lo, hi] (NaN is not).
inline bool all_within(const float* v, int64_t n, float lo, float hi) {
  const __m512 vlo = _mm512_set1_ps(lo), vhi = _mm512_set1_ps(hi);
  __mmask16 ok = 0xFFFF;
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512 x = _mm512_loadu_ps(v + i);
    ok &= _mm512_cmp_ps_mask(x, vlo, _CMP_GE_OQ) & _mm512_cmp_ps_mask(x, vhi, _CMP_LE_OQ);
  }
  bool rest = true;
  for (; i < n; ++i) rest &= v[i] >= lo && v[i] <= hi;
  return ok == 0xFFFF && rest;
}

// The state update of row b over the W channels from c0 (As: A * exp_scale of those channels, dt: block_dt's): the
// sums C . h to out.
inline void update_block_fast(const MambaStepArgs& a, int64_t b, int64_t c0, const float* As, const float* dt,
                              float* out) {
  constexpr int L = 16;
  const int64_t D_ = a.channels, R = a.rank, P = R + 2 * L;
  const float* proj = static_cast<const float*>(a.scratch) + b * (P + 3 * D_);
  const float* u = proj + P + c0;
  const __m512 Bv = _mm512_loadu_ps(proj + R), Cv = _mm512_loadu_ps(proj + R + L);
  float* h = static_cast<float*>(a.h) + (b * D_ + c0) * L;
  Vec<float>::type prod[W];
  for (int j0 = 0; j0 < W; j0 += FAST_G) {
    __m512 e[FAST_G];
#pragma GCC unroll 8
    for (int q = 0; q < FAST_G; ++q)
      e[q] = _mm512_mul_ps(_mm512_set1_ps(dt[j0 + q]), _mm512_loadu_ps(As + (j0 + q) * L));
    exp2_nonpositive(e);
#pragma GCC unroll 8
    for (int q = 0; q < FAST_G; ++q) {
      const int j = j0 + q;
      const __m512 du_B = _mm512_mul_ps(_mm512_set1_ps(dt[j] * u[j]), Bv);
      const __m512 hn = _mm512_fmadd_ps(e[q], _mm512_loadu_ps(h + j * L), du_B);
      _mm512_storeu_ps(h + j * L, hn);
      prod[j] = static_cast<Vec<float>::type>(_mm512_mul_ps(Cv, hn));
    }
  }
  lane_sums_of<float, W>(prod, out);  // update_block's sums: the same tree
}

// update_phase's several rows, fp32, N = 16, over channels [c0, c1) (As: A * exp_scale of those channels), when A
// there is finite and <= 0: row by row, dt of all the channels (block_dt in one pass, to the row's spare third of
// scratch), then the W-channel blocks of the rows whose dt fits (update_block_fast, the sums to y), then y's skip
// connection and gate in one pass (block_output). A row whose dt does not fit, and a last block of fewer than W
// channels, take update_block<float, true>. Long passes instead of one block at a time let the core overlap the
// divisions of softplus and silu from channel to channel.
void update_rows_fast(const MambaStepArgs& a, int64_t c0, int64_t c1, const float* As) {
  const int64_t D_ = a.channels, P = a.rank + 2 * a.state, full = (c1 - c0) / W * W;
  for (int64_t b = 0; b < a.batch; ++b) {
    float* dt = static_cast<float*>(a.scratch) + b * (P + 3 * D_) + P + 2 * D_ + c0;
    float* y = static_cast<float*>(a.y) + b * D_ + c0;
    block_dt<float>(a, b, c0, full, dt);
    if (all_within(dt, full, 0.0f, std::numeric_limits<float>::max())) {
      for (int64_t j = 0; j < full; j += W) update_block_fast(a, b, c0 + j, As + j * 16, dt + j, y + j);
      block_output<float>(a, b, c0, full, y);
    } else {
      for (int64_t j = 0; j < full; j += W) update_block<float, true>(a, b, c0 + j, W, As + j * 16);
    }
    if (full < c1 - c0) update_block<float, true>(a, b, c0 + full, c1 - c0 - full, As + full * 16);
  }
}
#endif

// Phases over all rows at once, so that each weight is read once per call and the per-channel constant
// (A * exp_scale) is prepared once per call rather than once per row. Each phase is a work-shared loop (`omp for`):
// inside a parallel region the threads split it, outside it one thread runs it all.
// Per row, scratch holds x_proj's output (dt, B, C: P values), then the conv's output u, then dt_proj's output
// (channels each).

// The conv of row b over channels [c0, c1), given the taps: channel c's tap k at taps[c * KC + k] (KC > 0: the
// weight as it lies, KC taps per channel, a constant stride the compiler vectorises) or at taps[k * n + c] (KC 0:
// transposed); per channel the bias, then the taps in order, then silu; the row's window moves on.
template <typename T, int KC>
void conv_row(const MambaStepArgs& a, int64_t b, int64_t c0, int64_t c1, const T* taps, int64_t n) {
  const int64_t D_ = a.channels, K = KC ? KC : a.kernel, P = a.rank + 2 * a.state;
  const T* conv_bias = static_cast<const T*>(a.conv_bias);
  const T* xz = static_cast<const T*>(a.xz) + b * a.xz_stride + c0;
  T* window = static_cast<T*>(a.window) + b * (K - 1) * D_;
  T* u = static_cast<T*>(a.scratch) + b * (P + 3 * D_) + P + c0;
  const int64_t tap_stride = KC ? KC : 1, k_stride = KC ? 1 : n;  // tap k of channel c: k k_stride + c tap_stride
#pragma omp simd
  for (int64_t c = 0; c < n; ++c) u[c] = conv_bias ? conv_bias[c0 + c] : T(0);
  for (int64_t k = 0; k < K - 1; ++k) {
    const T* win = window + k * D_ + c0;
    const T* tk = taps + k * k_stride;
#pragma omp simd
    for (int64_t c = 0; c < n; ++c) u[c] += tk[c * tap_stride] * win[c];
  }
  const T* tl = taps + (K - 1) * k_stride;
#pragma omp simd
  for (int64_t c = 0; c < n; ++c) u[c] = silu(u[c] + tl[c * tap_stride] * xz[c]);
  for (int64_t k = 0; k + 1 < K - 1; ++k) std::copy(window + (k + 1) * D_ + c0, window + (k + 1) * D_ + c1,
                                                    window + k * D_ + c0);
  if (K > 1) std::copy(xz, xz + n, window + (K - 2) * D_ + c0);
}

// 1. conv over the window and the new input, then silu, vectorised over channels (conv_row): for several rows the
// taps transposed once per call (wt: (K, channels of the item)), then each row tap by tap.
template <typename T>
void conv_phase(const MambaStepArgs& a) {
  const int64_t D_ = a.channels, K = a.kernel, items = a.threads;
  const T* conv_w = static_cast<const T*>(a.conv_w);
  std::vector<T> wt;
#pragma omp for schedule(static)
  for (int64_t i = 0; i < items; ++i) {
    int64_t c0, c1;
    channel_range(D_, items, i, c0, c1);
    const int64_t n = c1 - c0;
    if (a.batch == 1 && K == 4) {  // one row: the taps read where they lie (transposing them cost as much as the conv)
      conv_row<T, 4>(a, 0, c0, c1, conv_w + c0 * K, n);
      continue;
    }
    wt.resize(K * n);
    for (int64_t c = 0; c < n; ++c)
      for (int64_t k = 0; k < K; ++k) wt[k * n + c] = conv_w[(c0 + c) * K + k];
    for (int64_t b = 0; b < a.batch; ++b) conv_row<T, 0>(a, b, c0, c1, wt.data(), n);
  }
}

// 2. x_proj (plain weights): rank + 2N dot products over the channels per row, in tiles.h's register tiles (each
// weight row read once for all the batch's rows; a row's sums the same whatever the rows beside it), the weight
// rows split over the threads.
template <typename T>
void x_proj_phase(const MambaStepArgs& a) {
  const int64_t D_ = a.channels, P = a.rank + 2 * a.state, stride = P + 3 * D_, items = a.threads;
  const T* xw = static_cast<const T*>(a.x_proj_w);
  T* scratch = static_cast<T*>(a.scratch);
  std::vector<const T*> u(a.batch);  // each row's conv output
  for (int64_t b = 0; b < a.batch; ++b) u[b] = scratch + b * stride + P;
#pragma omp for schedule(static)
  for (int64_t i = 0; i < items; ++i)
    matrix_rows<T>(xw, D_, P * i / items, P * (i + 1) / items, u.data(), a.batch,
                   [&](int64_t b, int64_t j, T v) { scratch[b * stride + j] = v; });
}

// 3. the three norms of each row (a few dozen values each).
template <typename T>
void norm_phase(const MambaStepArgs& a) {
  const int64_t D_ = a.channels, R = a.rank, N = a.state, P = R + 2 * N;
  T* scratch = static_cast<T*>(a.scratch);
#pragma omp for schedule(static)
  for (int64_t b = 0; b < a.batch; ++b) {
    T* proj = scratch + b * (P + 3 * D_);
    rms_norm<T>(proj, static_cast<const T*>(a.dt_norm_w), R, a.eps);
    rms_norm<T>(proj + R, static_cast<const T*>(a.B_norm_w), N, a.eps);
    rms_norm<T>(proj + R + N, static_cast<const T*>(a.C_norm_w), N, a.eps);
  }
}

// 4. for the thread's channels: (plain weights) dt_proj's product of every row for those channels, each weight row
// read once for all rows (tiles.h's matrix_rows: a row's sums in the same order whatever the rows beside it); for
// several rows A * exp_scale once (one row scales A as it reads it); then row by row (each row's state read in
// order), softplus, state update, skip connection and gate.
template <typename T>
void update_phase(const MambaStepArgs& a) {
  const int64_t D_ = a.channels, R = a.rank, N = a.state, P = R + 2 * N, items = a.threads;
  const T* dtw = a.dt_bits ? nullptr : static_cast<const T*>(a.dt_proj_w);
  const T* A = static_cast<const T*>(a.A);
  T* scratch = static_cast<T*>(a.scratch);
  std::vector<const T*> dt_low(a.batch);  // each row's normalised dt (rank values at the start of its scratch)
  for (int64_t b = 0; b < a.batch; ++b) dt_low[b] = scratch + b * (P + 3 * D_);
  std::vector<T> As;
#pragma omp for schedule(static)
  for (int64_t i = 0; i < items; ++i) {
    int64_t c0, c1;
    channel_range(D_, items, i, c0, c1);
    if (dtw)
      matrix_rows<T>(dtw, R, c0, c1, dt_low.data(), a.batch,
                     [&](int64_t b, int64_t j, T v) { scratch[b * (P + 3 * D_) + P + D_ + j] = v; });
    bool nonpositive = false;  // the AVX2 path's hint (update_block)
#ifdef OPENJAMBA_AVX2_STATE
    if constexpr (std::is_same_v<T, float>) nonpositive = none_positive(A + c0 * N, (c1 - c0) * N);
#endif
    if (a.batch == 1) {
      for (int64_t cb = c0; cb < c1; cb += W)
        update_block<T, false>(a, 0, cb, std::min<int64_t>(W, c1 - cb), A + cb * N, nonpositive);
      continue;
    }
    As.resize((c1 - c0) * N);
#pragma omp simd
    for (int64_t e = 0; e < (c1 - c0) * N; ++e) As[e] = A[c0 * N + e] * Math<T>::exp_scale;
#ifdef __AVX512F__
    if constexpr (std::is_same_v<T, float>) {
      if (N == 16 && all_within(A + c0 * N, (c1 - c0) * N, -std::numeric_limits<float>::max(), 0.0f)) {
        update_rows_fast(a, c0, c1, As.data());
        continue;
      }
    }
#endif
    for (int64_t b = 0; b < a.batch; ++b)
      for (int64_t cb = c0; cb < c1; cb += W)
        update_block<T, true>(a, b, cb, std::min<int64_t>(W, c1 - cb), As.data() + (cb - c0) * N, nonpositive);
  }
}

// A quantized product over the batch's rows of scratch: x at column x_col, y to column y_col (row stride P + 3D).
void scratch_product(const MambaStepArgs& a, int64_t bits, const void* q, const void* scales, const void* zeros,
                     int64_t group, int64_t threads, int64_t in, int64_t out, int64_t x_col, int64_t y_col) {
  const int64_t stride = a.rank + 2 * a.state + 3 * a.channels;
  float* scratch = static_cast<float*>(a.scratch);
  quantized_product(bits, group, threads, q, scales, zeros, scratch + x_col, scratch + y_col, a.batch, in, out,
                    stride, stride);
}

}  // namespace

extern "C" {

// The quantized fp32 step called by every thread of the caller's parallel region (layer_step.cpp's one region per
// layer, or the step's own): the products' threads share their work items (quant_linear.h's team_product; the same
// bits as the product alone), with a barrier where the next phase reads their result; it ends with one.
void mamba_step_team_f32(const MambaStepArgs* ap) {
  const MambaStepArgs& a = *ap;
  const int64_t D_ = a.channels, R = a.rank, P = R + 2 * a.state, stride = P + 3 * D_;
  float* scratch = static_cast<float*>(a.scratch);
  conv_phase<float>(a);
  if (a.x_bits) {
    team_product({a.x_bits, a.x_group, a.x_threads, a.x_proj_w, a.x_scales, a.x_zeros}, scratch + P, scratch,
                 a.batch, D_, P, stride, stride);
#pragma omp barrier
  } else {
    x_proj_phase<float>(a);
  }
  norm_phase<float>(a);
  if (a.dt_bits) {
    team_product({a.dt_bits, a.dt_group, a.dt_threads, a.dt_proj_w, a.dt_scales, a.dt_zeros}, scratch,
                 scratch + P + D_, a.batch, R, D_, stride, stride);
#pragma omp barrier
  }
  update_phase<float>(a);
}

}  // extern "C"

namespace {

template <typename T>
void step(const MambaStepArgs& a) {
  if (!a.x_bits && !a.dt_bits) {  // plain weights: the four phases in one parallel region
#pragma omp parallel num_threads(a.threads)
    {
      conv_phase<T>(a);
      x_proj_phase<T>(a);
      norm_phase<T>(a);
      update_phase<T>(a);
    }
    return;
  }
  // Quantized projections (fp32 only, as their kernels).
  if constexpr (std::is_same_v<T, float>) {
    const int64_t D_ = a.channels, R = a.rank, P = R + 2 * a.state;
    if (a.threads > 1) {
#pragma omp parallel num_threads(a.threads)
      mamba_step_team_f32(&a);
      return;
    }
    // Else each product runs its own parallel region between the phases.
#pragma omp parallel num_threads(a.threads)
    conv_phase<T>(a);
    if (a.x_bits)
      scratch_product(a, a.x_bits, a.x_proj_w, a.x_scales, a.x_zeros, a.x_group, a.x_threads, D_, P, P, 0);
    else {
#pragma omp parallel num_threads(a.threads)
      x_proj_phase<T>(a);
    }
    norm_phase<T>(a);  // a few dozen values per row: not worth waking the threads
    if (a.dt_bits)
      scratch_product(a, a.dt_bits, a.dt_proj_w, a.dt_scales, a.dt_zeros, a.dt_group, a.dt_threads, R, D_, 0,
                      P + D_);
#pragma omp parallel num_threads(a.threads)
    update_phase<T>(a);
  }
}

}  // namespace

extern "C" {

void mamba_step_f32(const MambaStepArgs* a) { step<float>(*a); }
void mamba_step_f64(const MambaStepArgs* a) { step<double>(*a); }

}  // extern "C"
