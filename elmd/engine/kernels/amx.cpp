// Prompt work on AMX: matmuls of many activation rows against int8 or int4 weights, and
// (at the end of this file) a prompt chunk's attention.
//
// A prompt chunk multiplies hundreds of rows by each weight, so it is bound by arithmetic,
// not by streaming weights. The VNNI kernels of qgemv.cpp reach ~1,200 (int8) and ~800
// (int4) tokens/s on a 270M layer stack at 512 rows. AMX's TDPBF16PS multiplies a 16x32 bf16 tile by a 32x16
// one in 16 cycles, ~16x VNNI's rate, so here each weight is dequantized once per call
// into bf16 tiles (int8 values are exact in bf16; the per-channel scale is applied to
// the sums) and multiplied with the activations rounded to bf16, as bf16 weights are
// (there oneDNN's own AMX matmul is as fast as this, so float_linear takes it). Measured on
// the 270M shapes at 512 rows: ~1,800-1,950 GFLOP/s on 2 cores, and the activations'
// rounding error (relative 2e-3) is below that of the VNNI kernels' int8 activations (5e-3).
//
// Blocking, per thread over its own 32-column blocks of the output, eight blocks at a
// time: the input is cut into slices of at most kSliceMax columns; for each slice, each
// block's weights are dequantized into a panel of B tiles and multiplied by all rows,
// 32x32 outputs (four accumulator tiles) at a time. The eight blocks' partial sums (512
// rows: 512 KiB) stay in L2 between slices and are scaled into the output at the end.
//
// Linux hands out AMX state only on request (arch_prctl ARCH_REQ_XCOMP_PERM); where that
// fails or the CPU lacks AMX, amx_available() is false and the callers keep their kernels.

#include "kernels.h"

