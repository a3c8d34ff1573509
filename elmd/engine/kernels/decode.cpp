// The small operations of one decode step (or prompt chunk), fused: everything between the matmuls.
//
// At batch 1 a 270M token spends as long in ~40 small ATen ops per layer (norms,
// QK-norm, RoPE, KV writes, the attention products, softmax, residual adds, SiLU) as in
// its matmuls: each is a dispatch, an allocation and sometimes an OpenMP region for a
// few hundred floats. Here they are three ops per layer, each one pass over its data:
//
// * decode_attention: per sequence, QK-norm and RoPE of the new token's query and key,
//   the key and value written into the cache at the sequence's position, then one
//   query's attention over that sequence's cached positions (its own length, no mask).
// * add_rms_norm: the residual add in place, then RMSNorm of the sum (the next norm).
// * silu_mul: SwiGLU's SiLU(gate) * up.
//
// NativePlan runs the whole layer stack of one step in a single call from Python, with
// these and the matmul kernels of qgemv.cpp: at batch 1 the Python calls between ~112 ops
// per 270M token had cost ~1.4 ms of 8.3. Its `prefill` runs a prompt chunk of one
// sequence the same way, the row-wise ops split over threads by rows: there the ~40 ATen
// norm, RoPE and SwiGLU ops per layer (a quarter of a 256-token chunk on the 270M) were
// each a pass over the chunk's activations.
//
// Batch-invariant: every op computes a row (a token) alone, in an order that does not
// depend on the other rows, and a prompt chunk's attention is decode_attention with one row
// per position. So a token's logits are bitwise the same in a decode step of any batch, in
// a prompt chunk of any split, and after a prefix-cache hit of any length
// (tests/test_batch_invariance.py). Not on AMX CPUs, whose prompt matmuls and attention
// (amx.cpp) round to bf16 from kAmxRows rows on.
//
// float32 activations only (the CPU's dtype), with a float32 or float16 KV cache;
// elmd/engine/openelm.py keeps the ATen path for everything else and checks this against
// it in tests.

#include "kernels.h"

#include <ATen/Parallel.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <unordered_map>
#include <vector>

namespace {

// dst[0:n] = src[0:n], rounded to the cache's dtype.
template <typename T>
inline void store_row(const float* src, T* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) store16(dst + i, vload(src + i));
  for (; i < n; ++i) dst[i] = static_cast<T>(src[i]);
}

template <typename T>
inline float dot(const float* a, const T* b, int64_t n) {
  vf acc = vzero();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) acc = vfmadd(vload(a + i), load16(b + i), acc);
  float s = vsum(acc);
  for (; i < n; ++i) s += a[i] * static_cast<float>(b[i]);
  return s;
}

inline float exp1(float x) { return vfirst(exp16(vset(x))); }

// y[0:n] += w * v[0:n]
template <typename T>
inline void axpy(float w, const T* v, float* y, int64_t n) {
  const vf wv = vset(w);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) vstore(y + i, vfmadd(wv, load16(v + i), vload(y + i)));
  for (; i < n; ++i) y[i] += w * static_cast<float>(v[i]);
}

// p[0:n] = softmax(p[0:n]) in place.
inline void softmax(float* p, int64_t n) {
  vf top = vset(-INFINITY);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) top = vmax(top, vload(p + i));
  float m = vmaxval(top);
  for (; i < n; ++i) m = std::max(m, p[i]);
  const vf mv = vset(m);
  vf total = vzero();
  for (i = 0; i + 16 <= n; i += 16) {
    const vf e = exp16(vsub(vload(p + i), mv));
    vstore(p + i, e);
    total = vadd(total, e);
  }
  float t = vsum(total);
  for (; i < n; ++i) t += (p[i] = exp1(p[i] - m));
  const vf inv = vset(1.f / t);
  for (i = 0; i + 16 <= n; i += 16) vstore(p + i, vmul(vload(p + i), inv));
  for (; i < n; ++i) p[i] /= t;
}

