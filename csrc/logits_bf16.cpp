// bf16 inputs: the logits GEMM fused with the statistics, and grad_weight's fp32 accumulation, both through
// MKL's bf16 x bf16 -> fp32 GEMM (the products of bf16 numbers are exact in fp32, so fp32 accumulation gives
// the logits an fp32 weight copy would, without making one).
//
// Why the logits are made slab by slab: a chunk's fp32 logits [rows, V] are far larger than any cache, and
// writing them to memory only to read them back for the statistics costs more than the statistics (measured
// at N = 1024, H = 896, V = 151936 on 2 cores: MKL's bf16 GEMM 225 ms with its fp32 output in memory, 165 ms
// into a cache-sized tile).  So each thread takes a block of rows and walks the vocabulary in slabs: one
// single-threaded GEMM fills an fp32 tile [block, slab] that stays in L2, the statistics fold it into each
// row's running max / sums (row_kernels_impl.h, slab_bf16), and the tile is stored as bf16 for the dz pass.
// The statistics are those of the fp32 logits.  Only dz starts from the bf16 copy, which holds z minus a
// shift per (row, slab): the running max, or in the backward the known lse.  Measured at V = 32000 (grad
// relative error against fp64, bf16 GEMMs): 2.5e-3 with the shift, 2.5e-3 from fp32 logits, but 1.9e-2 to
// 3.9e-2 storing z itself at logits of std 5 (bf16 rounds z to ~0.4% of |z|, and p = exp(z - lse) feels it).
#include <ATen/Parallel.h>

#include <climits>
#include <cmath>
#include <limits>
#include <vector>

#include "ops.h"

// Exported by torch's CPU library when torch is built with MKL (the x86 wheels are).  Weak, so the extension
// still loads where it is missing: has_bf16_gemm() then says false and the Python side computes bf16 inputs in
// fp32.  The integer arguments are declared 64-bit: on x86-64 an LP64 MKL reads their low halves, which hold
// the same values (all checked to fit in 32 bits).
extern "C" void cblas_gemm_bf16bf16f32(int layout, int transa, int transb, int64_t m, int64_t n, int64_t k,
                                       float alpha, const void* a, int64_t lda, const void* b, int64_t ldb,
                                       float beta, float* c, int64_t ldc) __attribute__((weak));

namespace erpo_native {
namespace {

constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;  // CBLAS enum values
// Tiles of kBlockRows x kSlabCols (ops.h) fp32: 256 x 512 = 512 KB, which with the block's hidden rows (0.45 MB
// at H = 896) and the weight slab (0.9 MB) fits a 2 MB L2.  Measured, the whole step at N = 1024, H = 896,
// V = 151936, 2 threads (ms; oneDNN's bf16 GEMM alone: 150): 256 x 512: 204-222; 256 x 256: 227-237;
// 512 x 128 .. 512 x 512: 225-258; 128 x any: 288-295.  MKL's own packing of the hidden block, repeated for every
// slab, and the bf16 stores to memory are what the step adds to the GEMM.  Splitting the vocabulary over the
// threads instead of the rows was slower (262 ms at 1024 x 128): the stores then scatter over every row.
constexpr int64_t kBlockRows = 256;

void check_int32(int64_t value, const char* what) {
  TORCH_CHECK(value <= INT_MAX, what, " of ", value, " exceeds MKL's 32-bit sizes");
}

// A GEMM operand as CBLAS wants it: transposed or not, and its leading dimension.
struct Operand {
  at::Tensor tensor;
  int trans;
  int64_t ld;
};

Operand operand(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 2 && t.scalar_type() == at::kBFloat16 && t.device().is_cpu(), name,
              ": expected a 2-D bfloat16 CPU tensor, got ", t.dim(), "-D ", t.scalar_type(), " on ", t.device());
  if (t.stride(1) == 1 && t.stride(0) >= std::max<int64_t>(t.size(1), 1)) return {t, kNoTrans, t.stride(0)};
  if (t.stride(0) == 1 && t.stride(1) >= std::max<int64_t>(t.size(0), 1)) return {t, kTrans, t.stride(1)};
  at::Tensor copy = t.contiguous();  // any other layout (e.g. a size-1 dimension with an odd stride)
  return {copy, kNoTrans, std::max<int64_t>(copy.size(1), 1)};
}

void check_matrix(const at::Tensor& t, const char* name, at::ScalarType dtype) {
  TORCH_CHECK(t.dim() == 2 && t.scalar_type() == dtype && t.device().is_cpu(), name, ": expected a 2-D ", dtype,
              " CPU tensor, got ", t.dim(), "-D ", t.scalar_type(), " on ", t.device());
  TORCH_CHECK(t.size(1) <= 1 || t.stride(1) == 1, name, ": expected unit stride along its rows");
}

}  // namespace

bool has_bf16_gemm() { return cblas_gemm_bf16bf16f32 != nullptr; }

