// Dense layers, y = x w (+ b) [then GELU], for XLA:CPU (XLA FFI custom calls): the forward
// and the weight gradient.
//
// At the small model's shapes ([768, 128] x [128, 512] and the like) XLA:CPU's matmul
// library runs the forward at 55-70% of the machine's peak inside a train step, and its
// weight gradients x^T dy at 120-190 GFLOP/s even alone. One register-tile kernel (`tile`,
// cpu_kernels.h: 6 rows x 64 columns of accumulators, each task's 64-column panel of w or
// dy read from L1) runs both at 250-330 GFLOP/s alone. The forward starts from the bias
// and can apply GELU to each tile while it is in L1 (writing the pre-activation, which the
// backward needs, and the activation); the weight gradient reads x transposed for free
// (its elements are broadcast) and sums the bias gradient from the same blocks of dy.
// dx = dy w^T stays in XLA (lm/ops/cpu_linear.py). x [M, K] (any leading shape), w [K, N],
// float32, K % 16 == 0 and N % 16 == 0.
#include "cpu_kernels.h"

namespace lm {
namespace {

constexpr int kMR = 6;            // rows per register tile
constexpr int kNR = 64;           // columns per register tile and per task
constexpr int kRowsPerTask = 96;  // rows of y per task
constexpr int kBlockK = 128;      // rows of w per pass over a task's tiles

// C[mr, 16 nv] (+)= A B as `tile` does, for mr in [1, kMR] and nv in [1, 4]. The tiles stay
// out of line: inlined into the task loops, GCC may spill the accumulators (seen: 2.5x
// slower).
template <int MR>
[[gnu::noinline]] void tile_cols(int nv, int k0, int k1, const float* a, long ai, long ak,
                                 const float* b, long ldb, float* c, long ldc, bool acc,
                                 const float* init) {
  switch (nv) {
    case 4: tile<MR, 4>(k0, k1, a, ai, ak, b, ldb, c, ldc, acc, init); break;
    case 3: tile<MR, 3>(k0, k1, a, ai, ak, b, ldb, c, ldc, acc, init); break;
    case 2: tile<MR, 2>(k0, k1, a, ai, ak, b, ldb, c, ldc, acc, init); break;
    default: tile<MR, 1>(k0, k1, a, ai, ak, b, ldb, c, ldc, acc, init);
  }
}

void tile_any(long mr, long nv, int k0, int k1, const float* a, long ai, long ak,
              const float* b, long ldb, float* c, long ldc, bool acc, const float* init) {
  switch (mr) {
    case 6: tile_cols<6>(nv, k0, k1, a, ai, ak, b, ldb, c, ldc, acc, init); break;
    case 5: tile_cols<5>(nv, k0, k1, a, ai, ak, b, ldb, c, ldc, acc, init); break;
    case 4: tile_cols<4>(nv, k0, k1, a, ai, ak, b, ldb, c, ldc, acc, init); break;
    case 3: tile_cols<3>(nv, k0, k1, a, ai, ak, b, ldb, c, ldc, acc, init); break;
    case 2: tile_cols<2>(nv, k0, k1, a, ai, ak, b, ldb, c, ldc, acc, init); break;
    default: tile_cols<1>(nv, k0, k1, a, ai, ak, b, ldb, c, ldc, acc, init);
  }
}

ffi::Error check(long K, long N) {
  if (K % 16 || N % 16)
    return ffi::Error::InvalidArgument("linear: both axes of the kernel must be multiples of 16");
  return ffi::Error::Success();
}

ffi::Error Forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                   ffi::Buffer<ffi::F32> bias, ffi::ResultBuffer<ffi::F32> y,
                   ffi::ResultBuffer<ffi::F32> act) {
  const auto xd = x.dimensions(), wd = w.dimensions();
  const long K = xd[xd.size() - 1], N = wd[1], M = x.element_count() / K;
  if (auto e = check(K, N); e.failure()) return e;
  if (wd[0] != K) return ffi::Error::InvalidArgument("linear: x's last axis must equal w's first");
  const bool gelu = act->element_count() != 0;  // act [0]: no activation
  const float *xs = x.typed_data(), *ws = w.typed_data();
  const float* b = bias.element_count() ? bias.typed_data() : nullptr;
  float *ys = y->typed_data(), *hs = act->typed_data();
  const int panels = (N + kNR - 1) / kNR, chunks = (M + kRowsPerTask - 1) / kRowsPerTask;
  parallel_for(pool, panels * chunks, [&](int t) {
    const long j = (t % panels) * kNR, w16 = std::min<long>(kNR, N - j) / 16;
    const long i0 = (t / panels) * kRowsPerTask, i1 = std::min<long>(M, i0 + kRowsPerTask);
    for (long k0 = 0; k0 < K; k0 += kBlockK) {  // a [kBlockK, 64] block of w stays in L1
      const long k1 = std::min<long>(K, k0 + kBlockK);
      const float* init = b && k0 == 0 ? b + j : nullptr;
      for (long i = i0; i < i1; i += kMR)
        tile_any(std::min<long>(kMR, i1 - i), w16, k0, k1, xs + i * K, K, 1, ws + j, N,
                 ys + i * N + j, N, k0 > 0, init);
    }
    if (gelu)  // the task's rows of this panel are still in L1/L2
      for (long i = i0; i < i1; ++i)
        for (long v = 0; v < w16 * 16; v += 16)
          store(hs + i * N + j + v, vgelu(load(ys + i * N + j + v)));
  });
  return ffi::Error::Success();
}

// dw = x^T dy (x read transposed: its elements are broadcast) and, if asked, the bias
// gradient (dy's column sums): tasks of (48 rows of dw, one 64-column panel); each pass
// over a block of kBlockM rows of x and dy keeps that block of dy in L1 while the task's
// tiles read it.
constexpr int kDwRows = 48;
constexpr int kBlockM = 64;

ffi::Error WeightGrad(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                      ffi::ResultBuffer<ffi::F32> dw, ffi::ResultBuffer<ffi::F32> dbias) {
  const auto xd = x.dimensions(), dd = dy.dimensions();
  const long K = xd[xd.size() - 1], N = dd[dd.size() - 1], M = x.element_count() / K;
  if (auto e = check(K, N); e.failure()) return e;
  const float *xs = x.typed_data(), *dys = dy.typed_data();
  float *dws = dw->typed_data(), *db = dbias->element_count() ? dbias->typed_data() : nullptr;
  const int panels = (N + kNR - 1) / kNR, chunks = (K + kDwRows - 1) / kDwRows;
  parallel_for(pool, panels * chunks, [&](int t) {
    const long j = (t % panels) * kNR, nv = std::min<long>(kNR, N - j) / 16;
    const long d0 = (t / panels) * kDwRows, d1 = std::min<long>(K, d0 + kDwRows);
    v16 bsum[kNR / 16] = {};  // the bias gradient: dy's column sums, by the first chunk
    for (long m0 = 0; m0 < M; m0 += kBlockM) {
      const long m1 = std::min<long>(M, m0 + kBlockM);
      if (db && d0 == 0)
        for (long m = m0; m < m1; ++m)
          for (long v = 0; v < nv; ++v) bsum[v] += load(dys + m * N + j + 16 * v);
      for (long d = d0; d < d1; d += kMR)
        tile_any(std::min<long>(kMR, d1 - d), nv, m0, m1, xs + d, 1, K, dys + j, N,
                 dws + d * N + j, N, m0 > 0, nullptr);
    }
    if (db && d0 == 0)
      for (long v = 0; v < nv; ++v) store(db + j + 16 * v, bsum[v]);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(LmLinearForward, Forward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()    // x [..., K]
                                  .Arg<ffi::Buffer<ffi::F32>>()    // w [K, N]
                                  .Arg<ffi::Buffer<ffi::F32>>()    // bias [N] or [0]
                                  .Ret<ffi::Buffer<ffi::F32>>()    // y = x w + b [..., N]
                                  .Ret<ffi::Buffer<ffi::F32>>());  // gelu(y) [..., N] or [0]

XLA_FFI_DEFINE_HANDLER_SYMBOL(LmLinearWeightGrad, WeightGrad,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()    // x [..., K]
                                  .Arg<ffi::Buffer<ffi::F32>>()    // dy [..., N]
                                  .Ret<ffi::Buffer<ffi::F32>>()    // dw = x^T dy [K, N]
                                  .Ret<ffi::Buffer<ffi::F32>>());  // dy summed over rows [N] or [0]

}  // namespace lm
