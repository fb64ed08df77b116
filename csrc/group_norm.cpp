// Fused GroupNorm (+ per-channel add, + SiLU) forward and backward for CPU tensors, fp32 and bf16, OpenMP.
//
// x is seen as (N, C, S) in one of two layouts:
//   rows:          x[n, c, s] at n*sN + c*sC + s        (contiguous NC(D)HW: each (n, c) is one row)
//   channels-last: x[n, c, s] at n*sN + s*sS + c        (channels_last(_3d): each (n, s) is one row of C)
// Three steps, two reads of x and one write of y in all (torch's silu(group_norm(x)) makes five passes):
//   1. moments: per channel (mean, M2) of x. Each chunk (~16K elements, stays in L2) is summed, then
//      centred and squared from cache (two-pass, exact), and chunks are merged in double with Chan's
//      formula, so a large mean does not cancel the variance away. One read of x.
//   2. per group: the add shifts each channel's mean (not its M2); merge channels -> mean, rstd (N, G).
//   3. apply: y = silu((x - mu_c) * rstd * w_c + b_c), mu_c = mean - add[n, c]. One read, one write.
// Threads split the rows (or the chunks of rows) of the whole batch, so a small N still fills the cores.
// SiLU uses a vectorisable exp (Cody-Waite reduction + degree-7 polynomial, ~1 ulp), so the compiler can
// keep the apply loop in SIMD registers (built with -fno-trapping-math, else GCC will not if-convert it).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/csrc/utils/pybind.h>

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace {

using bf16_t = uint16_t;  // raw bits of at::BFloat16

inline float to_f(float v) { return v; }
inline float to_f(bf16_t v) {
  uint32_t u = uint32_t(v) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
inline void store(float* p, float v) { *p = v; }
inline void store(bf16_t* p, float v) {  // round to nearest even; NaN stays NaN
  uint32_t u;
  std::memcpy(&u, &v, sizeof u);
  uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  uint32_t nan = (u >> 16) | 0x40u;
  *p = bf16_t(((u & 0x7fffffffu) > 0x7f800000u) ? nan : rounded);
}

inline float exp_approx(float x) {
  // The clamp keeps round(x / ln2) in int range; the exponent is then saturated in the integer domain
  // (2^k -> 0 below 2^-126, inf above 2^127), so no denormal is ever produced: denormal results cost
  // a micro-code assist per lane, and clamping x to the float range did produce them.
  x = std::min(std::max(x, -100.0f), 100.0f);
  float k = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round(x / ln2)
  float r = x - k * 0.693145751953125f;                                // Cody-Waite: ln2 = hi + lo
  r = r - k * 1.428606820309417e-06f;                                 // |r| <= ln2 / 2
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t biased = std::min(std::max(int32_t(k) + 127, 0), 255);
  const int32_t bits = biased << 23;  // 2^k, or 0, or inf
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;  // relative error < 1e-7 where the result is a normal float
}

inline float silu(float z) { return z / (1.0f + exp_approx(-z)); }

struct Moments {
  double n = 0, mean = 0, m2 = 0;
  void merge(double nb, double mb, double m2b) {  // Chan et al.
    double tot = n + nb;
    if (tot == 0) return;
    double delta = mb - mean;
    mean += delta * (nb / tot);
    m2 += m2b + delta * delta * n * (nb / tot);
    n = tot;
  }
};

constexpr int64_t kChunk = 16384;  // elements per chunk: 64 KiB of fp32, stays in L2 for the second pass

// ---- layout "rows": every (n, c) is a contiguous row of S elements -------------------------------------
template <typename T>
void moments_rows(const T* x, int64_t N, int64_t C, int64_t S, int64_t sN, int64_t sC, double* mean,
                  double* m2, int nt) {
#pragma omp parallel for num_threads(nt) schedule(dynamic, 1)
  for (int64_t row = 0; row < N * C; ++row) {
    const T* p = x + (row / C) * sN + (row % C) * sC;
    Moments m;
    for (int64_t s0 = 0; s0 < S; s0 += kChunk) {
      const int64_t len = std::min(kChunk, S - s0);
      const T* q = p + s0;
      float sum = 0.f;
#pragma omp simd reduction(+ : sum)
      for (int64_t i = 0; i < len; ++i) sum += to_f(q[i]);
      const float mb = sum / float(len);
      float sq = 0.f;
#pragma omp simd reduction(+ : sq)
      for (int64_t i = 0; i < len; ++i) {
        float d = to_f(q[i]) - mb;
        sq += d * d;
      }
      m.merge(double(len), double(mb), double(sq));
    }
    mean[row] = m.mean;
    m2[row] = m.m2;
  }
}

template <typename T>
void apply_rows(const T* x, T* y, int64_t N, int64_t C, int64_t S, int64_t sN, int64_t sC, int64_t oN,
                int64_t oC, const float* mu, const float* scale, const float* shift, bool act, int nt) {
  constexpr int64_t kBlock = 4096;
  const int64_t blocks = (S + kBlock - 1) / kBlock;
#pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t job = 0; job < N * C * blocks; ++job) {
    const int64_t row = job / blocks, s0 = (job % blocks) * kBlock;
    const int64_t n = row / C, c = row % C, len = std::min(kBlock, S - s0);
    const T* p = x + n * sN + c * sC + s0;
    T* o = y + n * oN + c * oC + s0;
    const float m = mu[row], a = scale[row], b = shift[c];
    if (act) {
#pragma omp simd
      for (int64_t i = 0; i < len; ++i) store(o + i, silu((to_f(p[i]) - m) * a + b));
    } else {
#pragma omp simd
      for (int64_t i = 0; i < len; ++i) store(o + i, (to_f(p[i]) - m) * a + b);
    }
  }
}

// ---- layout "channels-last": every (n, s) is a contiguous row of C channels ----------------------------
template <typename T>
void moments_cl(const T* x, int64_t N, int64_t C, int64_t S, int64_t sN, int64_t sS, double* mean, double* m2,
                int nt) {
  const int64_t rows = std::max<int64_t>(1, kChunk / C);
  const int64_t chunks = (S + rows - 1) / rows;
  std::vector<Moments> acc(size_t(nt) * N * C);
#pragma omp parallel num_threads(nt)
  {
    const int tid = omp_get_thread_num();
    std::vector<float> sum(C), sq(C);
    Moments* mine = acc.data() + size_t(tid) * N * C;
#pragma omp for schedule(static)
    for (int64_t job = 0; job < N * chunks; ++job) {
      const int64_t n = job / chunks, r0 = (job % chunks) * rows, len = std::min(rows, S - r0);
      const T* p = x + n * sN + r0 * sS;
      std::fill(sum.begin(), sum.end(), 0.f);
      std::fill(sq.begin(), sq.end(), 0.f);
      float* su = sum.data();
      float* sqp = sq.data();
      for (int64_t r = 0; r < len; ++r) {
        const T* q = p + r * sS;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) su[c] += to_f(q[c]);
      }
      const float inv = 1.f / float(len);
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) su[c] *= inv;  // now the chunk means
      for (int64_t r = 0; r < len; ++r) {
        const T* q = p + r * sS;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) {
          float d = to_f(q[c]) - su[c];
          sqp[c] += d * d;
        }
      }
      for (int64_t c = 0; c < C; ++c) mine[n * C + c].merge(double(len), double(su[c]), double(sq[c]));
    }
  }
  for (int64_t i = 0; i < N * C; ++i) {
    Moments m;
    for (int t = 0; t < nt; ++t) {
      const Moments& p = acc[size_t(t) * N * C + i];
      m.merge(p.n, p.mean, p.m2);
    }
    mean[i] = m.mean;
    m2[i] = m.m2;
  }
}

