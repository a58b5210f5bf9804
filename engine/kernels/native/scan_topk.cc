// Fused brute-force scan + top-k for x86-64 and AArch64 CPUs, called from XLA as FFI custom calls.
// Python's one face of it: engine/kernels/native/__init__.py (build, CPU dispatch, FFI calls).
//
// For every query q and row r of an int8, bfloat16 or float16 matrix it computes
//     score[q, r] = dot(query[q], m[r]) * scale[r] * qmul[q] + bias[r]
// and keeps the k best rows per query without writing the [Q, N] scores: each worker keeps a heap
// per query and compares a whole vector of scores against the heaps' thresholds at once, so the
// scan runs at the speed of the products, not of the selection.
//
// Products, 4 bytes of a row at a time:
//   * int8 (AVX512-VNNI): vpdpbusd, u8 x s8 -> s32. The queries are the unsigned operand, stored
//     as q + 128; the row sum times 128 is subtracted afterwards.
//   * bfloat16 (AVX512-BF16): vdpbf16ps, pairs of bf16 -> f32. Few queries are split into a bf16
//     high and low part (float32-accurate scores, the loop is memory-bound anyway); a batch uses
//     the queries rounded to bf16 (scores within ~1e-3; the index re-scores candidates exactly).
//   * float16 (AVX-512): vcvtph2ps + vfmadd with float32 queries, exact widening; few queries only.
// The same on CPUs with AVX2 + FMA + F16C only, 32 bytes of a row at a time:
//   * int8: vpmaddubsw(|row|, sign(query, row)) then vpmaddwd with ones, s32 sums: exact, the
//     same integer dot (|row| <= 128 and |query| <= 127: a pair sums to <= 32512, no saturation).
//   * bfloat16 (widened by a 16-bit shift) and float16 (vcvtph2ps): vfmadd with float32 queries,
//     exact widening.
// And on AArch64 (few queries): int8 with sdot (built with +dotprod) or vmull + vpadal, bfloat16
// and float16 widened exactly, vfma.
// Each handler takes the best path the CPU runs (or the one its `isa` attribute names, for tests):
// the AVX-512 and AVX2 functions carry their own target attributes, everything else is baseline
// x86-64, so the library loads on any x86-64 CPU and runs only what the CPU has.
// Inner loops:
//   * Few queries (Q <= kSmallQ): one row at a time, 64 (AVX2: 32, NEON: 16) bytes per
//     instruction, a horizontal sum per row: memory-bound.
//   * Many queries: lanes are queries. Queries are packed as [Q/16][D bytes/4][16][4]; each 4-byte
//     group of a row is broadcast and multiplied with 16 queries at once, 4-12 rows by up to
//     kMaxTiles tiles of 16 queries in registers (a GEMM micro-kernel).
//   * Many int8 queries with AVX2: the same with tiles of 8 queries, 3 rows x 2 tiles in registers.
//   * Many float16 / bfloat16 queries with AVX2: 48 rows widened to float32 once, then a float32
//     GEMM blocking (6 rows x 2 tiles of 8 queries, 128 dimensions per pass).
// Rows are split into blocks shared by XLA's intra-op thread pool and the calling thread.
// Ties are broken towards the lower row number, so the result does not depend on the threads.

#if defined(__x86_64__)
#include <immintrin.h>
#elif defined(__aarch64__)
#include <arm_neon.h>
#include <sys/auxv.h>
#endif

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <mutex>
#include <string>
#include <type_traits>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kSmallQ = 8;              // up to this many queries: the row-at-a-time loop
constexpr int kMaxTiles = 4;            // tiles of 16 queries per pass: 32 KB at 512 bytes, in L1
constexpr int64_t kBlockRows = 2048;    // rows per unit of work handed to a thread
constexpr int64_t kPrefetchBytes = 8192;  // software prefetch distance along the rows
static_assert(kMaxTiles == 4, "ScanMany dispatches groups of 1 to 4 tiles");

#if defined(__x86_64__)
// The kernels are compiled for these extensions and only called after a runtime check of the one
// their element type needs (VNNI for int8, BF16 for bfloat16).
#define KERNEL_TARGET __attribute__((target("avx512f,avx512bw,avx512vnni,avx512bf16")))
#define VNNI_TARGET __attribute__((target("avx512f,avx512bw,avx512vnni")))
#define AVX2_TARGET __attribute__((target("avx2,fma,f16c")))
#endif

// The `isa` attribute of the handlers: 0 the best this CPU runs.
constexpr int64_t kIsaAvx2 = 1;
constexpr int64_t kIsaAvx512 = 2;
constexpr int64_t kIsaNeon = 3;  // AArch64: Advanced SIMD (sdot where the library was built with it)

struct Cand {
  float s;
  int32_t i;
};

// a ranks before b: higher score, then the lower row.
inline bool Before(float s, int32_t i, const Cand& b) { return s > b.s || (s == b.s && i < b.i); }

// A bounded heap of the k best candidates; the worst one is at the root.
struct Heap {
  Cand* h;
  int k;
  int n;
  float* thr;  // the score a candidate must reach (-inf until full); read by the vector compare

  void Push(float s, int32_t i) {
    if (!(s > -std::numeric_limits<float>::infinity())) return;  // -inf (masked rows) and NaN
    if (n < k) {
      int c = n++;
      while (c > 0) {  // sift up: parents rank before children
        int p = (c - 1) / 2;
        if (!Before(h[p].s, h[p].i, Cand{s, i})) break;
        h[c] = h[p];
        c = p;
      }
      h[c] = Cand{s, i};
      if (n == k) *thr = h[0].s;
      return;
    }
    if (!Before(s, i, h[0])) return;
    int c = 0;
    for (;;) {  // sift down from the root
      int l = 2 * c + 1;
      if (l >= k) break;
      int w = l;
      if (l + 1 < k && Before(h[l].s, h[l].i, h[l + 1])) w = l + 1;  // the worse child
      if (!Before(s, i, h[w])) break;  // the candidate is the worse: it stays here
      h[c] = h[w];
      c = w;
    }
    h[c] = Cand{s, i};
    *thr = h[0].s;
  }
};

#if defined(__x86_64__)
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

#endif  // __x86_64__

