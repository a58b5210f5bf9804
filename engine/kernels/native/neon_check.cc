// The AArch64 NEON loops of scan_neon.cc against float64 / integer references, one thread, no XLA:
// tests/test_native.py cross-compiles it (with and without +dotprod) and runs it under
// qemu-aarch64 where those tools are installed. Exit status 1 on a mismatch. One translation unit:
// the loops' file and the handlers' (for the peak and FromBf16) are included whole.
#include "scan_neon.cc"
#include "scan_topk.cc"

#include <cstdio>
#include <random>

namespace {

template <class E>
int Check(const char* name, int64_t n, int64_t d, int esize, const std::vector<uint8_t>& rows,
          const std::vector<double>& ref_rows, const std::vector<uint8_t>& packed_q,
          const std::vector<double>& ref_q, int64_t nq, int64_t dp, double tol) {
  const int64_t k = 7;
  std::vector<float> scale(n, 1.0f), bias(n, 0.0f), qmul(nq, 1.0f), qoff(nq), weight(n);
  for (int64_t r = 0; r < n; r += 11) bias[r] = -std::numeric_limits<float>::infinity();
  // The rank-one term: small integers for the exact int8 check (every sum stays exact in float32).
  std::mt19937 rng(n + d + nq);
  std::uniform_int_distribution<int> small(-3, 3);
  std::uniform_real_distribution<float> u(0.5f, 2.0f);
  for (auto& v : qoff) v = tol == 0 ? small(rng) : u(rng) - 1.25f;
  for (auto& v : weight) v = tol == 0 ? small(rng) + 3 : u(rng);
  Problem p{};
  p.m = rows.data();
  p.scale = scale.data();
  p.bias = bias.data();
  p.qmul = qmul.data();
  p.qoff = qoff.data();
  p.weight = weight.data();
  p.qpacked = packed_q.data();
  p.n = n, p.d = d, p.row_bytes = d * esize, p.dp = dp, p.q = nq, p.tiles = 1, p.k = k;
  Worker w;
  w.Init(p);
  ScanBlockNeon<E>(p, w, 0, n);
  int bad = 0;
  for (int64_t j = 0; j < nq; ++j) {
    std::vector<std::pair<double, int64_t>> all;
    for (int64_t r = 0; r < n; ++r) {
      if (r % 11 == 0) continue;
      double s = 0;
      for (int64_t c = 0; c < d; ++c) s += ref_q[j * d + c] * ref_rows[r * d + c];
      s += double(qoff[j]) * weight[r];
      all.push_back({-s, r});
    }
    std::sort(all.begin(), all.end());
    std::vector<Cand> got(w.heaps[j].h, w.heaps[j].h + w.heaps[j].n);
    std::sort(got.begin(), got.end(), [](const Cand& a, const Cand& b) { return Before(a.s, a.i, b); });
    if (int64_t(got.size()) != k) bad++;
    for (int64_t c = 0; c < k && c < int64_t(got.size()); ++c)
      if (std::abs(got[c].s + all[c].first) > tol || (tol == 0 && got[c].i != all[c].second)) bad++;
  }
  std::printf("%s Q=%lld D=%lld: %s\n", name, (long long)nq, (long long)d, bad ? "MISMATCH" : "ok");
  return bad;
}

}  // namespace

int main() {
  std::mt19937 rng(7);
  int bad = 0;
  for (int64_t nq : {1, 3, 8})
    for (int64_t d : {100, 512, 36}) {
      const int64_t n = 3001, dp = (d + 63) / 64 * 64;
      std::vector<uint8_t> rows(n * d), q(nq * dp, 0);
      std::vector<double> rr(n * d), rq(nq * d);
      std::uniform_int_distribution<int> u(-128, 127), uq(-127, 127);
      for (int64_t i = 0; i < n * d; ++i) rr[i] = int8_t(rows[i] = uint8_t(u(rng)));
      for (int64_t j = 0; j < nq; ++j)
        for (int64_t c = 0; c < d; ++c) rq[j * d + c] = int8_t(q[j * dp + c] = uint8_t(uq(rng)));
      bad += Check<Int8Neon>("int8", n, d, 1, rows, rr, q, rq, nq, dp, 0.0);
      // float16 and bfloat16 rows against float32 queries
      const int64_t dpf = (2 * d + 63) / 64 * 128;
      std::vector<uint8_t> h(n * d * 2), b(n * d * 2), qf(nq * dpf, 0);
      std::vector<double> rh(n * d), rb(n * d), rqf(nq * d);
      std::normal_distribution<float> g;
      for (int64_t i = 0; i < n * d; ++i) {
        const float x = g(rng);
        const __fp16 hx = __fp16(x);
        std::memcpy(&h[2 * i], &hx, 2);
        rh[i] = float(hx);
        uint32_t bits;
        std::memcpy(&bits, &x, 4);
        const uint16_t bb = uint16_t(bits >> 16);
        std::memcpy(&b[2 * i], &bb, 2);
        rb[i] = FromBf16(bb);
      }
      for (int64_t j = 0; j < nq; ++j)
        for (int64_t c = 0; c < d; ++c) {
          const float x = g(rng);
          std::memcpy(&qf[j * dpf + 4 * c], &x, 4);
          rqf[j * d + c] = x;
        }
      bad += Check<FloatNeon<true>>("float16", n, d, 2, h, rh, qf, rqf, nq, dpf, 1e-3);
      bad += Check<FloatNeon<false>>("bfloat16", n, d, 2, b, rb, qf, rqf, nq, dpf, 1e-3);
    }
  std::printf("peak %.1f GOP/s (emulated)\n", vgg_int8_peak_gops(0.01));
  return bad ? 1 : 0;
}
