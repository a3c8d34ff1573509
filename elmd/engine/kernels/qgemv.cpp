// Weight-streaming matmuls for small batches on CPUs: AVX512-VNNI / AVX512-BF16, AVX2 + FMA +
// F16C, or ARM64 NEON with SDOT (simd.h gives every build its 16-lane vectors).
//
// Batch-1 decode reads every weight once per token, so its speed is the speed at which
// a kernel streams weights. ATen's weight-only kernels reach about half the machine's
// read bandwidth at M=1; these reach most of it by keeping the inner loop to one load
// and one or two dot-product instructions per 64 bytes of weights:
//
// * int8 / int4 weights are multiplied with int8 activations (quantized here, per
//   block of 32, like llama.cpp's q8_0) by VPDPBUSD (on AVX2: AVX-VNNI, or VPMADDUBSW +
//   VPMADDWD; on ARM64 SDOT, see simd.h), 16 output rows per register
//   (one row per 32-bit lane, 4 consecutive k per lane), with the activation bytes
//   broadcast. Weights are unsigned: int8 is stored +128, int4 is q in [0, 15] with
//   w = scale * (q - 8) + zero per group (ATen's int4pack convention); the offsets are
//   taken out with the activations' block sums, so the error stays that of a
//   zero-centred weight.
// * bf16 weights (unpacked, row-major as in the checkpoint) use VDPBF16PS with bf16
//   activations, or are widened to float32 for float32 activations (and on AVX2, where
//   there is no VDPBF16PS, bf16 activations are widened too).
//
// Layouts are produced by elmd/engine/kernels/native.py (pack_int8, pack_int4). From
// kAmxRows rows on (prompts), int8/int4 matmuls go to amx.cpp where the CPU has AMX.

#include "kernels.h"

#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace {

constexpr int kRows = 16;   // output rows per register
constexpr int kBlock = 32;  // activation quantization block
constexpr int kTile = 4;    // activation rows sharing one weight load
// Software prefetch this far ahead of the weight stream, into L2. The hardware prefetchers
// stop at 4 KiB page boundaries and ramp up again after each. Measured on the 270M chain
// of 65 matmuls (2 threads), per token: no prefetch int4 9.1 ms, int8 12.6; 4 KiB into
// L1 6.8 / 11.8; then, interleaved in one session, 4 KiB into L1 5.2-5.5 / 9.8-10.4
// against 8 KiB into L2 4.7-5.0 / 8.4-9.3 (16 and 32 KiB about the same; the
// non-temporal hint ran at half the speed).
constexpr int kPrefetch = 8192;

inline void prefetch_ahead(const uint8_t* p) {
  __builtin_prefetch(p + kPrefetch, 0, 2);  // x86: PREFETCHT1; ARM64: PRFM PLDL2KEEP
}

// Independent VPDPBUSD accumulation chains per activation row: with fewer rows than
// kTile, one chain would wait on the instruction's latency instead of on memory.
template <int T>
constexpr int chains() { return kTile / T; }

template <int C>
inline vi sum_chains(const vi* acc) {
  vi s = acc[0];
  for (int c = 1; c < C; ++c) s = viadd(s, acc[c]);
  return s;
}

struct QuantizedActivations {
  std::vector<int8_t> q;       // [M, K]
  std::vector<float> scale;    // [M, K / 32]
  std::vector<float> fsum;     // [M, K / group]: sum of x over each weight group
  std::vector<float> qsum8;    // [M, K / group]: 8 * sum over the group's blocks of scale * sum(q)
  std::vector<float> offset;   // [M]: sum over blocks of scale * 128 * sum(q)
};