struct Problem {
  const uint8_t* m;        // [N, row_bytes]
  const float* scale;
  const float* bias;
  const float* qmul;
  const uint8_t* qpacked;  // few: [Q][kSplit][dp] bytes; many: [T][row_bytes/4][16][4]
                           // (dp: the row padded to 64 bytes, times kQBytes / 64)
  int64_t n, d, row_bytes, dp, q, tiles, k;
};

struct Worker {
  std::vector<Cand> cand;    // [Q][k]
  std::vector<float> thr;    // [tiles * 16]
  std::vector<Heap> heaps;   // [Q]
  std::vector<int32_t> rowsum;  // row sums of the block being scanned (int8)
  std::vector<float> wide;      // rows widened to float32 (AVX2 float16 / bfloat16, many queries)
  void Init(const Problem& p) {
    cand.resize(p.q * p.k);
    // Padding lanes never pass the compare; real queries start at -inf.
    thr.assign(std::max<int64_t>(p.tiles, 1) * 16, std::numeric_limits<float>::infinity());
    std::fill(thr.begin(), thr.begin() + p.q, -std::numeric_limits<float>::infinity());
    heaps.resize(p.q);
    for (int64_t j = 0; j < p.q; ++j) heaps[j] = Heap{cand.data() + j * p.k, int(p.k), 0, &thr[j]};
  }
};

#if defined(__x86_64__)
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
  float qm[Q];
  for (int j = 0; j < Q; ++j) qm[j] = p.qmul[j];
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
    const float sc = p.scale[r], b = p.bias[r];
    for (int j = 0; j < Q; ++j) {
      float s = E::Score(acc[j], rs) * sc * qm[j] + b;
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
    for (int g = 0; g < G; ++g) {
      const int64_t t = t0 + g;
      __m512 s = E::Scores(acc[i][g], rs);
      s = _mm512_add_ps(_mm512_mul_ps(_mm512_mul_ps(s, sc), _mm512_loadu_ps(p.qmul + t * 16)), b);
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

// ---- AVX2 + FMA + F16C: 32 bytes of a row at a time, tiles of 8 queries ----

// Bytes [j, j + 32) of a row of `bytes` bytes (a multiple of 4); zeros past its end.
AVX2_TARGET inline __m256i LoadRow32(const uint8_t* p, int64_t j, int64_t bytes) {
  if (j + 32 <= bytes) return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + j));
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(int((bytes - j) / 4)), lane);
  return _mm256_maskload_epi32(reinterpret_cast<const int*>(p + j), mask);
}

AVX2_TARGET inline int32_t HsumI32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}

AVX2_TARGET inline float HsumF32(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// int8 rows: |row| as the unsigned operand of vpmaddubsw, the query with the row's sign as the
// signed one; vpmaddwd with ones widens the pairs to s32.
struct Int8Avx2 {
  using Acc = __m256i;
  struct Row {
    __m256i x, ax;
  };
  static constexpr int kQBytes = 64;  // signed query bytes per 64 bytes of a row
  AVX2_TARGET static Acc Zero() { return _mm256_setzero_si256(); }
  AVX2_TARGET static Row Prep(__m256i x) { return Row{x, _mm256_abs_epi8(x)}; }
  AVX2_TARGET static Acc Dot(Acc a, __m256i q, const Row& r) {
    const __m256i p = _mm256_maddubs_epi16(r.ax, _mm256_sign_epi8(q, r.x));
    return _mm256_add_epi32(a, _mm256_madd_epi16(p, _mm256_set1_epi16(1)));
  }
  AVX2_TARGET static Acc DotRow(Acc a, const uint8_t* q, const Row& r) {
    return Dot(a, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q)), r);
  }
  AVX2_TARGET static float Score(Acc a) { return float(HsumI32(a)); }
};

// bfloat16 and float16 rows, widened exactly to float32, against float32 queries.
template <bool kHalf>
struct FloatAvx2 {
  using Acc = __m256;
  struct Row {
    __m256 lo, hi;  // elements 0-7 and 8-15 of the 32 bytes
  };
  static constexpr int kQBytes = 128;  // 16 elements of a row meet 16 float32 query values
  AVX2_TARGET static Acc Zero() { return _mm256_setzero_ps(); }
  AVX2_TARGET static Row Prep(__m256i x) {
    const __m128i a = _mm256_castsi256_si128(x), b = _mm256_extracti128_si256(x, 1);
    if constexpr (kHalf) return Row{_mm256_cvtph_ps(a), _mm256_cvtph_ps(b)};
    return Row{_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(a), 16)),
               _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(b), 16))};
  }
  AVX2_TARGET static Acc DotRow(Acc a, const uint8_t* q, const Row& r) {
    const float* qf = reinterpret_cast<const float*>(q);
    a = _mm256_fmadd_ps(_mm256_loadu_ps(qf), r.lo, a);
    return _mm256_fmadd_ps(_mm256_loadu_ps(qf + 8), r.hi, a);
  }
  AVX2_TARGET static float Score(Acc a) { return HsumF32(a); }
};

template <int Q, class E>
AVX2_TARGET void ScanSmallAvx2(const Problem& p, Worker& w, int64_t r0, int64_t r1) {
  float qm[Q];
  for (int j = 0; j < Q; ++j) qm[j] = p.qmul[j];
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* row = p.m + r * p.row_bytes;
    typename E::Acc acc[Q];
    for (int j = 0; j < Q; ++j) acc[j] = E::Zero();
    for (int64_t c = 0; c < p.row_bytes; c += 32) {
      if (c % 64 == 0)
        _mm_prefetch(reinterpret_cast<const char*>(row + kPrefetchBytes + c), _MM_HINT_T0);
      const typename E::Row x = E::Prep(LoadRow32(row, c, p.row_bytes));
      for (int j = 0; j < Q; ++j)
        acc[j] = E::DotRow(acc[j], p.qpacked + j * p.dp + c * (E::kQBytes / 64), x);
    }
    const float sc = p.scale[r], b = p.bias[r];
    for (int j = 0; j < Q; ++j) {
      float s = E::Score(acc[j]) * sc * qm[j] + b;
      if (s >= w.thr[j]) w.heaps[j].Push(s, int32_t(r));
    }
  }
}

