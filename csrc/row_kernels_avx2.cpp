// The row kernels built for the AVX2 instruction set (flags from setup.py); see row_kernels_impl.h.
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#include "row_kernels_impl.h"
