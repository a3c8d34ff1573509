// Sixteen-lane vectors for the kernels, one definition per instruction set, so that
// qgemv.cpp and decode.cpp hold one algorithm for every build (native.py compiles them
// with AVX-512 flags, with or without AVX512-BF16, with AVX2 + FMA + F16C, and on ARM64 with
// NEON's dot product and float16 extensions).
//
// * vf: 16 float32, vi: 16 int32, vb: 64 bytes (16 rows x 4 bytes of a packed weight block).
//   AVX-512: one register each. AVX2: a pair of 256-bit registers (rows 0-7, rows 8-15).
//   NEON: four 128-bit registers. So the packed layouts of native.py, 16 output rows per
//   block, are the same in all.
// * dpbusd(acc, w, x4): acc + sum over each 32-bit lane of 4 unsigned weight bytes times
//   the 4 signed activation bytes x4 (VPDPBUSD; AVX-VNNI's 256-bit form; on plain AVX2
//   VPMADDUBSW + VPMADDWD, exact for weights below 128 such as int4's nibbles; on NEON
//   SDOT, which takes such weights as signed bytes).
// * dot_int8(acc, w, x4): the same for int8 weights stored +128, whose products would
//   saturate VPMADDUBSW's 16-bit pairs: without VNNI the weights are made signed again and
//   kInt8DotHasOffset is false (the sum is of the true int8 values, no +128 to take out).
#pragma once

#if defined(__x86_64__)
#include <immintrin.h>
#elif defined(__aarch64__)
#include <arm_neon.h>
#endif
#include <torch/extension.h>

#include <cstdint>

#if defined(__AVX512F__)

using vf = __m512;
using vi = __m512i;
using vb = __m512i;

inline vf vzero() { return _mm512_setzero_ps(); }
inline vf vset(float v) { return _mm512_set1_ps(v); }
inline vf vload(const float* p) { return _mm512_loadu_ps(p); }
inline void vstore(float* p, vf v) { _mm512_storeu_ps(p, v); }
inline vf vadd(vf a, vf b) { return _mm512_add_ps(a, b); }
inline vf vsub(vf a, vf b) { return _mm512_sub_ps(a, b); }
inline vf vmul(vf a, vf b) { return _mm512_mul_ps(a, b); }
inline vf vdiv(vf a, vf b) { return _mm512_div_ps(a, b); }
inline vf vmax(vf a, vf b) { return _mm512_max_ps(a, b); }
inline vf vfmadd(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
inline vf vfnmadd(vf a, vf b, vf c) { return _mm512_fnmadd_ps(a, b, c); }
inline float vsum(vf v) { return _mm512_reduce_add_ps(v); }
inline float vmaxval(vf v) { return _mm512_reduce_max_ps(v); }
inline float vfirst(vf v) { return _mm512_cvtss_f32(v); }

// 16 float32 results stored as float32 or rounded to bf16 (the activations' dtype).
inline void store16(float* p, vf v) { _mm512_storeu_ps(p, v); }
#if defined(__AVX512BF16__)
inline void store16(at::BFloat16* p, vf v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), (__m256i)_mm512_cvtneps_pbh(v));
}
#else  // round to nearest even on the high 16 bits, as VCVTNEPS2BF16 does (NaN aside)
inline void store16(at::BFloat16* p, vf v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF))), 16);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(rounded));
}
#endif
inline void store16(at::Half* p, vf v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
}

// 16 floats from a float32 or a float16 KV cache (or any float32 row), or from bf16 weights.
inline vf load16(const float* p) { return _mm512_loadu_ps(p); }
inline vf load16(const at::Half* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
inline vf load_bf16(const uint16_t* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// e^x for 16 floats: 2^n * e^f with n = round(x / ln 2) and a degree-6 Taylor polynomial on
// |f| <= ln(2) / 2 (relative error below 2e-7); _mm512_scalef_ps applies 2^n, saturating to
// 0 or inf outside float's range.
inline vf exp16(vf x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-104.f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT);
  __m512 f = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145752f), x);
  f = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.42860677e-6f), f);
  __m512 p = _mm512_set1_ps(1.f / 720);
  for (float c : {1.f / 120, 1.f / 24, 1.f / 6, 0.5f, 1.f, 1.f}) p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(c));
  return _mm512_scalef_ps(p, n);
}