void gemm_bf16_f32(const at::Tensor& a, const at::Tensor& b, at::Tensor& out, double alpha, double beta) {
  TORCH_CHECK(has_bf16_gemm(), "gemm_bf16_f32: this torch has no MKL bf16 GEMM (cblas_gemm_bf16bf16f32)");
  const Operand A = operand(a, "a"), B = operand(b, "b");
  TORCH_CHECK(a.size(1) == b.size(0), "b: expected ", a.size(1), " rows to match a's columns, got ", b.size(0));
  check_matrix(out, "out", at::kFloat);
  TORCH_CHECK(out.size(0) == a.size(0) && out.size(1) == b.size(1), "out: expected shape [", a.size(0), ", ",
              b.size(1), "], got ", out.sizes());
  const int64_t m = a.size(0), n = b.size(1), k = a.size(1);
  if (m == 0 || n == 0) return;
  if (k == 0) {
    out.mul_(beta);
    return;
  }
  const int64_t ldc = std::max<int64_t>(out.stride(0), n);
  for (int64_t value : {m, n, k, A.ld, B.ld, ldc}) check_int32(value, "gemm_bf16_f32: a size or stride");
  cblas_gemm_bf16bf16f32(kRowMajor, A.trans, B.trans, m, n, k, static_cast<float>(alpha), A.tensor.data_ptr(),
                         A.ld, B.tensor.data_ptr(), B.ld, static_cast<float>(beta), out.data_ptr<float>(), ldc);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> chunk_logits_bf16(
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& targets, int64_t ignore_index, double temperature, const std::optional<at::Tensor>& lse,
    at::Tensor& logits) {
  TORCH_CHECK(has_bf16_gemm(), "chunk_logits_bf16: this torch has no MKL bf16 GEMM");
  check_matrix(hidden, "hidden", at::kBFloat16);
  check_matrix(weight, "weight", at::kBFloat16);
  check_matrix(logits, "logits", at::kBFloat16);
  const int64_t rows = hidden.size(0), dim = hidden.size(1), vocab = weight.size(0);
  TORCH_CHECK(weight.size(1) == dim, "weight: expected [V, ", dim, "] to match hidden, got ", weight.sizes());
  TORCH_CHECK(vocab > 0, "weight: expected a vocabulary of at least 1, got 0");
  TORCH_CHECK(logits.size(0) == rows && logits.size(1) == vocab, "logits: expected shape [", rows, ", ", vocab,
              "], got ", logits.sizes());
  if (bias) check_rows(*bias, "bias", vocab, at::kFloat);
  if (lse) check_rows(*lse, "lse", rows, at::kFloat);
  check_targets(targets, rows, vocab, ignore_index);
  TORCH_CHECK(temperature > 0, "temperature: expected > 0, got ", temperature);
  for (int64_t value : {dim, hidden.stride(0), weight.stride(0), logits.stride(0)}) {
    check_int32(value, "chunk_logits_bf16: a size or stride");
  }
  const bool stats = !lse.has_value();
  const at::TensorOptions fp32 = hidden.options().dtype(at::kFloat);
  at::Tensor logprobs = at::empty({stats ? rows : 0}, fp32), entropy = at::empty_like(logprobs);
  at::Tensor lse_out = stats ? at::empty({rows}, fp32) : *lse;
  at::Tensor shifts = at::empty({rows, (vocab + kSlabCols - 1) / kSlabCols}, fp32);
  const float scale = static_cast<float>(1.0 / temperature), beta = bias ? scale : 0.0f;
  const c10::BFloat16* h = hidden.data_ptr<c10::BFloat16>();
  const c10::BFloat16* w = weight.data_ptr<c10::BFloat16>();
  const float* b = bias ? bias->data_ptr<float>() : nullptr;
  const float* known_lse = stats ? nullptr : lse->data_ptr<float>();
  const int64_t* target = targets.data_ptr<int64_t>();
  c10::BFloat16* out = logits.data_ptr<c10::BFloat16>();
  const int64_t ld_h = hidden.stride(0), ld_w = weight.stride(0), ld_out = logits.stride(0);
  float* shift = shifts.data_ptr<float>();
  const int64_t ld_shift = shifts.stride(0);

  // One contiguous block of rows per thread (splitting the vocabulary instead was slower: 262 vs 230 ms, its
  // stores scatter over every row of the chunk); MKL runs single-threaded inside the parallel region.
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> tile(kBlockRows * kSlabCols), state(4 * kBlockRows);
    for (int64_t r0 = begin; r0 < end; r0 += kBlockRows) {
      const int64_t block = std::min(kBlockRows, end - r0);
      float *run_max = state.data(), *run_sum_e = run_max + block, *run_sum_ez = run_sum_e + block,
            *target_logit = run_sum_ez + block;
      std::fill(run_max, run_max + block, -std::numeric_limits<float>::infinity());
      std::fill(run_sum_e, run_sum_e + 3 * block, 0.0f);
      for (int64_t c0 = 0; c0 < vocab; c0 += kSlabCols) {
        const int64_t cols = std::min(kSlabCols, vocab - c0);
        if (b != nullptr) {  // the bias as the GEMM's beta term: tile = (h W^T + b) / temperature
          for (int64_t i = 0; i < block; ++i) std::copy(b + c0, b + c0 + cols, tile.data() + i * kSlabCols);
        }
        cblas_gemm_bf16bf16f32(kRowMajor, kNoTrans, kTrans, block, cols, dim, scale, h + r0 * ld_h, ld_h,
                               w + c0 * ld_w, ld_w, beta, tile.data(), kSlabCols);
        row_kernels().slab_bf16(SlabArgs{tile.data(), block, cols, kSlabCols, c0, target + r0, out + r0 * ld_out,
                                         ld_out, shift + r0 * ld_shift + c0 / kSlabCols, ld_shift,
                                         known_lse == nullptr ? nullptr : known_lse + r0, run_max, run_sum_e,
                                         run_sum_ez, target_logit});
      }
      for (int64_t i = 0; stats && i < block; ++i) {
        const int64_t r = r0 + i;
        const float log_s = std::log(run_sum_e[i]), row_lse = run_max[i] + log_s;
        lse_out.data_ptr<float>()[r] = row_lse;
        entropy.data_ptr<float>()[r] = log_s - run_sum_ez[i] / run_sum_e[i];
        logprobs.data_ptr<float>()[r] = target[r] == ignore_index ? 0.0f : target_logit[i] - row_lse;
      }
    }
  });
  return {logprobs, entropy, lse_out, shifts};
}

}  // namespace erpo_native