// Scores of one row against tile t of 8 queries from its 8 products: the heaps of the queries
// whose threshold they reach get them.
AVX2_TARGET inline void Emit8(const Problem& p, Worker& w, int64_t row, int64_t t, __m256 dot) {
  const __m256 sc = _mm256_set1_ps(p.scale[row]);
  const __m256 s = _mm256_add_ps(_mm256_mul_ps(_mm256_mul_ps(dot, sc), _mm256_loadu_ps(p.qmul + t * 8)),
                                 _mm256_set1_ps(p.bias[row]));
  int hit =
      _mm256_movemask_ps(_mm256_cmp_ps(s, _mm256_loadu_ps(w.thr.data() + t * 8), _CMP_GE_OQ));
  if (!hit) return;
  alignas(32) float sv[8];
  _mm256_store_ps(sv, s);
  while (hit) {
    const int lane = __builtin_ctz(hit);
    hit &= hit - 1;
    const int64_t qi = t * 8 + lane;
    if (qi < p.q) w.heaps[qi].Push(sv[lane], int32_t(row));
  }
}

// R int8 rows against G tiles of 8 queries packed as [T][row_bytes/4][8][4] (signed bytes).
template <int R, int G>
AVX2_TARGET inline void MicroAvx2(const Problem& p, Worker& w, int64_t r, int64_t t0) {
  __m256i acc[R][G];
  for (int i = 0; i < R; ++i)
    for (int g = 0; g < G; ++g) acc[i][g] = _mm256_setzero_si256();
  const uint8_t* rows[R];
  for (int i = 0; i < R; ++i) rows[i] = p.m + (r + i) * p.row_bytes;
  const int64_t groups = p.row_bytes / 4;
  const uint8_t* qp = p.qpacked + t0 * groups * 32;
  const __m256i ones = _mm256_set1_epi16(1);
  for (int64_t j = 0; j < groups; ++j) {
    if (j % 16 == 0)
      for (int i = 0; i < R; ++i)
        _mm_prefetch(reinterpret_cast<const char*>(rows[i] + kPrefetchBytes + 4 * j), _MM_HINT_T1);
    __m256i x[R], ax[R];
    for (int i = 0; i < R; ++i) {
      int32_t v;
      std::memcpy(&v, rows[i] + 4 * j, 4);
      x[i] = _mm256_set1_epi32(v);
      ax[i] = _mm256_abs_epi8(x[i]);
    }
    for (int g = 0; g < G; ++g) {
      const __m256i qv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qp + (g * groups + j) * 32));
      for (int i = 0; i < R; ++i) {
        const __m256i pr = _mm256_maddubs_epi16(ax[i], _mm256_sign_epi8(qv, x[i]));
        acc[i][g] = _mm256_add_epi32(acc[i][g], _mm256_madd_epi16(pr, ones));
      }
    }
  }
  for (int i = 0; i < R; ++i)
    for (int g = 0; g < G; ++g) Emit8(p, w, r + i, t0 + g, _mm256_cvtepi32_ps(acc[i][g]));
}

// R rows (float32, `dw` apart at `wide`) against G tiles of 8 queries (packed [T][D][8] from tile
// t0 at `qp`) over dimensions [j0, j1), adding to the partial sums at `c` (rows `cs` apart).
template <int R, int G>
AVX2_TARGET inline void FloatPanel(const float* wide, int64_t dw, const float* qp, int64_t d,
                                   int64_t j0, int64_t j1, float* c, int64_t cs) {
  __m256 acc[R][G];
#pragma GCC unroll 8
  for (int i = 0; i < R; ++i)
#pragma GCC unroll 2
    for (int g = 0; g < G; ++g) acc[i][g] = _mm256_setzero_ps();
  for (int64_t j = j0; j < j1; ++j) {
    __m256 qv[G];
#pragma GCC unroll 2
    for (int g = 0; g < G; ++g) qv[g] = _mm256_loadu_ps(qp + (g * d + j) * 8);
#pragma GCC unroll 8
    for (int i = 0; i < R; ++i) {
      const __m256 x = _mm256_broadcast_ss(wide + i * dw + j);
#pragma GCC unroll 2
      for (int g = 0; g < G; ++g) acc[i][g] = _mm256_fmadd_ps(qv[g], x, acc[i][g]);
    }
  }
  // Added at the end: accumulators loaded from memory stayed on the stack (GCC 12).
  for (int i = 0; i < R; ++i)
    for (int g = 0; g < G; ++g) {
      float* out = c + i * cs + g * 8;
      _mm256_storeu_ps(out, _mm256_add_ps(_mm256_loadu_ps(out), acc[i][g]));
    }
}

// FloatPanel<6, 2> with twelve named accumulators: as an array, GCC 12 stored all of them to the
// stack on every step (half the speed).
AVX2_TARGET void FloatPanel62(const float* wide, int64_t dw, const float* qp, int64_t d,
                              int64_t j0, int64_t j1, float* c, int64_t cs) {
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, b0 = a0, b1 = a0,
         b2 = a0, b3 = a0, b4 = a0, b5 = a0;
  for (int64_t j = j0; j < j1; ++j) {
    const __m256 q0 = _mm256_loadu_ps(qp + j * 8), q1 = _mm256_loadu_ps(qp + (d + j) * 8);
    __m256 x = _mm256_broadcast_ss(wide + j);
    a0 = _mm256_fmadd_ps(q0, x, a0);
    b0 = _mm256_fmadd_ps(q1, x, b0);
    x = _mm256_broadcast_ss(wide + dw + j);
    a1 = _mm256_fmadd_ps(q0, x, a1);
    b1 = _mm256_fmadd_ps(q1, x, b1);
    x = _mm256_broadcast_ss(wide + 2 * dw + j);
    a2 = _mm256_fmadd_ps(q0, x, a2);
    b2 = _mm256_fmadd_ps(q1, x, b2);
    x = _mm256_broadcast_ss(wide + 3 * dw + j);
    a3 = _mm256_fmadd_ps(q0, x, a3);
    b3 = _mm256_fmadd_ps(q1, x, b3);
    x = _mm256_broadcast_ss(wide + 4 * dw + j);
    a4 = _mm256_fmadd_ps(q0, x, a4);
    b4 = _mm256_fmadd_ps(q1, x, b4);
    x = _mm256_broadcast_ss(wide + 5 * dw + j);
    a5 = _mm256_fmadd_ps(q0, x, a5);
    b5 = _mm256_fmadd_ps(q1, x, b5);
  }
  const __m256 a[6] = {a0, a1, a2, a3, a4, a5}, b[6] = {b0, b1, b2, b3, b4, b5};
  for (int i = 0; i < 6; ++i) {
    float* out = c + i * cs;
    _mm256_storeu_ps(out, _mm256_add_ps(_mm256_loadu_ps(out), a[i]));
    _mm256_storeu_ps(out + 8, _mm256_add_ps(_mm256_loadu_ps(out + 8), b[i]));
  }
}