// out[i] = the sum of a[i]'s 16 lanes, for 16 vectors at once: three rounds of adding halves
// (within 128-bit lanes, then across them), 45 instructions instead of 16 full reductions.
inline vf sum16(const vf* a) {
  __m512 x[8], y[4], z[2];
  for (int i = 0; i < 8; ++i)  // lanes hold [a(2i), a(2i+1), a(2i), a(2i+1)] partial sums
    x[i] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * i], a[2 * i + 1]), _mm512_unpackhi_ps(a[2 * i], a[2 * i + 1]));
  for (int i = 0; i < 4; ++i) {  // 128-bit lane L holds a(4i .. 4i+3)'s sums over lane L
    const __m512d lo = _mm512_unpacklo_pd(_mm512_castps_pd(x[2 * i]), _mm512_castps_pd(x[2 * i + 1]));
    const __m512d hi = _mm512_unpackhi_pd(_mm512_castps_pd(x[2 * i]), _mm512_castps_pd(x[2 * i + 1]));
    y[i] = _mm512_add_ps(_mm512_castpd_ps(lo), _mm512_castpd_ps(hi));
  }
  for (int i = 0; i < 2; ++i)  // then across the four 128-bit lanes, twice
    z[i] = _mm512_add_ps(_mm512_shuffle_f32x4(y[2 * i], y[2 * i + 1], 0x88), _mm512_shuffle_f32x4(y[2 * i], y[2 * i + 1], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(z[0], z[1], 0x88), _mm512_shuffle_f32x4(z[0], z[1], 0xDD));
}

inline vi vizero() { return _mm512_setzero_si512(); }
inline vi viadd(vi a, vi b) { return _mm512_add_epi32(a, b); }
inline vf vcvt(vi v) { return _mm512_cvtepi32_ps(v); }
inline vb vload_bytes(const uint8_t* p) { return _mm512_loadu_si512(p); }
inline vb low_nibbles(vb v) { return _mm512_and_si512(v, _mm512_set1_epi8(0x0F)); }
inline vb high_nibbles(vb v) { return _mm512_and_si512(_mm512_srli_epi16(v, 4), _mm512_set1_epi8(0x0F)); }
inline vi dpbusd(vi acc, vb w, int32_t x4) { return _mm512_dpbusd_epi32(acc, w, _mm512_set1_epi32(x4)); }
constexpr bool kInt8DotHasOffset = true;
inline vb int8_weights(vb w) { return w; }
inline vi dot_int8(vi acc, vb w, int32_t x4) { return dpbusd(acc, w, x4); }

#if defined(__AMX_TILE__)
constexpr bool kAmxBuild = true;  // amx.cpp is part of this build (used where the CPU has AMX)
#else
constexpr bool kAmxBuild = false;  // AVX-512 without BF16: no AMX CPU lacks it, so no amx.cpp
#endif

#elif defined(__aarch64__)  // ARMv8.2-A NEON with the dot product (SDOT) and float16 extensions

// Four 128-bit registers per vector, lanes in order: v[0] holds rows 0-3 of a packed block,
// v[3] rows 12-15, so the packed layouts are those of the x86 builds.
struct vf {
  float32x4_t v[4];
};
struct vi {
  int32x4_t v[4];
};
struct vb {
  uint8x16_t v[4];
};