template <typename T>
void apply_cl(const T* x, T* y, int64_t N, int64_t C, int64_t S, int64_t sN, int64_t sS, int64_t oN, int64_t oS,
              const float* mu, const float* scale, const float* shift, bool act, int nt) {
  const int64_t rows = std::max<int64_t>(1, 4096 / C);
  const int64_t chunks = (S + rows - 1) / rows;
#pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t job = 0; job < N * chunks; ++job) {
    const int64_t n = job / chunks, r0 = (job % chunks) * rows, len = std::min(rows, S - r0);
    const float* m = mu + n * C;
    const float* a = scale + n * C;
    for (int64_t r = r0; r < r0 + len; ++r) {
      const T* p = x + n * sN + r * sS;
      T* o = y + n * oN + r * oS;
      if (act) {
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) store(o + c, silu((to_f(p[c]) - m[c]) * a[c] + shift[c]));
      } else {
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) store(o + c, (to_f(p[c]) - m[c]) * a[c] + shift[c]);
      }
    }
  }
}

template <typename T>
void forward_impl(const at::Tensor& x, at::Tensor& y, at::Tensor& mean_out, at::Tensor& rstd_out,
                  const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
                  const c10::optional<at::Tensor>& add, int64_t G, double eps, bool act, bool rows_layout) {
  const int64_t N = x.size(0), C = x.size(1), S = x.size(2), Cg = C / G;
  const int nt = std::max(1, at::get_num_threads());
  const T* xp = reinterpret_cast<const T*>(x.data_ptr());
  T* yp = reinterpret_cast<T*>(y.data_ptr());
  std::vector<double> cmean(N * C), cm2(N * C);
  if (rows_layout)
    moments_rows(xp, N, C, S, x.stride(0), x.stride(1), cmean.data(), cm2.data(), nt);
  else
    moments_cl(xp, N, C, S, x.stride(0), x.stride(2), cmean.data(), cm2.data(), nt);

  const float* w = weight ? weight->data_ptr<float>() : nullptr;
  const float* b = bias ? bias->data_ptr<float>() : nullptr;
  const float* a = add ? add->data_ptr<float>() : nullptr;
  float* mo = mean_out.data_ptr<float>();
  float* ro = rstd_out.data_ptr<float>();
  std::vector<float> mu(N * C), scale(N * C), shift(C);
  for (int64_t c = 0; c < C; ++c) shift[c] = b ? b[c] : 0.f;
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t g = 0; g < G; ++g) {
      // channels hold S elements each: group mean = mean of channel means (shifted by the add)
      double mg = 0;
      for (int64_t c = g * Cg; c < (g + 1) * Cg; ++c) mg += cmean[n * C + c] + (a ? a[n * C + c] : 0.0);
      mg /= double(Cg);
      double m2 = 0;
      for (int64_t c = g * Cg; c < (g + 1) * Cg; ++c) {
        double d = cmean[n * C + c] + (a ? a[n * C + c] : 0.0) - mg;
        m2 += cm2[n * C + c] + double(S) * d * d;
      }
      const double var = std::max(m2 / (double(Cg) * double(S)), 0.0);
      const float rstd = float(1.0 / std::sqrt(var + eps));
      mo[n * G + g] = float(mg);
      ro[n * G + g] = rstd;
      for (int64_t c = g * Cg; c < (g + 1) * Cg; ++c) {
        mu[n * C + c] = float(mg - (a ? a[n * C + c] : 0.0));
        scale[n * C + c] = rstd * (w ? w[c] : 1.f);
      }
    }
  }
  if (rows_layout)
    apply_rows(xp, yp, N, C, S, x.stride(0), x.stride(1), y.stride(0), y.stride(1), mu.data(), scale.data(),
               shift.data(), act, nt);
  else
    apply_cl(xp, yp, N, C, S, x.stride(0), x.stride(2), y.stride(0), y.stride(2), mu.data(), scale.data(),
             shift.data(), act, nt);
}

