// The AVX-VNNI int8 loops of scan_avx2.cc against an integer reference, one thread, no XLA, on any
// AVX2 CPU: built with VGG_EMULATE_AVX_VNNI, which swaps the one VEX vpdpbusd for an exact AVX2
// equivalent (neither this machine's CPU nor qemu-x86_64 7.2 runs AVX-VNNI). Everything around the
// instruction runs as in the library: the handler's query packing, the few- and many-query loops,
// the row sums, the rank-one term, the heaps. tests/test_native.py builds and runs it; exit status
// 1 on a mismatch. One translation unit: the loop files and the handlers' file are included whole.
#define VGG_EMULATE_AVX_VNNI 1
#include "scan_avx2.cc"
#include "scan_avx512.cc"
#include "scan_topk.cc"

#include <cstdio>
#include <random>

namespace {

// Scans rows [0, n) in blocks, as the handler's workers do, and compares every query's k best
// with the exact integer scores (small-integer offsets keep every float32 sum exact).
int Check(int64_t n, int64_t d, int64_t nq, std::mt19937& rng) {
  const int64_t k = 9;
  std::uniform_int_distribution<int> u(-128, 127), uq(-127, 127), small(-3, 3);
  std::vector<uint8_t> rows(n * d);
  std::vector<int8_t> q(nq * d);
  for (auto& v : rows) v = uint8_t(u(rng));
  for (auto& v : q) v = int8_t(uq(rng));
  const int64_t lanes = kInt8AvxVnni.lanes;
  const int64_t tiles = (nq + lanes - 1) / lanes;
  std::vector<float> scale(n, 1.0f), bias(n, 0.0f), weight(n);
  std::vector<float> qmul(tiles * lanes, 0.0f), qoff(tiles * lanes, 0.0f);
  for (int64_t r = 0; r < n; ++r) weight[r] = float(small(rng) + 3);
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
  p.dp = nq <= kSmallQ ? (d + 63) / 64 * kInt8AvxVnni.qbytes : d;
  std::vector<uint8_t> packed;
  PackUnsigned(q.data(), p, lanes, packed);
  p.qpacked = packed.data();
  Worker w;
  w.Init(p);
  for (int64_t r0 = 0; r0 < n; r0 += kBlockRows)
    kInt8AvxVnni.scan(p, w, r0, std::min(n, r0 + kBlockRows));
  int bad = 0;
  for (int64_t j = 0; j < nq; ++j) {
    std::vector<std::pair<int64_t, int64_t>> all;  // (-score, row): best first, ties to the lower row
    for (int64_t r = 0; r < n; ++r) {
      if (r % 11 == 0) continue;
      int64_t s = 0;
      for (int64_t c = 0; c < d; ++c) s += int64_t(q[j * d + c]) * int8_t(rows[r * d + c]);
      all.push_back({-(s + int64_t(qoff[j]) * int64_t(weight[r])), r});
    }
    std::sort(all.begin(), all.end());
    std::vector<Cand> got(w.heaps[j].h, w.heaps[j].h + w.heaps[j].n);
    std::sort(got.begin(), got.end(), [](const Cand& a, const Cand& b) { return Before(a.s, a.i, b); });
    if (int64_t(got.size()) != k) bad++;
    for (int64_t c = 0; c < k && c < int64_t(got.size()); ++c)
      if (double(got[c].s) != double(-all[c].first) || got[c].i != all[c].second) bad++;
  }
  std::printf("avx-vnni (emulated) Q=%lld D=%lld: %s\n", (long long)nq, (long long)d,
              bad ? "MISMATCH" : "ok");
  return bad;
}

}  // namespace

int main() {
  std::mt19937 rng(11);
  int bad = 0;
  for (int64_t nq : {1, 3, 8, 9, 17, 40, 100})
    for (int64_t d : {36, 100, 516}) bad += Check(nq > 40 ? 2500 : 5001, d, nq, rng);
  return bad ? 1 : 0;
}
