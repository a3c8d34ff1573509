// What the kernel files share: small vector helpers, the matmuls of qgemv.cpp (which the
// native plan in decode.cpp runs) and their AMX versions for many rows (amx.cpp).
#pragma once

#include <immintrin.h>
#include <torch/extension.h>

// 16 float32 results stored as float32 or rounded to bf16 (the activations' dtype).
inline void store16(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
inline void store16(at::BFloat16* p, __m512 v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), (__m256i)_mm512_cvtneps_pbh(v));
}
inline void store16(at::Half* p, __m512 v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
}

// 16 floats from a float32 or a float16 KV cache (or any float32 row).
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const at::Half* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }

// e^x for 16 floats: 2^n * e^f with n = round(x / ln 2) and a degree-6 Taylor polynomial on
// |f| <= ln(2) / 2 (relative error below 2e-7); _mm512_scalef_ps applies 2^n, saturating to
// 0 or inf outside float's range.
inline __m512 exp16(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-104.f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT);
  __m512 f = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145752f), x);
  f = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.42860677e-6f), f);
  __m512 p = _mm512_set1_ps(1.f / 720);
  for (float c : {1.f / 120, 1.f / 24, 1.f / 6, 0.5f, 1.f, 1.f}) p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(c));
  return _mm512_scalef_ps(p, n);
}

// Calls f(In*, Out*) with the activations' element type (float32 or bfloat16; the output has the same).
template <typename F>
void with_types(const at::Tensor& x, const at::Tensor& out, F&& f) {
  if (x.scalar_type() == at::kBFloat16)
    f(x.data_ptr<at::BFloat16>(), out.data_ptr<at::BFloat16>());
  else
    f(x.data_ptr<float>(), out.data_ptr<float>());
}

at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale);
at::Tensor int4_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale, const at::Tensor& zero,
                       int64_t group);
at::Tensor bf16_linear(const at::Tensor& x, const at::Tensor& w);

bool amx_available();
void amx_int8_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale, at::Tensor& out);
at::Tensor amx_prefill_attention(const at::Tensor& qkv, int64_t hq, const at::Tensor& k_row, const at::Tensor& v_row,
                                 int64_t start);
void amx_int4_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale, const at::Tensor& zero,
                     int64_t group, at::Tensor& out);
