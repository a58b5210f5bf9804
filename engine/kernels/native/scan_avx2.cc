// The AVX2 scan loops of scan_topk.h, for CPUs with AVX2 + FMA + F16C (and without AVX-512 or its
// VNNI / BF16 extensions): 32 bytes of a row at a time, tiles of 8 queries.
//   * int8: vpmaddubsw(|row|, sign(query, row)) then vpmaddwd with ones, s32 sums: exact, the
//     same integer dot (|row| <= 128 and |query| <= 127: a pair sums to <= 32512, no saturation).
//   * int8 with AVX-VNNI (Alder Lake, Sapphire Rapids and later: the VEX form of vpdpbusd on ymm):
//     one vpdpbusd (u8 x s8 -> s32, 4 byte pairs per lane) instead of the three instructions above,
//     queries stored as unsigned bytes q + 128 and 128 times the row sum subtracted, as in the
//     AVX512-VNNI loops. With VGG_EMULATE_AVX_VNNI defined (vnni_check.cc, a test program) that
//     instruction is replaced by an exact AVX2 equivalent, so the loops around it run on any AVX2
//     CPU.
//   * bfloat16 (widened by a 16-bit shift) and float16 (vcvtph2ps): vfmadd with float32 queries,
//     exact widening.
// Every function here carries its target attribute: the rest of the library stays baseline x86-64
// and calls these only on a CPU that has the extensions.

#if defined(__x86_64__)
#include "simd_x86.h"

#include <cmath>
#include <cstring>
#include <type_traits>

#include "scan_topk.h"

namespace vgg_scan {
namespace {

#define AVX2_TARGET VGG_TARGET("avx2,fma,f16c")
#if defined(VGG_EMULATE_AVX_VNNI)
#define AVX_VNNI_TARGET AVX2_TARGET
#else
#define AVX_VNNI_TARGET VGG_TARGET("avx2,fma,f16c,avxvnni")
#endif

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
  float qm[Q], qo[Q];
  for (int j = 0; j < Q; ++j) qm[j] = p.qmul[j], qo[j] = p.qoff[j];
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
    const float sc = p.scale[r], b = p.bias[r], wr = p.weight[r];
    for (int j = 0; j < Q; ++j) {
      const float s = std::fma(E::Score(acc[j]) * sc, qm[j], qo[j] * wr) + b;
      if (s >= w.thr[j]) w.heaps[j].Push(s, int32_t(r));
    }
  }
}