template <typename In>
QuantizedActivations quantize_activations(const In* x, int64_t M, int64_t K, int64_t group) {
  const int64_t nb = K / kBlock;
  QuantizedActivations a;
  a.q.resize(M * K);
  a.scale.resize(M * nb);
  a.fsum.resize(group > 0 ? M * (K / group) : 0);
  a.qsum8.resize(a.fsum.size());
  a.offset.resize(M);
  for (int64_t m = 0; m < M; ++m) {
    double offset = 0;
    for (int64_t b = 0; b < nb; ++b) {
      float xb[kBlock];
      for (int i = 0; i < kBlock; ++i) xb[i] = static_cast<float>(x[m * K + b * kBlock + i]);
      float amax = 0.f;
      for (int i = 0; i < kBlock; ++i) amax = std::max(amax, std::abs(xb[i]));
      const float scale = amax / 127.f;
      const float inv = amax > 0.f ? 127.f / amax : 0.f;
      int8_t* qb = a.q.data() + m * K + b * kBlock;
      int32_t qsum = 0;
      for (int i = 0; i < kBlock; ++i) {
        qb[i] = static_cast<int8_t>(std::nearbyint(xb[i] * inv));
        qsum += qb[i];
      }
      a.scale[m * nb + b] = scale;
      offset += 128.0 * scale * qsum;
      if (group > 0) a.qsum8[m * (K / group) + b * kBlock / group] += 8.f * scale * qsum;
    }
    a.offset[m] = static_cast<float>(offset);
    if (group > 0) {
      for (int64_t g = 0; g < K / group; ++g) {
        float s = 0.f;
        for (int64_t i = 0; i < group; ++i) s += static_cast<float>(x[m * K + g * group + i]);
        a.fsum[m * (K / group) + g] = s;
      }
    }
  }
  return a;
}

inline int32_t load_i32(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// out[m, n] = scale[n] * (sum_b xscale[m, b] * dot_b(w[n] + 128, xq[m]) - offset[m]), or without
// the offset where the build's dot_int8 takes the signed weights (simd.h).
template <int T, typename Out>
void int8_rows(const uint8_t* w, const float* wscale, const QuantizedActivations& a, int64_t m0,
               int64_t K, int64_t N, int64_t rb, Out* out) {
  const int64_t nb = K / kBlock;
  vf accf[T];
  for (int t = 0; t < T; ++t) accf[t] = vzero();
  const uint8_t* wr = w + rb * kRows * K;
  constexpr int C = chains<T>();
  for (int64_t b = 0; b < nb; ++b) {
    vi acci[T][C];
    for (int t = 0; t < T; ++t)
      for (int c = 0; c < C; ++c) acci[t][c] = vizero();
    for (int c = 0; c < kBlock / 4; ++c) {
      prefetch_ahead(wr + (b * (kBlock / 4) + c) * 64);
      const vb v = int8_weights(vload_bytes(wr + (b * (kBlock / 4) + c) * 64));
      for (int t = 0; t < T; ++t) {
        const int32_t xv = load_i32(a.q.data() + (m0 + t) * K + b * kBlock + c * 4);
        acci[t][c % C] = dot_int8(acci[t][c % C], v, xv);
      }
    }
    for (int t = 0; t < T; ++t)
      accf[t] = vfmadd(vcvt(sum_chains<C>(acci[t])), vset(a.scale[(m0 + t) * nb + b]), accf[t]);
  }
  const vf s = vload(wscale + rb * kRows);
  for (int t = 0; t < T; ++t) {
    const vf r = vmul(kInt8DotHasOffset ? vsub(accf[t], vset(a.offset[m0 + t])) : accf[t], s);
    store16(out + (m0 + t) * N + rb * kRows, r);
  }
}

// out[m, n] = sum_g scale[n, g] * sum_{b in g} xscale[m, b] * dot_b(q[n] - 8, xq[m]) + zero[n, g] * xsum[m, g]
template <int T, typename Out>
void int4_rows(const uint8_t* w, const at::Half* wscale, const at::Half* wzero, const QuantizedActivations& a,
               int64_t m0, int64_t K, int64_t N, int64_t group, int64_t rb, Out* out) {
  const int64_t nb = K / kBlock, ng = K / group;
  vf accf[T];
  for (int t = 0; t < T; ++t) accf[t] = vzero();
  const uint8_t* wr = w + rb * kRows * K / 2;
  for (int64_t g = 0; g < ng; ++g) {
    const int64_t gi = (rb * ng + g) * kRows;
    const vf s = load16(wscale + gi);
    const vf zero = load16(wzero + gi);
    vf accg[T];
    for (int t = 0; t < T; ++t) accg[t] = vzero();
    constexpr int C = chains<T>();
    for (int64_t b = g * group / kBlock; b < (g + 1) * group / kBlock; ++b) {
      vi acci[T][C];
      for (int t = 0; t < T; ++t)
        for (int c = 0; c < C; ++c) acci[t][c] = vizero();
      for (int c = 0; c < kBlock / 8; ++c) {
        prefetch_ahead(wr + (b * (kBlock / 8) + c) * 64);
        const vb v = vload_bytes(wr + (b * (kBlock / 8) + c) * 64);
        const vb lo = low_nibbles(v);
        const vb hi = high_nibbles(v);
        for (int t = 0; t < T; ++t) {
          const int8_t* xq = a.q.data() + (m0 + t) * K + b * kBlock + c * 8;
          vi& even = acci[t][(2 * c) % C];
          even = dpbusd(even, lo, load_i32(xq));
          vi& odd = acci[t][(2 * c + 1) % C];
          odd = dpbusd(odd, hi, load_i32(xq + 4));
        }
      }
      for (int t = 0; t < T; ++t)
        accg[t] = vfmadd(vcvt(sum_chains<C>(acci[t])), vset(a.scale[(m0 + t) * nb + b]), accg[t]);
    }
    for (int t = 0; t < T; ++t) {
      const vf centred = vsub(accg[t], vset(a.qsum8[(m0 + t) * ng + g]));
      accf[t] = vfmadd(centred, s, accf[t]);
      accf[t] = vfmadd(zero, vset(a.fsum[(m0 + t) * ng + g]), accf[t]);
    }
  }
  for (int t = 0; t < T; ++t) store16(out + (m0 + t) * N + rb * kRows, accf[t]);
}

template <typename RowsFn>
void over_tiles(int64_t M, RowsFn&& rows) {
  int64_t m = 0;
  for (; m + 4 <= M; m += 4) rows(std::integral_constant<int, 4>{}, m);
  for (; m + 2 <= M; m += 2) rows(std::integral_constant<int, 2>{}, m);
  for (; m < M; ++m) rows(std::integral_constant<int, 1>{}, m);
}

std::pair<at::Tensor, at::Tensor> rows_and_output(const at::Tensor& x, int64_t N) {
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "activations must be float32 or bfloat16");
  const at::Tensor rows = x.reshape({-1, x.size(-1)}).contiguous();
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = N;
  return {rows, at::empty(shape, x.options())};
}