template <typename F>
inline vf each(F&& f) {
  return {{f(0), f(1), f(2), f(3)}};
}
inline vf vzero() { return each([](int) { return vdupq_n_f32(0.f); }); }
inline vf vset(float x) { return each([x](int) { return vdupq_n_f32(x); }); }
inline vf vload(const float* p) { return each([p](int i) { return vld1q_f32(p + 4 * i); }); }
inline void vstore(float* p, vf a) {
  for (int i = 0; i < 4; ++i) vst1q_f32(p + 4 * i, a.v[i]);
}
inline vf vadd(vf a, vf b) { return each([&](int i) { return vaddq_f32(a.v[i], b.v[i]); }); }
inline vf vsub(vf a, vf b) { return each([&](int i) { return vsubq_f32(a.v[i], b.v[i]); }); }
inline vf vmul(vf a, vf b) { return each([&](int i) { return vmulq_f32(a.v[i], b.v[i]); }); }
inline vf vdiv(vf a, vf b) { return each([&](int i) { return vdivq_f32(a.v[i], b.v[i]); }); }
inline vf vmax(vf a, vf b) { return each([&](int i) { return vmaxq_f32(a.v[i], b.v[i]); }); }
inline vf vfmadd(vf a, vf b, vf c) { return each([&](int i) { return vfmaq_f32(c.v[i], a.v[i], b.v[i]); }); }
inline vf vfnmadd(vf a, vf b, vf c) { return each([&](int i) { return vfmsq_f32(c.v[i], a.v[i], b.v[i]); }); }
inline float32x4_t fold(vf a) { return vaddq_f32(vaddq_f32(a.v[0], a.v[1]), vaddq_f32(a.v[2], a.v[3])); }
inline float vsum(vf a) { return vaddvq_f32(fold(a)); }
inline float vmaxval(vf a) { return vmaxvq_f32(vmaxq_f32(vmaxq_f32(a.v[0], a.v[1]), vmaxq_f32(a.v[2], a.v[3]))); }
inline float vfirst(vf a) { return vgetq_lane_f32(a.v[0], 0); }

// bf16 by round-to-nearest-even of the high 16 bits (as VCVTNEPS2BF16, NaN aside).
inline uint16x4_t to_bf16(float32x4_t x) {
  const uint32x4_t bits = vreinterpretq_u32_f32(x);
  const uint32x4_t odd = vandq_u32(vshrq_n_u32(bits, 16), vdupq_n_u32(1));
  return vshrn_n_u32(vaddq_u32(bits, vaddq_u32(odd, vdupq_n_u32(0x7FFF))), 16);
}
inline void store16(float* p, vf a) { vstore(p, a); }
inline void store16(at::BFloat16* p, vf a) {
  for (int i = 0; i < 4; ++i) vst1_u16(reinterpret_cast<uint16_t*>(p) + 4 * i, to_bf16(a.v[i]));
}
inline void store16(at::Half* p, vf a) {
  for (int i = 0; i < 4; ++i) vst1_f16(reinterpret_cast<float16_t*>(p) + 4 * i, vcvt_f16_f32(a.v[i]));
}

inline vf load16(const float* p) { return vload(p); }
inline vf load16(const at::Half* p) {
  const float16_t* h = reinterpret_cast<const float16_t*>(p);
  return each([h](int i) { return vcvt_f32_f16(vld1_f16(h + 4 * i)); });
}
inline vf load_bf16(const uint16_t* p) {
  return each([p](int i) { return vreinterpretq_f32_u32(vshll_n_u16(vld1_u16(p + 4 * i), 16)); });
}