// One kv head's attention for its `group` query heads (queries [group, D], pre-scaled) over
// n cached keys and values [n, D] (float32 or float16), D = 16 * C; p [group, n] is scratch,
// y [group, D] the output.
// Scores take 16 keys at a time with one sum16; the weighted sum keeps each query's output in
// registers over blocks of 64 values, so a long context reads its keys and values from L1.
template <int C, typename T>
void attend(const float* queries, int64_t group, const T* keys, const T* values, int64_t n, float* p, float* y) {
  constexpr int64_t D = 16 * C;
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    for (int64_t g = 0; g < group; ++g) {
      const float* q = queries + g * D;
      vf acc[16];
      for (int jj = 0; jj < 16; ++jj) {
        const T* k = keys + (j + jj) * D;
        vf a = vmul(vload(q), load16(k));
        for (int c = 1; c < C; ++c) a = vfmadd(vload(q + 16 * c), load16(k + 16 * c), a);
        acc[jj] = a;
      }
      vstore(p + g * n + j, sum16(acc));
    }
  }
  for (; j < n; ++j)
    for (int64_t g = 0; g < group; ++g) p[g * n + j] = dot(queries + g * D, keys + j * D, D);
  for (int64_t g = 0; g < group; ++g) softmax(p + g * n, n);
  std::fill(y, y + group * D, 0.f);
  for (int64_t j0 = 0; j0 < n; j0 += 64) {
    const int64_t j1 = std::min(n, j0 + 64);
    for (int64_t g = 0; g < group; ++g) {
      vf out[C];
      for (int c = 0; c < C; ++c) out[c] = vload(y + g * D + 16 * c);
      for (int64_t jj = j0; jj < j1; ++jj) {
        const vf w = vset(p[g * n + jj]);
        for (int c = 0; c < C; ++c) out[c] = vfmadd(w, load16(values + jj * D + 16 * c), out[c]);
      }
      for (int c = 0; c < C; ++c) vstore(y + g * D + 16 * c, out[c]);
    }
  }
}

// The same for any head width, one key and one query at a time.
template <typename T>
void attend_any(const float* queries, int64_t group, int64_t D, const T* keys, const T* values, int64_t n, float* p,
                float* y) {
  for (int64_t j = 0; j < n; ++j)
    for (int64_t g = 0; g < group; ++g) p[g * n + j] = dot(queries + g * D, keys + j * D, D);
  for (int64_t g = 0; g < group; ++g) softmax(p + g * n, n);
  std::fill(y, y + group * D, 0.f);
  for (int64_t j = 0; j < n; ++j)
    for (int64_t g = 0; g < group; ++g) axpy(p[g * n + j], values + j * D, y + g * D, D);
}

inline float inverse_rms(const float* x, int64_t n, double eps) {
  return static_cast<float>(1.0 / std::sqrt(dot(x, x, n) / n + eps));
}

// out = rms_norm(x) * weight (weight may be null: no norm, out = x).
inline void rms_norm(const float* x, const float* weight, int64_t n, double eps, float* out) {
  if (weight == nullptr) {
    if (out != x) std::copy(x, x + n, out);
    return;
  }
  const float r = inverse_rms(x, n, eps);
  for (int64_t i = 0; i < n; ++i) out[i] = x[i] * r * weight[i];
}

// Rotate-half RoPE with the signed sin table of openelm.rope_tables: out = x*cos + roll(x, D/2)*sin.
inline void rope(float* x, const float* cos, const float* sin, int64_t d, float scale) {
  float rotated[1024];
  const int64_t half = d / 2;
  for (int64_t i = 0; i < d; ++i) rotated[i] = x[i] * cos[i] + x[(i + half) % d] * sin[i];
  for (int64_t i = 0; i < d; ++i) x[i] = rotated[i] * scale;
}

const float* optional_data(const c10::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? t->data_ptr<float>() : nullptr;
}

// Rows per task when a row-wise op covers a prompt chunk (one decode row: no thread region).
constexpr int64_t kRowGrain = 8;

// rms_norm(x) * weight for each row of x [rows, n].
at::Tensor rms_norm_rows(const at::Tensor& x, const at::Tensor& weight, double eps) {
  const int64_t n = x.size(-1), rows = x.numel() / n;
  at::Tensor out = at::empty_like(x);
  const float* xp = x.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, rows, kRowGrain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) rms_norm(xp + r * n, wp, n, eps, op + r * n);
  });
  return out;
}

// qkv [T, (Hq + 2 Hkv) * D], one sequence at positions start .. start + T - 1: QK-norm and
// RoPE of every query and key head, in place.
void norm_rope_rows(at::Tensor& qkv, const float* q_norm, const float* k_norm, double eps, const at::Tensor& cos,
                    const at::Tensor& sin, int64_t start, int64_t q_heads, int64_t kv_heads, int64_t D) {
  const int64_t T = qkv.size(0), width = qkv.size(1);
  TORCH_CHECK(start + T <= cos.size(0) && D <= 1024, "prefill: position out of range, or heads wider than 1024");
  float* p = qkv.data_ptr<float>();
  const float* cp = cos.data_ptr<float>();
  const float* sp = sin.data_ptr<float>();
  at::parallel_for(0, T, kRowGrain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      for (int64_t h = 0; h < q_heads + kv_heads; ++h) {
        float* x = p + t * width + h * D;
        rms_norm(x, h < q_heads ? q_norm : k_norm, D, eps, x);
        rope(x, cp + (start + t) * D, sp + (start + t) * D, D, 1.f);
      }
    }
  });
}

