// LayerNorm / RMSNorm over the last axis for XLA:CPU (XLA FFI custom calls), forward and
// backward, as lm/ops/norms.py computes them.
//
// XLA:CPU runs the norm's backward as ~8 ops (row reductions, broadcasts, column sums for
// the scale and bias gradients), each streaming the activations through memory: 4-5x the
// time of one pass. Here each row is read once into L1 and finished there; the scale and
// bias gradients are summed per task and then across tasks in a fixed order (so results do
// not depend on thread timing). x [R, D] (any leading shape), float32, D % 16 == 0.
#include <algorithm>
#include <cmath>
#include <vector>

#include "cpu_kernels.h"

namespace lm {
namespace {

ffi::Error check(const Rows& r) {
  if (r.D % 16) return ffi::Error::InvalidArgument("norm: the last axis must be a multiple of 16");
  return ffi::Error::Success();
}

// With delta (else [0]): the norm of h = x + delta, and h itself (a residual stream and
// the norm that follows its add, in one pass).
ffi::Error Forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> delta,
                   ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> bias,
                   ffi::ResultBuffer<ffi::F32> y, ffi::ResultBuffer<ffi::F32> h,
                   ffi::ResultBuffer<ffi::F32> mean, ffi::ResultBuffer<ffi::F32> rstd,
                   bool centered, float eps) {
  const Rows r(x);
  if (auto e = check(r); e.failure()) return e;
  const float *xs = x.typed_data(), *s = scale.typed_data(), *b = bias.typed_data();
  const float* ds = delta.element_count() ? delta.typed_data() : nullptr;
  float *ys = y->typed_data(), *hs = h->typed_data();
  float *means = mean->typed_data(), *rstds = rstd->typed_data();
  const float inv_d = 1.0f / r.D;
  parallel_for(pool, r.tasks, [&](int t) {
    for (long i = r.begin(t); i < r.end(t); ++i) {
      const float* xr = xs + i * r.D;
      if (ds) {
        for (long j = 0; j < r.D; j += 16)
          store(hs + i * r.D + j, load(xr + j) + load(ds + i * r.D + j));
        xr = hs + i * r.D;
      }
      float mu = 0.0f;
      if (centered) {
        v16 acc{};
        for (long j = 0; j < r.D; j += 16) acc += load(xr + j);
        mu = hsum(acc) * inv_d;
      }
      v16 sq{};
      for (long j = 0; j < r.D; j += 16) {
        const v16 c = load(xr + j) - mu;
        sq += c * c;
      }
      const float rs = 1.0f / std::sqrt(hsum(sq) * inv_d + eps);
      for (long j = 0; j < r.D; j += 16)
        store(ys + i * r.D + j, (load(xr + j) - mu) * rs * load(s + j) + load(b + j));
      means[i] = mu;
      rstds[i] = rs;
    }
  });
  return ffi::Error::Success();
}

// xhat = (x - mean) * rstd, g = dy * scale:
// dx = rstd * (g - mean(g) [centered only] - xhat * mean(g * xhat)) (+ dres: the gradient
// that reaches x, the residual stream, past the norm), dscale = sum over rows of
// dy * xhat, dbias = sum over rows of dy.
ffi::Error Backward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> scale,
                    ffi::Buffer<ffi::F32> mean, ffi::Buffer<ffi::F32> rstd,
                    ffi::Buffer<ffi::F32> dy, ffi::Buffer<ffi::F32> dres,
                    ffi::ResultBuffer<ffi::F32> dx, ffi::ResultBuffer<ffi::F32> dscale,
                    ffi::ResultBuffer<ffi::F32> dbias, bool centered) {
  const Rows r(x);
  if (auto e = check(r); e.failure()) return e;
  const float *xs = x.typed_data(), *s = scale.typed_data(), *dys = dy.typed_data();
  const float* drs = dres.element_count() ? dres.typed_data() : nullptr;
  const float *means = mean.typed_data(), *rstds = rstd.typed_data();
  float* dxs = dx->typed_data();
  std::vector<float> partial(r.tasks * 2 * r.D, 0.0f);  // per task: dscale, dbias
  const float inv_d = 1.0f / r.D;
  parallel_for(pool, r.tasks, [&](int t) {
    float* ds = partial.data() + t * 2 * r.D;
    float* db = ds + r.D;
    for (long i = r.begin(t); i < r.end(t); ++i) {
      const float *xr = xs + i * r.D, *gr = dys + i * r.D;
      const float mu = means[i], rs = rstds[i];
      v16 sum_g{}, sum_gx{};
      for (long j = 0; j < r.D; j += 16) {
        const v16 xh = (load(xr + j) - mu) * rs, d = load(gr + j), g = d * load(s + j);
        sum_g += g;
        sum_gx += g * xh;
        store(ds + j, load(ds + j) + d * xh);
        store(db + j, load(db + j) + d);
      }
      const float mg = centered ? hsum(sum_g) * inv_d : 0.0f, mgx = hsum(sum_gx) * inv_d;
      for (long j = 0; j < r.D; j += 16) {
        const v16 xh = (load(xr + j) - mu) * rs;
        const v16 d = rs * (load(gr + j) * load(s + j) - mg - xh * mgx);
        store(dxs + i * r.D + j, drs ? d + load(drs + i * r.D + j) : d);
      }
    }
  });
  sum_partials(partial.data(), r.tasks, 2 * r.D, r.D, dscale->typed_data());
  sum_partials(partial.data() + r.D, r.tasks, 2 * r.D, r.D, dbias->typed_data());
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(LmNormForward, Forward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x
                                  .Arg<ffi::Buffer<ffi::F32>>()  // delta, added to x, or [0]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // scale
                                  .Arg<ffi::Buffer<ffi::F32>>()  // bias (zeros if none)
                                  .Ret<ffi::Buffer<ffi::F32>>()  // y
                                  .Ret<ffi::Buffer<ffi::F32>>()  // x + delta, or [0]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // mean [R] (0 if not centered)
                                  .Ret<ffi::Buffer<ffi::F32>>()  // rstd [R]
                                  .Attr<bool>("centered")
                                  .Attr<float>("eps"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(LmNormBackward, Backward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x
                                  .Arg<ffi::Buffer<ffi::F32>>()  // scale
                                  .Arg<ffi::Buffer<ffi::F32>>()  // mean
                                  .Arg<ffi::Buffer<ffi::F32>>()  // rstd
                                  .Arg<ffi::Buffer<ffi::F32>>()  // dy
                                  .Arg<ffi::Buffer<ffi::F32>>()  // dres, added to dx, or [0]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dx
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dscale
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dbias
                                  .Attr<bool>("centered"));

}  // namespace lm
