// The int8 loops for instructions this project's CPU (AMD Zen 3) and qemu-x86_64 7.2 do not run,
// checked on any AVX2 CPU against an integer reference, one thread, no XLA:
//   * AVX-VNNI (scan_avx2.cc), built with VGG_EMULATE_AVX_VNNI: the one VEX vpdpbusd becomes an
//     exact AVX2 equivalent;
//   * AMX-INT8 (scan_amx.cc), built with VGG_EMULATE_AMX: the tile loads, stores and TDPBSSD
//     become plain C++ on arrays.
// Everything around the instructions runs as in the library: the handler's query packing, the
// loops over rows and query tiles, row sums, scratch copies, the rank-one term, the heaps.
// tests/test_native.py builds and runs it; exit status 1 on a mismatch. One translation unit: the
// loop files and the handlers' file are included whole.
#define VGG_EMULATE_AVX_VNNI 1
#define VGG_EMULATE_AMX 1
#include "scan_amx.cc"
#include "scan_avx2.cc"
#include "scan_avx512.cc"
#include "scan_topk.cc"

#include <cstdio>
#include <functional>
#include <random>

namespace {

using Pack = std::function<void(const int8_t*, const Problem&, std::vector<uint8_t>&)>;

// Sets up the problem as ScanTopK does, scans rows [0, n) in blocks as its workers do, and
// compares every query's k best with the exact integer scores (small-integer scales and offsets
// keep every float32 sum exact).
int Check(const char* name, const Kernel& kern, const Pack& pack, int64_t n, int64_t d, int64_t nq,
          std::mt19937& rng) {
  const int64_t k = 9;
  std::uniform_int_distribution<int> u(-128, 127), uq(-127, 127), small(-3, 3);
  std::vector<uint8_t> rows(n * d);
  std::vector<int8_t> q(nq * d);
  for (auto& v : rows) v = uint8_t(u(rng));
  for (auto& v : q) v = int8_t(uq(rng));
  const int64_t lanes = kern.lanes;
  const int64_t tiles = (nq + lanes - 1) / lanes;
  std::vector<float> scale(n), bias(n, 0.0f), weight(n);
  std::vector<float> qmul(tiles * lanes, 0.0f), qoff(tiles * lanes, 0.0f);
  for (int64_t r = 0; r < n; ++r) scale[r] = float(1 + r % 2), weight[r] = float(small(rng) + 3);
  for (int64_t r = 0; r < n; r += 11) bias[r] = -std::numeric_limits<float>::infinity();
  for (int64_t j = 0; j < nq; ++j) qmul[j] = 1.0f, qoff[j] = float(small(rng));
  Problem p{};
  p.m = rows.data();
  p.scale = scale.data();
  p.bias = bias.data();
  p.weight = weight.data();
  p.qmul = qmul.data();
  p.qoff = qoff.data();
  p.n = n, p.d = d, p.row_bytes = d, p.q = nq, p.k = k;
  p.tiles = nq <= kSmallQ ? (nq + 15) / 16 : tiles;
  p.dp = nq <= kSmallQ ? (d + 63) / 64 * kern.qbytes : d;
  std::vector<uint8_t> packed;
  pack(q.data(), p, packed);
  p.qpacked = packed.data();
  Worker w;
  w.Init(p);
  for (int64_t r0 = 0; r0 < n; r0 += kBlockRows) kern.scan(p, w, r0, std::min(n, r0 + kBlockRows));
  int bad = 0;
  for (int64_t j = 0; j < nq; ++j) {
    std::vector<std::pair<int64_t, int64_t>> all;  // (-score, row): best first, ties to the lower row
    for (int64_t r = 0; r < n; ++r) {
      if (r % 11 == 0) continue;
      int64_t s = 0;
      for (int64_t c = 0; c < d; ++c) s += int64_t(q[j * d + c]) * int8_t(rows[r * d + c]);
      all.push_back({-(s * int64_t(scale[r]) + int64_t(qoff[j]) * int64_t(weight[r])), r});
    }
    std::sort(all.begin(), all.end());
    std::vector<Cand> got(w.heaps[j].h, w.heaps[j].h + w.heaps[j].n);
    std::sort(got.begin(), got.end(), [](const Cand& a, const Cand& b) { return Before(a.s, a.i, b); });
    if (int64_t(got.size()) != k) bad++;
    for (int64_t c = 0; c < k && c < int64_t(got.size()); ++c)
      if (double(got[c].s) != double(-all[c].first) || got[c].i != all[c].second) bad++;
  }
  std::printf("%s (emulated) Q=%lld D=%lld N=%lld: %s\n", name, (long long)nq, (long long)d,
              (long long)n, bad ? "MISMATCH" : "ok");
  return bad;
}

}  // namespace

int main() {
  std::mt19937 rng(11);
  int bad = 0;
  const Pack vnni = [](const int8_t* qs, const Problem& p, std::vector<uint8_t>& out) {
    PackUnsigned(qs, p, kInt8AvxVnni.lanes, out);
  };
  for (int64_t nq : {1, 3, 8, 9, 17, 40, 100})
    for (int64_t d : {36, 100, 516}) bad += Check("avx-vnni", kInt8AvxVnni, vnni, 5001, d, nq, rng);
  // AMX: batches only; D a multiple of 64 (rows loaded in place) or not (copied), N with a
  // partial last group of 32 rows in a block and in the last block.
  for (int64_t nq : {9, 16, 17, 40, 100})
    for (int64_t d : {64, 100, 512})
      bad += Check("amx-int8", kInt8Amx, PackSignedAmx, nq > 40 ? 2100 : 4500, d, nq, rng);
  return bad ? 1 : 0;
}