// ---- backward ------------------------------------------------------------------------------------------
// With xhat = (x - mu_c) * rstd, z = xhat * w_c + b_c and dz = dy * silu'(z) (or dy):
//   pass 1 (one read of x and dy): per (n, c) ds = sum dz, dd = sum dz * xhat, sx = sum xhat
//   per group: c1 = sum_c w_c ds / M, c2 = sum_c w_c dd / M (M = Cg * S); dw = sum_n dd, db = sum_n ds,
//              dadd[n, c] = rstd * (w_c ds - S c1 - c2 sx)
//   pass 2 (one read of x and dy, one write of dx): dx = rstd * (w_c dz - c1 - xhat c2)
// z and xhat are recomputed from x and the forward's (mean, rstd).
struct ChanConst {
  const float* mu;     // (N, C) mean of the group minus the channel's add
  const float* rstd;   // (N, C)
  const float* w;      // (C)
  const float* b;      // (C)
};

template <bool ACT>
inline float dz_of(float dy, float xhat, float w, float b) {
  if (!ACT) return dy;
  const float z = xhat * w + b;
  const float sig = 1.0f / (1.0f + exp_approx(-z));
  return dy * sig * (1.0f + z * (1.0f - sig));
}

template <bool ACT, typename T>
void bwd_sums_rows(const T* x, const T* dy, int64_t N, int64_t C, int64_t S, int64_t sN, int64_t sC,
                   const ChanConst& k, double* ds, double* dd, double* sx, int nt) {
  constexpr int64_t kBlock = 4096;  // float partial sums per block, double across blocks
#pragma omp parallel for num_threads(nt) schedule(dynamic, 1)
  for (int64_t row = 0; row < N * C; ++row) {
    const int64_t off = (row / C) * sN + (row % C) * sC;
    const T* p = x + off;
    const T* g = dy + off;
    const float mu = k.mu[row], r = k.rstd[row], w = k.w[row % C], b = k.b[row % C];
    double a_ds = 0, a_dd = 0, a_sx = 0;
    for (int64_t s0 = 0; s0 < S; s0 += kBlock) {
      const int64_t len = std::min(kBlock, S - s0);
      float f_ds = 0.f, f_dd = 0.f, f_sx = 0.f;
#pragma omp simd reduction(+ : f_ds, f_dd, f_sx)
      for (int64_t i = s0; i < s0 + len; ++i) {
        const float xh = (to_f(p[i]) - mu) * r;
        const float dz = dz_of<ACT>(to_f(g[i]), xh, w, b);
        f_ds += dz;
        f_dd += dz * xh;
        f_sx += xh;
      }
      a_ds += f_ds;
      a_dd += f_dd;
      a_sx += f_sx;
    }
    ds[row] = a_ds;
    dd[row] = a_dd;
    sx[row] = a_sx;
  }
}

