// Fused brute-force scan + top-k for x86-64 and AArch64 CPUs, called from XLA as FFI custom calls.
// Python's one face of it: engine/kernels/native/__init__.py (build, CPU dispatch, FFI calls).
//
// For every query q and row r of an int8, bfloat16 or float16 matrix it computes
//     score[q, r] = fma(dot(query[q], m[r]) * scale[r], qmul[q], qoff[q] * weight[r]) + bias[r]
// in float32, the same operations on every path: qoff * weight is a rank-one term (collection
// statistics), zeros without one, and then the score is dot * scale * qmul + bias, bit for bit
// XLA's int8 path. (With the term XLA's CPU fusion contracts one of the two products into an FMA,
// which one depends on the graph: scores agree to an ulp.)
// and keeps the k best rows per query without writing the [Q, N] scores: each worker keeps a heap
// per query and compares a whole vector of scores against the heaps' thresholds at once, so the
// scan runs at the speed of the products, not of the selection.
//
// The files, compiled together into one library:
//   * scan_topk.h (this file): the problem, the per-thread heaps and the scan loops' declarations;
//   * scan_avx512.cc: the AVX512-VNNI / AVX512-BF16 / AVX-512 loops (int8, bfloat16, float16);
//   * scan_avx2.cc: the AVX2 + FMA + F16C loops (int8, bfloat16, float16) and the int8 loops
//     with AVX-VNNI (VEX vpdpbusd on 256 bits);
//   * scan_amx.cc: the AMX-INT8 loop for many int8 queries;
//   * scan_neon.cc: the AArch64 Advanced SIMD loops (compiled on AArch64 only);
//   * scan_topk.cc: run-time CPU dispatch, query packing, the row-block threading, the merge of
//     the workers' heaps and the XLA FFI handlers.
// The AVX-512 and AVX2 functions carry their own target attributes, everything else is baseline
// x86-64, so the library loads on any x86-64 CPU and runs only what the CPU has. Each handler takes
// the best path the CPU runs (or the one its `isa` attribute names, for tests).
// Inner loops:
//   * Few queries (Q <= kSmallQ): one row at a time, 64 (AVX2: 32, NEON: 16) bytes per
//     instruction, a horizontal sum per row: memory-bound.
//   * Many queries: lanes are queries. Queries are packed as [Q/16][D bytes/4][16][4]; each 4-byte
//     group of a row is broadcast and multiplied with 16 queries at once, 4-12 rows by up to
//     kMaxTiles tiles of 16 queries in registers (a GEMM micro-kernel).
//   * Many int8 queries with AVX2: the same with tiles of 8 queries, 3 rows x 2 tiles in registers
//     (AVX-VNNI: 6 rows x 2 tiles, one vpdpbusd per 4 bytes of a row and 8 queries).
//   * Many int8 queries with AMX: 32 rows x 32 queries x 64 bytes per step in tile registers.
//   * Many float16 / bfloat16 queries with AVX2: 48 rows widened to float32 once, then a float32
//     GEMM blocking (6 rows x 2 tiles of 8 queries, 128 dimensions per pass).
// Rows are split into blocks shared by XLA's intra-op thread pool and the calling thread.
// Ties are broken towards the lower row number, so the result does not depend on the threads.

#pragma once

// The library built against SIMDe for the tests (simd_x86.h) runs AVX-VNNI and AMX as the check
// program emulated_check.cc does: the one VEX instruction and the tile operations in plain code.
#if defined(VGG_SCAN_EMULATE)
#define VGG_EMULATE_AVX_VNNI 1
#define VGG_EMULATE_AMX 1
#endif

// Compilers that know the AVX-VNNI and AMX target names (GCC 11, clang 12); with an older one the
// library is built without those paths. The check programs force the emulated paths on.
#if defined(VGG_EMULATE_AVX_VNNI) || defined(VGG_EMULATE_AMX)
#define VGG_HAVE_AVX_VNNI 1
#define VGG_HAVE_AMX 1
#elif defined(__clang__)
#define VGG_HAVE_AVX_VNNI (__clang_major__ >= 12)
#define VGG_HAVE_AMX (__clang_major__ >= 12)
#elif defined(__GNUC__)
#define VGG_HAVE_AVX_VNNI (__GNUC__ >= 11)
#define VGG_HAVE_AMX (__GNUC__ >= 11)
#else
#define VGG_HAVE_AVX_VNNI 0
#define VGG_HAVE_AMX 0
#endif

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

