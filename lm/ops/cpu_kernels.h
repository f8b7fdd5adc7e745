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

// Runs f(0..n-1) on the calling thread and the intra-op pool's threads. Late pool tasks
// find the counter spent and return without touching f; the caller waits for every index.
template <class F>
void parallel_for(ffi::ThreadPool& pool, int n, const F& f) {
  struct State {
    std::atomic<int> next{0}, done{0};
  };
  auto st = std::make_shared<State>();
  auto work = [st, n, fp = &f]() {
    for (int i; (i = st->next.fetch_add(1)) < n;) {
      (*fp)(i);
      st->done.fetch_add(1, std::memory_order_release);
    }
  };
  const long helpers = std::min<long>(pool.num_threads(), n) - 1;
  for (long w = 0; w < helpers; ++w) pool.Schedule(decltype(work)(work));
  work();
  while (st->done.load(std::memory_order_acquire) < n) std::this_thread::yield();
}

}  // namespace lm

#endif  // LM_OPS_CPU_KERNELS_H_
