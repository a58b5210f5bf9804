// The AVX-512 scan loops of scan_topk.h, 64 bytes of a row at a time, tiles of 16 queries.
// Products, 4 bytes of a row at a time:
//   * int8 (AVX512-VNNI): vpdpbusd, u8 x s8 -> s32. The queries are the unsigned operand, stored
//     as q + 128; the row sum times 128 is subtracted afterwards.
//   * bfloat16 (AVX512-BF16): vdpbf16ps, pairs of bf16 -> f32. Few queries are split into a bf16
//     high and low part (float32-accurate scores, the loop is memory-bound anyway); a batch uses
//     the queries rounded to bf16 (scores within ~1e-3; the index re-scores candidates exactly).
//   * float16 (AVX-512): vcvtph2ps + vfmadd with float32 queries, exact widening; few queries only.
// Every function here carries its target attribute: the rest of the library stays baseline x86-64
// and calls these only on a CPU that has the extensions.

#if defined(__x86_64__)
#include "simd_x86.h"

#include <cmath>
#include <cstring>

#include "scan_topk.h"

namespace vgg_scan {
namespace {

constexpr int kMaxTiles = 4;  // tiles of 16 queries per pass: 32 KB at 512 bytes, in L1
static_assert(kMaxTiles == 4, "ScanMany dispatches groups of 1 to 4 tiles");

// The kernels are compiled for these extensions and only called after a runtime check of the one
// their element type needs (VNNI for int8, BF16 for bfloat16).
#define KERNEL_TARGET VGG_TARGET("avx512f,avx512bw,avx512vnni,avx512bf16")
#define VNNI_TARGET VGG_TARGET("avx512f,avx512bw,avx512vnni")

// One element type: how 4 bytes of a row meet 4 bytes of a packed query.
struct Int8 {
  using Acc = __m512i;
  static constexpr bool kRowSum = true;  // the q + 128 offset needs the row sums
  static constexpr int kSplit = 1;       // packed copies per query in the few-query loop
  static constexpr int kQBytes = 64;     // packed query bytes per 64 bytes of a row
  static constexpr bool kTiles = true;   // has the many-query micro-kernel
  KERNEL_TARGET static Acc Zero() { return _mm512_setzero_si512(); }
  KERNEL_TARGET static Acc Dot(Acc a, __m512i q, __m512i x) { return _mm512_dpbusd_epi32(a, q, x); }
  KERNEL_TARGET static Acc DotRow(Acc a, const uint8_t* q, __m512i x) {
    return Dot(a, _mm512_loadu_si512(q), x);
  }
  KERNEL_TARGET static __m512 Scores(Acc a, int32_t rowsum) {
    return _mm512_cvtepi32_ps(_mm512_sub_epi32(a, _mm512_set1_epi32(128 * rowsum)));
  }
  KERNEL_TARGET static float Score(Acc a, int32_t rowsum) {
    return float(_mm512_reduce_add_epi32(a) - 128 * rowsum);
  }
};

struct Bf16 {
  using Acc = __m512;
  static constexpr bool kRowSum = false;
  static constexpr int kSplit = 2;  // high and low bf16 parts of each query
  static constexpr int kQBytes = 64;
  static constexpr bool kTiles = true;
  KERNEL_TARGET static Acc Zero() { return _mm512_setzero_ps(); }
  KERNEL_TARGET static Acc Dot(Acc a, __m512i q, __m512i x) {
    return _mm512_dpbf16_ps(a, reinterpret_cast<__m512bh>(q), reinterpret_cast<__m512bh>(x));
  }
  KERNEL_TARGET static Acc DotRow(Acc a, const uint8_t* q, __m512i x) {
    return Dot(a, _mm512_loadu_si512(q), x);
  }
  KERNEL_TARGET static __m512 Scores(Acc a, int32_t) { return a; }
  KERNEL_TARGET static float Score(Acc a, int32_t) { return _mm512_reduce_add_ps(a); }
};

// float16 rows, widened exactly (vcvtph2ps) against float32 queries: the few-query loop only.
struct F16 {
  using Acc = __m512;
  static constexpr bool kRowSum = false;
  static constexpr int kSplit = 1;
  static constexpr int kQBytes = 128;  // 32 halves of a row meet 32 float32 query values
  static constexpr bool kTiles = false;
  KERNEL_TARGET static Acc Zero() { return _mm512_setzero_ps(); }
  KERNEL_TARGET static Acc DotRow(Acc a, const uint8_t* q, __m512i x) {
    const float* qf = reinterpret_cast<const float*>(q);
    a = _mm512_fmadd_ps(_mm512_loadu_ps(qf), _mm512_cvtph_ps(_mm512_castsi512_si256(x)), a);
    return _mm512_fmadd_ps(_mm512_loadu_ps(qf + 16),
                           _mm512_cvtph_ps(_mm512_extracti64x4_epi64(x, 1)), a);
  }
  KERNEL_TARGET static float Score(Acc a, int32_t) { return _mm512_reduce_add_ps(a); }
};

KERNEL_TARGET inline __m512i LoadRow(const uint8_t* p, int64_t j, int64_t bytes) {
  if (j + 64 <= bytes) return _mm512_loadu_si512(p + j);
  return _mm512_maskz_loadu_epi8(~0ULL >> (64 - (bytes - j)), p + j);
}

KERNEL_TARGET int32_t RowSum(const uint8_t* row, int64_t bytes) {
  const __m512i ones = _mm512_set1_epi8(1);
  __m512i s = _mm512_setzero_si512();
  for (int64_t j = 0; j < bytes; j += 64) s = _mm512_dpbusd_epi32(s, ones, LoadRow(row, j, bytes));
  return _mm512_reduce_add_epi32(s);
}

template <int Q, class E>
KERNEL_TARGET void ScanSmall(const Problem& p, Worker& w, int64_t r0, int64_t r1) {
  const __m512i ones = _mm512_set1_epi8(1);
  float qm[Q], qo[Q];
  for (int j = 0; j < Q; ++j) qm[j] = p.qmul[j], qo[j] = p.qoff[j];
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* row = p.m + r * p.row_bytes;
    typename E::Acc acc[Q];
    __m512i sum = _mm512_setzero_si512();
    for (int j = 0; j < Q; ++j) acc[j] = E::Zero();
    for (int64_t c = 0; c < p.row_bytes; c += 64) {
      _mm_prefetch(reinterpret_cast<const char*>(row + kPrefetchBytes + c), _MM_HINT_T0);
      __m512i x = LoadRow(row, c, p.row_bytes);
      if constexpr (E::kRowSum) sum = _mm512_dpbusd_epi32(sum, ones, x);
      for (int j = 0; j < Q; ++j)
        for (int h = 0; h < E::kSplit; ++h) {
          const uint8_t* qv = p.qpacked + (j * E::kSplit + h) * p.dp + c * (E::kQBytes / 64);
          acc[j] = E::DotRow(acc[j], qv, x);
        }
    }
    const int32_t rs = E::kRowSum ? _mm512_reduce_add_epi32(sum) : 0;
    const float sc = p.scale[r], b = p.bias[r], wr = p.weight[r];
    for (int j = 0; j < Q; ++j) {
      const float s = std::fma(E::Score(acc[j], rs) * sc, qm[j], qo[j] * wr) + b;
      if (s >= w.thr[j]) w.heaps[j].Push(s, int32_t(r));
    }
  }
}

// One group of 4 bytes of R rows against G tiles of 16 queries.
template <int R, int G, class E>
KERNEL_TARGET __attribute__((always_inline)) inline void Step(typename E::Acc (&acc)[R][G],
                                                              const uint8_t* const (&rows)[R],
                                                              const uint8_t* qp, int64_t groups,
                                                              int64_t j) {
  __m512i b[R];
  for (int i = 0; i < R; ++i) {
    int32_t v;
    std::memcpy(&v, rows[i] + 4 * j, 4);
    b[i] = _mm512_set1_epi32(v);
  }
  for (int g = 0; g < G; ++g) {
    __m512i qv = _mm512_loadu_si512(qp + (g * groups + j) * 64);
    for (int i = 0; i < R; ++i) acc[i][g] = E::Dot(acc[i][g], qv, b[i]);
  }
}

// R rows against G tiles of 16 queries starting at tile t0.
template <int R, int G, class E>
KERNEL_TARGET inline void Micro(const Problem& p, Worker& w, int64_t r, int64_t t0,
                                int32_t* rowsum, bool first) {
  typename E::Acc acc[R][G];
  for (int i = 0; i < R; ++i)
    for (int g = 0; g < G; ++g) acc[i][g] = E::Zero();
  const uint8_t* rows[R];
  for (int i = 0; i < R; ++i) rows[i] = p.m + (r + i) * p.row_bytes;
  const uint8_t* const(&crows)[R] = rows;
  const int64_t groups = p.row_bytes / 4;
  const uint8_t* qp = p.qpacked + t0 * groups * 64;
  // One cache line of each row (16 groups of 4 bytes) per outer step, fully unrolled: with
  // constant offsets the compiler schedules it at 83-87% of the VNNI ceiling (4 steps: 60-65%).
  int64_t j = 0;
  for (; j + 16 <= groups; j += 16) {
    for (int i = 0; i < R; ++i)
      _mm_prefetch(reinterpret_cast<const char*>(rows[i] + kPrefetchBytes + 4 * j), _MM_HINT_T1);
#pragma GCC unroll 16
    for (int64_t u = 0; u < 16; ++u) Step<R, G, E>(acc, crows, qp, groups, j + u);
  }
  for (; j < groups; ++j) Step<R, G, E>(acc, crows, qp, groups, j);
  for (int i = 0; i < R; ++i) {
    const int64_t row = r + i;
    if constexpr (E::kRowSum) {
      if (first) rowsum[i] = RowSum(rows[i], p.row_bytes);  // once, kept for the other groups
    }
    const int32_t rs = E::kRowSum ? rowsum[i] : 0;
    const __m512 sc = _mm512_set1_ps(p.scale[row]);
    const __m512 b = _mm512_set1_ps(p.bias[row]);
    const __m512 wr = _mm512_set1_ps(p.weight[row]);
    for (int g = 0; g < G; ++g) {
      const int64_t t = t0 + g;
      __m512 s = E::Scores(acc[i][g], rs);
      const __m512 off = _mm512_mul_ps(_mm512_loadu_ps(p.qoff + t * 16), wr);
      s = _mm512_fmadd_ps(_mm512_mul_ps(s, sc), _mm512_loadu_ps(p.qmul + t * 16), off);
      s = _mm512_add_ps(s, b);
      __mmask16 hit = _mm512_cmp_ps_mask(s, _mm512_loadu_ps(w.thr.data() + t * 16), _CMP_GE_OQ);
      if (!hit) continue;
      alignas(64) float sv[16];
      _mm512_store_ps(sv, s);
      while (hit) {
        int lane = __builtin_ctz(hit);
        hit &= hit - 1;
        int64_t qi = t * 16 + lane;
        if (qi < p.q) w.heaps[qi].Push(sv[lane], int32_t(row));
      }
    }
  }
}

// Rows per micro-kernel step for G tiles: about 16 accumulators, registers to spare.
constexpr int RowsFor(int g) { return g >= 4 ? 4 : g == 3 ? 5 : g == 2 ? 8 : 12; }

template <int G, class E>
KERNEL_TARGET void ScanTiles(const Problem& p, Worker& w, int64_t r0, int64_t r1, int64_t t0,
                             bool first) {
  constexpr int R = RowsFor(G);
  int32_t* rowsum = w.rowsum.data() - r0;
  int64_t r = r0;
  for (; r + R <= r1; r += R) Micro<R, G, E>(p, w, r, t0, rowsum + r, first);
  for (; r < r1; ++r) Micro<1, G, E>(p, w, r, t0, rowsum + r, first);
}

template <class E>
KERNEL_TARGET void ScanMany(const Problem& p, Worker& w, int64_t r0, int64_t r1) {
  // Split the tiles into near-equal groups of at most kMaxTiles; each group streams the block.
  w.rowsum.resize(r1 - r0);
  const int64_t groups = (p.tiles + kMaxTiles - 1) / kMaxTiles;
  int64_t t0 = 0;
  for (int64_t gi = 0; gi < groups; ++gi) {
    const int64_t g = (p.tiles - t0) / (groups - gi);
    switch (g) {
      case 1: ScanTiles<1, E>(p, w, r0, r1, t0, gi == 0); break;
      case 2: ScanTiles<2, E>(p, w, r0, r1, t0, gi == 0); break;
      case 3: ScanTiles<3, E>(p, w, r0, r1, t0, gi == 0); break;
      default: ScanTiles<4, E>(p, w, r0, r1, t0, gi == 0); break;
    }
    t0 += g;
  }
}

template <class E>
void ScanBlock(const Problem& p, Worker& w, int64_t r0, int64_t r1) {
  switch (p.q) {
    case 1: ScanSmall<1, E>(p, w, r0, r1); return;
    case 2: ScanSmall<2, E>(p, w, r0, r1); return;
    case 3: ScanSmall<3, E>(p, w, r0, r1); return;
    case 4: ScanSmall<4, E>(p, w, r0, r1); return;
    case 5: ScanSmall<5, E>(p, w, r0, r1); return;
    case 6: ScanSmall<6, E>(p, w, r0, r1); return;
    case 7: ScanSmall<7, E>(p, w, r0, r1); return;
    case 8: ScanSmall<8, E>(p, w, r0, r1); return;
    default:
      if constexpr (E::kTiles) ScanMany<E>(p, w, r0, r1);  // the handlers keep Q <= kSmallQ else
      return;
  }
}

}  // namespace