// The two halves of one query row's attention, compiled once and shared by decode steps
// and prompt chunks, so that a row's result is bitwise the same however it is batched
// (no inlining: one instance of the arithmetic, whatever the caller).
//
// Row b: QK-norm and RoPE of its query heads into q [q_heads, D] (pre-scaled by `scale`),
// of its key into the cache at (slot, pos); its value into the cache.
template <typename T>
__attribute__((noinline)) void prepare_row(const float* row, const float* qn, const float* kn, double eps,
                                           const float* c, const float* s, int64_t q_heads, int64_t kv_heads,
                                           int64_t D, float scale, float* q, T* kc, T* vc, int64_t slot, int64_t L,
                                           int64_t pos) {
  for (int64_t h = 0; h < q_heads; ++h) {
    float* qh = q + h * D;
    rms_norm(row + h * D, qn, D, eps, qh);
    rope(qh, c, s, D, scale);
  }
  for (int64_t h = 0; h < kv_heads; ++h) {
    const int64_t at_pos = ((slot * kv_heads + h) * L + pos) * D;
    float key[1024];
    rms_norm(row + (q_heads + h) * D, kn, D, eps, key);
    rope(key, c, s, D, 1.f);
    store_row(key, kc + at_pos, D);
    store_row(row + (q_heads + kv_heads + h) * D, vc + at_pos, D);
  }
}

// One kv head's group of query heads over its first n cached positions.
template <typename T>
__attribute__((noinline)) void attend_row(const float* queries, int64_t group, int64_t D, const T* keys,
                                          const T* values, int64_t n, std::vector<float>& p, float* y) {
  p.resize(group * n);
  switch (D) {
    case 32: attend<2>(queries, group, keys, values, n, p.data(), y); break;
    case 64: attend<4>(queries, group, keys, values, n, p.data(), y); break;
    case 128: attend<8>(queries, group, keys, values, n, p.data(), y); break;
    default: attend_any(queries, group, D, keys, values, n, p.data(), y);
  }
}

}  // namespace

// qkv [B, (Hq + 2 Hkv) * D] (the fused projection of one token per row); k_cache,
// v_cache [slots, Hkv, L, D]; slots, positions int64 [B]; cos, sin [max_len, D].
// Returns the attention output [B, Hq * D] before out_proj.
//
// Each row is a query at its own position, attending to its slot's positions up to its own,
// computed alone whatever the other rows: a decode step (one row per sequence) and a prompt
// chunk (one row per position of one sequence, all written before any attends) give a row the
// same bits. Rows take threads in an order that pairs short spans with long ones.
at::Tensor decode_attention(const at::Tensor& qkv, const c10::optional<at::Tensor>& q_norm,
                            const c10::optional<at::Tensor>& k_norm, double eps, const at::Tensor& cos,
                            const at::Tensor& sin, at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& slots,
                            const at::Tensor& positions, int64_t q_heads) {
  const bool half = k_cache.scalar_type() == at::kHalf;
  TORCH_CHECK(qkv.scalar_type() == at::kFloat && (half || k_cache.scalar_type() == at::kFloat),
              "decode_attention: float32 activations, a float32 or float16 cache");
  TORCH_CHECK(qkv.is_contiguous() && k_cache.is_contiguous() && v_cache.is_contiguous(), "decode_attention: contiguous");
  const int64_t B = qkv.size(0), kv_heads = k_cache.size(1), L = k_cache.size(2), D = k_cache.size(3);
  TORCH_CHECK(qkv.size(1) == (q_heads + 2 * kv_heads) * D && q_heads % kv_heads == 0 && D <= 1024,
              "decode_attention: bad shapes");
  const int64_t group = q_heads / kv_heads;
  const int64_t* slot = slots.data_ptr<int64_t>();
  const int64_t* pos = positions.data_ptr<int64_t>();
  TORCH_CHECK(v_cache.sizes() == k_cache.sizes() && v_cache.scalar_type() == k_cache.scalar_type(), "decode_attention: v_cache");
  TORCH_CHECK(slots.numel() == B && positions.numel() == B && slots.scalar_type() == at::kLong &&
                  positions.scalar_type() == at::kLong && slots.is_contiguous() && positions.is_contiguous(),
              "decode_attention: one int64 slot and position per sequence");
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(pos[b] >= 0 && pos[b] < L && pos[b] < cos.size(0), "decode_attention: position out of range");
    TORCH_CHECK(slot[b] >= 0 && slot[b] < k_cache.size(0), "decode_attention: slot out of range");
  }
  const float* qn = optional_data(q_norm);
  const float* kn = optional_data(k_norm);
  const float* cp = cos.data_ptr<float>();
  const float* sp = sin.data_ptr<float>();
  at::Tensor q = at::empty({B, q_heads, D}, qkv.options());
  at::Tensor out = at::empty({B, q_heads * D}, qkv.options());
  const float* in = qkv.data_ptr<float>();
  float* qp = q.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(D)));

  // Generic over the cache's element type (float or at::Half).
  auto run = [&](auto* kc, auto* vc) {
    // Every row's key and value into the cache, its normed query heads into q (pre-scaled).
    at::parallel_for(0, B, kRowGrain, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b)
        prepare_row(in + b * qkv.size(1), qn, kn, eps, cp + pos[b] * D, sp + pos[b] * D, q_heads, kv_heads, D, scale,
                    qp + b * q_heads * D, kc, vc, slot[b], L, pos[b]);
    });

    // One (row, kv head) per task: its group of query heads reads each cached key and value
    // once. Threads only when the spans make it worth an OpenMP region. Tasks go by rows
    // 0, B-1, 1, B-2, ...: a prompt chunk's rows grow in span, and each thread's contiguous
    // share then gets as many long rows as short ones.
    int64_t work = 0;
    for (int64_t b = 0; b < B; ++b) work += (pos[b] + 1) * D * q_heads;
    const int64_t grain = work > (1 << 17) ? 1 : B * kv_heads;
    at::parallel_for(0, B * kv_heads, grain, [&](int64_t begin, int64_t end) {
      std::vector<float> p;
      for (int64_t task = begin; task < end; ++task) {
        const int64_t r = task / kv_heads, h = task % kv_heads;
        const int64_t b = r % 2 == 0 ? r / 2 : B - 1 - r / 2;
        attend_row(qp + (b * q_heads + h * group) * D, group, D, kc + (slot[b] * kv_heads + h) * L * D,
                   vc + (slot[b] * kv_heads + h) * L * D, pos[b] + 1, p, op + (b * q_heads + h * group) * D);
      }
    });
  };
  if (half)
    run(k_cache.data_ptr<at::Half>(), v_cache.data_ptr<at::Half>());
  else
    run(k_cache.data_ptr<float>(), v_cache.data_ptr<float>());
  return out;
}

