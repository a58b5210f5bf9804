// The AMX-INT8 scan loop of scan_topk.h (Sapphire Rapids and later), for many int8 queries only:
// few queries are memory-bound and stay on the AVX512-VNNI loop.
//
// AMX keeps eight tile registers of up to 16 rows x 64 bytes; TDPBSSD multiplies an A tile of
// signed bytes [16 x 64] with a B tile of signed bytes [16 x 64] in "VNNI" layout (row k4 holds,
// for each of 16 columns n, the 4 bytes 4 k4 .. 4 k4 + 3 of column n) into a C tile of s32
// [16 x 16]: C[m][n] += sum_k A[m][k] B[k / 4][4 n + k % 4].
//   * A = 16 matrix rows, 64 bytes of each, loaded straight from the rows (stride: the row length):
//     no copy and no transpose of the rows.
//   * B = 16 queries, 64 bytes of each: the packed layout [T][groups][16][4] of the AVX512-VNNI
//     many-query loop is exactly this (one tile = 16 consecutive groups), with signed bytes and the
//     groups padded with zeros to a multiple of 16.
//   * Signed x signed (TDPBSSD, not TDPBUSD): no q + 128 offset, so no row sums.
// Per step: 2 A tiles (32 rows) x 2 B tiles (32 queries) -> 4 C tiles, all 8 tiles in use; the C
// tiles are stored after the last 64 bytes and scored with AVX-512 as in scan_avx512.cc.
// Rows whose 64-byte chunks would run past the matrix (a row length not a multiple of 64, or fewer
// than 32 rows left in the block) are copied to a zero-padded scratch first: the zero padding of
// the queries meets whatever the padding bytes of the rows hold.
//
// Linux hands out the tile state only to a process that asks (arch_prctl(ARCH_REQ_XCOMP_PERM,
// XFEATURE_XTILEDATA)); scan_topk.cc asks once when the CPU has AMX and offers this path only if
// the kernel said yes, else says why (vgg_amx_status).
//
// With VGG_EMULATE_AMX defined (amx_check.cc, a test program) the tile instructions are replaced
// by plain C++ on arrays and no target attribute is set, so the loop runs on any x86-64 CPU.

#include "scan_topk.h"

#if defined(__x86_64__) && VGG_HAVE_AMX
#include "simd_x86.h"

#include <algorithm>
#include <cmath>
#include <cstring>

