// What the kernel files share: the vectors of simd.h, the matmuls of qgemv.cpp (which the
// native plan in decode.cpp runs) and their AMX versions for many rows (amx.cpp).
#pragma once

#include "simd.h"

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
at::Tensor float_linear(const at::Tensor& x, const at::Tensor& w);

bool amx_available();
void amx_int8_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale, at::Tensor& out);
at::Tensor amx_prefill_attention(const at::Tensor& qkv, int64_t hq, const at::Tensor& k_row, const at::Tensor& v_row,
                                 int64_t start);
void amx_int4_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale, const at::Tensor& zero,
                     int64_t group, at::Tensor& out);