// x += delta (in place, the residual stream); returns rms_norm(x) * weight.
at::Tensor add_rms_norm(at::Tensor& x, const at::Tensor& delta, const at::Tensor& weight, double eps) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && delta.scalar_type() == at::kFloat && x.is_contiguous() &&
                  delta.is_contiguous() && x.sizes() == delta.sizes(),
              "add_rms_norm: contiguous float32 tensors of one shape");
  const int64_t n = x.size(-1), rows = x.numel() / n;
  at::Tensor out = at::empty_like(x);
  float* xp = x.data_ptr<float>();
  const float* dp = delta.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, rows, kRowGrain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      float* xr = xp + r * n;
      for (int64_t i = 0; i < n; ++i) xr[i] += dp[r * n + i];
      rms_norm(xr, wp, n, eps, op + r * n);
    }
  });
  return out;
}

// h [..., 2W] = [gate, up] -> silu(gate) * up [..., W].
at::Tensor silu_mul(const at::Tensor& h) {
  TORCH_CHECK(h.scalar_type() == at::kFloat && h.is_contiguous() && h.size(-1) % 2 == 0, "silu_mul: bad input");
  const int64_t w = h.size(-1) / 2, rows = h.numel() / h.size(-1);
  std::vector<int64_t> shape(h.sizes().begin(), h.sizes().end());
  shape.back() = w;
  at::Tensor out = at::empty(shape, h.options());
  const float* hp = h.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, rows, kRowGrain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* gate = hp + r * 2 * w;
      const float* up = gate + w;
      float* o = op + r * w;
      int64_t i = 0;
      for (; i + 16 <= w; i += 16) {
        const vf g = vload(gate + i);
        const vf sig = vdiv(g, vadd(vset(1.f), exp16(vsub(vzero(), g))));
        vstore(o + i, vmul(sig, vload(up + i)));
      }
      for (; i < w; ++i) o[i] = gate[i] / (1.f + exp1(-gate[i])) * up[i];
    }
  });
  return out;
}

// A linear layer as the plan runs it: float32 / bf16 / int8 / int4 weights through the native
// kernels, with the tensors elmd/engine/quantize.py stores.
struct PlanLinear {
  enum Kind : int64_t { kFloat = 0, kBF16 = 1, kInt8 = 2, kInt4 = 3 };
  int64_t kind;
  at::Tensor w, scale, zero;
  int64_t group;

