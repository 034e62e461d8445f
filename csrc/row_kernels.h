// The per-row kernels of one token chunk, as plain-pointer functions.
//
// A chunk's logits block is `rows` rows of `vocab` logits, row r starting at z + r * ld.  Each function
// handles rows [begin, end); erpo_native.cpp splits the rows over threads and picks, at run time, the
// build of these functions for the widest vector instructions the CPU has (row_kernels_impl.h is compiled
// once per instruction set: row_kernels_{default,avx2,avx512}.cpp).  Only raw pointers cross this
// boundary, so the instruction-set-specific files include no tensor code.
#pragma once

#include <cstdint>

#include <c10/util/BFloat16.h>

namespace erpo_native {

// Inputs and outputs of the statistics pass: per row, max, logsumexp, entropy and the target log-prob.
template <typename T>
struct StatsArgs {
  const T* z;              // logits [rows, ld]
  int64_t vocab;
  int64_t ld;
  const int64_t* targets;  // [rows]; checked to lie in [0, vocab) or equal ignore_index by the caller
  int64_t ignore_index;
  T* logprobs;             // [rows] out: z[target] - lse (0 for ignore_index)
  T* entropy;              // [rows] out
  T* lse;                  // [rows] out
};

// Inputs of the dz pass, which overwrites the logits with
//   dz = (g_lp * (onehot(target) - p) - g_H * p * (z - lse + H)) / temperature,   p = exp(z - lse).
// A target that is ignore_index has g_lp = 0; one outside [0, vocab) has no one-hot column but keeps its
// -g_lp * p term (a vocabulary shard that does not hold the token).
template <typename T>
struct DzArgs {
  T* z;                        // logits [rows, ld] in; dz out, in place (see the dz functions)
  int64_t vocab;
  int64_t ld;
  const int64_t* targets;      // [rows]
  int64_t ignore_index;
  const T* lse;                // [rows]
  const T* entropy;            // [rows]
  const T* grad_logprobs;      // [rows] or nullptr (0)
  const T* grad_entropy;       // [rows] or nullptr (0)
  T inv_temperature;
  // bf16 logits only: they are stored minus a shift per (row, vocabulary slab of slab_cols columns), the
  // shift of row r's slab k at slab_shift[r * shift_ld + k] (see SlabArgs)
  const float* slab_shift = nullptr;
  int64_t shift_ld = 0;
  int64_t slab_cols = 0;
};

// One vocabulary slab of a block of rows, fp32 logits fresh from the GEMM, stored in bf16 minus a shift per
// (row, slab), so that bf16's relative rounding lands on z - shift, which is near 0 exactly where p is not
// negligible (storing z itself costs 8-16x the gradient error at logits of std 5; see logits_bf16.cpp):
// - statistics mode (known_lse == nullptr): the shift is the row's running max after this slab, and the slab is
//   folded into the row's running statistics, relative to that max: sum_e = sum exp(z - max),
//   sum_ez = sum exp(z - max) * (z - max);
// - recompute mode (the backward, whose logsumexp is known): the shift is lse, so the stored value is log p.
struct SlabArgs {
  const float* tile;          // [rows, cols] fp32, row stride ld_tile
  int64_t rows, cols, ld_tile;
  int64_t col0;               // the slab's first vocabulary column
  const int64_t* targets;     // [rows]
  c10::BFloat16* out;         // bf16 logits of the block: row i, column v at out[i * ld_out + v]
  int64_t ld_out;
  float* shift;               // out: row i's shift for this slab at shift[i * shift_ld]
  int64_t shift_ld;
  const float* known_lse;     // [rows] in recompute mode, else nullptr
  float* run_max;             // [rows] running state (-inf, 0, 0 before the first slab; statistics mode)
  float* run_sum_e;
  float* run_sum_ez;
  float* target_logit;        // [rows] set when the slab holds the row's target (statistics mode)
};

using StatsF32 = void (*)(const StatsArgs<float>&, int64_t begin, int64_t end);
using StatsF64 = void (*)(const StatsArgs<double>&, int64_t begin, int64_t end);
using DzF32 = void (*)(const DzArgs<float>&, int64_t begin, int64_t end);
using DzF64 = void (*)(const DzArgs<double>&, int64_t begin, int64_t end);
using DzBf16 = void (*)(const DzArgs<float>&, c10::BFloat16* logits, int64_t begin, int64_t end);
using Slab = void (*)(const SlabArgs&);

// One build of the kernels.
struct RowKernels {
  const char* isa;
  StatsF32 stats_f32;
  StatsF64 stats_f64;
  DzF32 dz_f32;            // fp32 dz over fp32 logits, in place
  DzF64 dz_f64;
  DzBf16 dz_bf16;          // bf16 dz over bf16 logits, in place (the DzArgs' z is unused)
  Slab slab_bf16;          // one slab of the fused bf16 logits-and-statistics step
};

// Defined once per instruction set; erpo_native.cpp declares the ones this build has (ERPO_HAVE_AVX2/512).
namespace DEFAULT { RowKernels row_kernels(); }
namespace AVX2 { RowKernels row_kernels(); }
namespace AVX512 { RowKernels row_kernels(); }

}  // namespace erpo_native
