// Fused causal/segment-masked softmax attention for XLA:CPU (an XLA FFI custom call).
//
// XLA:CPU runs attention as ~45 separate ops per layer: small batched matmuls at a third of
// the machine's matmul rate, plus transposes, slices, selects and reductions that each
// stream the [B, N, T, S] scores through memory. Here one task per (batch, KV head) keeps
// a head's scores in L2, runs the matmuls through one register-blocked kernel, skips the
// tiles above the causal diagonal, and recomputes the probabilities in the backward pass
// from the saved log-sum-exp (as FlashAttention does) instead of storing them.
//
// Layouts are the model's: q, out [B, T, N, H]; k, v [B, S, K, H] (K divides N: GQA);
// segment ids [B, T] and [B, S] (a query attends keys of its own segment); lse [B, N, T].
// The packed entry points take q, k, v side by side in one [B, T, (N + 2K) H] projection
// (and give dq, dk, dv back the same way): no slices, no concatenation around the kernel.
// Dropout hashes each score's index in [B, N, T, S] exactly as lm/ops/dropout.py does, so
// the mask equals the XLA path's. Requires float32, H % 16 == 0, T % 16 == 0, S == T.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "cpu_kernels.h"

namespace lm {
namespace {

// lowbias32 (lm/ops/dropout.py _mix32).
inline w16 mix32(w16 x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  return x ^ (x >> 16);
}

constexpr int kRows = 4;  // rows per register tile; m must be a multiple of it

// C[m, n] (+)= A[m, K] B[K, n] over row blocks of kRows, where block i0 only needs
// k in krange(i0) and columns below ncols(i0) (a multiple of 16): the causal skip.
template <class KRange, class NCols>
void gemm(int m, const float* a, long ai, long ak, const float* b, long ldb, float* c,
          long ldc, bool acc, KRange krange, NCols ncols) {
  for (int i0 = 0; i0 < m; i0 += kRows) {
    const auto [k0, k1] = krange(i0);
    const int n = ncols(i0);
    const float* ar = a + i0 * ai;
    float* cr = c + i0 * ldc;
    int j = 0;
    for (; j + 64 <= n; j += 64) tile<kRows, 4>(k0, k1, ar, ai, ak, b + j, ldb, cr + j, ldc, acc);
    switch ((n - j) / 16) {
      case 3: tile<kRows, 3>(k0, k1, ar, ai, ak, b + j, ldb, cr + j, ldc, acc); break;
      case 2: tile<kRows, 2>(k0, k1, ar, ai, ak, b + j, ldb, cr + j, ldc, acc); break;
      case 1: tile<kRows, 1>(k0, k1, ar, ai, ak, b + j, ldb, cr + j, ldc, acc); break;
    }
  }
}

struct Dims {
  long B, T, S, N, K, H;
  long ldq, ldk;  // floats from one time step to the next in q (dq) and in k, v (dk, dv)
  bool causal;
  float rate;
  uint32_t seed0, seed1;
  uint32_t threshold;  // dropout keeps a score whose hash is >= rate * 2^32
  const float* bias = nullptr;  // packed only: [(N + 2K) H] added to q, k, v, or none
  long G() const { return N / K; }
  const float* qbias(long n) const { return bias ? bias + n * H : nullptr; }
  const float* kbias(long kv) const { return bias ? bias + (N + kv) * H : nullptr; }
  const float* vbias(long kv) const { return bias ? bias + (N + K + kv) * H : nullptr; }
  // Keys that query rows [i0, i0 + kRows) may see: [0, kend).
  int kend(int i0) const { return causal ? std::min<long>(S, i0 + kRows + (S - T)) : S; }
  int ncols(int i0) const { return std::min<long>(S, (kend(i0) + 15) / 16 * 16); }
  // Queries that key rows [j0, j0 + kRows) may be seen by: [qbeg, T).
  int qbeg(int j0) const { return causal ? std::max<long>(0, j0 - (S - T)) : 0; }
};

// Per-thread scratch, grown on demand and kept for the thread's life.
float* scratch(size_t n) {
  thread_local std::vector<float> buf;
  if (buf.size() < n) buf.resize(n);
  return buf.data();
}

#if LM_HAS_SHUFFLE
// One stage swaps bit S of the row index with bit S of the column index, between rows i
// (bit S clear) and i + S of a 16 x 16 block; stages S = 1, 2, 4, 8 transpose it in registers.
#define LM_LO(c, s) ((((c) & (s)) ? 16 : 0) + ((c) & ~(s)))
#define LM_HI(c, s) ((((c) & (s)) ? 16 : 0) + ((c) | (s)))
#define LM_IDX(F, s)                                                                      \
  F(0, s), F(1, s), F(2, s), F(3, s), F(4, s), F(5, s), F(6, s), F(7, s), F(8, s), F(9, s), \
      F(10, s), F(11, s), F(12, s), F(13, s), F(14, s), F(15, s)
template <int S>
inline void transpose_stage(v16* r) {
  for (int i = 0; i < 16; ++i)
    if (!(i & S)) {
      const v16 a = r[i], b = r[i + S];
      r[i] = __builtin_shufflevector(a, b, LM_IDX(LM_LO, S));
      r[i + S] = __builtin_shufflevector(a, b, LM_IDX(LM_HI, S));
    }
}
#endif

// One head's keys k[S, H] (rows ld floats apart) + bias[H] if any, transposed to kt[H, S]
// (the B operand of q k^T needs rows of keys): 16 x 16 blocks, read as 16 vectors and
// transposed in registers.
void transpose_keys(const float* k, long ld, const Dims& d, const float* bias, float* kt) {
  for (long j0 = 0; j0 < d.S; j0 += 16) {
    const float* rows = k + j0 * ld;
    for (long h0 = 0; h0 < d.H; h0 += 16) {
#if LM_HAS_SHUFFLE
      v16 r[16];
      for (int j = 0; j < 16; ++j) r[j] = load(rows + j * ld + h0);
      transpose_stage<1>(r), transpose_stage<2>(r), transpose_stage<4>(r), transpose_stage<8>(r);
      for (int h = 0; h < 16; ++h)
        store(kt + (h0 + h) * d.S + j0, bias ? r[h] + bias[h0 + h] : r[h]);
#else
      for (long h = h0; h < h0 + 16; ++h)
        for (long j = 0; j < 16; ++j)
          kt[h * d.S + j0 + j] = rows[j * ld + h] + (bias ? bias[h] : 0.0f);
#endif
    }
  }
}

// A head's rows x[R, H] (ld floats apart) as the kernel reads them: as they are, or, with a
// bias, x + bias copied to buf (H floats apart). Returns the rows and their stride.
std::pair<const float*, long> with_bias(const float* x, long ld, long R, long H,
                                        const float* bias, float* buf) {
  if (!bias) return {x, ld};
  for (long r = 0; r < R; ++r)
    for (long h = 0; h < H; h += 16) store(buf + r * H + h, load(x + r * ld + h) + load(bias + h));
  return {buf, H};
}

// Scores of one head: sc[T, S] = q k^T for the tiles below the causal diagonal; q's rows
// are ldq floats apart.
void scores(const float* q, long ldq, const float* kt, const Dims& d, float* sc) {
  gemm(d.T, q, ldq, 1, kt, d.S, sc, d.S, false,
       [&](int) { return std::pair<int, int>(0, d.H); }, [&](int i0) { return d.ncols(i0); });
}

// For row i of head n: which of 16 keys from j may be attended, and which are kept by
// dropout (all when rate == 0).
struct RowMask {
  const Dims& d;
  const int32_t* kseg;  // [S] of this batch row
  int32_t qseg;
  long i, jmax;
  uint32_t idx0;
  RowMask(const Dims& d, const int32_t* qs, const int32_t* ks, long b, long n, long i)
      : d(d), kseg(ks), qseg(qs[i]), i(i),
        jmax(d.causal ? std::min<long>(d.S, i + 1 + (d.S - d.T)) : d.S),
        idx0(static_cast<uint32_t>(((b * d.N + n) * d.T + i) * d.S)) {}
  i16 allowed(long j) const {
    return (iota16() + static_cast<int32_t>(j) < static_cast<int32_t>(jmax)) &
           (load_i(kseg + j) == qseg);
  }
  i16 keep(long j) const {
    if (d.rate <= 0.0f) return ~i16{};
    const w16 idx = (w16)iota16() + (idx0 + static_cast<uint32_t>(j));
    return (i16)(mix32(mix32(idx + d.seed0) ^ d.seed1) >= d.threshold);
  }
};

void forward_task(const float* q, const float* k, const float* v, const int32_t* qseg,
                  const int32_t* kseg, const Dims& d, long task, float* out, float* lse) {
  const long b = task / d.K, kv = task % d.K;
  float* kt = scratch(d.H * d.S + d.T * d.S + d.S * d.H + d.T * d.H);
  float* sc = kt + d.H * d.S;
  float* vbuf = sc + d.T * d.S;  // biased copies (with_bias)
  float* qbuf = vbuf + d.S * d.H;
  const long koff = b * d.S * d.ldk + kv * d.H;
  transpose_keys(k + koff, d.ldk, d, d.kbias(kv), kt);
  const auto [v_b, ldv] = with_bias(v + koff, d.ldk, d.S, d.H, d.vbias(kv), vbuf);
  const float scale = 1.0f / std::sqrt(static_cast<float>(d.H));
  const float keep_scale = d.rate > 0.0f ? 1.0f / (1.0f - d.rate) : 1.0f;
  const float ninf = -std::numeric_limits<float>::infinity();
  for (long n = kv * d.G(); n < (kv + 1) * d.G(); ++n) {
    const auto [q_n, ldq] =
        with_bias(q + b * d.T * d.ldq + n * d.H, d.ldq, d.T, d.H, d.qbias(n), qbuf);
    scores(q_n, ldq, kt, d, sc);
    for (long i = 0; i < d.T; ++i) {
      RowMask rm(d, qseg + b * d.T, kseg + b * d.S, b, n, i);
      float* row = sc + i * d.S;
      const long end = d.ncols(i / kRows * kRows);
      v16 mv = splat(ninf);
      for (long j = 0; j < end; j += 16) {
        v16 x = rm.allowed(j) ? load(row + j) * scale : splat(ninf);
        store(row + j, x);
        mv = mv > x ? mv : x;
      }
      const float m = hmax(mv);
      if (m == ninf) {  // nothing to attend (no key in the query's segment): zeros
        for (long j = 0; j < end; ++j) row[j] = 0.0f;
        lse[(b * d.N + n) * d.T + i] = 0.0f;
        continue;
      }
      v16 lv{};
      for (long j = 0; j < end; j += 16) {
        v16 p = vexp(load(row + j) - m);
        p = rm.allowed(j) ? p : v16{};
        store(row + j, p);
        lv += p;
      }
      const float l = hsum(lv);
      lse[(b * d.N + n) * d.T + i] = m + std::log(l);
      const v16 norm = splat(keep_scale / l);
      for (long j = 0; j < end; j += 16)
        store(row + j, rm.keep(j) ? load(row + j) * norm : v16{});
    }
    // out_n = P v, over the keys each row block may see.
    gemm(d.T, sc, d.S, 1, v_b, ldv, out + (b * d.T * d.N + n) * d.H, d.N * d.H, false,
         [&](int i0) { return std::pair<int, int>(0, d.kend(i0)); },
         [&](int) { return static_cast<int>(d.H); });
  }
}

void backward_task(const float* q, const float* k, const float* v, const int32_t* qseg,
                   const int32_t* kseg, const float* out, const float* lse, const float* dout,
                   const Dims& d, long task, float* dq, float* dk, float* dv) {
  const long b = task / d.K, kv = task % d.K;
  float* kt = scratch(2 * d.H * d.S + 2 * d.T * d.S + d.T + d.S * d.H + d.T * d.H);
  float* vt = kt + d.H * d.S;
  float* p = vt + d.H * d.S;  // dropped-out probabilities, then
  float* ds = p + d.T * d.S;  // dO v^T, then dS (scaled)
  float* delta = ds + d.T * d.S;  // [T]: rowsum(out * dout) of the head
  float* kbuf = delta + d.T;  // biased copies (with_bias)
  float* qbuf = kbuf + d.S * d.H;
  const float scale = 1.0f / std::sqrt(static_cast<float>(d.H));
  const float keep_scale = d.rate > 0.0f ? 1.0f / (1.0f - d.rate) : 1.0f;
  const long ld = d.N * d.H, ldk = d.ldk, ldq = d.ldq;
  const long koff = b * d.S * ldk + kv * d.H;
  transpose_keys(k + koff, ldk, d, d.kbias(kv), kt);
  transpose_keys(v + koff, ldk, d, d.vbias(kv), vt);
  const auto [k_b, ldkb] = with_bias(k + koff, ldk, d.S, d.H, d.kbias(kv), kbuf);
  float* dk_b = dk + koff;
  float* dv_b = dv + koff;
  for (long n = kv * d.G(); n < (kv + 1) * d.G(); ++n) {
    const long off = (b * d.T * d.N + n) * d.H, qoff = b * d.T * ldq + n * d.H;
    const bool acc = n > kv * d.G();  // dk, dv sum over the group's query heads
    const auto [q_n, ldqn] = with_bias(q + qoff, ldq, d.T, d.H, d.qbias(n), qbuf);
    scores(q_n, ldqn, kt, d, p);
    gemm(d.T, dout + off, ld, 1, vt, d.S, ds, d.S, false,
         [&](int) { return std::pair<int, int>(0, d.H); }, [&](int i0) { return d.ncols(i0); });
    for (long i = 0; i < d.T; ++i) {  // apart from the loop below: its loads overlap
      const float *o_i = out + off + i * ld, *do_i = dout + off + i * ld;
      v16 dl{};
      for (long h = 0; h < d.H; h += 16) dl += load(o_i + h) * load(do_i + h);
      delta[i] = hsum(dl);
    }
    for (long i = 0; i < d.T; ++i) {
      RowMask rm(d, qseg + b * d.T, kseg + b * d.S, b, n, i);
      const float l = lse[(b * d.N + n) * d.T + i];
      float* prow = p + i * d.S;
      float* drow = ds + i * d.S;
      const long end = d.ncols(i / kRows * kRows);
      for (long j = 0; j < end; j += 16) {
        const i16 ok = rm.allowed(j), kept = rm.keep(j);
        v16 pr = ok ? vexp(load(prow + j) * scale - l) : v16{};
        v16 dp = kept ? load(drow + j) * keep_scale : v16{};
        store(prow + j, kept ? pr * keep_scale : v16{});
        store(drow + j, pr * (dp - delta[i]) * scale);
      }
    }
    // dv += P^T dO and dk += dS^T q (P, dS read transposed); dq = dS k.
    auto qrange = [&](int j0) { return std::pair<int, int>(d.qbeg(j0), d.T); };
    auto hcols = [&](int) { return static_cast<int>(d.H); };
    gemm(d.S, p, 1, d.S, dout + off, ld, dv_b, ldk, acc, qrange, hcols);
    gemm(d.S, ds, 1, d.S, q_n, ldqn, dk_b, ldk, acc, qrange, hcols);
    gemm(d.T, ds, d.S, 1, k_b, ldkb, dq + qoff, ldq, false,
         [&](int i0) { return std::pair<int, int>(0, d.kend(i0)); }, hcols);
  }
}

// q [B, T, N, H] and k [B, S, K, H]; a time step of q is ldq floats on, of k and v ldk.
Dims dims(const ffi::Span<const int64_t>& qd, long S, long K, long ldq, long ldk,
          const ffi::Buffer<ffi::U32>& seed, bool causal, float rate) {
  const uint32_t* s = seed.typed_data();
  const auto threshold = static_cast<uint32_t>(
      std::min(std::llround(static_cast<double>(rate) * 4294967296.0), 4294967295LL));
  return Dims{qd[0], qd[1], S, qd[2], K, qd[3], ldq, ldk, causal, rate, s[0], s[1], threshold};
}

ffi::Error check(const Dims& d) {
  if (d.N % d.K || d.H % 16 || d.T % 16 || d.S != d.T)
    return ffi::Error::InvalidArgument("lm attention kernel: needs N % K == 0, H % 16 == 0, "
                                       "T % 16 == 0 and S == T");
  return ffi::Error::Success();
}

ffi::Error RunForward(ffi::ThreadPool& pool, const Dims& d, const float* q, const float* k,
                      const float* v, const int32_t* qseg, const int32_t* kseg, float* out,
                      float* lse) {
  if (auto e = check(d); e.failure()) return e;
  parallel_for(pool, d.B * d.K,
               [&](int task) { forward_task(q, k, v, qseg, kseg, d, task, out, lse); });
  return ffi::Error::Success();
}

ffi::Error RunBackward(ffi::ThreadPool& pool, const Dims& d, const float* q, const float* k,
                       const float* v, const int32_t* qseg, const int32_t* kseg,
                       const float* out, const float* lse, const float* dout, float* dq,
                       float* dk, float* dv) {
  if (auto e = check(d); e.failure()) return e;
  parallel_for(pool, d.B * d.K, [&](int task) {
    backward_task(q, k, v, qseg, kseg, out, lse, dout, d, task, dq, dk, dv);
  });
  return ffi::Error::Success();
}

using F32 = ffi::Buffer<ffi::F32>;
using Seg = ffi::Buffer<ffi::S32>;
using Seed = ffi::Buffer<ffi::U32>;
using Out = ffi::ResultBuffer<ffi::F32>;

ffi::Error Forward(ffi::ThreadPool pool, F32 q, F32 k, F32 v, Seg qseg, Seg kseg, Seed seed,
                   Out out, Out lse, bool causal, float rate) {
  const auto qd = q.dimensions(), kd = k.dimensions();
  const Dims d = dims(qd, kd[1], kd[2], qd[2] * qd[3], kd[2] * kd[3], seed, causal, rate);
  return RunForward(pool, d, q.typed_data(), k.typed_data(), v.typed_data(),
                    qseg.typed_data(), kseg.typed_data(), out->typed_data(), lse->typed_data());
}

ffi::Error Backward(ffi::ThreadPool pool, F32 q, F32 k, F32 v, Seg qseg, Seg kseg, Seed seed,
                    F32 out, F32 lse, F32 dout, Out dq, Out dk, Out dv, bool causal,
                    float rate) {
  const auto qd = q.dimensions(), kd = k.dimensions();
  const Dims d = dims(qd, kd[1], kd[2], qd[2] * qd[3], kd[2] * kd[3], seed, causal, rate);
  return RunBackward(pool, d, q.typed_data(), k.typed_data(), v.typed_data(),
                     qseg.typed_data(), kseg.typed_data(), out.typed_data(), lse.typed_data(),
                     dout.typed_data(), dq->typed_data(), dk->typed_data(), dv->typed_data());
}

// Packed: qkv [B, T, E] with E = (N + 2K) H; N and H from out [B, T, N, H]; bias [E]
// (added to q, k, v) or [0].
ffi::Error packed_dims(const F32& qkv, const F32& bias, ffi::Span<const int64_t> od,
                       const Seed& seed, bool causal, float rate, Dims* d) {
  const long e = qkv.dimensions()[2], nh = od[2] * od[3];
  if ((e - nh) <= 0 || (e - nh) % (2 * od[3]))
    return ffi::Error::InvalidArgument("lm attention kernel: packed qkv width is not "
                                       "(N + 2K) * H for the output's N and H");
  const long nb = static_cast<long>(bias.element_count());
  if (nb != 0 && nb != e)
    return ffi::Error::InvalidArgument("lm attention kernel: bias must be [(N + 2K) H] or [0]");
  *d = dims(od, od[1], (e - nh) / (2 * od[3]), e, e, seed, causal, rate);
  d->bias = nb ? bias.typed_data() : nullptr;
  return ffi::Error::Success();
}

ffi::Error ForwardPacked(ffi::ThreadPool pool, F32 qkv, F32 bias, Seg qseg, Seg kseg,
                         Seed seed, Out out, Out lse, bool causal, float rate) {
  Dims d;
  if (auto e = packed_dims(qkv, bias, out->dimensions(), seed, causal, rate, &d); e.failure())
    return e;
  const float* q = qkv.typed_data();
  return RunForward(pool, d, q, q + d.N * d.H, q + (d.N + d.K) * d.H, qseg.typed_data(),
                    kseg.typed_data(), out->typed_data(), lse->typed_data());
}

ffi::Error BackwardPacked(ffi::ThreadPool pool, F32 qkv, F32 bias, Seg qseg, Seg kseg,
                          Seed seed, F32 out, F32 lse, F32 dout, Out dqkv, bool causal,
                          float rate) {
  Dims d;
  if (auto e = packed_dims(qkv, bias, out.dimensions(), seed, causal, rate, &d); e.failure())
    return e;
  const float* q = qkv.typed_data();
  float* dq = dqkv->typed_data();
  const long kofs = d.N * d.H, vofs = (d.N + d.K) * d.H;
  return RunBackward(pool, d, q, q + kofs, q + vofs, qseg.typed_data(), kseg.typed_data(),
                     out.typed_data(), lse.typed_data(), dout.typed_data(), dq, dq + kofs,
                     dq + vofs);
}

// Both kinds of handler: q, k, v (or qkv and its bias), then query and key segment ids,
// dropout seed.
auto BindSeparate() {
  return ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<F32>().Arg<F32>().Arg<F32>()
      .Arg<Seg>().Arg<Seg>().Arg<Seed>();
}
auto BindPacked() {
  return ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<F32>().Arg<F32>().Arg<Seg>().Arg<Seg>()
      .Arg<Seed>();
}
}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(LmAttentionForward, Forward,
                              BindSeparate()
                                  .Ret<F32>()  // out
                                  .Ret<F32>()  // lse
                                  .Attr<bool>("causal")
                                  .Attr<float>("rate"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(LmAttentionBackward, Backward,
                              BindSeparate()
                                  .Arg<F32>()  // out
                                  .Arg<F32>()  // lse
                                  .Arg<F32>()  // dout
                                  .Ret<F32>()  // dq
                                  .Ret<F32>()  // dk
                                  .Ret<F32>()  // dv
                                  .Attr<bool>("causal")
                                  .Attr<float>("rate"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(LmAttentionForwardPacked, ForwardPacked,
                              BindPacked()
                                  .Ret<F32>()  // out
                                  .Ret<F32>()  // lse
                                  .Attr<bool>("causal")
                                  .Attr<float>("rate"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(LmAttentionBackwardPacked, BackwardPacked,
                              BindPacked()
                                  .Arg<F32>()  // out
                                  .Arg<F32>()  // lse
                                  .Arg<F32>()  // dout
                                  .Ret<F32>()  // dqkv
                                  .Attr<bool>("causal")
                                  .Attr<float>("rate"));

}  // namespace lm