  at::Tensor operator()(const at::Tensor& x) const {
    switch (kind) {
      case kFloat:
      case kBF16: return float_linear(x, w);
      case kInt8: return int8_linear(x, w, scale);
      default: return int4_linear(x, w, scale, zero, group);
    }
  }
};

// The layer stack of OpenELM for one token per sequence (step) or one sequence's prompt
// chunk (prefill). Built once per loaded model;
// the KV caches come with each call because the scheduler resizes them.
struct NativePlan : torch::CustomClassHolder {
  std::vector<at::Tensor> norms;      // per layer: attn, q, k (empty: none), ffn; then the final norm
  std::vector<PlanLinear> linears;    // per layer: qkv_proj, out_proj, proj_1, proj_2
  std::vector<int64_t> q_heads;
  double eps;
  bool glu;
  at::Tensor cos, sin;

  // tensors: three per linear (weight, scale, zero; empty where the kind has none).
  NativePlan(std::vector<at::Tensor> norms, std::vector<at::Tensor> tensors, std::vector<int64_t> kinds,
             std::vector<int64_t> groups, std::vector<int64_t> q_heads, double eps, bool glu, at::Tensor cos,
             at::Tensor sin)
      : norms(std::move(norms)), q_heads(std::move(q_heads)), eps(eps), glu(glu), cos(std::move(cos)),
        sin(std::move(sin)) {
    const size_t layers = this->q_heads.size();
    TORCH_CHECK(this->norms.size() == 4 * layers + 1 && kinds.size() == 4 * layers && groups.size() == kinds.size() &&
                    tensors.size() == 3 * kinds.size(),
                "NativePlan: inconsistent layer lists");
    for (size_t i = 0; i < kinds.size(); ++i) {
      TORCH_CHECK(kinds[i] >= PlanLinear::kFloat && kinds[i] <= PlanLinear::kInt4, "NativePlan: unknown linear kind");
      linears.push_back({kinds[i], tensors[3 * i], tensors[3 * i + 1], tensors[3 * i + 2], groups[i]});
    }
  }

  // LoRA/DoRA adapters by index (elmd/engine/lora.py, AdapterSet): per linear, A [r, in], B
  // transposed [r, out] (the scale folded in) and DoRA's per-output factor; empty tensors where
  // the adapter leaves a linear alone. Over int8/int4 layers A and B are kept in float16: a decode
  // step streams them beside the base's weights, and in float32 a rank-16 adapter on every layer
  // of SmolLM2-135M is 16 MB a token against the int4 base's 70 MB (batch 1 at 0.77x, 0.87x in
  // float16); their rounding (2^-11 relative) is far below the base's quantization error.
  // Over float32 and bf16 layers they stay float32, exact to the reference.
  struct Adapter {
    std::vector<at::Tensor> a, bt, factor;
  };
  std::unordered_map<int64_t, Adapter> adapters;
  using RowAdapters = std::vector<const Adapter*>;  // per row of a call (nullptr: the base); empty: none at all

  void add_adapter(int64_t index, std::vector<at::Tensor> a, std::vector<at::Tensor> bt, std::vector<at::Tensor> factor) {
    TORCH_CHECK(index > 0 && a.size() == linears.size() && bt.size() == a.size() && factor.size() == a.size(),
                "NativePlan: an adapter has A, B and factor per linear, and an index above 0");
    for (size_t l = 0; l < a.size(); ++l) {
      if (a[l].numel() == 0) continue;
      TORCH_CHECK(a[l].scalar_type() == at::kFloat && bt[l].scalar_type() == at::kFloat && a[l].dim() == 2 &&
                      bt[l].dim() == 2 && a[l].size(0) == bt[l].size(0),
                  "NativePlan: an adapter's A [r, in] and B^T [r, out] are float32 with one rank");
      const auto dtype = linears[l].kind >= PlanLinear::kInt8 ? at::kHalf : at::kFloat;
      a[l] = a[l].to(dtype).contiguous();
      bt[l] = bt[l].to(dtype).contiguous();
    }
    adapters[index] = {std::move(a), std::move(bt), std::move(factor)};
  }

  void remove_adapter(int64_t index) { adapters.erase(index); }

  // Bytes of the plan's A and B^T copies of adapter `index`.
  int64_t adapter_bytes(int64_t index) const {
    int64_t bytes = 0;
    for (const auto& t : adapters.at(index).a) bytes += t.nbytes();
    for (const auto& t : adapters.at(index).bt) bytes += t.nbytes();
    return bytes;
  }

