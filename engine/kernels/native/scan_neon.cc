// The AArch64 Advanced SIMD scan loops of scan_topk.h: 16 bytes of a row at a time, few queries
// (Q <= kSmallQ; larger batches run XLA's products). int8 with sdot (the library is built with
// +dotprod where the CPU has it) or vmull + vpadal; bfloat16 and float16 widened exactly, vfma.
// Compiled on AArch64 only: on x86-64 this file is empty.

#if defined(__aarch64__)
#include <arm_neon.h>

#include <cmath>
#include <cstring>

#include "scan_topk.h"

namespace vgg_scan {
namespace {

inline uint8x16_t LoadRow16(const uint8_t* p, int64_t j, int64_t bytes) {
  if (j + 16 <= bytes) return vld1q_u8(p + j);
  uint8_t tail[16] = {};
  std::memcpy(tail, p + j, bytes - j);
  return vld1q_u8(tail);
}

// int8 rows against signed queries: sdot (built with +dotprod, where the CPU has it) or widening
// multiplies and pairwise adds; both the exact integer dot.
struct Int8Neon {
  using Acc = int32x4_t;
  static constexpr int kQBytes = 64;
  static Acc Zero() { return vdupq_n_s32(0); }
  static Acc DotRow(Acc a, const uint8_t* q, uint8x16_t xu) {
    const int8x16_t qv = vld1q_s8(reinterpret_cast<const int8_t*>(q)), x = vreinterpretq_s8_u8(xu);
#if defined(__ARM_FEATURE_DOTPROD)
    return vdotq_s32(a, qv, x);
#else
    a = vpadalq_s16(a, vmull_s8(vget_low_s8(qv), vget_low_s8(x)));
    return vpadalq_s16(a, vmull_high_s8(qv, x));
#endif
  }
  static float Score(Acc a) { return float(vaddvq_s32(a)); }
};

// bfloat16 (a 16-bit shift) and float16 (fcvtl) rows, widened exactly, against float32 queries.
template <bool kHalf>
struct FloatNeon {
  using Acc = float32x4_t;
  static constexpr int kQBytes = 128;
  static Acc Zero() { return vdupq_n_f32(0.0f); }
  static Acc DotRow(Acc a, const uint8_t* q, uint8x16_t x) {
    const float* qf = reinterpret_cast<const float*>(q);
    float32x4_t lo, hi;
    if constexpr (kHalf) {
      const float16x8_t h = vreinterpretq_f16_u8(x);
      lo = vcvt_f32_f16(vget_low_f16(h));
      hi = vcvt_high_f32_f16(h);
    } else {
      const uint16x8_t u = vreinterpretq_u16_u8(x);
      lo = vreinterpretq_f32_u32(vshll_n_u16(vget_low_u16(u), 16));
      hi = vreinterpretq_f32_u32(vshll_high_n_u16(u, 16));
    }
    a = vfmaq_f32(a, vld1q_f32(qf), lo);
    return vfmaq_f32(a, vld1q_f32(qf + 4), hi);
  }
  static float Score(Acc a) { return vaddvq_f32(a); }
};

template <int Q, class E>
void ScanSmallNeon(const Problem& p, Worker& w, int64_t r0, int64_t r1) {
  float qm[Q], qo[Q];
  for (int j = 0; j < Q; ++j) qm[j] = p.qmul[j], qo[j] = p.qoff[j];
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* row = p.m + r * p.row_bytes;
    typename E::Acc acc[Q];
    for (int j = 0; j < Q; ++j) acc[j] = E::Zero();
    for (int64_t c = 0; c < p.row_bytes; c += 16) {
      if (c % 64 == 0) __builtin_prefetch(row + kPrefetchBytes + c);
      const uint8x16_t x = LoadRow16(row, c, p.row_bytes);
      for (int j = 0; j < Q; ++j)
        acc[j] = E::DotRow(acc[j], p.qpacked + j * p.dp + c * (E::kQBytes / 64), x);
    }
    const float sc = p.scale[r], b = p.bias[r], wr = p.weight[r];
    for (int j = 0; j < Q; ++j) {
      const float s = std::fma(E::Score(acc[j]) * sc, qm[j], qo[j] * wr) + b;
      if (s >= w.thr[j]) w.heaps[j].Push(s, int32_t(r));
    }
  }
}

template <class E>
void ScanBlockNeon(const Problem& p, Worker& w, int64_t r0, int64_t r1) {
  switch (p.q) {
    case 1: ScanSmallNeon<1, E>(p, w, r0, r1); return;
    case 2: ScanSmallNeon<2, E>(p, w, r0, r1); return;
    case 3: ScanSmallNeon<3, E>(p, w, r0, r1); return;
    case 4: ScanSmallNeon<4, E>(p, w, r0, r1); return;
    case 5: ScanSmallNeon<5, E>(p, w, r0, r1); return;
    case 6: ScanSmallNeon<6, E>(p, w, r0, r1); return;
    case 7: ScanSmallNeon<7, E>(p, w, r0, r1); return;
    case 8: ScanSmallNeon<8, E>(p, w, r0, r1); return;
    default: return;  // the handlers keep Q <= kSmallQ
  }
}

}  // namespace

const Kernel kInt8Neon{&ScanBlockNeon<Int8Neon>, Int8Neon::kQBytes, 0};
const Kernel kBf16Neon{&ScanBlockNeon<FloatNeon<false>>, FloatNeon<false>::kQBytes, 0};
const Kernel kF16Neon{&ScanBlockNeon<FloatNeon<true>>, FloatNeon<true>::kQBytes, 0};

double NeonPeak(int64_t iters) {  // 8 independent chains of the int8 dot of Int8Neon
  int8x16_t a = vdupq_n_s8(3);
  int32x4_t c0 = vdupq_n_s32(0), c1 = c0, c2 = c0, c3 = c0, c4 = c0, c5 = c0, c6 = c0, c7 = c0;
  const uint8_t* q = reinterpret_cast<const uint8_t*>(&a);
  for (int64_t i = 0; i < iters; ++i) {
    __asm__ volatile("" : "+w"(a));
    const uint8x16_t x = vreinterpretq_u8_s8(a);
    c0 = Int8Neon::DotRow(c0, q, x);
    c1 = Int8Neon::DotRow(c1, q, x);
    c2 = Int8Neon::DotRow(c2, q, x);
    c3 = Int8Neon::DotRow(c3, q, x);
    c4 = Int8Neon::DotRow(c4, q, x);
    c5 = Int8Neon::DotRow(c5, q, x);
    c6 = Int8Neon::DotRow(c6, q, x);
    c7 = Int8Neon::DotRow(c7, q, x);
    __asm__ volatile("" : "+w"(c0), "+w"(c1), "+w"(c2), "+w"(c3), "+w"(c4), "+w"(c5), "+w"(c6),
                     "+w"(c7));
  }
  volatile int32_t sink = vaddvq_s32(vaddq_s32(vaddq_s32(vaddq_s32(c0, c1), vaddq_s32(c2, c3)),
                                               vaddq_s32(vaddq_s32(c4, c5), vaddq_s32(c6, c7))));
  (void)sink;
  return double(iters) * 8 * 16 * 2;
}

}  // namespace vgg_scan
#endif  // __aarch64__