namespace vgg_scan {
namespace {

#if defined(VGG_EMULATE_AMX)
#define AMX_TARGET
// Eight tiles of 16 rows x 64 bytes, per thread, and the four operations the loop uses.
thread_local uint8_t tiles[8][16][64];
inline void TileLoad(int t, const void* base, int64_t stride) {
  for (int i = 0; i < 16; ++i)
    std::memcpy(tiles[t][i], static_cast<const uint8_t*>(base) + i * stride, 64);
}
inline void TileStore(int t, void* base, int64_t stride) {
  for (int i = 0; i < 16; ++i) std::memcpy(static_cast<uint8_t*>(base) + i * stride, tiles[t][i], 64);
}
inline void TileZero(int t) { std::memset(tiles[t], 0, sizeof(tiles[t])); }
inline void TileDpbssd(int c, int a, int b) {
  for (int m = 0; m < 16; ++m)
    for (int n = 0; n < 16; ++n) {
      int32_t s;
      std::memcpy(&s, &tiles[c][m][4 * n], 4);
      for (int k = 0; k < 64; ++k)
        s += int8_t(tiles[a][m][k]) * int8_t(tiles[b][k / 4][4 * n + k % 4]);
      std::memcpy(&tiles[c][m][4 * n], &s, 4);
    }
}
#define TILE_LOAD(t, base, stride) TileLoad(t, base, stride)
#define TILE_STORE(t, base, stride) TileStore(t, base, stride)
#define TILE_ZERO(t) TileZero(t)
#define TILE_DPBSSD(c, a, b) TileDpbssd(c, a, b)
#define TILE_CONFIG(cfg) (void)(cfg)
#define TILE_RELEASE() (void)0
#else
#define AMX_TARGET VGG_TARGET("amx-tile,amx-int8,avx512f,avx512bw")
#define TILE_LOAD(t, base, stride) _tile_loadd(t, base, stride)
#define TILE_STORE(t, base, stride) _tile_stored(t, base, stride)
#define TILE_ZERO(t) _tile_zero(t)
#define TILE_DPBSSD(c, a, b) _tile_dpbssd(c, a, b)
#define TILE_CONFIG(cfg) _tile_loadconfig(cfg)
#define TILE_RELEASE() _tile_release()
#endif

// The 64-byte operand of LDTILECFG (palette 1): every tile 16 rows x 64 bytes.
struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {64, 64, 64, 64, 64, 64, 64, 64};
  uint8_t rows[16] = {16, 16, 16, 16, 16, 16, 16, 16};
};
static_assert(sizeof(TileConfig) == 64, "LDTILECFG reads 64 bytes");
// In static storage: the intrinsic's asm declares only 8 of the 64 bytes as read, so a local copy's
// other stores could be optimised away.
const TileConfig kTileConfig{};

// Scores of one row against tile t of 16 queries from its 16 products, into the heaps.
AMX_TARGET inline void Emit16(const Problem& p, Worker& w, int64_t row, int64_t t,
                              const int32_t* dot) {
  const float sc = p.scale[row], b = p.bias[row], wr = p.weight[row];
  for (int lane = 0; lane < 16; ++lane) {  // the compare first: most scores miss every heap
    const int64_t qi = t * 16 + lane;
    const float s = std::fma(float(dot[lane]) * sc, p.qmul[qi], p.qoff[qi] * wr) + b;
    if (s >= w.thr[qi] && qi < p.q) w.heaps[qi].Push(s, int32_t(row));
  }
}

// 32 rows at `a` (`stride` apart, `kp` bytes each, of which rows [0, m) are real) against G tiles
// of 16 queries from tile t0.
template <int G>
AMX_TARGET void AmxMicro(const Problem& p, Worker& w, const uint8_t* a, int64_t stride, int64_t kp,
                      int64_t r, int64_t m, int64_t t0) {
  const int64_t groups = kp / 4;
  const uint8_t* qp = p.qpacked + t0 * groups * 64;
  TILE_ZERO(0);
  TILE_ZERO(1);
  if constexpr (G == 2) {
    TILE_ZERO(2);
    TILE_ZERO(3);
  }
  for (int64_t k = 0; k < kp; k += 64) {
    TILE_LOAD(4, a + k, stride);                // rows 0-15
    TILE_LOAD(5, a + 16 * stride + k, stride);  // rows 16-31
    TILE_LOAD(6, qp + (k / 4) * 64, 64);        // queries of tile t0
    TILE_DPBSSD(0, 4, 6);
    TILE_DPBSSD(1, 5, 6);
    if constexpr (G == 2) {
      TILE_LOAD(7, qp + (groups + k / 4) * 64, 64);  // tile t0 + 1
      TILE_DPBSSD(2, 4, 7);
      TILE_DPBSSD(3, 5, 7);
    }
  }
  alignas(64) int32_t c[4][16][16];
  TILE_STORE(0, c[0], 64);
  TILE_STORE(1, c[1], 64);
  if constexpr (G == 2) {
    TILE_STORE(2, c[2], 64);
    TILE_STORE(3, c[3], 64);
  }
  for (int g = 0; g < G; ++g)
    for (int64_t i = 0; i < m; ++i) Emit16(p, w, r + i, t0 + g, c[2 * g + i / 16][i % 16]);
}

AMX_TARGET void ScanBlockAmx(const Problem& p, Worker& w, int64_t r0, int64_t r1) {
  if (p.q <= kSmallQ) return;  // the handler sends only batches here
  TILE_CONFIG(&kTileConfig);  // per thread; it also zeroes the tiles
  const int64_t kp = (p.row_bytes + 63) / 64 * 64;
  for (int64_t r = r0; r < r1; r += 32) {
    const int64_t m = std::min<int64_t>(32, r1 - r);
    const uint8_t* a = p.m + r * p.row_bytes;
    int64_t stride = p.row_bytes;
    if (m < 32 || kp != p.row_bytes) {  // the last chunk would read past these rows
      w.scratch.assign(32 * kp, 0);
      for (int64_t i = 0; i < m; ++i)
        std::memcpy(&w.scratch[i * kp], p.m + (r + i) * p.row_bytes, p.row_bytes);
      a = w.scratch.data();
      stride = kp;
      __asm__ volatile("" ::: "memory");  // the tile loads read the copy (their asm says not)
    }
    int64_t t = 0;
    for (; t + 2 <= p.tiles; t += 2) AmxMicro<2>(p, w, a, stride, kp, r, m, t);
    if (t < p.tiles) AmxMicro<1>(p, w, a, stride, kp, r, m, t);
  }
  TILE_RELEASE();
}

}  // namespace

const Kernel kInt8Amx{&ScanBlockAmx, 64, 16};

}  // namespace vgg_scan
#endif  // __x86_64__ && VGG_HAVE_AMX