  // ids [B] int64: the adapter of each row (0: the base; empty: none anywhere).
  RowAdapters rows_of(const at::Tensor& ids, int64_t rows) const {
    RowAdapters out;
    if (ids.numel() == 0) return out;
    const at::Tensor flat = ids.to(at::kLong).contiguous();
    TORCH_CHECK(flat.numel() == 1 || flat.numel() == rows, "NativePlan: one adapter id per row");
    const int64_t* v = flat.data_ptr<int64_t>();
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t id = v[flat.numel() == 1 ? 0 : r];
      const auto found = adapters.find(id);
      TORCH_CHECK(id == 0 || found != adapters.end(), "NativePlan: no adapter ", id);
      out.push_back(id == 0 ? nullptr : &found->second);
    }
    return out;
  }

  // Linear l of the plan on x [rows, in], plus each row's adapter delta.
  at::Tensor linear(size_t l, const at::Tensor& x, const RowAdapters& rows) const {
    at::Tensor y = linears[l](x);
    if (!rows.empty()) add_adapters(l, x, y, rows);
    return y;
  }

  // y[i] = (y[i] + B (A x[i])) * factor for each row i whose adapter adapts linear l, in one pass
  // for every adapter of the call (no gathers). A row's arithmetic is fixed whatever the rows beside
  // it: each of A x[i]'s entries is one lane-wise FMA chain over `in` and one vsum, each output sums
  // the rank in order, and threads split whole dots (A) or whole 64-column blocks (B). A pass this
  // small costs less than waking the other threads, so it runs on one thread below kSerialFmas.
  void add_adapters(size_t l, const at::Tensor& x, at::Tensor& y, const RowAdapters& rows) const {
    constexpr int64_t kSerialFmas = 1 << 15;
    const int64_t n_rows = x.size(0), in = x.size(1), out = y.size(1);
    std::vector<int64_t> offset(n_rows, -1);
    int64_t total = 0;
    for (int64_t i = 0; i < n_rows; ++i) {
      if (rows[i] != nullptr && rows[i]->a[l].numel() > 0) {
        offset[i] = total;
        total += rows[i]->a[l].size(0);
      }
    }
    if (total == 0) return;
    TORCH_CHECK(x.is_contiguous() && y.is_contiguous() && x.scalar_type() == at::kFloat, "NativePlan: adapter rows");
    const float* xp = x.data_ptr<float>();
    float* yp = y.data_ptr<float>();
    std::vector<float> t(total);
    // A x: items of four rank entries of one row (a row's rank is whole fours but for its last item).
    std::vector<std::pair<int64_t, int64_t>> items;  // (row, first rank entry)
    for (int64_t i = 0; i < n_rows; ++i) {
      if (offset[i] < 0) continue;
      for (int64_t j = 0; j < rows[i]->a[l].size(0); j += 4) items.emplace_back(i, j);
    }
    const int64_t n_items = static_cast<int64_t>(items.size());
    const int64_t blocks = (out + 63) / 64;
    const int threads = total * (in + out) >= kSerialFmas ? at::get_num_threads() : 1;
    // One parallel region for both halves (waking the threads once), a barrier between them.
#pragma omp parallel num_threads(threads)
    {
      const int64_t nt = omp_get_num_threads(), tid = omp_get_thread_num();
      for (int64_t item = n_items * tid / nt; item < n_items * (tid + 1) / nt; ++item) {
        const auto [i, j] = items[item];
        const at::Tensor& a = rows[i]->a[l];
        const int64_t count = std::min<int64_t>(4, a.size(0) - j);
        float* ti = t.data() + offset[i] + j;
        if (a.scalar_type() == at::kHalf)
          project(a.data_ptr<at::Half>() + j * in, count, xp + i * in, in, ti);
        else
          project(a.data_ptr<float>() + j * in, count, xp + i * in, in, ti);
      }
#pragma omp barrier
      const int64_t from = blocks * tid / nt * 64, to = std::min(out, blocks * (tid + 1) / nt * 64);
      for (int64_t i = 0; i < n_rows && from < to; ++i) {
        if (offset[i] < 0) continue;
        const at::Tensor& factor = rows[i]->factor[l];
        const at::Tensor& bt = rows[i]->bt[l];
        const float* f = factor.numel() > 0 ? factor.data_ptr<float>() : nullptr;
        if (bt.scalar_type() == at::kHalf)
          expand_row(bt.data_ptr<at::Half>(), bt.size(0), f, t.data() + offset[i], yp + i * out, out, from, to);
        else
          expand_row(bt.data_ptr<float>(), bt.size(0), f, t.data() + offset[i], yp + i * out, out, from, to);
      }
    }
  }

  // t[j] = A[j] . x for A's first `count` (at most 4) rows: independent chains, each one lane-wise
  // FMA chain over k and one vsum.
  template <typename W>
  static void project(const W* ap, int64_t count, const float* x, int64_t in, float* t) {
    const int64_t vec_in = in / 16 * 16;
    vf acc[4] = {vzero(), vzero(), vzero(), vzero()};
    for (int64_t k = 0; k < vec_in; k += 16) {
      const vf xk = vload(x + k);
      for (int64_t u = 0; u < count; ++u) acc[u] = vfmadd(load16(ap + u * in + k), xk, acc[u]);
    }
    for (int64_t u = 0; u < count; ++u) t[u] = finish_dot(vsum(acc[u]), ap + u * in, x, vec_in, in);
  }

  template <typename W>
  static float finish_dot(float sum, const W* a, const float* x, int64_t from, int64_t to) {
    for (int64_t k = from; k < to; ++k) sum += static_cast<float>(a[k]) * x[k];
    return sum;
  }

  // y[c] = (y[c] + sum over j in order of B^T[j, c] t[j]) * factor[c] for c in [from, to): four
  // 16-column chains at a time, a scalar tail past the last whole 16.
  template <typename W>
  static void expand_row(const W* bp, int64_t r, const float* factor, const float* t, float* y, int64_t out,
                         int64_t from, int64_t to) {
    int64_t c = from;
    for (; c + 16 <= to; ) {
      const int u_count = static_cast<int>(std::min<int64_t>(4, (to - c) / 16));
      vf d[4] = {vzero(), vzero(), vzero(), vzero()};
      for (int64_t j = 0; j < r; ++j) {
        const vf tj = vset(t[j]);
        for (int u = 0; u < u_count; ++u) d[u] = vfmadd(load16(bp + j * out + c + 16 * u), tj, d[u]);
      }
      for (int u = 0; u < u_count; ++u, c += 16) {
        const vf sum = vadd(vload(y + c), d[u]);
        vstore(y + c, factor != nullptr ? vmul(sum, vload(factor + c)) : sum);
      }
    }
    for (; c < to; ++c) {
      float d = 0.f;
      for (int64_t j = 0; j < r; ++j) d = std::fma(static_cast<float>(bp[j * out + c]), t[j], d);
      y[c] = factor != nullptr ? (y[c] + d) * factor[c] : y[c] + d;
    }
  }

  // x [B, dim] float32: the embedded tokens, used as the residual stream (updated in place);
  // adapter_ids [B] (or empty) the adapter of each row.
  // Returns the final norm of the last layer's output, ready for the head.
  at::Tensor step(at::Tensor x, std::vector<at::Tensor> k_caches, std::vector<at::Tensor> v_caches,
                  at::Tensor slots, at::Tensor positions, at::Tensor adapter_ids) {
    const size_t layers = q_heads.size();
    TORCH_CHECK(k_caches.size() == layers && v_caches.size() == layers, "NativePlan: one KV cache per layer");
    TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 2 && x.is_contiguous(), "NativePlan: x is [B, dim] float32");
    const RowAdapters row_adapters = rows_of(adapter_ids, x.size(0));
    at::Tensor h = rms_norm_rows(x, norms[0], eps);
    for (size_t i = 0; i < layers; ++i) {
      const at::Tensor* n = &norms[4 * i];
      const at::Tensor y = decode_attention(linear(4 * i, h, row_adapters), optional_norm(n[1]), optional_norm(n[2]), eps,
                                            cos, sin, k_caches[i], v_caches[i], slots, positions, q_heads[i]);
      h = finish_layer(i, x, y, row_adapters);
    }
    return h;
  }

  // A prompt chunk of one sequence: x [T, dim] float32, the embedded tokens at positions
  // start .. start + T - 1 (the residual stream, updated in place), their keys and values
  // written to cache row `slot`. Each position attends as a decode step's row would
  // (decode_attention, one row per position), so its logits are bitwise those of any other
  // split of the prompt, or of decoding it token by token: every other op here is per row.
  // (On AMX, layers on bf16/int8/int4 weights take amx.cpp's attention instead, which rounds
  // to bf16 and is not batch-invariant.) `adapter`: the sequence's adapter (0: none).
  // Returns the final norm of every position [T, dim].
  at::Tensor prefill(at::Tensor x, std::vector<at::Tensor> k_caches, std::vector<at::Tensor> v_caches, int64_t slot,
                     int64_t start, int64_t adapter) {
    const size_t layers = q_heads.size();
    TORCH_CHECK(k_caches.size() == layers && v_caches.size() == layers, "NativePlan: one KV cache per layer");
    TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 2 && x.is_contiguous(), "NativePlan: x is [T, dim] float32");
    const int64_t T = x.size(0), span = start + T;
    TORCH_CHECK(start >= 0 && slot >= 0 && slot < k_caches[0].size(0) && span <= k_caches[0].size(2),
                "NativePlan: slot or positions out of the cache");
    const at::Tensor slots = at::full({T}, slot, x.options().dtype(at::kLong));
    const at::Tensor positions = at::arange(start, span, x.options().dtype(at::kLong));
    const RowAdapters row_adapters = rows_of(adapter == 0 ? at::empty({0}, positions.options())
                                                    : at::full({1}, adapter, positions.options()), T);
    at::Tensor h = rms_norm_rows(x, norms[0], eps);
    for (size_t i = 0; i < layers; ++i) {
      const at::Tensor* n = &norms[4 * i];
      const int64_t D = k_caches[i].size(3);
      at::Tensor qkv = linear(4 * i, h, row_adapters);
      if constexpr (kAmxBuild) {
        if (amx_attention(linears[4 * i], D)) {
          const int64_t kv_heads = k_caches[i].size(1), hq = q_heads[i];
          norm_rope_rows(qkv, optional_data(optional_norm(n[1])), optional_data(optional_norm(n[2])), eps, cos, sin,
                         start, hq, kv_heads, D);
          const at::Tensor heads = qkv.view({T, hq + 2 * kv_heads, D}).transpose(0, 1);  // [heads, T, D]
          const at::Tensor keys = k_caches[i].select(0, slot), values = v_caches[i].select(0, slot);
          keys.slice(1, start, span).copy_(heads.slice(0, hq, hq + kv_heads));
          values.slice(1, start, span).copy_(heads.slice(0, hq + kv_heads));
          h = finish_layer(i, x, amx_prefill_attention(qkv, hq, keys, values, start), row_adapters);
          continue;
        }
      }
      h = finish_layer(i, x, decode_attention(qkv, optional_norm(n[1]), optional_norm(n[2]), eps, cos, sin,
                                              k_caches[i], v_caches[i], slots, positions, q_heads[i]), row_adapters);
    }
    return h;
  }

  // Layer i after attention: out_proj of the attention output `y` into the residual stream
  // x (in place), the feed-forward block, and the next layer's (or the final) norm of x.
  at::Tensor finish_layer(size_t i, at::Tensor& x, const at::Tensor& y, const RowAdapters& adapters_of_rows) const {
    const at::Tensor h = add_rms_norm(x, linear(4 * i + 1, y, adapters_of_rows), norms[4 * i + 3], eps);
    const at::Tensor up = linear(4 * i + 2, h, adapters_of_rows);
    return add_rms_norm(x, linear(4 * i + 3, glu ? silu_mul(up) : at::silu(up), adapters_of_rows), norms[4 * (i + 1)], eps);
  }

  // Prompt attention on AMX (amx.cpp) for layers whose matmuls already round activations to
  // bf16 there (bf16, int8, int4 weights); float32 layers keep decode_attention's float32.
  static bool amx_attention(const PlanLinear& qkv_proj, int64_t D) {
    if constexpr (kAmxBuild) return qkv_proj.kind != PlanLinear::kFloat && D % 64 == 0 && amx_available();
    return false;
  }

  static c10::optional<at::Tensor> optional_norm(const at::Tensor& t) {
    return t.numel() > 0 ? c10::optional<at::Tensor>(t) : c10::nullopt;
  }
};