template <int G>
AVX2_TARGET void FloatPanels(const float* wide, int64_t dw, const float* qp, int64_t d, int64_t j0,
                             int64_t j1, float* c, int64_t cs, int64_t m) {
  int64_t i = 0;  // 6 rows x 2 tiles: 12 accumulators, 2 query vectors and a broadcast
  for (; i + 6 <= m; i += 6) {
    if constexpr (G == 2) {
      FloatPanel62(wide + i * dw, dw, qp, d, j0, j1, c + i * cs, cs);
    } else {
      FloatPanel<6, G>(wide + i * dw, dw, qp, d, j0, j1, c + i * cs, cs);
    }
  }
  for (; i < m; ++i) FloatPanel<1, G>(wide + i * dw, dw, qp, d, j0, j1, c + i * cs, cs);
}

// Many queries over float16 / bfloat16 rows: groups of kRows rows are widened to float32 once,
// then multiplied with every tile of queries kDepth dimensions at a time (a GEMM blocking: the
// queries' slice and the rows' slice stay in L1, the partial sums of the group in L2).
template <class E>
AVX2_TARGET void FloatManyAvx2(const Problem& p, Worker& w, int64_t r0, int64_t r1) {
  constexpr int64_t kRows = 48, kDepth = 128;
  const int64_t dw = (p.d + 15) / 16 * 16, cs = p.tiles * 8;
  w.wide.resize(kRows * (dw + cs));
  float* wide = w.wide.data();
  float* c = wide + kRows * dw;
  const float* qp = reinterpret_cast<const float*>(p.qpacked);
  for (int64_t r = r0; r < r1; r += kRows) {
    const int64_t m = std::min(kRows, r1 - r);
    for (int64_t i = 0; i < m; ++i) {
      const uint8_t* row = p.m + (r + i) * p.row_bytes;
      for (int64_t b = 0; b < p.row_bytes; b += 32) {
        const typename E::Row x = E::Prep(LoadRow32(row, b, p.row_bytes));
        _mm256_storeu_ps(wide + i * dw + b / 2, x.lo);
        _mm256_storeu_ps(wide + i * dw + b / 2 + 8, x.hi);
      }
    }
    std::fill(c, c + m * cs, 0.0f);
    for (int64_t j0 = 0; j0 < p.d; j0 += kDepth) {
      const int64_t j1 = std::min(p.d, j0 + kDepth);
      int64_t t = 0;
      for (; t + 2 <= p.tiles; t += 2)
        FloatPanels<2>(wide, dw, qp + t * p.d * 8, p.d, j0, j1, c + t * 8, cs, m);
      if (t < p.tiles) FloatPanels<1>(wide, dw, qp + t * p.d * 8, p.d, j0, j1, c + t * 8, cs, m);
    }
    for (int64_t i = 0; i < m; ++i)
      for (int64_t t = 0; t < p.tiles; ++t)
        Emit8(p, w, r + i, t, _mm256_loadu_ps(c + i * cs + t * 8));
  }
}

// acc + the s32 sums of |x| * sign(q, x) over pairs of bytes.
AVX2_TARGET __attribute__((always_inline)) inline __m256i Dot8(__m256i acc, __m256i ax, __m256i x,
                                                               __m256i q, __m256i ones) {
  return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(ax, _mm256_sign_epi8(q, x)), ones));
}

// MicroAvx2<3, 2> with six named accumulators (as an array GCC 12 kept one on the stack).
AVX2_TARGET void Int8Micro32(const Problem& p, Worker& w, int64_t r, int64_t t0) {
  const uint8_t* r0 = p.m + r * p.row_bytes;
  const uint8_t* r1 = r0 + p.row_bytes;
  const uint8_t* r2 = r1 + p.row_bytes;
  const int64_t groups = p.row_bytes / 4;
  const uint8_t* qp = p.qpacked + t0 * groups * 32;
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, b0 = a0, b1 = a0, b2 = a0;
  for (int64_t j = 0; j < groups; ++j) {
    if (j % 16 == 0) {
      _mm_prefetch(reinterpret_cast<const char*>(r0 + kPrefetchBytes + 4 * j), _MM_HINT_T1);
      _mm_prefetch(reinterpret_cast<const char*>(r1 + kPrefetchBytes + 4 * j), _MM_HINT_T1);
      _mm_prefetch(reinterpret_cast<const char*>(r2 + kPrefetchBytes + 4 * j), _MM_HINT_T1);
    }
    int32_t v0, v1, v2;
    std::memcpy(&v0, r0 + 4 * j, 4);
    std::memcpy(&v1, r1 + 4 * j, 4);
    std::memcpy(&v2, r2 + 4 * j, 4);
    const __m256i x0 = _mm256_set1_epi32(v0), x1 = _mm256_set1_epi32(v1),
                  x2 = _mm256_set1_epi32(v2);
    const __m256i ax0 = _mm256_abs_epi8(x0), ax1 = _mm256_abs_epi8(x1), ax2 = _mm256_abs_epi8(x2);
    const __m256i q0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qp + j * 32));
    const __m256i q1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qp + (groups + j) * 32));
    a0 = Dot8(a0, ax0, x0, q0, ones);
    b0 = Dot8(b0, ax0, x0, q1, ones);
    a1 = Dot8(a1, ax1, x1, q0, ones);
    b1 = Dot8(b1, ax1, x1, q1, ones);
    a2 = Dot8(a2, ax2, x2, q0, ones);
    b2 = Dot8(b2, ax2, x2, q1, ones);
  }
  Emit8(p, w, r, t0, _mm256_cvtepi32_ps(a0));
  Emit8(p, w, r, t0 + 1, _mm256_cvtepi32_ps(b0));
  Emit8(p, w, r + 1, t0, _mm256_cvtepi32_ps(a1));
  Emit8(p, w, r + 1, t0 + 1, _mm256_cvtepi32_ps(b1));
  Emit8(p, w, r + 2, t0, _mm256_cvtepi32_ps(a2));
  Emit8(p, w, r + 2, t0 + 1, _mm256_cvtepi32_ps(b2));
}

