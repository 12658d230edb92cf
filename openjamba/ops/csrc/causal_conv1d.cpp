// Causal depthwise conv1d with a carried-in window (ops/conv.py semantics), forward and backward, for CPUs.
//
//   x, y, dy, dx: rows (batch, length, channels), channel stride 1;  weight: (channels, K);  bias: (channels,)
//   window, dwindow: (batch, K - 1, channels), the inputs before x (zeros when window is null)
//   dweight, dbias: (channels, K), (channels,)
//
// With xp = [window, x] (length K - 1 + L):  pre_t = bias + sum_k weight[:, k] * xp[t + k],  y_t = silu(pre_t).
// A work item walks time once over a contiguous range of channels, each step a few vector loops over that range of
// the current rows (so rows are read in order, page after page). The returned window (the last K - 1 rows of xp) is
// sliced in Python, where autograd handles it. Work items: (batch, channel range) forward; channel ranges backward,
// each owning its channels' dweight and dbias.

#include <algorithm>
#include <vector>

#include "common.h"

namespace {

using namespace openjamba;

struct ConvArgs {
  int64_t batch, length, channels, kernel, groups, threads, silu;
  Rows x, y, dy, dx;
  void *weight, *bias, *window;
  void *dweight, *dbias, *dwindow;
};

// Channels [c0, c1) of range g: split at multiples of the vector width.
struct Range {
  int64_t c0, c1;
  Range(const ConvArgs& a, int64_t g)
      : c0(std::min(a.channels, g * a.channels / a.groups / W * W)),
        c1(g + 1 == a.groups ? a.channels : std::min(a.channels, (g + 1) * a.channels / a.groups / W * W)) {}
  int64_t size() const { return c1 - c0; }
};

// The range's parameters transposed to (K, n) and (n,), so every loop below is over contiguous channels.
template <typename T>
struct Taps {
  std::vector<T> w, bias;
  Taps(const ConvArgs& a, const Range& r) : w(a.kernel * r.size()), bias(r.size(), T(0)) {
    for (int64_t c = 0; c < r.size(); ++c) {
      for (int64_t k = 0; k < a.kernel; ++k)
        w[k * r.size() + c] = static_cast<const T*>(a.weight)[(r.c0 + c) * a.kernel + k];
      if (a.bias) bias[c] = static_cast<const T*>(a.bias)[r.c0 + c];
    }
  }
};

// Row p of xp = [window, x] for batch b at channel c0; nullptr for a zero row (no window given).
template <typename T>
inline const T* padded_row(const ConvArgs& a, int64_t b, int64_t p, int64_t c0) {
  const int64_t before = a.kernel - 1;
  if (p >= before) return row<T>(a.x, b, p - before) + c0;
  return a.window ? static_cast<const T*>(a.window) + (b * before + p) * a.channels + c0 : nullptr;
}

// pre = bias + sum_k taps[k] * xp[t + k] over the range.
template <typename T>
void pre_activation(const ConvArgs& a, const Range& r, const Taps<T>& taps, int64_t b, int64_t t, T* pre) {
  const int64_t n = r.size();
  std::copy(taps.bias.begin(), taps.bias.end(), pre);
  for (int64_t k = 0; k < a.kernel; ++k) {
    const T* xr = padded_row<T>(a, b, t + k, r.c0);
    if (!xr) continue;
    const T* wk = taps.w.data() + k * n;
#pragma omp simd
    for (int64_t c = 0; c < n; ++c) pre[c] += wk[c] * xr[c];
  }
}

template <typename T>
void forward_range(const ConvArgs& a, const Range& r, int64_t b) {
  const Taps<T> taps(a, r);
  std::vector<T> pre(r.size());
  for (int64_t t = 0; t < a.length; ++t) {
    pre_activation<T>(a, r, taps, b, t, pre.data());
    T* yr = row_out<T>(a.y, b, t) + r.c0;
    if (a.silu) {
#pragma omp simd
      for (int64_t c = 0; c < r.size(); ++c) yr[c] = pre[c] * Math<T>::sigmoid(pre[c]);
    } else {
      std::copy(pre.begin(), pre.end(), yr);
    }
  }
}

// dpre_t = dy_t * silu'(pre_t); accumulates dweight, dbias; keeps dpre in the ring slot of t.
template <typename T>
void dpre_step(const ConvArgs& a, const Range& r, const Taps<T>& taps, int64_t b, int64_t t, T* pre, T* dpre,
               T* dtaps, T* dbias) {
  const int64_t n = r.size();
  pre_activation<T>(a, r, taps, b, t, pre);
  const T* dyr = row<T>(a.dy, b, t) + r.c0;
#pragma omp simd
  for (int64_t c = 0; c < n; ++c) {
    const T sg = Math<T>::sigmoid(pre[c]);
    dpre[c] = a.silu ? dyr[c] * sg * (T(1) + pre[c] * (T(1) - sg)) : dyr[c];
    dbias[c] += dpre[c];
  }
  for (int64_t k = 0; k < a.kernel; ++k) {
    const T* xr = padded_row<T>(a, b, t + k, r.c0);
    if (!xr) continue;
    T* dk = dtaps + k * n;
#pragma omp simd
    for (int64_t c = 0; c < n; ++c) dk[c] += dpre[c] * xr[c];
  }
}

// d xp[p] = sum_k taps[k] * dpre[p - k], for p over all K - 1 + L rows; the last K dpre rows live in a ring.
template <typename T>
void backward_range(const ConvArgs& a, const Range& r, const Taps<T>& taps, int64_t b, T* dtaps, T* dbias) {
  const int64_t K = a.kernel, n = r.size();
  std::vector<T> ring(K * n, T(0)), pre(n), acc(n);
  for (int64_t p = 0; p < a.length + K - 1; ++p) {
    T* dpre = ring.data() + (p % K) * n;
    if (p < a.length)
      dpre_step<T>(a, r, taps, b, p, pre.data(), dpre, dtaps, dbias);
    else
      std::fill(dpre, dpre + n, T(0));
    if (p < K - 1 && !a.dwindow) continue;  // a zero window: nothing to return for it
    T* out = r.c0 + (p >= K - 1 ? row_out<T>(a.dx, b, p - (K - 1))
                                : static_cast<T*>(a.dwindow) + (b * (K - 1) + p) * a.channels);
    std::fill(acc.begin(), acc.end(), T(0));
    for (int64_t k = 0; k < K && k <= p; ++k) {
      const T* dk = ring.data() + ((p - k) % K) * n;
      const T* wk = taps.w.data() + k * n;
#pragma omp simd
      for (int64_t c = 0; c < n; ++c) acc[c] += wk[c] * dk[c];
    }
    std::copy(acc.begin(), acc.end(), out);
  }
}

template <typename T>
void forward(const ConvArgs& a) {
#pragma omp parallel for num_threads(a.threads) schedule(static)
  for (int64_t item = 0; item < a.batch * a.groups; ++item)
    forward_range<T>(a, Range(a, item % a.groups), item / a.groups);
}

template <typename T>
void backward(const ConvArgs& a) {
#pragma omp parallel for num_threads(a.threads) schedule(static)
  for (int64_t g = 0; g < a.groups; ++g) {
    const Range r(a, g);
    const Taps<T> taps(a, r);
    const int64_t K = a.kernel, n = r.size();
    std::vector<T> dtaps(K * n, T(0)), dbias(n, T(0));
    for (int64_t b = 0; b < a.batch; ++b) backward_range<T>(a, r, taps, b, dtaps.data(), dbias.data());
    for (int64_t c = 0; c < n; ++c) {
      for (int64_t k = 0; k < K; ++k) static_cast<T*>(a.dweight)[(r.c0 + c) * K + k] = dtaps[k * n + c];
      static_cast<T*>(a.dbias)[r.c0 + c] = dbias[c];
    }
  }
}

}  // namespace

extern "C" {

void conv_forward_f32(const ConvArgs* a) { forward<float>(*a); }
void conv_forward_f64(const ConvArgs* a) { forward<double>(*a); }
void conv_backward_f32(const ConvArgs* a) { backward<float>(*a); }
void conv_backward_f64(const ConvArgs* a) { backward<double>(*a); }

}  // extern "C"