// Scores of one row against tile t of 8 queries from its 8 products: the heaps of the queries
// whose threshold they reach get them.
AVX2_TARGET inline void Emit8(const Problem& p, Worker& w, int64_t row, int64_t t, __m256 dot) {
  const __m256 sc = _mm256_set1_ps(p.scale[row]);
  const __m256 off = _mm256_mul_ps(_mm256_loadu_ps(p.qoff + t * 8), _mm256_set1_ps(p.weight[row]));
  const __m256 s = _mm256_add_ps(
      _mm256_fmadd_ps(_mm256_mul_ps(dot, sc), _mm256_loadu_ps(p.qmul + t * 8), off),
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

#if VGG_HAVE_AVX_VNNI
// ---- int8 with AVX-VNNI: queries as unsigned bytes q + 128, 8 per tile ----

// acc + for each s32 lane the sum of its 4 products of unsigned bytes of `u` and signed bytes of
// `s`, exactly (no saturation): vpdpbusd.
AVX_VNNI_TARGET __attribute__((always_inline)) inline __m256i Dpbusd(__m256i acc, __m256i u,
                                                                    __m256i s) {
#if defined(VGG_EMULATE_AVX_VNNI)
  // Even and odd bytes widened to 16 bits (u zero-, s sign-extended), then vpmaddwd: each 32-bit
  // lane gets u0 s0 + u2 s2 and u1 s1 + u3 s3, |sum| <= 2 * 255 * 128.
  const __m256i lo8 = _mm256_set1_epi16(0x00FF);
  const __m256i even = _mm256_madd_epi16(_mm256_and_si256(u, lo8),
                                         _mm256_srai_epi16(_mm256_slli_epi16(s, 8), 8));
  const __m256i odd = _mm256_madd_epi16(_mm256_srli_epi16(u, 8), _mm256_srai_epi16(s, 8));
  return _mm256_add_epi32(acc, _mm256_add_epi32(even, odd));
#else
  return _mm256_dpbusd_avx_epi32(acc, u, s);
#endif
}

// 4 bytes at p in every 32-bit lane.
AVX2_TARGET inline __m256i Bcast4(const uint8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm256_set1_epi32(v);
}

AVX_VNNI_TARGET int32_t RowSumVnni(const uint8_t* row, int64_t bytes) {
  const __m256i ones = _mm256_set1_epi8(1);
  __m256i s = _mm256_setzero_si256();
  for (int64_t c = 0; c < bytes; c += 32) s = Dpbusd(s, ones, LoadRow32(row, c, bytes));
  return HsumI32(s);
}

// Few queries, packed [Q][dp] unsigned: one row at a time, its sum beside the products.
template <int Q>
AVX_VNNI_TARGET void ScanSmallVnni(const Problem& p, Worker& w, int64_t r0, int64_t r1) {
  const __m256i ones = _mm256_set1_epi8(1);
  float qm[Q], qo[Q];
  for (int j = 0; j < Q; ++j) qm[j] = p.qmul[j], qo[j] = p.qoff[j];
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* row = p.m + r * p.row_bytes;
    __m256i acc[Q];
    for (int j = 0; j < Q; ++j) acc[j] = _mm256_setzero_si256();
    __m256i sum = _mm256_setzero_si256();
    for (int64_t c = 0; c < p.row_bytes; c += 32) {
      if (c % 64 == 0)
        _mm_prefetch(reinterpret_cast<const char*>(row + kPrefetchBytes + c), _MM_HINT_T0);
      const __m256i x = LoadRow32(row, c, p.row_bytes);
      sum = Dpbusd(sum, ones, x);
      for (int j = 0; j < Q; ++j) {
        const uint8_t* q = p.qpacked + j * p.dp + c;
        acc[j] = Dpbusd(acc[j], _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q)), x);
      }
    }
    const int32_t rs = 128 * HsumI32(sum);
    const float sc = p.scale[r], b = p.bias[r], wr = p.weight[r];
    for (int j = 0; j < Q; ++j) {
      const float s = std::fma(float(HsumI32(acc[j]) - rs) * sc, qm[j], qo[j] * wr) + b;
      if (s >= w.thr[j]) w.heaps[j].Push(s, int32_t(r));
    }
  }
}

// R rows against G tiles of 8 unsigned queries packed as [T][row_bytes/4][8][4] from tile t0;
// `rowsum` holds 128 times the rows' sums.
template <int R, int G>
AVX_VNNI_TARGET inline void MicroVnni(const Problem& p, Worker& w, int64_t r, int64_t t0,
                                      const int32_t* rowsum) {
  __m256i acc[R][G];
  for (int i = 0; i < R; ++i)
    for (int g = 0; g < G; ++g) acc[i][g] = _mm256_setzero_si256();
  const uint8_t* rows[R];
  for (int i = 0; i < R; ++i) rows[i] = p.m + (r + i) * p.row_bytes;
  const int64_t groups = p.row_bytes / 4;
  const uint8_t* qp = p.qpacked + t0 * groups * 32;
  for (int64_t j = 0; j < groups; ++j) {
    __m256i x[R];
    for (int i = 0; i < R; ++i) x[i] = Bcast4(rows[i] + 4 * j);
    for (int g = 0; g < G; ++g) {
      const __m256i qv =
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qp + (g * groups + j) * 32));
      for (int i = 0; i < R; ++i) acc[i][g] = Dpbusd(acc[i][g], qv, x[i]);
    }
  }
  for (int i = 0; i < R; ++i)
    for (int g = 0; g < G; ++g)
      Emit8(p, w, r + i, t0 + g,
            _mm256_cvtepi32_ps(_mm256_sub_epi32(acc[i][g], _mm256_set1_epi32(rowsum[i]))));
}

