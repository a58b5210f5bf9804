// The entry points of the fused scan + top-k (see scan_topk.h for the whole): run-time CPU
// dispatch, the queries packed for the loop that will run, the rows split into blocks over XLA's
// intra-op thread pool, the merge of the workers' heaps, and the XLA FFI handlers with their
// registration. Everything here is baseline code for the architecture: the loops that need more
// live in scan_avx512.cc, scan_avx2.cc and scan_neon.cc.

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "scan_topk.h"
#include "xla/ffi/api/ffi.h"

#if defined(__x86_64__)
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cerrno>
#endif

namespace ffi = xla::ffi;
using namespace vgg_scan;  // NOLINT: this file is the library's one user of its internals

namespace {

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

// The paths (bit kIsa*) that the kernel of dtype 0 (int8), 1 (bfloat16) or 2 (float16) has on a
// CPU with the features `cpu` (kCpu* bits): a pure function, so tests can ask about any CPU.
int IsaMaskFor(int dtype, int cpu) {
  if (dtype < 0 || dtype > 2) return 0;
#if defined(__x86_64__)
  if (!(cpu & kCpuAvx2)) return 0;  // every x86 path also runs AVX2 code (and needs AVX state)
  int mask = 1 << kIsaAvx2;
  const int ext = dtype == 0 ? kCpuAvx512Vnni : dtype == 1 ? kCpuAvx512Bf16 : 0;
  if ((cpu & kCpuAvx512Bw) && (cpu & ext) == ext) mask |= 1 << kIsaAvx512;
  if (VGG_HAVE_AVX_VNNI && dtype == 0 && (cpu & kCpuAvxVnni)) mask |= 1 << kIsaAvxVnni;
  // AMX's epilogue is AVX-512 code.
  if (VGG_HAVE_AMX && dtype == 0 && (cpu & kCpuAmxInt8) && (cpu & kCpuAvx512Bw))
    mask |= 1 << kIsaAmx;
  return mask;
#elif defined(__aarch64__)
  return 1 << kIsaNeon;  // NEON is base
#else
  return 0;
#endif
}

#if defined(__x86_64__) && defined(VGG_SCAN_EMULATE)
// Built against SIMDe (simd_x86.h), for the tests: every x86 path runs on any x86-64 CPU.
int AmxStatus() { return 0; }
int CpuFeatures() {
  return kCpuAvx2 | kCpuAvx512Bw | kCpuAvx512Vnni | kCpuAvx512Bf16 | kCpuAvxVnni | kCpuAmxInt8;
}
#elif defined(__x86_64__)
// AMX on this CPU: 0 usable; -1 the CPU (or the OS's XCR0) lacks AMX-TILE + AMX-INT8; else the
// errno of Linux's refusal to give this process the tile state. Asked once per process.
int AmxStatus() {
  static const int status = [] {
    unsigned a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || !(d >> 24 & 1) || !(d >> 25 & 1)) return -1;
    if (!__get_cpuid(1, &a, &b, &c, &d) || !(c >> 27 & 1)) return -1;  // OSXSAVE: XGETBV works
    unsigned lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    if ((lo >> 17 & 3) != 3) return -1;  // XTILECFG + XTILEDATA not enabled by the OS
    constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    if (syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) != 0) return errno ? errno : 1;
    return 0;
  }();
  return status;
}

// This CPU's kCpu* features; __builtin_cpu_supports checks the OS saves the vector state too.
int CpuFeatures() {
  __builtin_cpu_init();
  int cpu = 0;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
      __builtin_cpu_supports("f16c"))
    cpu |= kCpuAvx2;
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")) cpu |= kCpuAvx512Bw;
  if (__builtin_cpu_supports("avx512vnni")) cpu |= kCpuAvx512Vnni;
  if (__builtin_cpu_supports("avx512bf16")) cpu |= kCpuAvx512Bf16;
  // AVX-VNNI from cpuid itself: older compilers' __builtin_cpu_supports do not know the name.
  unsigned a, b, c, d;
  if (__get_cpuid_count(7, 1, &a, &b, &c, &d) && (a >> 4 & 1)) cpu |= kCpuAvxVnni;
  if (AmxStatus() == 0) cpu |= kCpuAmxInt8;
  return cpu;
}
#else
int AmxStatus() { return -1; }
int CpuFeatures() { return 0; }
#endif

int IsaMask(int dtype) {
  static const int cpu = CpuFeatures();  // cpuid, and the AMX request, once
  return IsaMaskFor(dtype, cpu);
}

