// erpo_kernels._native: the compiled part of the "native" CPU backend (erpo_kernels/backends/native.py, the
// only Python module that loads it).  It registers operators under torch.ops.erpo_native, which the chunk
// loop of erpo_kernels/backends/torch_chunked.py calls once per token chunk:
//
//   chunk_stats(logits, targets, ignore_index) -> (logprobs, entropy, lse)
//       fp32 / fp64 logits [rows, V]: one pass per row (a max scan, then the exponential sums from cache)
//   chunk_logits_bf16(hidden, weight, bias?, targets, ignore_index, temperature, lse?, logits)
//       -> (logprobs, entropy, lse, shifts)
//       bf16 inputs: the logits GEMM and the statistics fused per vocabulary slab, the logits stored in bf16
//       minus a shift per (row, slab) (logits_bf16.cpp); with lse given (the backward), no statistics
//   chunk_dz_(logits, targets, lse, entropy, grad_logprobs?, grad_entropy?, ignore_index, temperature, shifts?)
//       one pass per row turning the logits into dz in place, in the logits' dtype (fp32, fp64, or bf16 with
//       the shifts chunk_logits_bf16 returned)
//   gemm_bf16_f32(a, b, out, alpha, beta)
//       out = alpha * a @ b + beta * out, bf16 operands, fp32 out: accumulates grad_weight across chunks
//   capability() -> str, has_bf16_gemm() -> bool
//
// The GEMMs are torch's (oneDNN / MKL through torch.mm, MKL's bf16 GEMM here).  Rows are split over torch's
// intra-op threads (at::parallel_for, OpenMP), so torch.set_num_threads governs these kernels as it does the
// GEMMs.  Argument errors are raised here, before any kernel runs, and name the argument.
#include <Python.h>

#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <torch/library.h>

#include <string>

#include "ops.h"

namespace erpo_native {

const RowKernels& row_kernels() {
  // torch's own choice of instruction set on this CPU, which honours the ATEN_CPU_CAPABILITY variable
  static const RowKernels chosen = [] {
    const std::string capability = at::get_cpu_capability();
#ifdef ERPO_HAVE_AVX512
    if (capability == "AVX512") return AVX512::row_kernels();
#endif
#ifdef ERPO_HAVE_AVX2
    if (capability == "AVX512" || capability == "AVX2") return AVX2::row_kernels();
#endif
    return DEFAULT::row_kernels();
  }();
  return chosen;
}

void over_rows(int64_t rows, int64_t vocab, const std::function<void(int64_t, int64_t)>& fn) {
  constexpr int64_t kLogitsPerTask = 1 << 15;  // below that, a thread costs more than it saves
  at::parallel_for(0, rows, std::max<int64_t>(1, kLogitsPerTask / std::max<int64_t>(vocab, 1)), fn);
}

void check_rows(const at::Tensor& t, const char* name, int64_t rows, at::ScalarType dtype) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == rows, name, ": expected shape [", rows, "], got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == dtype, name, ": expected ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.device().is_cpu() && t.is_contiguous(), name, ": expected a contiguous CPU tensor");
}

void check_targets(const at::Tensor& targets, int64_t rows, int64_t vocab, int64_t ignore_index) {
  check_rows(targets, "targets", rows, at::kLong);
  const int64_t* target = targets.data_ptr<int64_t>();
  for (int64_t r = 0; r < rows; ++r) {
    TORCH_CHECK(target[r] == ignore_index || (target[r] >= 0 && target[r] < vocab), "targets: row ", r,
                " has id ", target[r], ", expected one in [0, ", vocab, ") or ignore_index ", ignore_index);
  }
}

namespace {

void check_logits(const at::Tensor& logits, std::initializer_list<at::ScalarType> dtypes) {
  TORCH_CHECK(logits.device().is_cpu() && logits.dim() == 2, "logits: expected a 2-D CPU tensor, got ",
              logits.dim(), "-D on ", logits.device());
  TORCH_CHECK(std::find(dtypes.begin(), dtypes.end(), logits.scalar_type()) != dtypes.end(),
              "logits: unsupported dtype ", logits.scalar_type());
  TORCH_CHECK(logits.size(1) > 0, "logits: expected a vocabulary of at least 1, got 0");
  TORCH_CHECK(logits.stride(1) == 1, "logits: expected unit stride along the vocabulary");
}

// The row kernels for one dtype (overloads, so the dtype dispatch below picks them at compile time).
void run_stats(const StatsArgs<float>& a, int64_t begin, int64_t end) { row_kernels().stats_f32(a, begin, end); }
void run_stats(const StatsArgs<double>& a, int64_t begin, int64_t end) { row_kernels().stats_f64(a, begin, end); }
void run_dz(const DzArgs<float>& a, int64_t begin, int64_t end) { row_kernels().dz_f32(a, begin, end); }
void run_dz(const DzArgs<double>& a, int64_t begin, int64_t end) { row_kernels().dz_f64(a, begin, end); }

template <typename T>
DzArgs<T> dz_args(T* z, const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& lse,
                  const at::Tensor& entropy, const std::optional<at::Tensor>& grad_logprobs,
                  const std::optional<at::Tensor>& grad_entropy, int64_t ignore_index, double temperature) {
  return DzArgs<T>{z, logits.size(1), logits.stride(0), targets.data_ptr<int64_t>(), ignore_index,
                   lse.data_ptr<T>(), entropy.data_ptr<T>(),
                   grad_logprobs ? grad_logprobs->data_ptr<T>() : nullptr,
                   grad_entropy ? grad_entropy->data_ptr<T>() : nullptr, static_cast<T>(1.0 / temperature)};
}

std::string capability() { return row_kernels().isa; }

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> chunk_stats(const at::Tensor& logits, const at::Tensor& targets,
                                                           int64_t ignore_index) {
  check_logits(logits, {at::kFloat, at::kDouble});
  const int64_t rows = logits.size(0), vocab = logits.size(1);
  check_targets(targets, rows, vocab, ignore_index);
  at::Tensor logprobs = at::empty({rows}, logits.options()), entropy = at::empty_like(logprobs),
             lse = at::empty_like(logprobs);
  AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "chunk_stats", [&] {
    const StatsArgs<scalar_t> args{logits.data_ptr<scalar_t>(), vocab, logits.stride(0),
                                   targets.data_ptr<int64_t>(), ignore_index, logprobs.data_ptr<scalar_t>(),
                                   entropy.data_ptr<scalar_t>(), lse.data_ptr<scalar_t>()};
    over_rows(rows, vocab, [&](int64_t begin, int64_t end) { run_stats(args, begin, end); });
  });
  return {logprobs, entropy, lse};
}

