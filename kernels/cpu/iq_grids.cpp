// The host copies of the i-quant tables (iq_grids.h); the values are in iq_grids.inc.
#include "kernels/cpu/iq_grids.h"

namespace moemesh::quants {

#define MM_IQ_QUAL const
#define MM_IQ_NAME(name) name
#include "kernels/cpu/iq_grids.inc"
#undef MM_IQ_NAME
#undef MM_IQ_QUAL

}  // namespace moemesh::quants