#include <ATen/Parallel.h>
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace {

// Input columns per slice: the slice of 512 activation rows (512 KiB) stays in L2 and a
// column block's panel (32 KiB) in L1. Measured at 512 rows (2 threads): 1280 x 5120
// int8 3.9 ms at 512, 4.3 ms with the whole input in one slice.
constexpr int64_t kSliceMax = 512;
constexpr int64_t kGroupBlocks = 8;  // 32-column blocks whose partial sums stay in L2 together (512 rows: 512 KiB)
constexpr int64_t kMChunk = 512;         // activation rows per pass (larger inputs are taken in passes)
constexpr int64_t kTileBytes = 1024;     // one 16 x 64-byte tile
constexpr int kArchReqXcompPerm = 0x1023;
constexpr int kXfeatureXtiledata = 18;

// Tile registers: 0-3 accumulate a 32x32 output block, 4-5 hold 32 activation rows, 6-7
// hold 32 weight columns; every tile is 16 rows of 64 bytes.
struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// GCC 12's _tile_loadconfig declares an 8-byte operand for the 64-byte config, so the
// compiler may drop the stores that fill it (ggml-org/llama.cpp#20824): load it here.
inline void configure_tiles() {
  TileConfig config;
  for (int t = 0; t < 8; ++t) {
    config.colsb[t] = 64;
    config.rows[t] = 16;
  }
  asm volatile("ldtilecfg %0" ::"m"(*reinterpret_cast<const char(*)[64]>(&config)));
}

bool cpu_has_amx_bf16() {
  unsigned a, b, c, d;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
  return (d >> 22 & 1) && (d >> 24 & 1);  // AMX-BF16, AMX-TILE
}

// Weights of one output block in the B-tile layout: for each 32-wide k block and each
// 16-column half, 16 rows of k pairs x 16 columns x 2 bf16 (1 KiB).
struct Panel {
  uint16_t* data;
  int64_t k_blocks;
  uint16_t* tile(int64_t kb, int half) const { return data + (kb * 2 + half) * (kTileBytes / 2); }
};

// 64 floats as [16 columns][4 k] (the VNNI byte order, widened) -> the two B-tile rows
// of k pairs (k0, k1) and (k2, k3).
inline void store_pairs(__m512 f0, __m512 f1, __m512 f2, __m512 f3, uint16_t* even_row, uint16_t* odd_row) {
  const __m512i lo = (__m512i)_mm512_cvtne2ps_pbh(f1, f0);  // columns 0-7: k0 k1 k2 k3 each
  const __m512i hi = (__m512i)_mm512_cvtne2ps_pbh(f3, f2);  // columns 8-15
  const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
  _mm512_storeu_si512(even_row, _mm512_permutex2var_epi32(lo, even, hi));
  _mm512_storeu_si512(odd_row, _mm512_permutex2var_epi32(lo, odd, hi));
}

// Bytes 16*Quarter .. 16*Quarter+15 of a vector as 16 floats.
template <int Quarter, bool Signed>
inline __m512 widen_bytes(__m512i bytes) {
  const __m128i part = _mm512_extracti32x4_epi32(bytes, Quarter);
  return _mm512_cvtepi32_ps(Signed ? _mm512_cvtepi8_epi32(part) : _mm512_cvtepu8_epi32(part));
}

// int8, packed by pack_int8 ([N/16][K/4][16][4], stored +128): the raw values, scale applied later.
void int8_panel(const uint8_t* w, int64_t K, int64_t col0, int halves, int64_t k0, const Panel& p) {
  for (int h = 0; h < halves; ++h) {
    const uint8_t* rows = w + ((col0 / 16 + h) * (K / 4) + k0 / 4) * 64;
    for (int64_t kb = 0; kb < p.k_blocks; ++kb) {
      uint16_t* tile = p.tile(kb, h);
      for (int c = 0; c < 8; ++c) {  // 4 k per 64-byte chunk
        const __m512i v = _mm512_xor_si512(_mm512_loadu_si512(rows + (kb * 8 + c) * 64), _mm512_set1_epi8(-128));
        store_pairs(widen_bytes<0, true>(v), widen_bytes<1, true>(v), widen_bytes<2, true>(v),
                    widen_bytes<3, true>(v), tile + (2 * c) * 32, tile + (2 * c + 1) * 32);
      }
    }
  }
}

// 16 per-column values -> four vectors of [4 columns x 4 copies], matching widen_bytes' quarters.
inline void spread_columns(__m512 v, __m512* out) {
  for (int q = 0; q < 4; ++q) {
    const __m512i idx = _mm512_add_epi32(_mm512_set1_epi32(4 * q),
                                         _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3));
    out[q] = _mm512_permutexvar_ps(idx, v);
  }
}

// int4, packed by pack_int4 ([N/16][K/8][16][4], low nibbles k0-3, high k4-7), with fp16
// scale and zero per group: w = scale * (q - 8) + zero, rounded to bf16.
void int4_panel(const uint8_t* w, const at::Half* scale, const at::Half* zero, int64_t K, int64_t group,
                int64_t col0, int halves, int64_t k0, const Panel& p) {
  const __m512i low = _mm512_set1_epi8(0x0F);
  for (int h = 0; h < halves; ++h) {
    const int64_t rb = col0 / 16 + h;
    const uint8_t* rows = w + (rb * (K / 8) + k0 / 8) * 64;
    for (int64_t kb = 0; kb < p.k_blocks; ++kb) {
      const int64_t g = (k0 + kb * 32) / group;
      const int64_t gi = (rb * (K / group) + g) * 16;
      const __m512 s = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(scale + gi)));
      const __m512 z = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(zero + gi)));
      __m512 sq[4], zq[4];
      spread_columns(s, sq);
      spread_columns(_mm512_fnmadd_ps(_mm512_set1_ps(8.f), s, z), zq);  // zero - 8 * scale
      uint16_t* tile = p.tile(kb, h);
      for (int c = 0; c < 4; ++c) {  // 8 k per 64-byte chunk
        const __m512i v = _mm512_loadu_si512(rows + (kb * 4 + c) * 64);
        const __m512i nibbles[2] = {_mm512_and_si512(v, low), _mm512_and_si512(_mm512_srli_epi16(v, 4), low)};
        for (int half = 0; half < 2; ++half) {
          const __m512i n = nibbles[half];
          const int row = 4 * c + 2 * half;
          store_pairs(_mm512_fmadd_ps(widen_bytes<0, false>(n), sq[0], zq[0]),
                      _mm512_fmadd_ps(widen_bytes<1, false>(n), sq[1], zq[1]),
                      _mm512_fmadd_ps(widen_bytes<2, false>(n), sq[2], zq[2]),
                      _mm512_fmadd_ps(widen_bytes<3, false>(n), sq[3], zq[3]), tile + row * 32, tile + (row + 1) * 32);
        }
      }
    }
  }
}

