// The per-row kernels (row_kernels.h), written once over ATen's Vectorized<T> and compiled once per
// instruction set: the including file defines CPU_CAPABILITY (DEFAULT, AVX2 or AVX512) and the matching
// CPU_CAPABILITY_<ISA> macro, and is compiled with that instruction set's flags (setup.py).
//
// Why each pass is shaped the way it is:
// - A row of a real vocabulary (151936 fp32 logits: 600 KB) does not stay in L1 but does stay in L2.  The
//   statistics pass reads it from memory once for the max, then once more from L2 for the exponentials;
//   an online (rescaling) max would trade that second, cheap read for a rescale per vector.
// - The dz pass reads a row once and writes it once, in place.
// - exp is ATen's exp_u20 for fp32 (a degree-5 polynomial, at most 20 ulp: far inside the 1e-5 the
//   statistics are checked to, and twice the speed of the 1-ulp SLEEF exp, which fp64 uses).
// - Sums use two accumulator vectors per quantity so consecutive adds do not wait on each other.
// - Every loop that streams a row from memory prefetches 4 KB ahead: the hardware prefetcher alone left the
//   in-place bf16 dz loop waiting on its loads (measured on 39M bf16 logits, one thread: 45 ms without,
//   12 ms with 2-16 KB of lookahead).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>

#include "row_kernels.h"