// Rows from which amx.cpp takes an int8/int4 matmul (prompts) where the CPU has AMX.
// Measured on 270M shapes (2 threads): VNNI is faster up to ~16-24 rows, AMX from 24-32.
constexpr int64_t kAmxRows = 32;

inline bool use_amx(int64_t M) {
  if constexpr (kAmxBuild) return M >= kAmxRows && amx_available();
  return false;
}

}  // namespace

// x [..., K] float32 or bfloat16; w uint8 [N * K] packed by pack_int8; scale float32 [N].
at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale) {
  const int64_t K = x.size(-1), N = scale.size(0);
  TORCH_CHECK(K % kBlock == 0 && N % kRows == 0 && w.numel() == N * K, "int8_linear: bad shapes");
  auto [rows, out] = rows_and_output(x, N);
  const int64_t M = rows.size(0);
  const uint8_t* wp = w.data_ptr<uint8_t>();
  const float* sp = scale.data_ptr<float>();
  if constexpr (kAmxBuild) {
    if (use_amx(M)) {
      at::Tensor flat = out.view({M, N});
      amx_int8_linear(rows, w, scale, flat);
      return out;
    }
  }
  with_types(rows, out, [&](auto* xp, auto* op) {
    const QuantizedActivations a = quantize_activations(xp, M, K, 0);
    at::parallel_for(0, N / kRows, 1, [&](int64_t begin, int64_t end) {
      for (int64_t rb = begin; rb < end; ++rb)
        over_tiles(M, [&](auto tile, int64_t m0) { int8_rows<decltype(tile)::value>(wp, sp, a, m0, K, N, rb, op); });
    });
  });
  return out;
}