const Kernel kInt8Avx512{&ScanBlock<Int8>, Int8::kQBytes, 16};
const Kernel kBf16Avx512{&ScanBlock<Bf16>, Bf16::kQBytes, 16};
const Kernel kF16Avx512{&ScanBlock<F16>, F16::kQBytes, 0};

// 12 independent vpdpbusd per step.
VNNI_TARGET double VnniPeak(int64_t iters) {
  const __m512i a = _mm512_set1_epi32(0x01020304), b = _mm512_set1_epi32(0x01010101);
  // Twelve named accumulators (an array would live on the stack and time store forwarding).
  __m512i c0 = _mm512_setzero_si512(), c1 = c0, c2 = c0, c3 = c0, c4 = c0, c5 = c0, c6 = c0,
          c7 = c0, c8 = c0, c9 = c0, c10 = c0, c11 = c0;
  for (int64_t i = 0; i < iters; ++i) {
    c0 = _mm512_dpbusd_epi32(c0, a, b);
    c1 = _mm512_dpbusd_epi32(c1, a, b);
    c2 = _mm512_dpbusd_epi32(c2, a, b);
    c3 = _mm512_dpbusd_epi32(c3, a, b);
    c4 = _mm512_dpbusd_epi32(c4, a, b);
    c5 = _mm512_dpbusd_epi32(c5, a, b);
    c6 = _mm512_dpbusd_epi32(c6, a, b);
    c7 = _mm512_dpbusd_epi32(c7, a, b);
    c8 = _mm512_dpbusd_epi32(c8, a, b);
    c9 = _mm512_dpbusd_epi32(c9, a, b);
    c10 = _mm512_dpbusd_epi32(c10, a, b);
    c11 = _mm512_dpbusd_epi32(c11, a, b);
#if !defined(VGG_SCAN_EMULATE)  // SIMDe's vectors are not registers
    __asm__ volatile("" : "+v"(c0), "+v"(c1), "+v"(c2), "+v"(c3), "+v"(c4), "+v"(c5), "+v"(c6),
                     "+v"(c7), "+v"(c8), "+v"(c9), "+v"(c10), "+v"(c11));
#endif
  }
  const __m512i s0 = _mm512_add_epi32(_mm512_add_epi32(c0, c1), _mm512_add_epi32(c2, c3));
  const __m512i s1 = _mm512_add_epi32(_mm512_add_epi32(c4, c5), _mm512_add_epi32(c6, c7));
  const __m512i s2 = _mm512_add_epi32(_mm512_add_epi32(c8, c9), _mm512_add_epi32(c10, c11));
  volatile int32_t sink = _mm512_reduce_add_epi32(_mm512_add_epi32(_mm512_add_epi32(s0, s1), s2));
  (void)sink;
  return double(iters) * 12 * 64 * 2;
}

}  // namespace vgg_scan
#endif  // __x86_64__