// c[0 .. 31][0 .. 16*Halves) (+)= a[m0 .. m0+31][k0 .. k0 + 32 * k_blocks) x panel, c with row stride ldc.
template <int Halves>
void multiply_block(const uint16_t* a, int64_t K, int64_t m0, int64_t k0, const Panel& p, float* c, int64_t ldc,
                    bool first) {
  const int64_t cs = ldc * 4;
  if (first) {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
  } else {
    _tile_loadd(0, c, cs);
    _tile_loadd(2, c + 16 * ldc, cs);
    if (Halves == 2) {
      _tile_loadd(1, c + 16, cs);
      _tile_loadd(3, c + 16 * ldc + 16, cs);
    }
  }
  const uint16_t* ar = a + m0 * K + k0;
  for (int64_t kb = 0; kb < p.k_blocks; ++kb) {
    _tile_loadd(4, ar + kb * 32, K * 2);
    _tile_loadd(6, p.tile(kb, 0), 64);
    _tile_dpbf16ps(0, 4, 6);
    _tile_loadd(5, ar + 16 * K + kb * 32, K * 2);
    _tile_dpbf16ps(2, 5, 6);
    if (Halves == 2) {
      _tile_loadd(7, p.tile(kb, 1), 64);
      _tile_dpbf16ps(1, 4, 7);
      _tile_dpbf16ps(3, 5, 7);
    }
  }
  _tile_stored(0, c, cs);
  _tile_stored(2, c + 16 * ldc, cs);
  if (Halves == 2) {
    _tile_stored(1, c + 16, cs);
    _tile_stored(3, c + 16 * ldc + 16, cs);
  }
}

// The activations rounded to bf16, rows padded with zeros to a multiple of 32.
template <typename In>
at::Tensor activations_bf16(const In* x, int64_t M, int64_t K, int64_t padded) {
  at::Tensor a = at::empty({padded, K}, at::kBFloat16);
  uint16_t* ap = reinterpret_cast<uint16_t*>(a.data_ptr<at::BFloat16>());
  at::parallel_for(0, padded, 16, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      uint16_t* row = ap + m * K;
      if (m >= M) {
        std::memset(row, 0, K * 2);
      } else if constexpr (std::is_same_v<In, at::BFloat16>) {
        std::memcpy(row, x + m * K, K * 2);
      } else {
        for (int64_t k = 0; k < K; k += 16) store16(reinterpret_cast<at::BFloat16*>(row + k), _mm512_loadu_ps(x + m * K + k));
      }
    }
  });
  return a;
}

// Input columns per slice: equal multiples of 32, at most kSliceMax.
int64_t k_slice(int64_t K) {
  const int64_t slices = (K + kSliceMax - 1) / kSliceMax;
  return ((K + slices - 1) / slices + 31) / 32 * 32;
}

