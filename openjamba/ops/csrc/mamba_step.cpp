// The Mamba mixer's one-token decoding step between in_proj and out_proj, in one call (ops/decode.py has the
// plain PyTorch reference, `mamba_step_ref`, and the contract):
//
//   u, z  = the two halves of in_proj's output row             (channels each)
//   u     = silu(conv_bias + sum_k conv_w[:, k] * [window, u][k]); window shifted by one, u appended (in place)
//   dt, B, C = x_proj_w @ u, split (rank, N, N); each RMS-normalised with its weight
//   dt    = softplus(dt_proj_w @ dt + dt_bias)
//   h     = exp(dt * A) * h + dt * u * B   (A = -exp(A_log); h the (channels, N) SSM state, fp32, in place)
//   y     = (C . h + D * u) * silu(z)
//
// Decoding is bound by per-call overhead for small models: this replaces ~25 tensor ops per layer and token. The
// work is split over threads by channels (conv, state update) and by rows of x_proj; the tiny norms run on one.
//   xz: (batch, 2 * channels) rows, row stride xz_stride;  window: (batch, K - 1, channels);  conv_w: (channels, K)
//   x_proj_w: (rank + 2N, channels);  dt_proj_w: (channels, rank);  A_log: (channels, N);  h: (batch, channels, N)
//   y: (batch, channels);  scratch: (batch, rank + 2N + 3 channels) values of workspace

#include <algorithm>

#include "common.h"