// x [..., K]; w uint8 [N * K / 2] packed by pack_int4; scale, zero float16 [N / 16, K / group, 16].
at::Tensor int4_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale, const at::Tensor& zero,
                       int64_t group) {
  const int64_t K = x.size(-1), N = scale.size(0) * kRows;
  TORCH_CHECK(group % kBlock == 0 && K % group == 0 && w.numel() * 2 == N * K, "int4_linear: bad shapes");
  auto [rows, out] = rows_and_output(x, N);
  const int64_t M = rows.size(0);
  const uint8_t* wp = w.data_ptr<uint8_t>();
  const at::Half* sp = scale.data_ptr<at::Half>();
  const at::Half* zp = zero.data_ptr<at::Half>();
  if constexpr (kAmxBuild) {
    if (use_amx(M)) {
      at::Tensor flat = out.view({M, N});
      amx_int4_linear(rows, w, scale, zero, group, flat);
      return out;
    }
  }
  with_types(rows, out, [&](auto* xp, auto* op) {
    const QuantizedActivations a = quantize_activations(xp, M, K, group);
    at::parallel_for(0, N / kRows, 1, [&](int64_t begin, int64_t end) {
      for (int64_t rb = begin; rb < end; ++rb)
        over_tiles(M, [&](auto tile, int64_t m0) {
          int4_rows<decltype(tile)::value>(wp, sp, zp, a, m0, K, N, group, rb, op);
        });
    });
  });
  return out;
}

// Float weights (float32, or bf16) for any number of activation rows, with one reduction
// order per output whatever the rows beside it (batch invariance): output (m, n) is always
// the lane-wise FMA chain over k in steps of one vector, then sum16's fixed tree of its
// lanes. A tile of T activation rows x R weight rows shares each weight and activation load,
// so prompts run as a GEMM (compute-bound) and a decode row streams the weights.
// * float32 weights: float32 FMAs.
// * bf16 weights where the CPU has AVX512-BF16: the activations are rounded to bf16 (as
//   llama.cpp and oneDNN do for bf16 weights) and VDPBF16PS takes 32 k per instruction;
//   elsewhere the weights are widened to float32 (a 16-bit shift) and the activations kept.
//   On AMX CPUs prompts of kAmxRows rows or more take oneDNN's AMX matmul instead, ~10x
//   faster and, like the int8/int4 prompts there, not batch-invariant.
// float32 activations against float32 weights, or against bf16 ones widened (Weight uint16_t).
template <typename Weight>
struct Float32Dot {
  using W = Weight;
  using X = float;
  static constexpr int kStep = 16;
  static vf load_w(const Weight* p) {
    if constexpr (std::is_same_v<Weight, float>) return load16(p);
    else return load_bf16(p);
  }
  static vf load_x(const float* p) { return load16(p); }
  static vf dot(vf acc, vf w, vf x) { return vfmadd(w, x, acc); }
};

#if defined(__AVX512BF16__)
struct BF16Dot {
  using W = uint16_t;
  using X = uint16_t;  // the activations rounded to bf16
  static constexpr int kStep = 32;
  static __m512bh load_w(const uint16_t* p) { return (__m512bh)_mm512_loadu_si512(p); }
  static __m512bh load_x(const uint16_t* p) { return (__m512bh)_mm512_loadu_si512(p); }
  static vf dot(vf acc, __m512bh w, __m512bh x) { return _mm512_dpbf16_ps(acc, w, x); }
};
#endif

// Tile shapes: T x R accumulators (at most 16, sum16's width) within the build's registers.
#if defined(__AVX512F__)
constexpr int kFloatRows = 4, kFloatTile = 4;  // 16 zmm accumulators
#else
constexpr int kFloatRows = 2, kFloatTile = 2;  // 8 ymm accumulators (a vf is two)
#endif
constexpr int64_t kFloatChunk = 64;  // activation rows kept in L2 while the weight rows stream by