// out [M, N] = x [M, K] . W^T, W given by `panel(col0, halves, k0, panel)`, times col_scale[n] when given.
template <typename In, typename Out, typename PanelFn>
void amx_matmul(const In* x, int64_t M, int64_t K, int64_t N, const float* col_scale, Out* out, PanelFn&& panel) {
  const int64_t kc = k_slice(K);
  for (int64_t m_begin = 0; m_begin < M; m_begin += kMChunk) {
    const int64_t rows = std::min(kMChunk, M - m_begin), padded = (rows + 31) / 32 * 32;
    const at::Tensor a = activations_bf16(x + m_begin * K, rows, K, padded);
    const uint16_t* ap = reinterpret_cast<const uint16_t*>(a.data_ptr<at::BFloat16>());
    Out* o = out + m_begin * N;
    at::parallel_for(0, (N + 31) / 32, 1, [&](int64_t begin, int64_t end) {
      configure_tiles();
      std::vector<uint16_t> panel_buffer(kc / 32 * 2 * kTileBytes / 2);
      std::vector<float> sums(padded * 32 * kGroupBlocks);
      for (int64_t g0 = begin; g0 < end; g0 += kGroupBlocks) {
        const int64_t g1 = std::min(end, g0 + kGroupBlocks), ld = 32 * kGroupBlocks;
        for (int64_t k0 = 0; k0 < K; k0 += kc) {
          const Panel p{panel_buffer.data(), std::min(kc, K - k0) / 32};
          for (int64_t blk = g0; blk < g1; ++blk) {
            const int64_t col0 = blk * 32;
            const int halves = N - col0 >= 32 ? 2 : 1;  // N is a multiple of 16
            panel(col0, halves, k0, p);
            float* c = sums.data() + (blk - g0) * 32;
            for (int64_t m0 = 0; m0 < padded; m0 += 32) {
              if (halves == 2) multiply_block<2>(ap, K, m0, k0, p, c + m0 * ld, ld, k0 == 0);
              else multiply_block<1>(ap, K, m0, k0, p, c + m0 * ld, ld, k0 == 0);
            }
          }
        }
        const int64_t c0 = g0 * 32, c1 = std::min(N, g1 * 32);
        for (int64_t m = 0; m < rows; ++m)
          for (int64_t n = c0; n < c1; n += 16) {
            __m512 v = _mm512_loadu_ps(sums.data() + m * ld + (n - c0));
            if (col_scale) v = _mm512_mul_ps(v, _mm512_loadu_ps(col_scale + n));
            store16(o + m * N + n, v);
          }
      }
      _tile_release();
    });
  }
}

// Attention of one sequence's prompt chunk (flash style, bf16 tiles, float32 softmax).
//
// Per kv head, the span's keys are packed as B tiles of S = Q K^T (16 keys x 32 dims, dim
// pairs interleaved: a gather per tile row) and its values as B tiles of P V (32 keys x 16
// columns, key pairs interleaved). Each query head's rows, pre-scaled and rounded to bf16,
// are A tiles. For 16 query rows at a time and 64 keys at a time: four S tiles, an online
// softmax per row in float32 (masked to the row's own position), then P as two A tiles
// times the value tiles, added to the rows' outputs 64 columns (four tiles) at a time.
struct AttentionPacks {
  int64_t kv_heads, D, key_blocks;  // key_blocks: of 32 keys, zero-padded past the span to whole 64-key blocks
  at::Tensor keys, values;  // bf16 bits, every tile written by pack_keys_values
  uint16_t* key_tile(int64_t h, int64_t kb16, int64_t ds) const {
    return reinterpret_cast<uint16_t*>(keys.data_ptr<at::BFloat16>()) + ((h * key_blocks * 2 + kb16) * (D / 32) + ds) * 512;
  }
  uint16_t* value_tile(int64_t h, int64_t kb32, int64_t cb) const {
    return reinterpret_cast<uint16_t*>(values.data_ptr<at::BFloat16>()) + ((h * key_blocks + kb32) * (D / 16) + cb) * 512;
  }
};