template <int G>
AVX2_TARGET void ScanTilesAvx2(const Problem& p, Worker& w, int64_t r0, int64_t r1, int64_t t0) {
  constexpr int R = G == 2 ? 3 : 4;  // accumulators, |rows| and rows fit 16 registers
  int64_t r = r0;
  for (; r + R <= r1; r += R) {
    if constexpr (G == 2) {
      Int8Micro32(p, w, r, t0);
    } else {
      MicroAvx2<R, G>(p, w, r, t0);
    }
  }
  for (; r < r1; ++r) MicroAvx2<1, G>(p, w, r, t0);
}

template <class E>
void ScanBlockAvx2(const Problem& p, Worker& w, int64_t r0, int64_t r1) {
  switch (p.q) {
    case 1: ScanSmallAvx2<1, E>(p, w, r0, r1); return;
    case 2: ScanSmallAvx2<2, E>(p, w, r0, r1); return;
    case 3: ScanSmallAvx2<3, E>(p, w, r0, r1); return;
    case 4: ScanSmallAvx2<4, E>(p, w, r0, r1); return;
    case 5: ScanSmallAvx2<5, E>(p, w, r0, r1); return;
    case 6: ScanSmallAvx2<6, E>(p, w, r0, r1); return;
    case 7: ScanSmallAvx2<7, E>(p, w, r0, r1); return;
    case 8: ScanSmallAvx2<8, E>(p, w, r0, r1); return;
    default:
      if constexpr (std::is_same_v<E, Int8Avx2>) {  // pairs of tiles, then a last single one
        int64_t t = 0;
        for (; t + 2 <= p.tiles; t += 2) ScanTilesAvx2<2>(p, w, r0, r1, t);
        if (t < p.tiles) ScanTilesAvx2<1>(p, w, r0, r1, t);
      } else {
        FloatManyAvx2<E>(p, w, r0, r1);
      }
      return;
  }
}

#elif defined(__aarch64__)
// ---- AArch64 Advanced SIMD: 16 bytes of a row at a time, few queries ----

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
  float qm[Q];
  for (int j = 0; j < Q; ++j) qm[j] = p.qmul[j];
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
    const float sc = p.scale[r], b = p.bias[r];
    for (int j = 0; j < Q; ++j) {
      float s = E::Score(acc[j]) * sc * qm[j] + b;
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
#endif  // __aarch64__

// Work shared between the calling thread and pool tasks; tasks that start after the work is gone
// return at once, so no one waits for a task the pool never runs.
struct Shared {
  Problem p;
  void (*scan)(const Problem&, Worker&, int64_t, int64_t);
  int64_t blocks;
  std::atomic<int64_t> next{0};
  std::atomic<int> slots{0};
  std::vector<Worker> workers;
  std::mutex mu;
  std::condition_variable cv;
  int64_t done = 0;

  void Run() {
    int64_t b = next.fetch_add(1);
    if (b >= blocks) return;
    const int slot = slots.fetch_add(1);
    Worker& w = workers[slot];
    w.Init(p);
    int64_t mine = 0;
    for (; b < blocks; b = next.fetch_add(1), ++mine) {
      const int64_t r0 = b * kBlockRows;
      scan(p, w, r0, std::min(p.n, r0 + kBlockRows));
    }
    std::lock_guard<std::mutex> lock(mu);
    done += mine;
    if (done == blocks) cv.notify_all();
  }
};

#if defined(__x86_64__)
bool Avx512Bw() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");
}

bool Avx2Fma() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
         __builtin_cpu_supports("f16c");
}

// The paths (bit kIsa*) that the kernel of dtype 0 (int8), 1 (bfloat16) or 2 (float16) has here.
int IsaMask(int dtype) {
  if (dtype < 0 || dtype > 2) return 0;
  int mask = Avx2Fma() ? 1 << kIsaAvx2 : 0;
  const bool ext = dtype == 0   ? __builtin_cpu_supports("avx512vnni")
                   : dtype == 1 ? __builtin_cpu_supports("avx512bf16")
                                : true;
  if (Avx512Bw() && ext) mask |= 1 << kIsaAvx512;
  return mask;
}
#elif defined(__aarch64__)
int IsaMask(int dtype) { return dtype >= 0 && dtype <= 2 ? 1 << kIsaNeon : 0; }  // NEON is base
#else
int IsaMask(int) { return 0; }
#endif

// The path a call runs: the best of `mask` when `want` is 0, else `want` if the CPU has it; -1: none.
int64_t Resolve(int64_t want, int mask) {
  if (want == 0) {
    for (int64_t isa : {kIsaAvx512, kIsaAvx2, kIsaNeon})
      if (mask >> isa & 1) return isa;
    return -1;
  }
  return want > 0 && want <= kIsaNeon && (mask >> want & 1) ? want : -1;
}

// One scan loop and the query layout it reads.
struct Kernel {
  void (*scan)(const Problem&, Worker&, int64_t, int64_t);
  int qbytes;  // few queries: packed query bytes per 64 bytes of a row
  int lanes;   // many queries: queries per tile (16 AVX-512, 8 AVX2); 0: few queries only
};