// e^x as the AVX2 build's exp8: 2^n built in the exponent bits, x clamped to where 2^n is a
// normal float, and inputs below that give 0 (softmax's masked scores).
inline float32x4_t exp4(float32x4_t x) {
  const uint32x4_t kept = vcgeq_f32(x, vdupq_n_f32(-87.3f));
  x = vminq_f32(vmaxq_f32(x, vdupq_n_f32(-87.3f)), vdupq_n_f32(88.3f));
  const float32x4_t n = vrndnq_f32(vmulq_f32(x, vdupq_n_f32(1.44269504f)));
  float32x4_t f = vfmsq_f32(x, n, vdupq_n_f32(0.693145752f));
  f = vfmsq_f32(f, n, vdupq_n_f32(1.42860677e-6f));
  float32x4_t p = vdupq_n_f32(1.f / 720);
  for (float c : {1.f / 120, 1.f / 24, 1.f / 6, 0.5f, 1.f, 1.f}) p = vfmaq_f32(vdupq_n_f32(c), p, f);
  const int32x4_t two_n = vshlq_n_s32(vaddq_s32(vcvtq_s32_f32(n), vdupq_n_s32(127)), 23);
  const float32x4_t scaled = vmulq_f32(p, vreinterpretq_f32_s32(two_n));
  return vreinterpretq_f32_u32(vandq_u32(vreinterpretq_u32_f32(scaled), kept));
}
inline vf exp16(vf x) { return each([&](int i) { return exp4(x.v[i]); }); }

// out[i] = the sum of a[i]'s 16 lanes, for 16 vectors at once: each folded to 4 lanes, then
// pairwise adds (FADDP) of 4 folded vectors give their 4 sums.
inline vf sum16(const vf* a) {
  return each([a](int i) {
    const float32x4_t s0 = fold(a[4 * i]), s1 = fold(a[4 * i + 1]), s2 = fold(a[4 * i + 2]), s3 = fold(a[4 * i + 3]);
    return vpaddq_f32(vpaddq_f32(s0, s1), vpaddq_f32(s2, s3));
  });
}

inline vi vizero() { return {{vdupq_n_s32(0), vdupq_n_s32(0), vdupq_n_s32(0), vdupq_n_s32(0)}}; }
inline vi viadd(vi a, vi b) {
  return {{vaddq_s32(a.v[0], b.v[0]), vaddq_s32(a.v[1], b.v[1]), vaddq_s32(a.v[2], b.v[2]), vaddq_s32(a.v[3], b.v[3])}};
}
inline vf vcvt(vi a) { return each([&](int i) { return vcvtq_f32_s32(a.v[i]); }); }
inline vb vload_bytes(const uint8_t* p) { return {{vld1q_u8(p), vld1q_u8(p + 16), vld1q_u8(p + 32), vld1q_u8(p + 48)}}; }
inline vb low_nibbles(vb w) {
  const uint8x16_t low = vdupq_n_u8(0x0F);
  return {{vandq_u8(w.v[0], low), vandq_u8(w.v[1], low), vandq_u8(w.v[2], low), vandq_u8(w.v[3], low)}};
}
inline vb high_nibbles(vb w) {
  return {{vshrq_n_u8(w.v[0], 4), vshrq_n_u8(w.v[1], 4), vshrq_n_u8(w.v[2], 4), vshrq_n_u8(w.v[3], 4)}};
}
// SDOT takes signed bytes on both sides: int4's nibbles (below 128) as they are, int8's
// weights made signed again (kInt8DotHasOffset false, as on plain AVX2).
inline vi dpbusd(vi acc, vb w, int32_t x4) {
  const int8x16_t x = vreinterpretq_s8_s32(vdupq_n_s32(x4));
  vi out;
  for (int i = 0; i < 4; ++i) out.v[i] = vdotq_s32(acc.v[i], vreinterpretq_s8_u8(w.v[i]), x);
  return out;
}
constexpr bool kInt8DotHasOffset = false;
inline vb int8_weights(vb w) {
  const uint8x16_t bias = vdupq_n_u8(0x80);
  return {{veorq_u8(w.v[0], bias), veorq_u8(w.v[1], bias), veorq_u8(w.v[2], bias), veorq_u8(w.v[3], bias)}};
}
inline vi dot_int8(vi acc, vb w, int32_t x4) { return dpbusd(acc, w, x4); }

constexpr bool kAmxBuild = false;  // AMX is x86's

