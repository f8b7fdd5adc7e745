// Shared by the C++ kernels (cpu_*.cc, compiled together by lm/ops/cpu_kernels.py): 16-lane
// float vectors (GCC/Clang vector extensions) and a parallel loop on XLA's intra-op pool.
#ifndef LM_OPS_CPU_KERNELS_H_
#define LM_OPS_CPU_KERNELS_H_

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <memory>
#include <thread>

#if defined(__linux__)
#include <sched.h>
#endif

#include "xla/ffi/api/ffi.h"

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace ffi = xla::ffi;

namespace lm {

// 16 lanes, compiled to AVX-512 (or 2x AVX2) by -march=native.
typedef float v16 __attribute__((vector_size(64)));
typedef float v16u __attribute__((vector_size(64), aligned(4), may_alias));
typedef uint32_t w16 __attribute__((vector_size(64)));
typedef int32_t i16 __attribute__((vector_size(64)));
typedef int32_t i16u __attribute__((vector_size(64), aligned(4), may_alias));

inline v16 load(const float* p) { return *reinterpret_cast<const v16u*>(p); }
inline void store(float* p, v16 x) { *reinterpret_cast<v16u*>(p) = x; }
inline i16 load_i(const int32_t* p) { return *reinterpret_cast<const i16u*>(p); }
inline v16 splat(float x) { return v16{} + x; }
inline v16 vsqrt(v16 x) {
#if defined(__AVX512F__)
  return (v16)_mm512_sqrt_ps((__m512)x);
#else
  for (int i = 0; i < 16; ++i) x[i] = std::sqrt(x[i]);
  return x;
#endif
}
inline i16 iota16() { return i16{0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15}; }

#if defined(__has_builtin) && __has_builtin(__builtin_shufflevector)
#define LM_HAS_SHUFFLE 1
#else
#define LM_HAS_SHUFFLE 0
#endif

// Horizontal max and sum as a tree of halving shuffles (4 dependent steps, not 15).
#if LM_HAS_SHUFFLE
typedef float v8 __attribute__((vector_size(32)));
typedef float v4 __attribute__((vector_size(16)));
template <class Op>
inline float reduce16(v16 x, Op op) {
  const v8 a = op(__builtin_shufflevector(x, x, 0, 1, 2, 3, 4, 5, 6, 7),
                  __builtin_shufflevector(x, x, 8, 9, 10, 11, 12, 13, 14, 15));
  v4 b = op(__builtin_shufflevector(a, a, 0, 1, 2, 3), __builtin_shufflevector(a, a, 4, 5, 6, 7));
  b = op(b, __builtin_shufflevector(b, b, 2, 3, 0, 1));
  b = op(b, __builtin_shufflevector(b, b, 1, 0, 3, 2));
  return b[0];
}
inline float hmax(v16 x) {
  return reduce16(x, [](auto a, auto b) { return a > b ? a : b; });
}
inline float hsum(v16 x) {
  return reduce16(x, [](auto a, auto b) { return a + b; });
}
#else
inline float hmax(v16 x) {
  float m = x[0];
  for (int i = 1; i < 16; ++i) m = std::max(m, x[i]);
  return m;
}
inline float hsum(v16 x) {
  float s = 0.0f;
  for (int i = 0; i < 16; ++i) s += x[i];
  return s;
}
#endif

// exp(x) for x <= 0 (attention scores minus their row max): Cody-Waite reduction and
// a degree-6 polynomial, ~1 ulp; below -87 it returns 0.
inline v16 vexp(v16 x) {
  x = x < -87.0f ? splat(-87.0f) : x;
  // round(x / ln 2) for x <= 0, by truncation of x / ln 2 - 0.5
  const i16 ni = __builtin_convertvector(x * 1.44269504088896341f - 0.5f, i16);
  const v16 n = __builtin_convertvector(ni, v16);
  v16 r = x - n * 0.693359375f + n * 2.12194440e-4f;
  v16 p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  return p * (v16)((ni + 127) << 23);
}

// 1 / d for d > 0 (a normal float): a division costs several times the rest of a lane's
// work, so on AVX-512 the 14-bit reciprocal estimate plus one Newton step (~1e-7 relative)
// stands in.
inline v16 reciprocal(v16 d) {
#ifdef __AVX512F__
  const v16 r = (v16)_mm512_rcp14_ps((__m512)d);
  return r * (2.0f - d * r);
#else
  return 1.0f / d;
#endif
}

// tanh(z) as XLA:CPU computes it (Eigen's rational approximation: z times an even
// degree-12 polynomial over an even degree-6 one, within 4e-7 of tanh), exactly +-1 past
// |z| = 7.905 (so GELU's derivative is 0 far left, as XLA's); 30% faster in the GELU
// kernels than (1 - e) / (1 + e) with e = exp(-2|z|).
inline v16 vtanh(v16 z) {
  constexpr float kClamp = 7.90531110763549805f;
  const v16 x = z < -kClamp ? splat(-kClamp) : z > kClamp ? splat(kClamp) : z;
  const v16 x2 = x * x;
  v16 p = x2 * -2.76076847742355e-16f + 2.00018790482477e-13f;
  p = p * x2 - 8.60467152213735e-11f;
  p = p * x2 + 5.12229709037114e-08f;
  p = p * x2 + 1.48572235717979e-05f;
  p = p * x2 + 6.37261928875436e-04f;
  p = p * x2 + 4.89352455891786e-03f;
  v16 q = x2 * 1.19825839466702e-06f + 1.18534705686654e-04f;
  q = q * x2 + 2.26843463243900e-03f;
  q = q * x2 + 4.89352518554385e-03f;  // >= 4.89e-3: reciprocal's range
  const v16 t = x * p * reciprocal(q);
  return z >= kClamp ? splat(1.0f) : z <= -kClamp ? splat(-1.0f) : t;
}

// GELU, tanh approximation (GPT-2): 0.5 u (1 + tanh(C (u + A u^3))).
constexpr float kGeluC = 0.7978845608028654f;  // sqrt(2 / pi)
constexpr float kGeluA = 0.044715f;
inline v16 vgelu(v16 u) { return 0.5f * u * (1.0f + vtanh(kGeluC * (u + kGeluA * u * u * u))); }
// Its derivative: 0.5 (1 + t) + 0.5 u (1 - t^2) C (1 + 3 A u^2), t = tanh(C (u + A u^3)).
inline v16 vgelu_grad(v16 u) {
  const v16 u2 = u * u, t = vtanh(kGeluC * (u + kGeluA * u2 * u));
  return 0.5f * (1.0f + t) + 0.5f * u * (1.0f - t * t) * kGeluC * (1.0f + 3 * kGeluA * u2);
}

// C[MR, 16 * NV] (+)= A[MR, k0:k1] B[k0:k1, 16 * NV]; A(i, k) sits at a[i * ai + k * ak],
// so A may be read transposed for free (its elements are broadcast, not vector-loaded).
// Without acc, C starts from the row `init` (a bias) if given, else from 0.
template <int MR, int NV>
inline void tile(int k0, int k1, const float* a, long ai, long ak, const float* b, long ldb,
                 float* c, long ldc, bool acc, const float* init = nullptr) {
  v16 s[MR][NV];
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v)
      s[r][v] = acc ? load(c + r * ldc + 16 * v) : init ? load(init + 16 * v) : v16{};
  for (int k = k0; k < k1; ++k) {
    v16 bv[NV];
    for (int v = 0; v < NV; ++v) {
      bv[v] = load(b + k * ldb + 16 * v);
#if defined(__AVX512F__)
      asm("" : "+v"(bv[v]));  // keep B in registers: GCC would reload it for every row
#endif
    }
    for (int r = 0; r < MR; ++r) {
      const float x = a[r * ai + k * ak];
      for (int v = 0; v < NV; ++v) s[r][v] += x * bv[v];
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) store(c + r * ldc + 16 * v, s[r][v]);
}

// Row chunks of an [R, D] array (any leading shape) for parallel_for: at most kMaxTasks,
// which also bounds the per-task partial sums of column reductions (sum_partials).
constexpr long kMaxTasks = 64;

struct Rows {
  long R, D, tasks, per;
  explicit Rows(const ffi::Buffer<ffi::F32>& x) {
    auto dims = x.dimensions();
    D = dims.size() ? dims[dims.size() - 1] : 1;
    R = D ? static_cast<long>(x.element_count()) / D : 0;
    tasks = std::max(1L, std::min(R, kMaxTasks));
    per = (R + tasks - 1) / tasks;
  }
  long begin(long t) const { return std::min(R, t * per); }
  long end(long t) const { return std::min(R, (t + 1) * per); }
};

// out[D] = the sum over tasks of partial[t * stride + j], j < D, in task order: a column sum
// that does not depend on thread timing. D % 16 == 0.
inline void sum_partials(const float* partial, long tasks, long stride, long D, float* out) {
  std::fill(out, out + D, 0.0f);
  for (long t = 0; t < tasks; ++t)
    for (long j = 0; j < D; j += 16) store(out + j, load(out + j) + load(partial + t * stride + j));
}

// Runs f(0..n-1) on the calling thread and the intra-op pool's threads. The indices come
// in one contiguous part per thread, each taken first by the threads running on the cores
// it is keyed to (sched_getcpu), then by any: kernels that split rows the same way, one
// after another, find their rows in the same core's L2. Late pool tasks find the counters
// spent and return without touching f; the caller waits for every index.
template <class F>
void parallel_for(ffi::ThreadPool& pool, int n, const F& f) {
  constexpr int kMaxParts = 64;
  struct State {
    std::atomic<int> next[kMaxParts], done{0};
  };
  if (n <= 0) return;
  const int parts = std::clamp(static_cast<int>(pool.num_threads()), 1, std::min(n, kMaxParts));
  auto st = std::make_shared<State>();
  for (int p = 0; p < parts; ++p) st->next[p] = static_cast<int>(static_cast<long>(n) * p / parts);
  auto work = [st, n, parts, fp = &f]() {
#if defined(__linux__)
    const int first = std::max(0, sched_getcpu()) % parts;
#else
    const int first = 0;  // no core affinity: the parts in order
#endif
    for (int q = 0; q < parts; ++q) {
      const int p = (first + q) % parts;
      const int end = static_cast<int>(static_cast<long>(n) * (p + 1) / parts);
      for (int i; (i = st->next[p].fetch_add(1)) < end;) {
        (*fp)(i);
        st->done.fetch_add(1, std::memory_order_release);
      }
    }
  };
  for (int w = 1; w < parts; ++w) pool.Schedule(decltype(work)(work));
  work();
  while (st->done.load(std::memory_order_acquire) < n) std::this_thread::yield();
}

}  // namespace lm

#endif  // LM_OPS_CPU_KERNELS_H_