// Checks shapes, runs the scan over XLA's thread pool and writes the merged top-k. `pack` fills
// `packed` with the queries in the layout of the loop that will run (p.q, p.d and p.dp are set).
template <class Pack>
ffi::Error ScanTopK(const char* name, const Kernel& kern, ffi::ThreadPool& pool, ffi::Span<const int64_t> qd,
                    ffi::Span<const int64_t> md, int64_t esize, const void* m,
                    ffi::Buffer<ffi::F32>& scale, ffi::Buffer<ffi::F32>& qmul,
                    ffi::Buffer<ffi::F32>& bias, ffi::ResultBuffer<ffi::F32>& out_s,
                    ffi::ResultBuffer<ffi::S32>& out_i, Pack pack) {
  auto od = out_s->dimensions();
  if (qd.size() != 2 || md.size() != 2 || qd[1] != md[1] || od.size() != 2 || od[0] != qd[0])
    return ffi::Error::InvalidArgument(std::string(name) +
                                       ": expected queries [Q, D], rows [N, D], out [Q, k]");
  const int64_t nq = qd[0], d = qd[1], n = md[0], k = od[1];
  if (!kern.lanes && nq > kSmallQ)
    return ffi::Error::InvalidArgument(std::string(name) + ": at most 8 queries per call");
  if (scale.element_count() != size_t(n) || bias.element_count() != size_t(n) ||
      qmul.element_count() != size_t(nq))
    return ffi::Error::InvalidArgument(std::string(name) + ": scale/bias need [N], qmul [Q]");
  if ((d * esize) % 4 != 0 || d > 65536)
    return ffi::Error::InvalidArgument(std::string(name) +
                                       ": rows must be a multiple of 4 bytes, D <= 65536");
  auto sh = std::make_shared<Shared>();
  Problem& p = sh->p;
  sh->scan = kern.scan;
  p.m = static_cast<const uint8_t*>(m);
  p.scale = scale.typed_data();
  p.bias = bias.typed_data();
  p.n = n;
  p.row_bytes = d * esize;
  p.d = d;
  p.q = nq;
  p.k = k;
  p.tiles = (nq + 15) / 16;
  std::vector<uint8_t> packed;
  std::vector<float> qm;
  if (nq <= kSmallQ) {
    p.dp = (p.row_bytes + 63) / 64 * kern.qbytes;
    qm.assign(qmul.typed_data(), qmul.typed_data() + nq);
  } else {
    p.dp = p.row_bytes;
    p.tiles = (nq + kern.lanes - 1) / kern.lanes;
    qm.assign(p.tiles * kern.lanes, 0.0f);
    std::copy(qmul.typed_data(), qmul.typed_data() + nq, qm.begin());
  }
  pack(p, packed);
  p.qpacked = packed.data();
  p.qmul = qm.data();

  sh->blocks = (n + kBlockRows - 1) / kBlockRows;
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), sh->blocks - 1);
  sh->workers.resize(helpers + 1);
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule([sh] { sh->Run(); });
  sh->Run();
  if (sh->blocks > 0) {
    std::unique_lock<std::mutex> lock(sh->mu);
    sh->cv.wait(lock, [&] { return sh->done == sh->blocks; });
  }

  // Merge the workers' heaps: best first, ties to the lower row; -inf / -1 where fewer than k.
  float* os = out_s->typed_data();
  int32_t* oi = out_i->typed_data();
  const int used = sh->slots.load();
  std::vector<Cand> all;
  for (int64_t j = 0; j < nq; ++j) {
    all.clear();
    for (int s = 0; s < used; ++s) {
      const Heap& h = sh->workers[s].heaps[j];
      all.insert(all.end(), h.h, h.h + h.n);
    }
    const int64_t take = std::min<int64_t>(k, all.size());
    std::partial_sort(all.begin(), all.begin() + take, all.end(),
                      [](const Cand& a, const Cand& b) { return Before(a.s, a.i, b); });
    for (int64_t c = 0; c < k; ++c) {
      os[j * k + c] = c < take ? all[c].s : -std::numeric_limits<float>::infinity();
      oi[j * k + c] = c < take ? all[c].i : -1;
    }
  }
  return ffi::Error::Success();

}

}  // namespace

// Bit kIsa* set for each path the kernel of `dtype` (0 int8, 1 bfloat16, 2 float16) runs here.
extern "C" int vgg_topk_isas(int dtype) { return IsaMask(dtype); }

// The instruction ceiling of the int8 path in use, one thread for about `seconds`, in GOP/s (one
// multiply-add = 2 operations): 12 independent vpdpbusd (VNNI), or 6 independent vpmaddubsw +
// vpmaddwd + vpaddd (AVX2). Benchmarks run it on every core at once for the floor.
#if defined(__x86_64__)
static VNNI_TARGET double VnniPeak(int64_t iters) {
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
    __asm__ volatile("" : "+v"(c0), "+v"(c1), "+v"(c2), "+v"(c3), "+v"(c4), "+v"(c5), "+v"(c6),
                     "+v"(c7), "+v"(c8), "+v"(c9), "+v"(c10), "+v"(c11));
  }
  const __m512i s0 = _mm512_add_epi32(_mm512_add_epi32(c0, c1), _mm512_add_epi32(c2, c3));
  const __m512i s1 = _mm512_add_epi32(_mm512_add_epi32(c4, c5), _mm512_add_epi32(c6, c7));
  const __m512i s2 = _mm512_add_epi32(_mm512_add_epi32(c8, c9), _mm512_add_epi32(c10, c11));
  volatile int32_t sink = _mm512_reduce_add_epi32(_mm512_add_epi32(_mm512_add_epi32(s0, s1), s2));
  (void)sink;
  return double(iters) * 12 * 64 * 2;
}