namespace vgg_scan {

constexpr int kSmallQ = 8;                // up to this many queries: the row-at-a-time loop
constexpr int64_t kBlockRows = 2048;      // rows per unit of work handed to a thread
constexpr int64_t kPrefetchBytes = 8192;  // software prefetch distance along the rows

// The `isa` attribute of the handlers: 0 the best this CPU runs.
constexpr int64_t kIsaAvx2 = 1;
constexpr int64_t kIsaAvx512 = 2;
constexpr int64_t kIsaNeon = 3;  // AArch64: Advanced SIMD (sdot where the library was built with it)
constexpr int64_t kIsaAvxVnni = 4;  // int8: AVX2 loops with the VEX vpdpbusd of AVX-VNNI
constexpr int64_t kIsaAmx = 5;      // int8, more than kSmallQ queries: AMX tiles (TDPBSSD)

// CPU features, as bits, that the paths need (scan_topk.cc reads them with cpuid; the choice of
// paths is a pure function of them, exported for tests as vgg_topk_isas_for).
constexpr int kCpuAvx2 = 1 << 0;        // AVX2 + FMA + F16C
constexpr int kCpuAvx512Bw = 1 << 1;    // AVX-512 F + BW
constexpr int kCpuAvx512Vnni = 1 << 2;
constexpr int kCpuAvx512Bf16 = 1 << 3;
constexpr int kCpuAvxVnni = 1 << 4;     // the VEX encoding (CPUID.(7,1):EAX[4])
constexpr int kCpuAmxInt8 = 1 << 5;     // AMX-TILE + AMX-INT8, and Linux granted the tile state

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

struct Problem {
  const uint8_t* m;        // [N, row_bytes]
  const float* scale;
  const float* bias;
  const float* qmul;      // [Q], padded with zeros to whole tiles in the many-query layout
  const float* qoff;      // [Q], padded like qmul
  const float* weight;    // [N]
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
  std::vector<uint8_t> scratch;  // rows copied with zero padding (AMX)
  void Init(const Problem& p) {
    cand.resize(p.q * p.k);
    // Padding lanes never pass the compare; real queries start at -inf.
    thr.assign(std::max<int64_t>(p.tiles, 1) * 16, std::numeric_limits<float>::infinity());
    std::fill(thr.begin(), thr.begin() + p.q, -std::numeric_limits<float>::infinity());
    heaps.resize(p.q);
    for (int64_t j = 0; j < p.q; ++j) heaps[j] = Heap{cand.data() + j * p.k, int(p.k), 0, &thr[j]};
  }
};

// One scan loop and the query layout it reads. `scan` adds rows [r0, r1) to the worker's heaps.
struct Kernel {
  void (*scan)(const Problem& p, Worker& w, int64_t r0, int64_t r1);
  int qbytes;  // few queries: packed query bytes per 64 bytes of a row
  int lanes;   // many queries: queries per tile (16 AVX-512 and AMX, 8 AVX2 and AVX-VNNI); 0: few
               // queries only
};

// The loops of each instruction set, by row type. Each is called only after a run-time check that
// the CPU has what it needs (scan_topk.cc's IsaMask).
#if defined(__x86_64__)
extern const Kernel kInt8Avx512;  // AVX512-VNNI; queries as unsigned bytes q + 128
extern const Kernel kBf16Avx512;  // AVX512-BF16; few queries as hi + lo bf16 parts, else bf16
extern const Kernel kF16Avx512;   // AVX-512 (F, BW); float32 queries, few only
extern const Kernel kInt8Avx2;    // AVX2; signed queries
extern const Kernel kBf16Avx2;    // AVX2 + FMA; float32 queries
extern const Kernel kF16Avx2;     // AVX2 + FMA + F16C; float32 queries
#if VGG_HAVE_AVX_VNNI
extern const Kernel kInt8AvxVnni;  // AVX2 + AVX-VNNI; queries as unsigned bytes q + 128
double AvxVnniPeak(int64_t iters);
#endif
#if VGG_HAVE_AMX
extern const Kernel kInt8Amx;  // AMX-INT8, many queries only; signed queries in tiles of 16
#endif
// The int8 instruction ceilings: operations (2 per multiply-add) done in `iters` steps.
double VnniPeak(int64_t iters);
double Avx2Peak(int64_t iters);
#elif defined(__aarch64__)
extern const Kernel kInt8Neon;  // signed queries; sdot where built with +dotprod
extern const Kernel kBf16Neon;  // float32 queries
extern const Kernel kF16Neon;   // float32 queries
double NeonPeak(int64_t iters);
#endif

}  // namespace vgg_scan
