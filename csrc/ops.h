// The operators of erpo_kernels._native (registered in erpo_native.cpp) and what they share.
#pragma once

#include <ATen/ATen.h>

#include <functional>
#include <optional>
#include <tuple>

#include "row_kernels.h"

namespace erpo_native {

// Vocabulary columns per slab of the bf16 logits step (a multiple of every bf16 vector width): one shift per
// (row, slab) comes with the bf16 logits (row_kernels.h, SlabArgs).  See logits_bf16.cpp for the measurements.
constexpr int64_t kSlabCols = 512;

// The build of the row kernels for the instruction set torch itself uses on this CPU.
const RowKernels& row_kernels();

// Split [0, rows) over torch's intra-op threads in tasks of at least ~32k logits.
void over_rows(int64_t rows, int64_t vocab, const std::function<void(int64_t, int64_t)>& fn);

// Argument checks shared by the operators (errors name the argument).
void check_rows(const at::Tensor& t, const char* name, int64_t rows, at::ScalarType dtype);
void check_targets(const at::Tensor& targets, int64_t rows, int64_t vocab, int64_t ignore_index);

// erpo_native.cpp
std::tuple<at::Tensor, at::Tensor, at::Tensor> chunk_stats(const at::Tensor& logits, const at::Tensor& targets,
                                                           int64_t ignore_index);
at::Tensor chunk_dz_(at::Tensor& logits, const at::Tensor& targets, const at::Tensor& lse,
                     const at::Tensor& entropy, const std::optional<at::Tensor>& grad_logprobs,
                     const std::optional<at::Tensor>& grad_entropy, int64_t ignore_index, double temperature,
                     const std::optional<at::Tensor>& shifts);

// logits_bf16.cpp
bool has_bf16_gemm();
void gemm_bf16_f32(const at::Tensor& a, const at::Tensor& b, at::Tensor& out, double alpha, double beta);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> chunk_logits_bf16(
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& targets, int64_t ignore_index, double temperature, const std::optional<at::Tensor>& lse,
    at::Tensor& logits);

}  // namespace erpo_native