TORCH_LIBRARY_FRAGMENT(elmd, m) {
  m.def("decode_attention(Tensor qkv, Tensor? q_norm, Tensor? k_norm, float eps, Tensor cos, Tensor sin, "
        "Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor slots, Tensor positions, int q_heads) -> Tensor");
  m.def("add_rms_norm(Tensor(a!) x, Tensor delta, Tensor weight, float eps) -> Tensor");
  m.def("silu_mul(Tensor h) -> Tensor");
  m.def("prefill_attention(Tensor qkv, int q_heads, Tensor k_row, Tensor v_row, int start) -> Tensor");
  m.class_<NativePlan>("NativePlan")
      .def(torch::init<std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<int64_t>, std::vector<int64_t>,
                       std::vector<int64_t>, double, bool, at::Tensor, at::Tensor>())
      .def("step", &NativePlan::step)
      .def("prefill", &NativePlan::prefill)
      .def("add_adapter", &NativePlan::add_adapter)
      .def("remove_adapter", &NativePlan::remove_adapter)
      .def("adapter_bytes", &NativePlan::adapter_bytes);
}

TORCH_LIBRARY_IMPL(elmd, CPU, m) {
  m.impl("decode_attention", &decode_attention);
  m.impl("add_rms_norm", &add_rms_norm);
  m.impl("silu_mul", &silu_mul);
#if defined(__AMX_TILE__)
  m.impl("prefill_attention", &amx_prefill_attention);
#endif
}