template <typename T>
AttentionPacks pack_keys_values(const T* k_row, const T* v_row, int64_t kv_heads, int64_t L, int64_t D, int64_t span) {
  AttentionPacks p{kv_heads, D, (span + 63) / 64 * 2, {}, {}};  // whole 64-key blocks
  p.keys = at::empty({kv_heads * p.key_blocks * 32 * D}, at::kBFloat16);
  p.values = at::empty({kv_heads * p.key_blocks * 32 * D}, at::kBFloat16);
  const __m512i key_rows = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                              _mm512_set1_epi32(static_cast<int>(D / 2)));  // dword offsets of 16 keys
  alignas(64) static constexpr uint16_t kPairs[32] = {0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23,
                                                      8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
  const __m512i pairs = _mm512_load_si512(kPairs);  // [a0..a15 b0..b15] -> a0 b0 a1 b1 ..
  at::parallel_for(0, kv_heads * p.key_blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<uint16_t> rows(32 * D);  // the block's keys in bf16, [key][dim], zero past the span
    for (int64_t task = begin; task < end; ++task) {
      const int64_t h = task / p.key_blocks, kb = task % p.key_blocks;
      const int64_t n = std::clamp<int64_t>(span - kb * 32, 0, 32);  // keys of this block inside the span
      const T* kr = k_row + (h * L + kb * 32) * D;
      const T* vr = v_row + (h * L + kb * 32) * D;
      std::fill(rows.begin() + n * D, rows.end(), 0);
      for (int64_t j = 0; j < n * D; j += 16)
        store16(reinterpret_cast<at::BFloat16*>(&rows[j]), load16(kr + j));
      for (int half = 0; half < 2; ++half)
        for (int64_t ds = 0; ds < D / 32; ++ds) {
          uint16_t* tile = p.key_tile(h, kb * 2 + half, ds);
          const uint16_t* base = rows.data() + half * 16 * D + ds * 32;
          for (int r = 0; r < 16; ++r)  // row r: dims (2r, 2r+1) of the 16 keys
            _mm512_storeu_si512(tile + r * 32, _mm512_i32gather_epi32(key_rows, base + 2 * r, 4));
        }
      for (int64_t cb = 0; cb < D / 16; ++cb) {
        uint16_t* tile = p.value_tile(h, kb, cb);
        for (int r = 0; r < 16; ++r) {  // row r: keys (2r, 2r+1) of 16 columns, interleaved; zero past the span
          const __m512 even = 2 * r < n ? load16(vr + 2 * r * D + cb * 16) : _mm512_setzero_ps();
          const __m512 odd = 2 * r + 1 < n ? load16(vr + (2 * r + 1) * D + cb * 16) : _mm512_setzero_ps();
          _mm512_storeu_si512(tile + r * 32, _mm512_permutexvar_epi16(pairs, (__m512i)_mm512_cvtne2ps_pbh(odd, even)));
        }
      }
    }
  });
  return p;
}