// MicroVnni<6, 2> with twelve named accumulators (GCC 12 keeps arrays of them on the stack): 12
// independent vpdpbusd per 4 bytes of 6 rows, 2 query vectors and one broadcast in registers.
AVX_VNNI_TARGET void VnniMicro62(const Problem& p, Worker& w, int64_t r, int64_t t0,
                                 const int32_t* rowsum) {
  const uint8_t* r0 = p.m + r * p.row_bytes;
  const int64_t rb = p.row_bytes, groups = rb / 4;
  const uint8_t* qp = p.qpacked + t0 * groups * 32;
  __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, b0 = a0,
          b1 = a0, b2 = a0, b3 = a0, b4 = a0, b5 = a0;
  for (int64_t j = 0; j < groups; ++j) {
    if (j % 16 == 0)
      for (int i = 0; i < 6; ++i)
        _mm_prefetch(reinterpret_cast<const char*>(r0 + i * rb + kPrefetchBytes + 4 * j), _MM_HINT_T1);
    const __m256i q0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qp + j * 32));
    const __m256i q1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qp + (groups + j) * 32));
    __m256i x = Bcast4(r0 + 4 * j);
    a0 = Dpbusd(a0, q0, x);
    b0 = Dpbusd(b0, q1, x);
    x = Bcast4(r0 + 1 * rb + 4 * j);
    a1 = Dpbusd(a1, q0, x);
    b1 = Dpbusd(b1, q1, x);
    x = Bcast4(r0 + 2 * rb + 4 * j);
    a2 = Dpbusd(a2, q0, x);
    b2 = Dpbusd(b2, q1, x);
    x = Bcast4(r0 + 3 * rb + 4 * j);
    a3 = Dpbusd(a3, q0, x);
    b3 = Dpbusd(b3, q1, x);
    x = Bcast4(r0 + 4 * rb + 4 * j);
    a4 = Dpbusd(a4, q0, x);
    b4 = Dpbusd(b4, q1, x);
    x = Bcast4(r0 + 5 * rb + 4 * j);
    a5 = Dpbusd(a5, q0, x);
    b5 = Dpbusd(b5, q1, x);
  }
  const __m256i a[6] = {a0, a1, a2, a3, a4, a5}, b[6] = {b0, b1, b2, b3, b4, b5};
  for (int i = 0; i < 6; ++i) {
    const __m256i off = _mm256_set1_epi32(rowsum[i]);
    Emit8(p, w, r + i, t0, _mm256_cvtepi32_ps(_mm256_sub_epi32(a[i], off)));
    Emit8(p, w, r + i, t0 + 1, _mm256_cvtepi32_ps(_mm256_sub_epi32(b[i], off)));
  }
}

// Many queries: the block's row sums once, then pairs of tiles (6 rows at a time), then a last
// single tile, each streaming the block of rows (in L2) again.
AVX_VNNI_TARGET void ScanManyVnni(const Problem& p, Worker& w, int64_t r0, int64_t r1) {
  w.rowsum.resize(r1 - r0);
  for (int64_t r = r0; r < r1; ++r)
    w.rowsum[r - r0] = 128 * RowSumVnni(p.m + r * p.row_bytes, p.row_bytes);
  const int32_t* rs = w.rowsum.data() - r0;
  int64_t t = 0;
  for (; t + 2 <= p.tiles; t += 2) {
    int64_t r = r0;
    for (; r + 6 <= r1; r += 6) VnniMicro62(p, w, r, t, rs + r);
    for (; r < r1; ++r) MicroVnni<1, 2>(p, w, r, t, rs + r);
  }
  if (t < p.tiles) {
    int64_t r = r0;
    for (; r + 4 <= r1; r += 4) MicroVnni<4, 1>(p, w, r, t, rs + r);
    for (; r < r1; ++r) MicroVnni<1, 1>(p, w, r, t, rs + r);
  }
}

void ScanBlockVnni(const Problem& p, Worker& w, int64_t r0, int64_t r1) {
  switch (p.q) {
    case 1: ScanSmallVnni<1>(p, w, r0, r1); return;
    case 2: ScanSmallVnni<2>(p, w, r0, r1); return;
    case 3: ScanSmallVnni<3>(p, w, r0, r1); return;
    case 4: ScanSmallVnni<4>(p, w, r0, r1); return;
    case 5: ScanSmallVnni<5>(p, w, r0, r1); return;
    case 6: ScanSmallVnni<6>(p, w, r0, r1); return;
    case 7: ScanSmallVnni<7>(p, w, r0, r1); return;
    case 8: ScanSmallVnni<8>(p, w, r0, r1); return;
    default: ScanManyVnni(p, w, r0, r1); return;
  }
}