template <typename D, int T>
void float_tile(const typename D::W* w, const typename D::X* x, int64_t K, int64_t N, int64_t m0, int64_t n0,
                bool stream, float* out) {
  constexpr int R = kFloatRows;
  vf acc[16];
  for (vf& a : acc) a = vzero();
  for (int64_t k = 0; k < K; k += D::kStep) {
    decltype(D::load_x(x)) xv[T];
    for (int t = 0; t < T; ++t) xv[t] = D::load_x(x + (m0 + t) * K + k);
    for (int r = 0; r < R; ++r) {
      if (stream) __builtin_prefetch(w + (n0 + r + 2 * R) * K + k, 0, 3);  // into L1
      const auto wv = D::load_w(w + (n0 + r) * K + k);
      for (int t = 0; t < T; ++t) acc[t * R + r] = D::dot(acc[t * R + r], wv, xv[t]);
    }
  }
  alignas(64) float sums[16];
  vstore(sums, sum16(acc));
  for (int t = 0; t < T; ++t)
    for (int r = 0; r < R; ++r) out[(m0 + t) * N + n0 + r] = sums[t * R + r];
}

template <typename D>
void float_matmul(const typename D::W* w, const typename D::X* x, int64_t M, int64_t K, int64_t N, float* out) {
  const bool stream = M <= kFloatTile;  // weights read once: prefetch them (a tiled prompt keeps them in L1)
  at::parallel_for(0, N / kFloatRows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t c = 0; c < M; c += kFloatChunk) {
      const int64_t stop = std::min(M, c + kFloatChunk);
      for (int64_t rb = begin; rb < end; ++rb) {
        const int64_t n0 = rb * kFloatRows;
        int64_t m = c;
        for (; m + kFloatTile <= stop; m += kFloatTile) float_tile<D, kFloatTile>(w, x, K, N, m, n0, stream, out);
        if constexpr (kFloatTile > 2) {
          for (; m + 2 <= stop; m += 2) float_tile<D, 2>(w, x, K, N, m, n0, stream, out);
        }
        for (; m < stop; ++m) float_tile<D, 1>(w, x, K, N, m, n0, stream, out);
      }
    }
  });
}

// x [..., K] float32 or bfloat16 (computed in float32); w float32 or bfloat16 [N, K] row-major
// (the checkpoint's layout, so a tied head shares the embedding's tensor).
at::Tensor float_linear(const at::Tensor& x, const at::Tensor& w) {
  const int64_t K = x.size(-1), N = w.size(0);
  TORCH_CHECK(w.scalar_type() == at::kFloat || w.scalar_type() == at::kBFloat16, "float_linear: float32 or bf16 weights");
  TORCH_CHECK(K % 32 == 0 && N % kFloatRows == 0 && w.dim() == 2 && w.size(1) == K && w.is_contiguous(),
              "float_linear: bad shapes");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "activations must be float32 or bfloat16");
  if (w.scalar_type() == at::kBFloat16 && use_amx(x.numel() / K))  // prompts on AMX, as int8/int4's (not invariant)
    return at::linear(x.to(at::kBFloat16), w).to(x.scalar_type());
  const at::Tensor rows = x.reshape({-1, K}).to(at::kFloat).contiguous();
  const int64_t M = rows.size(0);
  at::Tensor out = at::empty({M, N}, rows.options());
  float* op = out.data_ptr<float>();
  if (w.scalar_type() == at::kFloat) {
    float_matmul<Float32Dot<float>>(w.data_ptr<float>(), rows.data_ptr<float>(), M, K, N, op);
  } else {
    const uint16_t* wp = reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>());
#if defined(__AVX512BF16__)
    const at::Tensor rounded = rows.to(at::kBFloat16);
    float_matmul<BF16Dot>(wp, reinterpret_cast<const uint16_t*>(rounded.data_ptr<at::BFloat16>()), M, K, N, op);
#else
    float_matmul<Float32Dot<uint16_t>>(wp, rows.data_ptr<float>(), M, K, N, op);
#endif
  }
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = N;
  return out.view(shape).to(x.scalar_type());
}

TORCH_LIBRARY(elmd, m) {
  m.def("int8_linear(Tensor x, Tensor w, Tensor scale) -> Tensor");
  m.def("int4_linear(Tensor x, Tensor w, Tensor scale, Tensor zero, int group) -> Tensor");
  m.def("float_linear(Tensor x, Tensor w) -> Tensor");
}

TORCH_LIBRARY_IMPL(elmd, CPU, m) {
  m.impl("int8_linear", &int8_linear);
  m.impl("int4_linear", &int4_linear);
  m.impl("float_linear", &float_linear);
}
