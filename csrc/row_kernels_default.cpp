// The row kernels built with the compiler's baseline instruction set; see row_kernels_impl.h.
#define CPU_CAPABILITY DEFAULT
#include "row_kernels_impl.h"