static AVX2_TARGET double Avx2Peak(int64_t iters) {
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i a = _mm256_set1_epi32(0x01020304), b0 = _mm256_set1_epi32(0x01010101), b1 = b0, b2 = b0,
          b3 = b0, b4 = b0, b5 = b0;
  __m256i c0 = _mm256_setzero_si256(), c1 = c0, c2 = c0, c3 = c0, c4 = c0, c5 = c0;
  for (int64_t i = 0; i < iters; ++i) {
    // Opaque operands each time: the products must not be computed once and hoisted.
    __asm__ volatile("" : "+x"(a), "+x"(b0), "+x"(b1), "+x"(b2), "+x"(b3), "+x"(b4), "+x"(b5));
    c0 = _mm256_add_epi32(c0, _mm256_madd_epi16(_mm256_maddubs_epi16(a, b0), ones));
    c1 = _mm256_add_epi32(c1, _mm256_madd_epi16(_mm256_maddubs_epi16(a, b1), ones));
    c2 = _mm256_add_epi32(c2, _mm256_madd_epi16(_mm256_maddubs_epi16(a, b2), ones));
    c3 = _mm256_add_epi32(c3, _mm256_madd_epi16(_mm256_maddubs_epi16(a, b3), ones));
    c4 = _mm256_add_epi32(c4, _mm256_madd_epi16(_mm256_maddubs_epi16(a, b4), ones));
    c5 = _mm256_add_epi32(c5, _mm256_madd_epi16(_mm256_maddubs_epi16(a, b5), ones));
  }
  const __m256i s = _mm256_add_epi32(_mm256_add_epi32(_mm256_add_epi32(c0, c1), c2),
                                     _mm256_add_epi32(_mm256_add_epi32(c3, c4), c5));
  volatile int32_t sink = HsumI32(s);
  (void)sink;
  return double(iters) * 6 * 32 * 2;
}