#else  // AVX2 + FMA + F16C (and AVX-VNNI where the build has it)

struct vf {
  __m256 lo, hi;
};
struct vi {
  __m256i lo, hi;
};
struct vb {
  __m256i lo, hi;
};

inline vf vzero() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
inline vf vset(float v) { return {_mm256_set1_ps(v), _mm256_set1_ps(v)}; }
inline vf vload(const float* p) { return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
inline void vstore(float* p, vf v) {
  _mm256_storeu_ps(p, v.lo);
  _mm256_storeu_ps(p + 8, v.hi);
}
inline vf vadd(vf a, vf b) { return {_mm256_add_ps(a.lo, b.lo), _mm256_add_ps(a.hi, b.hi)}; }
inline vf vsub(vf a, vf b) { return {_mm256_sub_ps(a.lo, b.lo), _mm256_sub_ps(a.hi, b.hi)}; }
inline vf vmul(vf a, vf b) { return {_mm256_mul_ps(a.lo, b.lo), _mm256_mul_ps(a.hi, b.hi)}; }
inline vf vdiv(vf a, vf b) { return {_mm256_div_ps(a.lo, b.lo), _mm256_div_ps(a.hi, b.hi)}; }
inline vf vmax(vf a, vf b) { return {_mm256_max_ps(a.lo, b.lo), _mm256_max_ps(a.hi, b.hi)}; }
inline vf vfmadd(vf a, vf b, vf c) { return {_mm256_fmadd_ps(a.lo, b.lo, c.lo), _mm256_fmadd_ps(a.hi, b.hi, c.hi)}; }
inline vf vfnmadd(vf a, vf b, vf c) { return {_mm256_fnmadd_ps(a.lo, b.lo, c.lo), _mm256_fnmadd_ps(a.hi, b.hi, c.hi)}; }

inline float sum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
inline float vsum(vf v) { return sum8(_mm256_add_ps(v.lo, v.hi)); }
inline float vfirst(vf v) { return _mm256_cvtss_f32(v.lo); }
inline float vmaxval(vf v) {
  const __m256 m = _mm256_max_ps(v.lo, v.hi);
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
}

// bf16 by round-to-nearest-even of the high 16 bits (as VCVTNEPS2BF16, NaN aside).
inline __m128i to_bf16(__m256 v) {
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  const __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF))), 16);
  const __m256i packed = _mm256_packus_epi32(rounded, rounded);  // per 128-bit lane: 4 values twice
  return _mm256_castsi256_si128(_mm256_permute4x64_epi64(packed, 0x08));
}

inline void store16(float* p, vf v) { vstore(p, v); }
inline void store16(at::BFloat16* p, vf v) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), to_bf16(v.lo));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p + 8), to_bf16(v.hi));
}
inline void store16(at::Half* p, vf v) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(v.lo, _MM_FROUND_TO_NEAREST_INT));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p + 8), _mm256_cvtps_ph(v.hi, _MM_FROUND_TO_NEAREST_INT));
}

inline vf load16(const float* p) { return vload(p); }
inline vf load16(const at::Half* p) {
  return {_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))),
          _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 8)))};
}
inline __m256 widen_bf16(const uint16_t* p) {
  const __m256i h = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(h, 16));
}
inline vf load_bf16(const uint16_t* p) { return {widen_bf16(p), widen_bf16(p + 8)}; }

// e^x as the AVX-512 exp16, with 2^n built in the exponent bits: x is clamped to where
// 2^n is a normal float, and inputs below that give 0 (softmax's masked scores).
inline __m256 exp8(__m256 x) {
  const __m256 underflow = _mm256_cmp_ps(x, _mm256_set1_ps(-87.3f), _CMP_GE_OQ);
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 f = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145752f), x);
  f = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.42860677e-6f), f);
  __m256 p = _mm256_set1_ps(1.f / 720);
  for (float c : {1.f / 120, 1.f / 24, 1.f / 6, 0.5f, 1.f, 1.f}) p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(c));
  const __m256i two_n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_and_ps(_mm256_mul_ps(p, _mm256_castsi256_ps(two_n)), underflow);
}
inline vf exp16(vf x) { return {exp8(x.lo), exp8(x.hi)}; }