template <bool ACT, typename T>
void bwd_sums_cl(const T* x, const T* dy, int64_t N, int64_t C, int64_t S, int64_t sN, int64_t sS,
                 const ChanConst& k, double* ds, double* dd, double* sx, int nt) {
  const int64_t rows = std::max<int64_t>(1, 4096 / C);
  const int64_t chunks = (S + rows - 1) / rows;
  std::vector<double> acc(size_t(nt) * 3 * N * C, 0.0);
#pragma omp parallel num_threads(nt)
  {
    const int tid = omp_get_thread_num();
    std::vector<float> f(3 * C);
    double* mine = acc.data() + size_t(tid) * 3 * N * C;
#pragma omp for schedule(static)
    for (int64_t job = 0; job < N * chunks; ++job) {
      const int64_t n = job / chunks, r0 = (job % chunks) * rows, len = std::min(rows, S - r0);
      std::fill(f.begin(), f.end(), 0.f);
      float* f_ds = f.data();
      float* f_dd = f_ds + C;
      float* f_sx = f_dd + C;
      const float* mu = k.mu + n * C;
      const float* rs = k.rstd + n * C;
      for (int64_t r = r0; r < r0 + len; ++r) {
        const T* p = x + n * sN + r * sS;
        const T* g = dy + n * sN + r * sS;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) {
          const float xh = (to_f(p[c]) - mu[c]) * rs[c];
          const float dz = dz_of<ACT>(to_f(g[c]), xh, k.w[c], k.b[c]);
          f_ds[c] += dz;
          f_dd[c] += dz * xh;
          f_sx[c] += xh;
        }
      }
      for (int64_t c = 0; c < C; ++c) {
        mine[n * C + c] += f_ds[c];
        mine[N * C + n * C + c] += f_dd[c];
        mine[2 * N * C + n * C + c] += f_sx[c];
      }
    }
  }
  for (int64_t i = 0; i < N * C; ++i) {
    double a = 0, b = 0, c = 0;
    for (int t = 0; t < nt; ++t) {
      const double* m = acc.data() + size_t(t) * 3 * N * C;
      a += m[i];
      b += m[N * C + i];
      c += m[2 * N * C + i];
    }
    ds[i] = a;
    dd[i] = b;
    sx[i] = c;
  }
}