#elif defined(__aarch64__)
static double NeonPeak(int64_t iters) {  // 8 independent chains of the int8 dot of Int8Neon
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
#endif

extern "C" double vgg_int8_peak_gops(double seconds) {
  const int64_t isa = Resolve(0, IsaMask(0));
  if (isa < 0) return 0.0;
  const auto t0 = std::chrono::steady_clock::now();
  double ops = 0, sec = 0;
  while (sec < seconds) {
#if defined(__x86_64__)
    ops += isa == kIsaAvx512 ? VnniPeak(1 << 16) : Avx2Peak(1 << 16);
#elif defined(__aarch64__)
    ops += NeonPeak(1 << 16);
#endif
    sec = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  }
  return ops / sec / 1e9;
}

// Byte offset of byte `b` of query j's row in the many-query layout [Q/L][row_bytes/4][L][4] of
// tiles of L queries.
static int64_t TileOffset(int64_t j, int64_t b, int64_t groups, int64_t lanes = 16) {
  return (((j / lanes) * groups + b / 4) * lanes + j % lanes) * 4 + b % 4;
}

// Queries [Q, D] float32 as the loops of float rows read them. Few: [Q][dp] float32, 0-padded.
// Many (AVX2): tiles of 8 queries interleaved by element, [Q/8][D][8] float32, 0-padded.
static void PackFloat(const float* qs, const Problem& p, std::vector<uint8_t>& packed) {
  if (p.q <= kSmallQ) {
    packed.assign(p.q * p.dp, 0);
    for (int64_t j = 0; j < p.q; ++j) std::memcpy(&packed[j * p.dp], qs + j * p.d, 4 * p.d);
    return;
  }
  packed.assign(p.tiles * p.d * 8 * 4, 0);
  float* out = reinterpret_cast<float*>(packed.data());
  for (int64_t j = 0; j < p.q; ++j)
    for (int64_t c = 0; c < p.d; ++c) out[((j / 8) * p.d + c) * 8 + j % 8] = qs[j * p.d + c];
}

static ffi::Error NoPath(const char* name, int64_t want) {
  return ffi::Error::Internal(std::string(name) + ": this CPU runs no " +
                              (want == kIsaAvx2     ? "AVX2"
                               : want == kIsaAvx512 ? "AVX-512"
                               : want == kIsaNeon   ? "NEON"
                                                    : "") +
                              " path of this kernel");
}

static ffi::Error Int8TopK(ffi::ThreadPool pool, ffi::Buffer<ffi::S8> q8, ffi::Buffer<ffi::S8> m,
                           ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> qmul,
                           ffi::Buffer<ffi::F32> bias, ffi::ResultBuffer<ffi::F32> out_s,
                           ffi::ResultBuffer<ffi::S32> out_i, int64_t want) {
  const int64_t isa = Resolve(want, IsaMask(0));
  if (isa < 0) return NoPath("int8_topk", want);
  const int8_t* qs = q8.typed_data();
#if defined(__aarch64__)
  auto pack = [qs](const Problem& p, std::vector<uint8_t>& packed) {  // signed, few queries
    packed.assign(p.q * p.dp, 0);
    for (int64_t j = 0; j < p.q; ++j) std::memcpy(&packed[j * p.dp], qs + j * p.d, p.d);
  };
  return ScanTopK("int8_topk", Kernel{&ScanBlockNeon<Int8Neon>, Int8Neon::kQBytes, 0}, pool,
                  q8.dimensions(), m.dimensions(), 1, m.typed_data(), scale, qmul, bias, out_s,
                  out_i, pack);
#elif defined(__x86_64__)
  if (isa == kIsaAvx2) {  // signed queries; tiles of 8 for many
    auto pack = [qs](const Problem& p, std::vector<uint8_t>& packed) {
      const int64_t nq = p.q, d = p.d;
      if (nq <= kSmallQ) {
        packed.assign(nq * p.dp, 0);
        for (int64_t j = 0; j < nq; ++j) std::memcpy(&packed[j * p.dp], qs + j * d, d);
        return;
      }
      const int64_t groups = d / 4;
      packed.assign(p.tiles * groups * 32, 0);
      for (int64_t j = 0; j < nq; ++j)
        for (int64_t c = 0; c < d; ++c)
          packed[TileOffset(j, c, groups, 8)] = uint8_t(qs[j * d + c]);
    };
    return ScanTopK("int8_topk", Kernel{&ScanBlockAvx2<Int8Avx2>, Int8Avx2::kQBytes, 8}, pool,
                    q8.dimensions(), m.dimensions(), 1, m.typed_data(), scale, qmul, bias, out_s,
                    out_i, pack);
  }
  // Queries as unsigned bytes (q + 128); the many-query loop wants them interleaved by 16.
  auto pack = [qs](const Problem& p, std::vector<uint8_t>& packed) {
    const int64_t nq = p.q, d = p.d;
    if (nq <= kSmallQ) {
      packed.assign(nq * p.dp, 128);
      for (int64_t j = 0; j < nq; ++j)
        for (int64_t c = 0; c < d; ++c) packed[j * p.dp + c] = uint8_t(qs[j * d + c] + 128);
      return;
    }
    const int64_t groups = d / 4;
    packed.assign(p.tiles * groups * 64, 128);
    for (int64_t j = 0; j < nq; ++j)
      for (int64_t c = 0; c < d; ++c)
        packed[TileOffset(j, c, groups)] = uint8_t(qs[j * d + c] + 128);
  };
  return ScanTopK("int8_topk", Kernel{&ScanBlock<Int8>, Int8::kQBytes, 16}, pool, q8.dimensions(),
                  m.dimensions(), 1, m.typed_data(), scale, qmul, bias, out_s, out_i, pack);
#else
  return NoPath("int8_topk", want);
#endif
}

// Round-to-nearest-even float32 -> bfloat16 bits (queries are finite).
static uint16_t ToBf16(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  return uint16_t((u + 0x7FFF + ((u >> 16) & 1)) >> 16);
}

static float FromBf16(uint16_t h) {
  uint32_t u = uint32_t(h) << 16;
  float x;
  std::memcpy(&x, &u, 4);
  return x;
}

static ffi::Error Bf16TopK(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::BF16> m,
                           ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> qmul,
                           ffi::Buffer<ffi::F32> bias, ffi::ResultBuffer<ffi::F32> out_s,
                           ffi::ResultBuffer<ffi::S32> out_i, int64_t want) {
  const int64_t isa = Resolve(want, IsaMask(1));
  if (isa < 0) return NoPath("bf16_topk", want);
  const float* qs = q.typed_data();
#if defined(__aarch64__)
  auto pack = [qs](const Problem& p, std::vector<uint8_t>& packed) { PackFloat(qs, p, packed); };
  return ScanTopK("bf16_topk", Kernel{&ScanBlockNeon<FloatNeon<false>>, 128, 0}, pool,
                  q.dimensions(), m.dimensions(), 2, m.typed_data(), scale, qmul, bias, out_s,
                  out_i, pack);
#elif defined(__x86_64__)
  if (isa == kIsaAvx2) {  // float32 queries against rows widened exactly
    auto pack = [qs](const Problem& p, std::vector<uint8_t>& packed) { PackFloat(qs, p, packed); };
    using E = FloatAvx2<false>;
    return ScanTopK("bf16_topk", Kernel{&ScanBlockAvx2<E>, E::kQBytes, 8}, pool, q.dimensions(),
                    m.dimensions(), 2, m.typed_data(), scale, qmul, bias, out_s, out_i, pack);
  }
  auto pack = [qs](const Problem& p, std::vector<uint8_t>& packed) {
    const int64_t nq = p.q, d = p.d;
    auto put = [&](int64_t byte, uint16_t v) { std::memcpy(&packed[byte], &v, 2); };
    if (nq <= kSmallQ) {  // [Q][hi, lo][dp bytes]: the query as the sum of two bf16 vectors
      packed.assign(nq * 2 * p.dp, 0);
      for (int64_t j = 0; j < nq; ++j)
        for (int64_t c = 0; c < d; ++c) {
          const uint16_t hi = ToBf16(qs[j * d + c]);
          put((j * 2) * p.dp + 2 * c, hi);
          put((j * 2 + 1) * p.dp + 2 * c, ToBf16(qs[j * d + c] - FromBf16(hi)));
        }
      return;
    }
    const int64_t groups = d / 2;  // 4-byte groups: pairs of bf16
    packed.assign(p.tiles * groups * 64, 0);
    for (int64_t j = 0; j < nq; ++j)
      for (int64_t c = 0; c < d; ++c) put(TileOffset(j, 2 * c, groups), ToBf16(qs[j * d + c]));
  };
  return ScanTopK("bf16_topk", Kernel{&ScanBlock<Bf16>, Bf16::kQBytes, 16}, pool, q.dimensions(),
                  m.dimensions(), 2, m.typed_data(), scale, qmul, bias, out_s, out_i, pack);
#else
  return NoPath("bf16_topk", want);
#endif
}

static ffi::Error F16TopK(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F16> m,
                          ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> qmul,
                          ffi::Buffer<ffi::F32> bias, ffi::ResultBuffer<ffi::F32> out_s,
                          ffi::ResultBuffer<ffi::S32> out_i, int64_t want) {
  const int64_t isa = Resolve(want, IsaMask(2));
  if (isa < 0) return NoPath("f16_topk", want);
  const float* qs = q.typed_data();
  auto pack = [qs](const Problem& p, std::vector<uint8_t>& packed) { PackFloat(qs, p, packed); };
#if defined(__aarch64__)
  const Kernel kern{&ScanBlockNeon<FloatNeon<true>>, 128, 0};
#elif defined(__x86_64__)
  const Kernel kern = isa == kIsaAvx2
                          ? Kernel{&ScanBlockAvx2<FloatAvx2<true>>, FloatAvx2<true>::kQBytes, 8}
                          : Kernel{&ScanBlock<F16>, F16::kQBytes, 0};
#else
  return NoPath("f16_topk", want);
#endif
  return ScanTopK("f16_topk", kern, pool, q.dimensions(), m.dimensions(), 2, m.typed_data(), scale,
                  qmul, bias, out_s, out_i, pack);
}

// The three handlers take (queries, rows, scale [N], qmul [Q], bias [N]) -> (scores, ids) [Q, k]
// and the attribute `isa` (0: the best path here; kIsaAvx2 / kIsaAvx512: that one).
template <ffi::DataType QueryType, ffi::DataType RowType>
auto TopKBinding() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Arg<ffi::Buffer<QueryType>>()
      .template Arg<ffi::Buffer<RowType>>()
      .template Arg<ffi::Buffer<ffi::F32>>()
      .template Arg<ffi::Buffer<ffi::F32>>()
      .template Arg<ffi::Buffer<ffi::F32>>()
      .template Ret<ffi::Buffer<ffi::F32>>()
      .template Ret<ffi::Buffer<ffi::S32>>()
      .template Attr<int64_t>("isa");
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(VggInt8TopK, Int8TopK, (TopKBinding<ffi::S8, ffi::S8>()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(VggBf16TopK, Bf16TopK, (TopKBinding<ffi::F32, ffi::BF16>()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(VggF16TopK, F16TopK, (TopKBinding<ffi::F32, ffi::F16>()));
