// The backward of GELU (tanh approximation) for XLA:CPU (an XLA FFI custom call), as
// lm/ops/activations.py computes it; the forward is applied by the dense layer's kernel
// (cpu_linear.cc) to the tiles it computes.
//
// XLA:CPU runs this backward as a loop fusion plus a column sum for the bias gradient of
// the layer before it; here it is one pass, the column sums kept per task and added
// across tasks in a fixed order. u [R, F] (any leading shape), float32, F % 16 == 0.
#include <vector>

#include "cpu_kernels.h"

namespace lm {
namespace {

// du = dy gelu'(u) (vgelu_grad, cpu_kernels.h); dbias = the sum of du over rows, unless
// dbias is [0] (no bias before the GELU).
ffi::Error Backward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> u, ffi::Buffer<ffi::F32> dy,
                    ffi::ResultBuffer<ffi::F32> du, ffi::ResultBuffer<ffi::F32> dbias) {
  const Rows r(u);
  if (r.D % 16) return ffi::Error::InvalidArgument("gelu: the last axis must be a multiple of 16");
  const float *us = u.typed_data(), *dys = dy.typed_data();
  float* dus = du->typed_data();
  const bool sums = dbias->element_count() != 0;
  std::vector<float> partial(sums ? r.tasks * r.D : 0, 0.0f);
  parallel_for(pool, r.tasks, [&](int t) {
    float* db = partial.data() + (sums ? t * r.D : 0);
    for (long i = r.begin(t); i < r.end(t); ++i)
      for (long j = 0; j < r.D; j += 16) {
        const v16 d = load(dys + i * r.D + j) * vgelu_grad(load(us + i * r.D + j));
        store(dus + i * r.D + j, d);
        if (sums) store(db + j, load(db + j) + d);
      }
  });
  if (sums) sum_partials(partial.data(), r.tasks, r.D, r.D, dbias->typed_data());
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(LmGeluBackward, Backward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()    // u (GELU's input)
                                  .Arg<ffi::Buffer<ffi::F32>>()    // dy
                                  .Ret<ffi::Buffer<ffi::F32>>()    // du
                                  .Ret<ffi::Buffer<ffi::F32>>());  // du summed over rows, or [0]

}  // namespace lm