namespace erpo_native {
namespace CPU_CAPABILITY {

using at::vec::Vectorized;

// A hint to fetch the line 4 KB past p (prefetches never fault, past the end of a row or buffer included).
inline void prefetch_ahead(const void* p) { __builtin_prefetch(static_cast<const char*>(p) + 4096, 0, 3); }

// A store of a full bf16 vector that bypasses the caches where the address allows: the bf16 logits are written
// once, read back only by the dz pass, and far larger than any cache, so a plain store would first read each
// line from memory (measured: a third of the slab step's time waiting there).  store_fence() orders them.
inline void store_streaming(c10::BFloat16* p, const Vectorized<c10::BFloat16>& v) {
#if defined(CPU_CAPABILITY_AVX512)
  if ((reinterpret_cast<uintptr_t>(p) & 63) == 0) return _mm512_stream_si512(reinterpret_cast<__m512i*>(p), v);
#elif defined(CPU_CAPABILITY_AVX2)
  if ((reinterpret_cast<uintptr_t>(p) & 31) == 0) return _mm256_stream_si256(reinterpret_cast<__m256i*>(p), v);
#endif
  v.store(p);
}

inline void store_fence() {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  _mm_sfence();
#endif
}

template <typename T>
inline Vectorized<T> fast_exp(const Vectorized<T>& x) {
  if constexpr (std::is_same_v<T, float>) {
    return x.exp_u20();
  } else {
    return x.exp();
  }
}

// x with its lanes past `count` set to -inf (they then add exp(-inf) = 0 to every sum).
template <typename T>
inline Vectorized<T> load_tail(const T* p, int64_t count) {
  return Vectorized<T>::set(Vectorized<T>(-std::numeric_limits<T>::infinity()), Vectorized<T>::loadu(p, count),
                            count);
}

template <typename T>
T row_max(const T* z, int64_t n) {
  using Vec = Vectorized<T>;
  constexpr int64_t W = Vec::size();
  Vec a(-std::numeric_limits<T>::infinity()), b = a;
  int64_t i = 0;
  for (; i + 2 * W <= n; i += 2 * W) {
    prefetch_ahead(z + i);
    a = at::vec::maximum(a, Vec::loadu(z + i));
    b = at::vec::maximum(b, Vec::loadu(z + i + W));
  }
  for (; i + W <= n; i += W) a = at::vec::maximum(a, Vec::loadu(z + i));
  if (i < n) b = at::vec::maximum(b, load_tail(z + i, n - i));
  return at::vec::vec_reduce_all<T>([](Vec x, Vec y) { return at::vec::maximum(x, y); }, at::vec::maximum(a, b));
}

// sum exp(z - m) and sum exp(z - m) * (z - m) over a row.  A -inf logit (a -inf bias) has exp = 0 and
// z - m = -inf, whose product is NaN; clamping z - m at the lowest finite value makes that term 0.
template <typename T>
void row_exp_sums(const T* z, int64_t n, T m, T* sum_e, T* sum_ez) {
  using Vec = Vectorized<T>;
  constexpr int64_t W = Vec::size();
  const Vec vm(m), lowest(std::numeric_limits<T>::lowest());
  Vec s0(T(0)), s1(T(0)), t0(T(0)), t1(T(0));
  int64_t i = 0;
  for (; i + 2 * W <= n; i += 2 * W) {
    const Vec x0 = Vec::loadu(z + i) - vm, x1 = Vec::loadu(z + i + W) - vm;
    const Vec e0 = fast_exp(x0), e1 = fast_exp(x1);
    s0 = s0 + e0;
    s1 = s1 + e1;
    t0 = at::vec::fmadd(e0, at::vec::maximum(x0, lowest), t0);
    t1 = at::vec::fmadd(e1, at::vec::maximum(x1, lowest), t1);
  }
  for (; i < n; i += W) {
    const Vec x = (i + W <= n ? Vec::loadu(z + i) : load_tail(z + i, n - i)) - vm;
    const Vec e = fast_exp(x);
    s0 = s0 + e;
    t0 = at::vec::fmadd(e, at::vec::maximum(x, lowest), t0);
  }
  const auto add = [](Vec x, Vec y) { return x + y; };
  *sum_e = at::vec::vec_reduce_all<T>(add, s0 + s1);
  *sum_ez = at::vec::vec_reduce_all<T>(add, t0 + t1);
}

// lse = m + log s and H = log s - sum(e (z - m)) / s, with e = exp(z - m), s = sum e: the entropy from
// logits centered on their max, without the cancellation of lse - sum(p z) at large |z|.
template <typename T>
void stats_rows(const StatsArgs<T>& a, int64_t begin, int64_t end) {
  for (int64_t r = begin; r < end; ++r) {
    const T* z = a.z + r * a.ld;
    const T m = row_max(z, a.vocab);
    T sum_e, sum_ez;
    row_exp_sums(z, a.vocab, m, &sum_e, &sum_ez);
    const T log_s = std::log(sum_e);
    const T lse = m + log_s;
    const int64_t target = a.targets[r];
    a.lse[r] = lse;
    a.entropy[r] = log_s - sum_ez / sum_e;
    a.logprobs[r] = target == a.ignore_index ? T(0) : z[target] - lse;
  }
}

// The per-row coefficients of dz: dz = -p * (c_lp + c_h * (z - lse + H)) + c_lp * onehot, with
// c_lp = g_lp / temperature (0 for an ignored target) and c_h = g_H / temperature.
template <typename T>
struct RowCoefficients {
  T c_lp, c_h, lse, entropy;
  int64_t column;  // the one-hot column, or -1 when the row has none here
};

template <typename T>
RowCoefficients<T> row_coefficients(const DzArgs<T>& a, int64_t r) {
  const int64_t target = a.targets[r];
  const bool ignored = target == a.ignore_index;
  RowCoefficients<T> c;
  c.c_lp = ignored || a.grad_logprobs == nullptr ? T(0) : a.grad_logprobs[r] * a.inv_temperature;
  c.c_h = a.grad_entropy == nullptr ? T(0) : a.grad_entropy[r] * a.inv_temperature;
  c.lse = a.lse[r];
  c.entropy = a.entropy[r];
  c.column = !ignored && target >= 0 && target < a.vocab ? target : -1;
  return c;
}

// dz of a vector of logits, without the one-hot term.
template <typename T>
inline Vectorized<T> dz_vec(const Vectorized<T>& z, const RowCoefficients<T>& c) {
  using Vec = Vectorized<T>;
  const Vec x = z - Vec(c.lse);            // log p
  const Vec p = fast_exp(x);
  if (c.c_h == T(0)) return p * Vec(-c.c_lp);
  const Vec clamped = at::vec::maximum(x, Vec(std::numeric_limits<T>::lowest()));  // p = 0 at z = -inf: term 0
  return Vec(T(0)) - p * at::vec::fmadd(Vec(c.c_h), clamped + Vec(c.entropy), Vec(c.c_lp));
}

// The same for one logit, with the one-hot term, in full precision: it overwrites the vector result at the
// target column.
template <typename T>
inline T dz_target(T z, const RowCoefficients<T>& c) {
  const T x = z - c.lse;
  const T p = std::exp(x);
  return c.c_lp - p * (c.c_lp + c.c_h * (std::max(x, std::numeric_limits<T>::lowest()) + c.entropy));
}

// dz in T over the logits, in place.
template <typename T>
void dz_rows(const DzArgs<T>& a, int64_t begin, int64_t end) {
  using Vec = Vectorized<T>;
  constexpr int64_t W = Vec::size();
  const int64_t vocab = a.vocab;  // a local: the stores below may alias anything, so a field would be re-read
  for (int64_t r = begin; r < end; ++r) {
    T* z = a.z + r * a.ld;
    const RowCoefficients<T> c = row_coefficients(a, r);
    if (c.c_lp == T(0) && c.c_h == T(0)) {  // no gradient through this row (e.g. an ignored target)
      std::fill(z, z + vocab, T(0));
      continue;
    }
    const T target_dz = c.column >= 0 ? dz_target(z[c.column], c) : T(0);
    int64_t i = 0;
    for (; i + W <= vocab; i += W) {
      prefetch_ahead(z + i);
      dz_vec(Vec::loadu(z + i), c).store(z + i);
    }
    if (i < vocab) dz_vec(Vec::loadu(z + i, vocab - i), c).store(z + i, vocab - i);
    if (c.column >= 0) z[c.column] = target_dz;
  }
}

// bf16 dz over bf16 logits, in place.  The logits were stored by slab_bf16 minus a shift per (row, slab); with
// the coefficients' lse replaced by lse - shift for each slab, dz_vec sees stored - (lse - shift) = z - lse.
// Two fp32 vectors per bf16 vector.
void dz_rows_bf16(const DzArgs<float>& a, c10::BFloat16* logits, int64_t begin, int64_t end) {
  using VecB = Vectorized<c10::BFloat16>;
  constexpr int64_t W = VecB::size();
  const int64_t vocab = a.vocab, slab = a.slab_cols;  // locals (see dz_rows); slab is a multiple of W
  for (int64_t r = begin; r < end; ++r) {
    c10::BFloat16* z = logits + r * a.ld;
    const float* shift = a.slab_shift + r * a.shift_ld;
    RowCoefficients<float> c = row_coefficients(a, r);
    if (c.c_lp == 0.0f && c.c_h == 0.0f) {
      std::fill(z, z + vocab, c10::BFloat16(0.0f));
      continue;
    }
    const float lse = c.lse;
    if (c.column >= 0) c.lse = lse - shift[c.column / slab];
    const float target_dz = c.column >= 0 ? dz_target(static_cast<float>(z[c.column]), c) : 0.0f;
    for (int64_t k = 0, s0 = 0; s0 < vocab; ++k, s0 += slab) {
      c.lse = lse - shift[k];
      const int64_t s1 = std::min(s0 + slab, vocab);
      int64_t i = s0;
      for (; i + W <= s1; i += W) {
        prefetch_ahead(z + i);
        auto [lo, hi] = at::vec::convert_to_float<c10::BFloat16>(VecB::loadu(z + i));
        at::vec::convert_from_float<c10::BFloat16>(dz_vec(lo, c), dz_vec(hi, c)).store(z + i);
      }
      if (i < s1) {
        auto [lo, hi] = at::vec::convert_to_float<c10::BFloat16>(VecB::loadu(z + i, s1 - i));
        at::vec::convert_from_float<c10::BFloat16>(dz_vec(lo, c), dz_vec(hi, c)).store(z + i, s1 - i);
      }
    }
    if (c.column >= 0) z[c.column] = c10::BFloat16(target_dz);
  }
}

// One slab of a block of rows (SlabArgs): in statistics mode, a max scan, then one loop that folds
// exp(z - max) into the row's running sums and stores z - max as bf16 (one read of the tile for both);
// the running sums are rescaled when the max grows (sum_ez shifts with the max:
// sum e'(z - m') = f (sum_ez + (m - m') sum_e), f = exp(m - m')).  In recompute mode, only the store.
void slab_bf16(const SlabArgs& a) {
  using Vec = Vectorized<float>;
  constexpr int64_t W = Vec::size();
  const int64_t cols = a.cols;  // a local (see dz_rows)
  const Vec lowest(std::numeric_limits<float>::lowest());
  for (int64_t i = 0; i < a.rows; ++i) {
    const float* x = a.tile + i * a.ld_tile;
    c10::BFloat16* out = a.out + i * a.ld_out + a.col0;
    float shift = 0.0f;
    if (a.known_lse != nullptr) {
      shift = a.known_lse[i];
    } else {
      const float old_max = a.run_max[i], new_max = std::max(old_max, row_max(x, cols));
      if (a.run_sum_e[i] > 0.0f && new_max > old_max) {
        const float f = std::exp(old_max - new_max);
        a.run_sum_ez[i] = f * (a.run_sum_ez[i] + (old_max - new_max) * a.run_sum_e[i]);
        a.run_sum_e[i] *= f;
      }
      a.run_max[i] = new_max;
      const int64_t column = a.targets[i] - a.col0;
      if (column >= 0 && column < cols) a.target_logit[i] = x[column];
      shift = new_max == -std::numeric_limits<float>::infinity() ? 0.0f : new_max;  // an all -inf slab so far
    }
    a.shift[i * a.shift_ld] = shift;
    const Vec vshift(shift);
    const bool sums = a.known_lse == nullptr;
    Vec s0(0.0f), s1(0.0f), t0(0.0f), t1(0.0f);
    for (int64_t j = 0; j < cols; j += 2 * W) {
      const int64_t n = std::min(2 * W, cols - j), n_lo = std::min(n, W);
      // past the end of the slab, -inf: exp gives 0 there and the clamp keeps 0 * (z - max) at 0
      const Vec lo = (n_lo == W ? Vec::loadu(x + j) : load_tail(x + j, n_lo)) - vshift;
      const Vec hi = (n == 2 * W ? Vec::loadu(x + j + W) : load_tail(x + j + W, n - n_lo)) - vshift;
      if (sums) {
        const Vec e_lo = fast_exp(lo), e_hi = fast_exp(hi);
        s0 = s0 + e_lo;
        s1 = s1 + e_hi;
        t0 = at::vec::fmadd(e_lo, at::vec::maximum(lo, lowest), t0);
        t1 = at::vec::fmadd(e_hi, at::vec::maximum(hi, lowest), t1);
      }
      const auto packed = at::vec::convert_from_float<c10::BFloat16>(lo, hi);
      if (n == 2 * W) {
        store_streaming(out + j, packed);
      } else {
        packed.store(out + j, n);
      }
    }
    if (sums) {
      const auto add = [](Vec p, Vec q) { return p + q; };
      a.run_sum_e[i] += at::vec::vec_reduce_all<float>(add, s0 + s1);
      a.run_sum_ez[i] += at::vec::vec_reduce_all<float>(add, t0 + t1);
    }
  }
  store_fence();
}

RowKernels row_kernels() {
  return RowKernels{C10_STRINGIZE(CPU_CAPABILITY), &stats_rows<float>, &stats_rows<double>, &dz_rows<float>,
                    &dz_rows<double>, &dz_rows_bf16, &slab_bf16};
}

}  // namespace CPU_CAPABILITY
}  // namespace erpo_native
