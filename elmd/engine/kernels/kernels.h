// The native ops the decode plan (decode.cpp) calls directly, defined in qgemv.cpp.
#pragma once

#include <torch/extension.h>

at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale);
at::Tensor int4_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale, const at::Tensor& zero,
                       int64_t group);
at::Tensor bf16_linear(const at::Tensor& x, const at::Tensor& w);
