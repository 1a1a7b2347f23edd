// Which x86 SIMD variant a quants_avx2*.cpp translation unit is compiled as. CMake compiles each
// of those files three times (MM_SIMD_VNNI set per object library):
//   0  AVX2 + FMA + F16C                          namespace quants::avx2
//   1  + AVX-VNNI (VEX vpdpbusd / vpdpwssd:        namespace quants::avxvnni
//        Intel Alder Lake and later cores, AMD Zen 5)
//   2  + AVX512 F/BW/VL/VNNI (AMD Zen 4/5, Intel    namespace quants::avx512vnni
//        Xeon since Cascade Lake): mostly 256-bit vectors with the VNNI fusions, plus 512-bit
//        forms of the hottest prompt kernels (Q4_K's decoded rows)
// The VNNI variants fuse multiply-and-add steps of the same integer arithmetic (see madd_add and
// dp4_add in quants_avx2_inl.h): every variant computes the same int32 lanes and the same float
// operations in the same order, so all three give the same bits (tests/test_simd_variants.cpp).
// quants_dot.cpp picks one at run time (simd_level()).
//
// Include this after the system headers and before quants_avx2_inl.h: it pushes the target
// options, which the including file pops at its end (`#pragma GCC pop_options`).
#ifndef MM_SIMD_VNNI
#define MM_SIMD_VNNI 0
#endif

#pragma GCC push_options
#if MM_SIMD_VNNI == 0
#pragma GCC target("avx2,fma,f16c")
#define MM_SIMD_NS avx2
#elif MM_SIMD_VNNI == 1
#pragma GCC target("avx2,fma,f16c,avxvnni")
#define MM_SIMD_NS avxvnni
#elif MM_SIMD_VNNI == 2
#pragma GCC target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")
#define MM_SIMD_NS avx512vnni
// GCC 12's AVX-512 intrinsics pass _mm256_undefined_*() (`__Y = __Y`) as the unused merge source,
// which -W(maybe-)uninitialized reports at some uses (GCC bug 105593); nothing is uninitialized.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#else
#error "MM_SIMD_VNNI must be 0, 1 or 2"
#endif