namespace {

using namespace openjamba;

struct MambaStepArgs {
  int64_t batch, channels, kernel, rank, state, threads, xz_stride;
  double eps;
  const void *xz, *conv_w, *conv_bias, *x_proj_w, *dt_norm_w, *B_norm_w, *C_norm_w, *dt_proj_w, *dt_bias, *A_log,
      *D;
  void *window, *h, *y, *scratch;
};

template <typename T>
inline T silu(T x) {
  return x * Math<T>::sigmoid(x);
}

template <typename T>
inline T exp_of(T x) {
  return Math<T>::exp_scaled(x * Math<T>::exp_scale);
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
constexpr int kLanes = 64 / sizeof(T);

template <typename T>
inline T tree_sum(T* part) {
  for (int w = kLanes<T> / 2; w > 0; w /= 2)
    for (int i = 0; i < w; ++i) part[i] += part[i + w];
  return part[0];
}

template <typename T>
inline T dot(const T* a, const T* b, int64_t n) {
  constexpr int L = kLanes<T>;
  T part[L] = {};
  int64_t k = 0;
  for (; k + L <= n; k += L)
#pragma omp simd
    for (int i = 0; i < L; ++i) part[i] += a[k + i] * b[k + i];
  T s = tree_sum(part);
  for (; k < n; ++k) s += a[k] * b[k];
  return s;
}

// Channels [c0, c1) of item i of n, in multiples of W.
inline void channel_range(int64_t channels, int64_t n, int64_t i, int64_t& c0, int64_t& c1) {
  const int64_t blocks = (channels + W - 1) / W;
  c0 = std::min(channels, blocks * i / n * W);
  c1 = std::min(channels, blocks * (i + 1) / n * W);
}

template <typename T>
void step(const MambaStepArgs& a) {
  const int64_t D_ = a.channels, K = a.kernel, R = a.rank, N = a.state, P = R + 2 * N;
  const T* conv_w = static_cast<const T*>(a.conv_w);
  const T* conv_bias = static_cast<const T*>(a.conv_bias);
  const T* xw = static_cast<const T*>(a.x_proj_w);
  const T* dtw = static_cast<const T*>(a.dt_proj_w);
  const T* dt_bias = static_cast<const T*>(a.dt_bias);
  const T* A_log = static_cast<const T*>(a.A_log);
  const T* Dp = static_cast<const T*>(a.D);
  const int64_t items = a.threads;
#pragma omp parallel num_threads(a.threads)
  for (int64_t b = 0; b < a.batch; ++b) {
    const T* xz = static_cast<const T*>(a.xz) + b * a.xz_stride;
    const T* z = xz + D_;
    T* window = static_cast<T*>(a.window) + b * (K - 1) * D_;
    T* h = static_cast<T*>(a.h) + b * D_ * N;
    T* y = static_cast<T*>(a.y) + b * D_;
    T* proj = static_cast<T*>(a.scratch) + b * (P + 3 * D_);  // x_proj's output (dt, B, C)
    T* u = proj + P;                                          // the conv's output, then 2 channels of workspace
    // 1. conv over the window and the new input, then silu (vectorised over channels); the window moves on.
#pragma omp for schedule(static)
    for (int64_t i = 0; i < items; ++i) {
      int64_t c0, c1;
      channel_range(D_, items, i, c0, c1);
      for (int64_t c = c0; c < c1; ++c) {
        T acc = conv_bias ? conv_bias[c] : T(0);
        for (int64_t k = 0; k < K - 1; ++k) acc += conv_w[c * K + k] * window[k * D_ + c];
        u[c] = acc + conv_w[c * K + K - 1] * xz[c];
      }
#pragma omp simd
      for (int64_t c = c0; c < c1; ++c) u[c] = silu(u[c]);
      for (int64_t k = 0; k + 1 < K - 1; ++k) std::copy(window + (k + 1) * D_ + c0, window + (k + 1) * D_ + c1,
                                                        window + k * D_ + c0);
      if (K > 1) std::copy(xz + c0, xz + c1, window + (K - 2) * D_ + c0);
    }
    // 2. x_proj: rank + 2N dot products over the channels.
#pragma omp for schedule(static)
    for (int64_t r = 0; r < P; ++r) {
      const T* wr = xw + r * D_;
      T acc = T(0);
#pragma omp simd reduction(+ : acc)
      for (int64_t c = 0; c < D_; ++c) acc += wr[c] * u[c];
      proj[r] = acc;
    }
    // 3. the three norms (a few hundred values: one thread).
#pragma omp single
    {
      rms_norm<T>(proj, static_cast<const T*>(a.dt_norm_w), R, a.eps);
      rms_norm<T>(proj + R, static_cast<const T*>(a.B_norm_w), N, a.eps);
      rms_norm<T>(proj + R + N, static_cast<const T*>(a.C_norm_w), N, a.eps);
    }
    const T* dt_low = proj;
    const T* Bv = proj + R;
    const T* Cv = proj + R + N;
    // 4. dt_proj, softplus, state update, skip connection and gate: the per-channel scalar functions (softplus,
    // silu) in loops over channels, which vectorise; the state update of each channel over its N states.
    T* dt_all = u + D_;  // dt per channel, then the state's output C . h
    T* gate_all = dt_all + D_;
#pragma omp for schedule(static)
    for (int64_t i = 0; i < items; ++i) {
      int64_t c0, c1;
      channel_range(D_, items, i, c0, c1);
      for (int64_t c = c0; c < c1; ++c) dt_all[c] = (dt_bias ? dt_bias[c] : T(0)) + dot(dtw + c * R, dt_low, R);
#pragma omp simd
      for (int64_t c = c0; c < c1; ++c) {
        dt_all[c] = Math<T>::softplus(dt_all[c]);
        gate_all[c] = silu(z[c]);
      }
      for (int64_t c = c0; c < c1; ++c) {
        const T dt = dt_all[c];
        const T du = dt * u[c];
        T* hc = h + c * N;
        const T* al = A_log + c * N;
        constexpr int L = kLanes<T>;
        T part[L] = {};
        int64_t n0 = 0;
        for (; n0 + L <= N; n0 += L)
#pragma omp simd
          for (int i = 0; i < L; ++i) {
            const int64_t n = n0 + i;
            const T hn = exp_of<T>(-dt * exp_of<T>(al[n])) * hc[n] + du * Bv[n];
            hc[n] = hn;
            part[i] += Cv[n] * hn;
          }
        T acc = tree_sum(part);
        for (int64_t n = n0; n < N; ++n) {
          const T hn = exp_of<T>(-dt * exp_of<T>(al[n])) * hc[n] + du * Bv[n];
          hc[n] = hn;
          acc += Cv[n] * hn;
        }
        dt_all[c] = acc;
      }
#pragma omp simd
      for (int64_t c = c0; c < c1; ++c) y[c] = (dt_all[c] + (Dp ? Dp[c] : T(0)) * u[c]) * gate_all[c];
    }
  }
}

}  // namespace

extern "C" {

void mamba_step_f32(const MambaStepArgs* a) { step<float>(*a); }
void mamba_step_f64(const MambaStepArgs* a) { step<double>(*a); }

}  // extern "C"
