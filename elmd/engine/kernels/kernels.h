// What the kernel files call across each other: the matmuls of qgemv.cpp (which the decode
// plan in decode.cpp runs) and their AMX versions for many rows (amx.cpp).
#pragma once

#include <torch/extension.h>

at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale);
at::Tensor int4_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale, const at::Tensor& zero,
                       int64_t group);
at::Tensor bf16_linear(const at::Tensor& x, const at::Tensor& w);

bool amx_available();
void amx_int8_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale, at::Tensor& out);
void amx_int4_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale, const at::Tensor& zero,
                     int64_t group, at::Tensor& out);