at::Tensor chunk_dz_(at::Tensor& logits, const at::Tensor& targets, const at::Tensor& lse,
                     const at::Tensor& entropy, const std::optional<at::Tensor>& grad_logprobs,
                     const std::optional<at::Tensor>& grad_entropy, int64_t ignore_index, double temperature,
                     const std::optional<at::Tensor>& shifts) {
  check_logits(logits, {at::kFloat, at::kDouble, at::kBFloat16});
  const int64_t rows = logits.size(0), vocab = logits.size(1);
  // bf16 logits come with fp32 statistics and coefficients
  const at::ScalarType dtype = logits.scalar_type() == at::kBFloat16 ? at::kFloat : logits.scalar_type();
  check_rows(targets, "targets", rows, at::kLong);
  check_rows(lse, "lse", rows, dtype);
  check_rows(entropy, "entropy", rows, dtype);
  if (grad_logprobs) check_rows(*grad_logprobs, "grad_logprobs", rows, dtype);
  if (grad_entropy) check_rows(*grad_entropy, "grad_entropy", rows, dtype);
  TORCH_CHECK(temperature > 0, "temperature: expected > 0, got ", temperature);
  if (logits.scalar_type() == at::kBFloat16) {
    const int64_t slabs = (vocab + kSlabCols - 1) / kSlabCols;
    TORCH_CHECK(shifts && shifts->dim() == 2 && shifts->size(0) == rows && shifts->size(1) == slabs &&
                    shifts->scalar_type() == at::kFloat && shifts->stride(1) == 1,
                "shifts: bf16 logits come with their float32 shifts [", rows, ", ", slabs,
                "] from chunk_logits_bf16");
    DzArgs<float> args = dz_args<float>(nullptr, logits, targets, lse, entropy, grad_logprobs, grad_entropy,
                                        ignore_index, temperature);
    args.slab_shift = shifts->data_ptr<float>();
    args.shift_ld = shifts->stride(0);
    args.slab_cols = kSlabCols;
    c10::BFloat16* z = logits.data_ptr<c10::BFloat16>();
    over_rows(rows, vocab, [&](int64_t begin, int64_t end) { row_kernels().dz_bf16(args, z, begin, end); });
    return logits;
  }
  AT_DISPATCH_FLOATING_TYPES(dtype, "chunk_dz_", [&] {
    const DzArgs<scalar_t> args = dz_args<scalar_t>(logits.data_ptr<scalar_t>(), logits, targets, lse, entropy,
                                                    grad_logprobs, grad_entropy, ignore_index, temperature);
    over_rows(rows, vocab, [&](int64_t begin, int64_t end) { run_dz(args, begin, end); });
  });
  return logits;
}

}  // namespace erpo_native

TORCH_LIBRARY(erpo_native, m) {
  m.def("chunk_stats(Tensor logits, Tensor targets, int ignore_index) -> (Tensor, Tensor, Tensor)");
  m.def("chunk_logits_bf16(Tensor hidden, Tensor weight, Tensor? bias, Tensor targets, int ignore_index, "
        "float temperature, Tensor? lse, Tensor(a!) logits) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("chunk_dz_(Tensor(a!) logits, Tensor targets, Tensor lse, Tensor entropy, Tensor? grad_logprobs, "
        "Tensor? grad_entropy, int ignore_index, float temperature, Tensor? shifts=None) -> Tensor(a!)");
  m.def("gemm_bf16_f32(Tensor a, Tensor b, Tensor(c!) out, float alpha, float beta) -> ()");
  m.def("capability() -> str", &erpo_native::capability);
  m.def("has_bf16_gemm() -> bool", &erpo_native::has_bf16_gemm);
}

TORCH_LIBRARY_IMPL(erpo_native, CPU, m) {
  m.impl("chunk_stats", &erpo_native::chunk_stats);
  m.impl("chunk_logits_bf16", &erpo_native::chunk_logits_bf16);
  m.impl("chunk_dz_", &erpo_native::chunk_dz_);
  m.impl("gemm_bf16_f32", &erpo_native::gemm_bf16_f32);
}

// The extension is imported as a Python module (erpo_kernels._native) so that importing it loads the library
// and runs the registrations above; the module itself is empty.
PyMODINIT_FUNC PyInit__native(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_native",
                                      "ERPO native CPU kernels (torch.ops.erpo_native)", -1, nullptr};
  return PyModule_Create(&module);
}
