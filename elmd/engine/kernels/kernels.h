// What the kernel files share: two small helpers, the matmuls of qgemv.cpp (which the
// native plan in decode.cpp runs) and their AMX versions for many rows (amx.cpp).
#pragma once

#include <immintrin.h>
#include <torch/extension.h>

// 16 float32 results stored as float32 or rounded to bf16 (the activations' dtype).
inline void store16(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
inline void store16(at::BFloat16* p, __m512 v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), (__m256i)_mm512_cvtneps_pbh(v));
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
void amx_int4_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale, const at::Tensor& zero,
                     int64_t group, at::Tensor& out);