#endif  // VGG_HAVE_AVX_VNNI

}  // namespace

const Kernel kInt8Avx2{&ScanBlockAvx2<Int8Avx2>, Int8Avx2::kQBytes, 8};
const Kernel kBf16Avx2{&ScanBlockAvx2<FloatAvx2<false>>, FloatAvx2<false>::kQBytes, 8};
const Kernel kF16Avx2{&ScanBlockAvx2<FloatAvx2<true>>, FloatAvx2<true>::kQBytes, 8};
#if VGG_HAVE_AVX_VNNI
const Kernel kInt8AvxVnni{&ScanBlockVnni, 64, 8};
#endif

// 6 independent vpmaddubsw + vpmaddwd + vpaddd per step.
AVX2_TARGET double Avx2Peak(int64_t iters) {
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i a = _mm256_set1_epi32(0x01020304), b0 = _mm256_set1_epi32(0x01010101), b1 = b0, b2 = b0,
          b3 = b0, b4 = b0, b5 = b0;
  __m256i c0 = _mm256_setzero_si256(), c1 = c0, c2 = c0, c3 = c0, c4 = c0, c5 = c0;
  for (int64_t i = 0; i < iters; ++i) {
    // Opaque operands each time: the products must not be computed once and hoisted.
#if !defined(VGG_SCAN_EMULATE)  // SIMDe's vectors are not registers
    __asm__ volatile("" : "+x"(a), "+x"(b0), "+x"(b1), "+x"(b2), "+x"(b3), "+x"(b4), "+x"(b5));
#endif
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

#if VGG_HAVE_AVX_VNNI
// 12 independent vpdpbusd (VEX, ymm) per step.
AVX_VNNI_TARGET double AvxVnniPeak(int64_t iters) {
  const __m256i a = _mm256_set1_epi32(0x01020304), b = _mm256_set1_epi32(0x01010101);
  __m256i c0 = _mm256_setzero_si256(), c1 = c0, c2 = c0, c3 = c0, c4 = c0, c5 = c0, c6 = c0,
          c7 = c0, c8 = c0, c9 = c0, c10 = c0, c11 = c0;
  for (int64_t i = 0; i < iters; ++i) {
    c0 = Dpbusd(c0, a, b);
    c1 = Dpbusd(c1, a, b);
    c2 = Dpbusd(c2, a, b);
    c3 = Dpbusd(c3, a, b);
    c4 = Dpbusd(c4, a, b);
    c5 = Dpbusd(c5, a, b);
    c6 = Dpbusd(c6, a, b);
    c7 = Dpbusd(c7, a, b);
    c8 = Dpbusd(c8, a, b);
    c9 = Dpbusd(c9, a, b);
    c10 = Dpbusd(c10, a, b);
    c11 = Dpbusd(c11, a, b);
#if !defined(VGG_SCAN_EMULATE)  // SIMDe's vectors are not registers
    __asm__ volatile("" : "+x"(c0), "+x"(c1), "+x"(c2), "+x"(c3), "+x"(c4), "+x"(c5), "+x"(c6),
                     "+x"(c7), "+x"(c8), "+x"(c9), "+x"(c10), "+x"(c11));
#endif
  }
  const __m256i s0 = _mm256_add_epi32(_mm256_add_epi32(c0, c1), _mm256_add_epi32(c2, c3));
  const __m256i s1 = _mm256_add_epi32(_mm256_add_epi32(c4, c5), _mm256_add_epi32(c6, c7));
  const __m256i s2 = _mm256_add_epi32(_mm256_add_epi32(c8, c9), _mm256_add_epi32(c10, c11));
  volatile int32_t sink = HsumI32(_mm256_add_epi32(_mm256_add_epi32(s0, s1), s2));
  (void)sink;
  return double(iters) * 12 * 32 * 2;
}
#endif  // VGG_HAVE_AVX_VNNI

}  // namespace vgg_scan
#endif  // __x86_64__