// Rows t0 .. t0+15 of one query head (q_bf16: its rows, [row][D], pre-scaled), attending to
// keys 0 .. start + t, 64 keys at a time; out: the head's columns of [T, hq * D].
void attend_rows(const AttentionPacks& p, const uint16_t* q_bf16, int64_t kv_head, int64_t t0, int64_t T,
                 int64_t start, float* out, int64_t out_stride, float* acc) {
  const int64_t D = p.D;
  alignas(64) float scores[16 * 64];
  alignas(64) uint16_t probs[16 * 64];
  float m[16], l[16];
  std::fill(acc, acc + 16 * D, 0.f);  // the rows' unnormalized outputs [16][D], accumulated by the tiles
  std::fill(m, m + 16, -INFINITY);
  std::fill(l, l + 16, 0.f);
  const int64_t last = start + std::min<int64_t>(t0 + 15, T - 1);  // the block's furthest key
  for (int64_t kb = 0; kb <= last / 64; ++kb) {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (int64_t ds = 0; ds < D / 32; ++ds) {
      _tile_loadd(4, q_bf16 + t0 * D + ds * 32, D * 2);
      _tile_loadd(5, p.key_tile(kv_head, kb * 4, ds), 64);
      _tile_dpbf16ps(0, 4, 5);
      _tile_loadd(5, p.key_tile(kv_head, kb * 4 + 1, ds), 64);
      _tile_dpbf16ps(1, 4, 5);
      _tile_loadd(5, p.key_tile(kv_head, kb * 4 + 2, ds), 64);
      _tile_dpbf16ps(2, 4, 5);
      _tile_loadd(5, p.key_tile(kv_head, kb * 4 + 3, ds), 64);
      _tile_dpbf16ps(3, 4, 5);
    }
    _tile_stored(0, scores, 256);  // tile numbers are immediates: no loop
    _tile_stored(1, scores + 16, 256);
    _tile_stored(2, scores + 32, 256);
    _tile_stored(3, scores + 48, 256);
    for (int r = 0; r < 16; ++r) {
      const int64_t visible = std::clamp<int64_t>(start + t0 + r - kb * 64 + 1, 0, 64);
      const uint64_t keep = visible == 64 ? ~0ull : (1ull << visible) - 1;
      __m512 s[4];
      __m512 top4 = _mm512_set1_ps(-INFINITY);
      for (int c = 0; c < 4; ++c) {
        s[c] = _mm512_mask_mov_ps(_mm512_set1_ps(-INFINITY), static_cast<__mmask16>(keep >> (16 * c)),
                                  _mm512_load_ps(scores + r * 64 + 16 * c));
        top4 = _mm512_max_ps(top4, s[c]);
      }
      const float top = std::max(m[r], _mm512_reduce_max_ps(top4));
      if (top == -INFINITY) {  // nothing visible yet (a padding row)
        std::memset(probs + r * 64, 0, 128);
        continue;
      }
      const float rescale = std::exp(m[r] - top);
      __m512 total = _mm512_setzero_ps();
      for (int c = 0; c < 4; ++c) {
        s[c] = exp16(_mm512_sub_ps(s[c], _mm512_set1_ps(top)));
        total = _mm512_add_ps(total, s[c]);
      }
      l[r] = l[r] * rescale + _mm512_reduce_add_ps(total);
      m[r] = top;
      if (rescale != 1.f)
        for (int64_t d = 0; d < D; d += 16)
          _mm512_storeu_ps(&acc[r * D + d], _mm512_mul_ps(_mm512_loadu_ps(&acc[r * D + d]), _mm512_set1_ps(rescale)));
      _mm512_store_si512(probs + r * 64, (__m512i)_mm512_cvtne2ps_pbh(s[1], s[0]));
      _mm512_store_si512(probs + r * 64 + 32, (__m512i)_mm512_cvtne2ps_pbh(s[3], s[2]));
    }
    for (int64_t cg = 0; cg < D / 64; ++cg) {  // acc[:, 64 cg ..] += P V, accumulated in the tiles
      float* a = acc + cg * 64;
      _tile_loadd(0, a, D * 4);
      _tile_loadd(1, a + 16, D * 4);
      _tile_loadd(2, a + 32, D * 4);
      _tile_loadd(3, a + 48, D * 4);
      for (int kk = 0; kk < 2; ++kk) {
        _tile_loadd(4, probs + kk * 32, 128);
        _tile_loadd(5, p.value_tile(kv_head, kb * 2 + kk, cg * 4), 64);
        _tile_dpbf16ps(0, 4, 5);
        _tile_loadd(5, p.value_tile(kv_head, kb * 2 + kk, cg * 4 + 1), 64);
        _tile_dpbf16ps(1, 4, 5);
        _tile_loadd(5, p.value_tile(kv_head, kb * 2 + kk, cg * 4 + 2), 64);
        _tile_dpbf16ps(2, 4, 5);
        _tile_loadd(5, p.value_tile(kv_head, kb * 2 + kk, cg * 4 + 3), 64);
        _tile_dpbf16ps(3, 4, 5);
      }
      _tile_stored(0, a, D * 4);
      _tile_stored(1, a + 16, D * 4);
      _tile_stored(2, a + 32, D * 4);
      _tile_stored(3, a + 48, D * 4);
    }
  }
  for (int r = 0; r < 16 && t0 + r < T; ++r)
    for (int64_t d = 0; d < D; ++d) out[(t0 + r) * out_stride + d] = acc[r * D + d] / l[r];
}

}  // namespace

bool amx_available() {
  static const bool ok = cpu_has_amx_bf16() && syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
  return ok;
}