template <bool ACT, typename T>
void bwd_dx_rows(const T* x, const T* dy, T* dx, int64_t N, int64_t C, int64_t S, int64_t sN, int64_t sC,
                 const ChanConst& k, const float* c1, const float* c2, int nt) {
  constexpr int64_t kBlock = 4096;
  const int64_t blocks = (S + kBlock - 1) / kBlock;
#pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t job = 0; job < N * C * blocks; ++job) {
    const int64_t row = job / blocks, s0 = (job % blocks) * kBlock, len = std::min(kBlock, S - s0);
    const int64_t off = (row / C) * sN + (row % C) * sC + s0;
    const T* p = x + off;
    const T* g = dy + off;
    T* o = dx + off;
    const float mu = k.mu[row], r = k.rstd[row], w = k.w[row % C], b = k.b[row % C];
    const float a1 = c1[row], a2 = c2[row];
#pragma omp simd
    for (int64_t i = 0; i < len; ++i) {
      const float xh = (to_f(p[i]) - mu) * r;
      const float dz = dz_of<ACT>(to_f(g[i]), xh, w, b);
      store(o + i, r * (w * dz - a1 - xh * a2));
    }
  }
}

template <bool ACT, typename T>
void bwd_dx_cl(const T* x, const T* dy, T* dx, int64_t N, int64_t C, int64_t S, int64_t sN, int64_t sS,
               const ChanConst& k, const float* c1, const float* c2, int nt) {
  const int64_t rows = std::max<int64_t>(1, 4096 / C);
  const int64_t chunks = (S + rows - 1) / rows;
#pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t job = 0; job < N * chunks; ++job) {
    const int64_t n = job / chunks, r0 = (job % chunks) * rows, len = std::min(rows, S - r0);
    const float* mu = k.mu + n * C;
    const float* rs = k.rstd + n * C;
    const float* a1 = c1 + n * C;
    const float* a2 = c2 + n * C;
    for (int64_t r = r0; r < r0 + len; ++r) {
      const int64_t off = n * sN + r * sS;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) {
        const float xh = (to_f(x[off + c]) - mu[c]) * rs[c];
        const float dz = dz_of<ACT>(to_f(dy[off + c]), xh, k.w[c], k.b[c]);
        store(dx + off + c, rs[c] * (k.w[c] * dz - a1[c] - xh * a2[c]));
      }
    }
  }
}

