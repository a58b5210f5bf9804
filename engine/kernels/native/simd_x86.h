// The x86 intrinsics of scan_avx512.cc and scan_avx2.cc, and the target attribute of their functions.
//
// A normal build includes <immintrin.h> and gives each kernel function its `target` attribute: the
// library stays baseline x86-64 and runs a loop only on a CPU that has its extensions.
//
// A build with -DVGG_SCAN_EMULATE (and SIMDe's headers on the include path: the `cmeel-simde`
// wheel of the test extra) compiles the same loops against SIMDe, which implements every intrinsic
// used here with portable code: the AVX-512 VNNI / BF16 loops then run, slowly but bit for bit, on a
// CPU without AVX-512, so tests/test_native_emulated.py checks them on any x86-64 machine. That
// library reports every x86 path as present (scan_topk.cc, IsaMask) and is never the one searches use.
#pragma once

#if defined(VGG_SCAN_EMULATE)
#define SIMDE_ENABLE_NATIVE_ALIASES
#include <simde/x86/avx512.h>
#include <simde/x86/f16c.h>
#include <simde/x86/fma.h>

#include <cmath>
#include <cstdint>
#include <cstring>

// The three intrinsics these loops use that SIMDe 0.8.2 lacks, and the two it rounds differently,
// written from their definitions in Intel's intrinsics guide.
static inline int32_t vgg_emulated_reduce_add_epi32(simde__m512i a) {
  int32_t x[16];
  std::memcpy(x, &a, sizeof(x));
  int32_t s = 0;
  for (int32_t v : x) s = int32_t(uint32_t(s) + uint32_t(v));  // wraps like vpaddd
  return s;
}

static inline float vgg_emulated_reduce_add_ps(simde__m512 a) {
  float x[16];
  std::memcpy(x, &a, sizeof(x));
  // The order of GCC's _mm512_reduce_add_ps: halves added pairwise down to one lane.
  for (int w = 8; w >= 1; w /= 2)
    for (int i = 0; i < w; ++i) x[i] = x[i] + x[i + w];
  return x[0];
}

static inline simde__m512i vgg_emulated_maskz_loadu_epi8(uint64_t k, const void* p) {
  uint8_t x[64] = {};
  const uint8_t* src = static_cast<const uint8_t*>(p);
  for (int i = 0; i < 64; ++i)
    if (k >> i & 1) x[i] = src[i];  // masked-off bytes are not read, as the instruction promises
  simde__m512i r;
  std::memcpy(&r, x, sizeof(r));
  return r;
}

// SIMDe's portable fmadd rounds the product before the add; the instruction rounds once, and the
// kernels' scores (the rank-one epilogue) are specified as that one rounding.
template <class V>
static inline V vgg_emulated_fmadd(V a, V b, V c) {
  constexpr int kLanes = sizeof(V) / sizeof(float);
  float x[kLanes], y[kLanes], z[kLanes];
  std::memcpy(x, &a, sizeof(x)), std::memcpy(y, &b, sizeof(y)), std::memcpy(z, &c, sizeof(z));
  for (int i = 0; i < kLanes; ++i) x[i] = std::fma(x[i], y[i], z[i]);
  std::memcpy(&a, x, sizeof(x));
  return a;
}

#undef _mm256_fmadd_ps
#undef _mm512_fmadd_ps
#define _mm256_fmadd_ps(a, b, c) vgg_emulated_fmadd<simde__m256>((a), (b), (c))
#define _mm512_fmadd_ps(a, b, c) vgg_emulated_fmadd<simde__m512>((a), (b), (c))
#define _mm512_reduce_add_epi32(a) vgg_emulated_reduce_add_epi32(a)
#define _mm512_reduce_add_ps(a) vgg_emulated_reduce_add_ps(a)
#define _mm512_maskz_loadu_epi8(k, p) vgg_emulated_maskz_loadu_epi8((k), (p))
#define VGG_TARGET(extensions)
#else
#include <immintrin.h>
#define VGG_TARGET(extensions) __attribute__((target(extensions)))
#endif