// The lane sums of 8 vectors of 8 (hadd pairs, then the two 128-bit halves).
inline __m256 sum8x8(const __m256* a) {
  const __m256 lo = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
  const __m256 hi = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(lo, hi, 0x20), _mm256_permute2f128_ps(lo, hi, 0x31));
}
// out[i] = the sum of a[i]'s 16 lanes, for 16 vectors at once.
inline vf sum16(const vf* a) {
  __m256 halves[16];
  for (int i = 0; i < 16; ++i) halves[i] = _mm256_add_ps(a[i].lo, a[i].hi);
  return {sum8x8(halves), sum8x8(halves + 8)};
}

inline vi vizero() { return {_mm256_setzero_si256(), _mm256_setzero_si256()}; }
inline vi viadd(vi a, vi b) { return {_mm256_add_epi32(a.lo, b.lo), _mm256_add_epi32(a.hi, b.hi)}; }
inline vf vcvt(vi v) { return {_mm256_cvtepi32_ps(v.lo), _mm256_cvtepi32_ps(v.hi)}; }
inline vb vload_bytes(const uint8_t* p) {
  return {_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)), _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 32))};
}
inline vb low_nibbles(vb v) {
  const __m256i low = _mm256_set1_epi8(0x0F);
  return {_mm256_and_si256(v.lo, low), _mm256_and_si256(v.hi, low)};
}
inline vb high_nibbles(vb v) {
  const __m256i low = _mm256_set1_epi8(0x0F);
  return {_mm256_and_si256(_mm256_srli_epi16(v.lo, 4), low), _mm256_and_si256(_mm256_srli_epi16(v.hi, 4), low)};
}

#if defined(__AVXVNNI__)
inline vi dpbusd(vi acc, vb w, int32_t x4) {
  const __m256i x = _mm256_set1_epi32(x4);
  return {_mm256_dpbusd_avx_epi32(acc.lo, w.lo, x), _mm256_dpbusd_avx_epi32(acc.hi, w.hi, x)};
}
constexpr bool kInt8DotHasOffset = true;
inline vb int8_weights(vb w) { return w; }
inline vi dot_int8(vi acc, vb w, int32_t x4) { return dpbusd(acc, w, x4); }
#else
// Unsigned bytes below 128 (int4 nibbles): pairs of products stay within int16.
inline __m256i dpbusd8(__m256i acc, __m256i w, __m256i x) {
  return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), _mm256_set1_epi16(1)));
}
inline vi dpbusd(vi acc, vb w, int32_t x4) {
  const __m256i x = _mm256_set1_epi32(x4);
  return {dpbusd8(acc.lo, w.lo, x), dpbusd8(acc.hi, w.hi, x)};
}
constexpr bool kInt8DotHasOffset = false;
// int8 weights stored +128, back to signed: |w| * (x with w's sign) keeps each pair in int16.
inline vb int8_weights(vb w) {
  const __m256i bias = _mm256_set1_epi8(-128);
  return {_mm256_xor_si256(w.lo, bias), _mm256_xor_si256(w.hi, bias)};
}
inline __m256i dot_int8_8(__m256i acc, __m256i w, __m256i x) {
  return dpbusd8(acc, _mm256_abs_epi8(w), _mm256_sign_epi8(x, w));
}
inline vi dot_int8(vi acc, vb w, int32_t x4) {
  const __m256i x = _mm256_set1_epi32(x4);
  return {dot_int8_8(acc.lo, w.lo, x), dot_int8_8(acc.hi, w.hi, x)};
}
#endif

constexpr bool kAmxBuild = false;  // AMX needs AVX-512: amx.cpp is not part of this build

#endif