template <typename T>
void backward_impl(const at::Tensor& x, const at::Tensor& dy, at::Tensor& dx, const at::Tensor& mean,
                   const at::Tensor& rstd, const c10::optional<at::Tensor>& weight,
                   const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& add, int64_t G,
                   bool act, bool rows_layout, at::Tensor& dw, at::Tensor& db, at::Tensor& dadd) {
  const int64_t N = x.size(0), C = x.size(1), S = x.size(2), Cg = C / G;
  const int nt = std::max(1, at::get_num_threads());
  const float* m = mean.data_ptr<float>();
  const float* rs = rstd.data_ptr<float>();
  const float* a = add ? add->data_ptr<float>() : nullptr;
  std::vector<float> mu(N * C), r(N * C), w(C), b(C);
  for (int64_t c = 0; c < C; ++c) {
    w[c] = weight ? weight->data_ptr<float>()[c] : 1.f;
    b[c] = bias ? bias->data_ptr<float>()[c] : 0.f;
  }
  for (int64_t n = 0; n < N; ++n)
    for (int64_t c = 0; c < C; ++c) {
      mu[n * C + c] = m[n * G + c / Cg] - (a ? a[n * C + c] : 0.f);
      r[n * C + c] = rs[n * G + c / Cg];
    }
  const ChanConst k{mu.data(), r.data(), w.data(), b.data()};
  const T* xp = reinterpret_cast<const T*>(x.data_ptr());
  const T* gp = reinterpret_cast<const T*>(dy.data_ptr());
  T* op = reinterpret_cast<T*>(dx.data_ptr());
  std::vector<double> ds(N * C), dd(N * C), sx(N * C);
  auto sums = [&](auto act_tag) {
    constexpr bool A = decltype(act_tag)::value;
    if (rows_layout)
      bwd_sums_rows<A>(xp, gp, N, C, S, x.stride(0), x.stride(1), k, ds.data(), dd.data(), sx.data(), nt);
    else
      bwd_sums_cl<A>(xp, gp, N, C, S, x.stride(0), x.stride(2), k, ds.data(), dd.data(), sx.data(), nt);
  };
  if (act)
    sums(std::true_type{});
  else
    sums(std::false_type{});
  std::vector<float> c1(N * C), c2(N * C);
  float* dwp = dw.data_ptr<float>();
  float* dbp = db.data_ptr<float>();
  float* dap = add ? dadd.data_ptr<float>() : nullptr;
  const double inv_m = 1.0 / (double(Cg) * double(S));
  for (int64_t c = 0; c < C; ++c) {
    double sw = 0, sb = 0;
    for (int64_t n = 0; n < N; ++n) {
      sw += dd[n * C + c];
      sb += ds[n * C + c];
    }
    dwp[c] = float(sw);
    dbp[c] = float(sb);
  }
  for (int64_t n = 0; n < N; ++n)
    for (int64_t g = 0; g < G; ++g) {
      double s1 = 0, s2 = 0;
      for (int64_t c = g * Cg; c < (g + 1) * Cg; ++c) {
        s1 += w[c] * ds[n * C + c];
        s2 += w[c] * dd[n * C + c];
      }
      const double e1 = s1 * inv_m, e2 = s2 * inv_m, rr = rs[n * G + g];
      for (int64_t c = g * Cg; c < (g + 1) * Cg; ++c) {
        c1[n * C + c] = float(e1);
        c2[n * C + c] = float(e2);
        if (dap) dap[n * C + c] = float(rr * (w[c] * ds[n * C + c] - double(S) * e1 - e2 * sx[n * C + c]));
      }
    }
  auto grad_x = [&](auto act_tag) {
    constexpr bool A = decltype(act_tag)::value;
    if (rows_layout)
      bwd_dx_rows<A>(xp, gp, op, N, C, S, x.stride(0), x.stride(1), k, c1.data(), c2.data(), nt);
    else
      bwd_dx_cl<A>(xp, gp, op, N, C, S, x.stride(0), x.stride(2), k, c1.data(), c2.data(), nt);
  };
  if (act)
    grad_x(std::true_type{});
  else
    grad_x(std::false_type{});
}

void check_vec(const c10::optional<at::Tensor>& t, int64_t numel, const char* name) {
  if (!t) return;
  TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->numel() == numel,
              "group_norm_cpu: ", name, " must be a contiguous float32 tensor of ", numel, " elements");
}

}  // namespace

// x, y: (N, C, S) CPU tensors of one dtype (float32 or bfloat16) and the same strides, with either
// stride(2) == 1 (rows) or stride(1) == 1 (channels-last). weight/bias (C,), add (N, C): float32.
// Writes y and mean/rstd (N, G) float32 (statistics of x + add).
void group_norm_forward(const at::Tensor& x, at::Tensor y, at::Tensor mean, at::Tensor rstd,
                        const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
                        const c10::optional<at::Tensor>& add, int64_t G, double eps, bool silu) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 3, "group_norm_cpu: x must be a 3D (N, C, S) CPU tensor");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "group_norm_cpu: float32 or bfloat16 only");
  TORCH_CHECK(y.sizes() == x.sizes() && y.strides() == x.strides() && y.scalar_type() == x.scalar_type(),
              "group_norm_cpu: y must match x in shape, strides and dtype");
  const int64_t N = x.size(0), C = x.size(1);
  TORCH_CHECK(G > 0 && C % G == 0, "group_norm_cpu: C must be divisible by G");
  TORCH_CHECK(mean.scalar_type() == at::kFloat && mean.is_contiguous() && mean.numel() == N * G &&
                  rstd.scalar_type() == at::kFloat && rstd.is_contiguous() && rstd.numel() == N * G,
              "group_norm_cpu: mean/rstd must be contiguous float32 (N, G)");
  check_vec(weight, C, "weight");
  check_vec(bias, C, "bias");
  check_vec(add, N * C, "add");
  const bool rows_layout = x.stride(2) == 1;
  TORCH_CHECK(rows_layout || x.stride(1) == 1, "group_norm_cpu: x needs stride(2) == 1 or stride(1) == 1");
  if (x.numel() == 0) return;
  if (x.scalar_type() == at::kFloat)
    forward_impl<float>(x, y, mean, rstd, weight, bias, add, G, eps, silu, rows_layout);
  else
    forward_impl<bf16_t>(x, y, mean, rstd, weight, bias, add, G, eps, silu, rows_layout);
}

