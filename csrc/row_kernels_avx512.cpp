// The row kernels built for the AVX512 instruction set (flags from setup.py); see row_kernels_impl.h.
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#include "row_kernels_impl.h"