// The path a call runs: the best of `mask` when `want` is 0, else `want` if the CPU has it; -1: none.
int64_t Resolve(int64_t want, int mask) {
  if (want == 0) {
    for (int64_t isa : {kIsaAvx512, kIsaAvxVnni, kIsaAvx2, kIsaNeon})
      if (mask >> isa & 1) return isa;
    return -1;
  }
  return want > 0 && want <= kIsaAmx && (mask >> want & 1) ? want : -1;
}

// Checks shapes, runs the scan over XLA's thread pool and writes the merged top-k. `pack` fills
// `packed` with the queries in the layout of the loop that will run (p.q, p.d and p.dp are set).
template <class Pack>
ffi::Error ScanTopK(const char* name, const Kernel& kern, ffi::ThreadPool& pool, ffi::Span<const int64_t> qd,
                    ffi::Span<const int64_t> md, int64_t esize, const void* m,
                    ffi::Buffer<ffi::F32>& scale, ffi::Buffer<ffi::F32>& qmul,
                    ffi::Buffer<ffi::F32>& bias, ffi::Buffer<ffi::F32>& qoff,
                    ffi::Buffer<ffi::F32>& weight, ffi::ResultBuffer<ffi::F32>& out_s,
                    ffi::ResultBuffer<ffi::S32>& out_i, Pack pack) {
  auto od = out_s->dimensions();
  if (qd.size() != 2 || md.size() != 2 || qd[1] != md[1] || od.size() != 2 || od[0] != qd[0])
    return ffi::Error::InvalidArgument(std::string(name) +
                                       ": expected queries [Q, D], rows [N, D], out [Q, k]");
  const int64_t nq = qd[0], d = qd[1], n = md[0], k = od[1];
  if (!kern.lanes && nq > kSmallQ)
    return ffi::Error::InvalidArgument(std::string(name) + ": at most 8 queries per call");
  if (scale.element_count() != size_t(n) || bias.element_count() != size_t(n) ||
      weight.element_count() != size_t(n) || qmul.element_count() != size_t(nq) ||
      qoff.element_count() != size_t(nq))
    return ffi::Error::InvalidArgument(std::string(name) +
                                       ": scale/bias/weight need [N], qmul/qoff [Q]");
  if ((d * esize) % 4 != 0 || d > 65536)
    return ffi::Error::InvalidArgument(std::string(name) +
                                       ": rows must be a multiple of 4 bytes, D <= 65536");
  auto sh = std::make_shared<Shared>();
  Problem& p = sh->p;
  sh->scan = kern.scan;
  p.m = static_cast<const uint8_t*>(m);
  p.scale = scale.typed_data();
  p.bias = bias.typed_data();
  p.weight = weight.typed_data();
  p.n = n;
  p.row_bytes = d * esize;
  p.d = d;
  p.q = nq;
  p.k = k;
  p.tiles = (nq + 15) / 16;
  std::vector<uint8_t> packed;
  std::vector<float> qm, qo;
  if (nq <= kSmallQ) {
    p.dp = (p.row_bytes + 63) / 64 * kern.qbytes;
    qm.assign(qmul.typed_data(), qmul.typed_data() + nq);
    qo.assign(qoff.typed_data(), qoff.typed_data() + nq);
  } else {
    p.dp = p.row_bytes;
    p.tiles = (nq + kern.lanes - 1) / kern.lanes;
    qm.assign(p.tiles * kern.lanes, 0.0f);
    qo.assign(p.tiles * kern.lanes, 0.0f);
    std::copy(qmul.typed_data(), qmul.typed_data() + nq, qm.begin());
    std::copy(qoff.typed_data(), qoff.typed_data() + nq, qo.begin());
  }
  pack(p, packed);
  p.qpacked = packed.data();
  p.qmul = qm.data();
  p.qoff = qo.data();

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

// Bit kIsa* set for each path the kernel of `dtype` (0 int8, 1 bfloat16, 2 float16) runs here,
// or would run on a CPU with the features `cpu` (kCpu* bits), and this CPU's features.
extern "C" int vgg_topk_isas(int dtype) { return IsaMask(dtype); }
extern "C" int vgg_topk_isas_for(int dtype, int cpu) { return IsaMaskFor(dtype, cpu); }
extern "C" int vgg_cpu_features() { return CpuFeatures(); }
// AmxStatus(): 0 AMX usable, -1 no AMX here, else the errno of the kernel's refusal.
extern "C" int vgg_amx_status() { return AmxStatus(); }

// The instruction ceiling of the int8 path in use, one thread for about `seconds`, in GOP/s (one
// multiply-add = 2 operations): 12 independent vpdpbusd (VNNI), or 6 independent vpmaddubsw +
// vpmaddwd + vpaddd (AVX2). Benchmarks run it on every core at once for the floor.
extern "C" double vgg_int8_peak_gops(double seconds) {
  const int64_t isa = Resolve(0, IsaMask(0));
  if (isa < 0) return 0.0;
  const auto t0 = std::chrono::steady_clock::now();
  double ops = 0, sec = 0;
  while (sec < seconds) {
#if defined(__x86_64__)
    ops += isa == kIsaAvx512    ? VnniPeak(1 << 16)
#if VGG_HAVE_AVX_VNNI
           : isa == kIsaAvxVnni ? AvxVnniPeak(1 << 16)
#endif
                                : Avx2Peak(1 << 16);
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

// int8 queries [Q, D] as unsigned bytes q + 128, as the vpdpbusd loops read them. Few: [Q][dp],
// padded with 128 (meeting the zeros past a row's end). Many: tiles of `lanes` queries,
// [Q/lanes][D/4][lanes][4].
static void PackUnsigned(const int8_t* qs, const Problem& p, int64_t lanes,
                         std::vector<uint8_t>& packed) {
  const int64_t nq = p.q, d = p.d;
  if (nq <= kSmallQ) {
    packed.assign(nq * p.dp, 128);
    for (int64_t j = 0; j < nq; ++j)
      for (int64_t c = 0; c < d; ++c) packed[j * p.dp + c] = uint8_t(qs[j * d + c] + 128);
    return;
  }
  const int64_t groups = d / 4;
  packed.assign(p.tiles * groups * lanes * 4, 128);
  for (int64_t j = 0; j < nq; ++j)
    for (int64_t c = 0; c < d; ++c)
      packed[TileOffset(j, c, groups, lanes)] = uint8_t(qs[j * d + c] + 128);
}

// int8 queries [Q, D] as AMX's B tiles read them: signed, tiles of 16 queries, the groups of 4
// bytes padded with zeros to whole 64-byte chunks: [Q/16][ceil(D/64) * 16][16][4].
static void PackSignedAmx(const int8_t* qs, const Problem& p, std::vector<uint8_t>& packed) {
  const int64_t groups = (p.row_bytes + 63) / 64 * 16;
  packed.assign(p.tiles * groups * 64, 0);
  for (int64_t j = 0; j < p.q; ++j)
    for (int64_t c = 0; c < p.d; ++c) packed[TileOffset(j, c, groups)] = uint8_t(qs[j * p.d + c]);
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
                              (want == kIsaAvx2      ? "AVX2"
                               : want == kIsaAvx512  ? "AVX-512"
                               : want == kIsaNeon    ? "NEON"
                               : want == kIsaAvxVnni ? "AVX-VNNI"
                               : want == kIsaAmx     ? "AMX-INT8"
                                                     : "") +
                              " path of this kernel");
}

static ffi::Error Int8TopK(ffi::ThreadPool pool, ffi::Buffer<ffi::S8> q8, ffi::Buffer<ffi::S8> m,
                           ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> qmul,
                           ffi::Buffer<ffi::F32> bias, ffi::Buffer<ffi::F32> qoff,
                           ffi::Buffer<ffi::F32> weight, ffi::ResultBuffer<ffi::F32> out_s,
                           ffi::ResultBuffer<ffi::S32> out_i, int64_t want) {
  const int64_t isa = Resolve(want, IsaMask(0));
  if (isa < 0) return NoPath("int8_topk", want);
  const int8_t* qs = q8.typed_data();
#if defined(__aarch64__)
  auto pack = [qs](const Problem& p, std::vector<uint8_t>& packed) {  // signed, few queries
    packed.assign(p.q * p.dp, 0);
    for (int64_t j = 0; j < p.q; ++j) std::memcpy(&packed[j * p.dp], qs + j * p.d, p.d);
  };
  return ScanTopK("int8_topk", kInt8Neon, pool, q8.dimensions(), m.dimensions(), 1, m.typed_data(),
                  scale, qmul, bias, qoff, weight, out_s, out_i, pack);
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
    return ScanTopK("int8_topk", kInt8Avx2, pool, q8.dimensions(), m.dimensions(), 1,
                    m.typed_data(), scale, qmul, bias, qoff, weight, out_s, out_i, pack);
  }
#if VGG_HAVE_AMX
  if (isa == kIsaAmx) {  // signed queries, tiles of 16, groups padded to whole 64-byte chunks
    if (q8.dimensions().size() == 2 && q8.dimensions()[0] <= kSmallQ)
      return ffi::Error::InvalidArgument("int8_topk: the AMX path takes more than 8 queries");
    auto pack = [qs](const Problem& p, std::vector<uint8_t>& packed) {
      PackSignedAmx(qs, p, packed);
    };
    return ScanTopK("int8_topk", kInt8Amx, pool, q8.dimensions(), m.dimensions(), 1,
                    m.typed_data(), scale, qmul, bias, qoff, weight, out_s, out_i, pack);
  }
#endif
  // Queries as unsigned bytes (q + 128), tiles of 8 (AVX-VNNI) or 16 (AVX512-VNNI).
#if VGG_HAVE_AVX_VNNI
  const Kernel& kern = isa == kIsaAvxVnni ? kInt8AvxVnni : kInt8Avx512;
#else
  const Kernel& kern = kInt8Avx512;
#endif
  auto pack = [qs, &kern](const Problem& p, std::vector<uint8_t>& packed) {
    PackUnsigned(qs, p, kern.lanes, packed);
  };
  return ScanTopK("int8_topk", kern, pool, q8.dimensions(), m.dimensions(), 1,
                  m.typed_data(), scale, qmul, bias, qoff, weight, out_s, out_i, pack);
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
                           ffi::Buffer<ffi::F32> bias, ffi::Buffer<ffi::F32> qoff,
                           ffi::Buffer<ffi::F32> weight, ffi::ResultBuffer<ffi::F32> out_s,
                           ffi::ResultBuffer<ffi::S32> out_i, int64_t want) {
  const int64_t isa = Resolve(want, IsaMask(1));
  if (isa < 0) return NoPath("bf16_topk", want);
  const float* qs = q.typed_data();
#if defined(__aarch64__)
  auto pack = [qs](const Problem& p, std::vector<uint8_t>& packed) { PackFloat(qs, p, packed); };
  return ScanTopK("bf16_topk", kBf16Neon, pool, q.dimensions(), m.dimensions(), 2, m.typed_data(),
                  scale, qmul, bias, qoff, weight, out_s, out_i, pack);
#elif defined(__x86_64__)
  if (isa == kIsaAvx2) {  // float32 queries against rows widened exactly
    auto pack = [qs](const Problem& p, std::vector<uint8_t>& packed) { PackFloat(qs, p, packed); };
    return ScanTopK("bf16_topk", kBf16Avx2, pool, q.dimensions(), m.dimensions(), 2, m.typed_data(),
                    scale, qmul, bias, qoff, weight, out_s, out_i, pack);
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
  return ScanTopK("bf16_topk", kBf16Avx512, pool, q.dimensions(), m.dimensions(), 2, m.typed_data(),
                  scale, qmul, bias, qoff, weight, out_s, out_i, pack);
#else
  return NoPath("bf16_topk", want);
#endif
}

static ffi::Error F16TopK(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F16> m,
                          ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> qmul,
                          ffi::Buffer<ffi::F32> bias, ffi::Buffer<ffi::F32> qoff,
                          ffi::Buffer<ffi::F32> weight, ffi::ResultBuffer<ffi::F32> out_s,
                          ffi::ResultBuffer<ffi::S32> out_i, int64_t want) {
  const int64_t isa = Resolve(want, IsaMask(2));
  if (isa < 0) return NoPath("f16_topk", want);
  const float* qs = q.typed_data();
  auto pack = [qs](const Problem& p, std::vector<uint8_t>& packed) { PackFloat(qs, p, packed); };
#if defined(__aarch64__)
  const Kernel& kern = kF16Neon;
#elif defined(__x86_64__)
  const Kernel& kern = isa == kIsaAvx2 ? kF16Avx2 : kF16Avx512;
#else
  return NoPath("f16_topk", want);
#endif
  return ScanTopK("f16_topk", kern, pool, q.dimensions(), m.dimensions(), 2, m.typed_data(), scale,
                  qmul, bias, qoff, weight, out_s, out_i, pack);
}

// The three handlers take (queries, rows, scale [N], qmul [Q], bias [N], qoff [Q], weight [N]) ->
// (scores, ids) [Q, k] and the attribute `isa` (0: the best path here; kIsa*: that one).
template <ffi::DataType QueryType, ffi::DataType RowType>
auto TopKBinding() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Arg<ffi::Buffer<QueryType>>()
      .template Arg<ffi::Buffer<RowType>>()
      .template Arg<ffi::Buffer<ffi::F32>>()  // scale
      .template Arg<ffi::Buffer<ffi::F32>>()  // qmul
      .template Arg<ffi::Buffer<ffi::F32>>()  // bias
      .template Arg<ffi::Buffer<ffi::F32>>()  // qoff
      .template Arg<ffi::Buffer<ffi::F32>>()  // weight
      .template Ret<ffi::Buffer<ffi::F32>>()
      .template Ret<ffi::Buffer<ffi::S32>>()
      .template Attr<int64_t>("isa");
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(VggInt8TopK, Int8TopK, (TopKBinding<ffi::S8, ffi::S8>()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(VggBf16TopK, Bf16TopK, (TopKBinding<ffi::F32, ffi::BF16>()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(VggF16TopK, F16TopK, (TopKBinding<ffi::F32, ffi::F16>()));