// Backward from the forward's (mean, rstd). x, dy, dx: (N, C, S), one dtype, the same strides (layout as in
// the forward). Returns dweight (C), dbias (C) and dadd (N, C, or empty without add), float32; writes dx.
std::vector<at::Tensor> group_norm_backward(const at::Tensor& x, const at::Tensor& dy, at::Tensor dx,
                                            const at::Tensor& mean, const at::Tensor& rstd,
                                            const c10::optional<at::Tensor>& weight,
                                            const c10::optional<at::Tensor>& bias,
                                            const c10::optional<at::Tensor>& add, int64_t G, bool silu) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 3, "group_norm_cpu: x must be a 3D (N, C, S) CPU tensor");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "group_norm_cpu: float32 or bfloat16 only");
  for (const at::Tensor* t : {&dy, static_cast<const at::Tensor*>(&dx)})
    TORCH_CHECK(t->sizes() == x.sizes() && t->strides() == x.strides() && t->scalar_type() == x.scalar_type(),
                "group_norm_cpu: dy and dx must match x in shape, strides and dtype");
  const int64_t N = x.size(0), C = x.size(1);
  TORCH_CHECK(G > 0 && C % G == 0, "group_norm_cpu: C must be divisible by G");
  TORCH_CHECK(mean.scalar_type() == at::kFloat && mean.is_contiguous() && mean.numel() == N * G &&
                  rstd.scalar_type() == at::kFloat && rstd.is_contiguous() && rstd.numel() == N * G,
              "group_norm_cpu: mean/rstd must be contiguous float32 (N, G)");
  check_vec(weight, C, "weight");
  check_vec(bias, C, "bias");
  check_vec(add, N * C, "add");
  const bool rows_layout = x.stride(2) == 1;
  TORCH_CHECK(rows_layout || x.stride(1) == 1, "group_norm_cpu: x needs stride(2) == 1 or stride(1) == 1");
  auto f32 = x.options().dtype(at::kFloat);
  at::Tensor dw = at::zeros({C}, f32), db = at::zeros({C}, f32);
  at::Tensor dadd = add ? at::zeros({N, C}, f32) : at::empty({0}, f32);
  if (x.numel() == 0) return {dw, db, dadd};
  if (x.scalar_type() == at::kFloat)
    backward_impl<float>(x, dy, dx, mean, rstd, weight, bias, add, G, silu, rows_layout, dw, db, dadd);
  else
    backward_impl<bf16_t>(x, dy, dx, mean, rstd, weight, bias, add, G, silu, rows_layout, dw, db, dadd);
  return {dw, db, dadd};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("group_norm_forward", &group_norm_forward, "Fused GroupNorm(+add)(+SiLU) forward, CPU, fp32/bf16",
        py::arg("x"), py::arg("y"), py::arg("mean"), py::arg("rstd"), py::arg("weight"), py::arg("bias"),
        py::arg("add"), py::arg("num_groups"), py::arg("eps"), py::arg("silu"));
  m.def("group_norm_backward", &group_norm_backward, "GroupNorm(+add)(+SiLU) backward, CPU, fp32/bf16",
        py::arg("x"), py::arg("dy"), py::arg("dx"), py::arg("mean"), py::arg("rstd"), py::arg("weight"),
        py::arg("bias"), py::arg("add"), py::arg("num_groups"), py::arg("silu"));
}