// The AMX versions of int8_linear and int4_linear for 2-D contiguous x, into `out`.
void amx_int8_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale, at::Tensor& out) {
  const int64_t M = x.size(0), K = x.size(1), N = scale.size(0);
  const uint8_t* wp = w.data_ptr<uint8_t>();
  with_types(x, out, [&](auto* xp, auto* op) {
    amx_matmul(xp, M, K, N, scale.data_ptr<float>(), op,
               [&](int64_t col0, int halves, int64_t k0, const Panel& p) { int8_panel(wp, K, col0, halves, k0, p); });
  });
}

void amx_int4_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale, const at::Tensor& zero,
                     int64_t group, at::Tensor& out) {
  const int64_t M = x.size(0), K = x.size(1), N = out.size(1);
  const uint8_t* wp = w.data_ptr<uint8_t>();
  const at::Half* sp = scale.data_ptr<at::Half>();
  const at::Half* zp = zero.data_ptr<at::Half>();
  with_types(x, out, [&](auto* xp, auto* op) {
    amx_matmul(xp, M, K, N, nullptr, op, [&](int64_t col0, int halves, int64_t k0, const Panel& p) {
      int4_panel(wp, sp, zp, K, group, col0, halves, k0, p);
    });
  });
}

// Attention of a prompt chunk of one sequence on AMX: queries are the first hq heads of qkv
// [T, (hq + 2 kv) D] float32 at positions start .. start + T - 1; keys and values the cache
// row [kv, L, D] (float32 or float16) up to start + T. Returns [T, hq * D] float32.
at::Tensor amx_prefill_attention(const at::Tensor& qkv, int64_t hq, const at::Tensor& k_row, const at::Tensor& v_row,
                                 int64_t start) {
  const int64_t T = qkv.size(0), kv_heads = k_row.size(0), L = k_row.size(1), D = k_row.size(2), span = start + T;
  TORCH_CHECK(qkv.scalar_type() == at::kFloat && qkv.is_contiguous() && k_row.is_contiguous() && v_row.is_contiguous() &&
                  D % 64 == 0 && hq % kv_heads == 0 && span <= L && qkv.size(1) == (hq + 2 * kv_heads) * D,
              "amx_prefill_attention: bad shapes");
  TORCH_CHECK(amx_available(), "amx_prefill_attention: this CPU (or kernel) gives no AMX");
  const AttentionPacks packs =
      k_row.scalar_type() == at::kHalf
          ? pack_keys_values(k_row.data_ptr<at::Half>(), v_row.data_ptr<at::Half>(), kv_heads, L, D, span)
          : pack_keys_values(k_row.data_ptr<float>(), v_row.data_ptr<float>(), kv_heads, L, D, span);
  const int64_t padded = (T + 15) / 16 * 16, group = hq / kv_heads, width = qkv.size(1);
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(D)));
  std::vector<uint16_t> queries(hq * padded * D, 0);  // [head][row][dim], pre-scaled bf16
  const float* qp = qkv.data_ptr<float>();
  at::parallel_for(0, hq * T, 64, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t h = i / T, t = i % T;
      for (int64_t d = 0; d < D; d += 16)
        store16(reinterpret_cast<at::BFloat16*>(&queries[(h * padded + t) * D + d]),
                _mm512_mul_ps(_mm512_loadu_ps(qp + t * width + h * D + d), _mm512_set1_ps(scale)));
    }
  });
  at::Tensor out = at::empty({T, hq * D}, qkv.options());
  float* op = out.data_ptr<float>();
  const int64_t blocks = padded / 16;
  at::parallel_for(0, hq * blocks, 1, [&](int64_t begin, int64_t end) {
    configure_tiles();
    std::vector<float> acc(16 * D);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t h = task / blocks, b = task % blocks;
      attend_rows(packs, queries.data() + h * padded * D, h / group, b * 16, T, start, op + h * D, hq * D, acc.data());
    }
    _tile_release();
  });
  return out;
}
