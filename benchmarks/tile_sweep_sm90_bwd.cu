// Times one Hopper-backward candidate, torch-free: KERNEL (0 the dQ kernel, 1 the dK/dV kernel, 2 the dK/dV
// kernel with the atomic dQ: bwd_dq_atomic.h) with the
// fields of its traits (sm90/bwd_kernel_traits.h): HDIM, BLOCK_M, BLOCK_N, STAGES, OVERLAP, PREFETCH_ROWS and
// DESC_PER_STEP (dK/dV only; tile_config.h's BwdTile says what each does). On the paper's
// shapes: bf16, 16k tokens, hidden 2048, S 1024 / 4096 / 16384, causal and not; the common variant (causal as
// the window (unbounded, 0), as the binding makes it). Built and run by benchmarks/tile_sweep_sm90_bwd.sh.
// FLOPs as tile_sweep.cu counts them: dQ does 3 of the split backward's 7 matmuls, dK/dV 4 (2.5x forward
// * 3/7 and * 4/7), the atomic dK/dV the whole backward (2.5x forward; its dQ's cast not timed). The atomic
// kernel's results are checked against the split backward's on the same inputs: its dQ (cast from fp32)
// against the dQ kernel's (tile_config.h's tile), its dK and dV bits against the split dK/dV kernel's of the
// same tile (the same products in the same order: the same hash).
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <utility>

#include "sweep_utils.cuh"

#include "sm90/bwd_launch.h"

using Element = cutlass::bfloat16_t;
#ifndef PREFETCH_ROWS
#define PREFETCH_ROWS 0
#endif
#ifndef DESC_PER_STEP
#define DESC_PER_STEP 0
#endif
using DkdvTraits = flash::sm90::BwdDkdvTraits<HDIM, Element, BLOCK_M, BLOCK_N, STAGES, OVERLAP, PREFETCH_ROWS,
                                              DESC_PER_STEP>;
#if KERNEL == 0
using Traits = flash::sm90::BwdDqTraits<HDIM, Element, BLOCK_M, BLOCK_N, STAGES, OVERLAP>;
#elif KERNEL == 1
using Traits = DkdvTraits;
#else
using Traits = flash::sm90::BwdDkdvAtomicDqTraits<DkdvTraits>;
#endif
constexpr bool kAtomic = KERNEL == 2;

// The atomic backward's last step, as the binding's dq.copy_(dq_accum): the fp32 dQ (already scaled) cast.
__global__ void cast_dq(float const *dq_accum, Element *dq, size_t n) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) {
    dq[i] = Element(dq_accum[i]);
  }
}

// Plausible LSE and D for timing: LSE = log(seqlen) + 1 (natural log, as the forward writes it), about what
// random inputs in [-1, 1) give, so that P = exp(S·scale - LSE) stays in (0, 1]; D small, of both signs.
__global__ void fill_rows(float *lse, float *dpsum, size_t n, float lse_value) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) {
    lse[i] = lse_value;
    dpsum[i] = 0.01f * float(int(i % 17) - 8);
  }
}

// A hash of the gradients' bits, the same whatever order the threads add in: the knobs (stages, overlap,
// prefetch_rows, desc_per_step) leave every product's accumulation order as it was, so candidates of one
// kernel, head dim and tile must print the same value (a check that a knob kept the results, not a test).
__global__ void hash_bits(Element const *p, size_t n, unsigned long long *out) {
  unsigned long long h = 0;
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) {
    h += (i * 0x9E3779B97F4A7C15ull + 1) * (reinterpret_cast<uint16_t const *>(p)[i] + 1ull);
  }
  atomicAdd(out, h);
}

// A fault is reported by the first synchronize after it, which names no kernel: each (shape, causal) syncs
// after its fills and after its first launch, so that the message says which of them faulted and for what.
#define CHECK_AT(call, what, seqlen, causal)                                                             \
  do {                                                                                                  \
    if (cudaError_t err_ = (call); err_ != cudaSuccess) {                                               \
      std::fprintf(stderr, "%s:%d: %s, after %s (S %d, causal %d)\n", __FILE__, __LINE__,               \
                   cudaGetErrorString(err_), what, seqlen, causal);                                     \
      std::exit(1);                                                                                     \
    }                                                                                                   \
  } while (0)

// What the launch is given, once per shape: for a comparison with the binding's params (flash_api.cpp's
// prepare_bwd) when a candidate faults.
void print_params(flash::BwdParams const &p) {
  auto tensor = [](char const *name, flash::HeadTensor const &t) {
    std::printf("  %-5s ptr %% 1024 = %4u  strides (batch %lld, row %lld, head %lld)\n", name,
                unsigned(reinterpret_cast<uintptr_t>(t.ptr) % 1024), (long long)t.batch_stride,
                (long long)t.row_stride, (long long)t.head_stride);
  };
  for (auto [name, t] : {std::pair{"q", p.q}, {"k", p.k}, {"v", p.v}, {"o", p.o}, {"dout", p.dout}, {"dq", p.dq},
                         {"dk", p.dk}, {"dv", p.dv}}) {
    tensor(name, t);
  }
  for (auto [name, t] : {std::pair{"lse", p.lse}, {"dpsum", p.dpsum}}) {
    std::printf("  %-5s ptr %% 1024 = %4u  strides (batch %lld, head %lld)\n", name,
                unsigned(reinterpret_cast<uintptr_t>(t.ptr) % 1024), (long long)t.batch_stride,
                (long long)t.head_stride);
  }
  std::printf("  batch %d heads %d/%d seqlen %d/%d total %d/%d head_dim %d  kThreads %d kSmemSize %d  "
              "sizeof(KernelParams) %zu\n",
              p.batch, p.heads, p.heads_kv, p.seqlen_q, p.seqlen_k, p.total_q, p.total_k, p.head_dim,
              Traits::kThreads, Traits::kSmemSize, sizeof(typename Traits::KernelParams));
}

int main() {
  constexpr int kTokens = 16384, kHidden = 2048, kHeads = kHidden / HDIM;
  char const *names[] = {"sm90 dq", "sm90 dkdv", "sm90 dkdv_atomic"};
  double const flop_share = KERNEL == 0 ? 2.5 * 3 / 7 : KERNEL == 1 ? 2.5 * 4 / 7 : 2.5;
  // SWEEP_SEQLEN=1024 (say) times that shape only: a short run under compute-sanitizer.
  char const *only = std::getenv("SWEEP_SEQLEN");
  for (int seqlen : {1024, 4096, 16384}) {
    if (only != nullptr && std::atoi(only) != seqlen) { continue; }
    int const batch = kTokens / seqlen;
    size_t const n = size_t(kTokens) * kHeads * HDIM, rows = size_t(kTokens) * kHeads;
    Element *q, *k, *v, *o, *dout, *dq, *dk, *dv, *dq_atomic;
    float *lse, *dpsum, *dq_accum;
    unsigned long long *hash;
    unsigned *scratch;
    CHECK(cudaMalloc(&hash, sizeof(*hash)));
    CHECK(cudaMalloc(&scratch, 2 * sizeof(unsigned)));
    for (Element **t : {&q, &k, &v, &o, &dout, &dq, &dk, &dv, &dq_atomic}) { CHECK(cudaMalloc(t, n * sizeof(Element))); }
    for (float **t : {&lse, &dpsum}) { CHECK(cudaMalloc(t, rows * sizeof(float))); }
    CHECK(cudaMalloc(&dq_accum, n * sizeof(float)));
    fill_random<<<1024, 256>>>(q, n, 1), fill_random<<<1024, 256>>>(k, n, 2), fill_random<<<1024, 256>>>(v, n, 3);
    fill_random<<<1024, 256>>>(o, n, 4), fill_random<<<1024, 256>>>(dout, n, 5);
    for (Element *grad : {dq, dk, dv}) { CHECK(cudaMemset(grad, 0, n * sizeof(Element))); }
    flash::BwdParams p{};
    int64_t const row = int64_t(kHeads) * HDIM;
    auto head_tensor = [&](Element *ptr) { return flash::HeadTensor{ptr, row * seqlen, row, HDIM}; };
    p.q = head_tensor(q), p.k = head_tensor(k), p.v = head_tensor(v), p.o = head_tensor(o);
    p.dout = head_tensor(dout), p.dq = head_tensor(dq), p.dk = head_tensor(dk), p.dv = head_tensor(dv);
    p.dq_accum = {dq_accum, row * seqlen, row, HDIM};  // fp32, laid out as q (the binding's: contiguous)
    p.lse = {lse, int64_t(kHeads) * seqlen, seqlen}, p.dpsum = {dpsum, int64_t(kHeads) * seqlen, seqlen};
    p.batch = batch, p.heads = p.heads_kv = kHeads, p.seqlen_q = p.seqlen_k = seqlen, p.head_dim = HDIM;
    // total_q and total_k stay 0, as the binding leaves them for a fixed-length batch (set_qkv): only varlen
    // reads them.
    p.softmax_scale = 1.f / std::sqrt(float(HDIM)), p.softmax_scale_log2 = p.softmax_scale * float(M_LOG2E);
    p.inv_score_scale = 1.f / p.softmax_scale;
    print_params(p);
    for (int causal = 0; causal < 2; ++causal) {
      p.is_windowed = causal, p.window_left = seqlen, p.window_right = causal ? 0 : seqlen;
      auto run = [&] {
        if constexpr (KERNEL == 0) {
          CHECK(flash::sm90::launch_bwd_dq<Traits>(p, 0));
        } else {
          CHECK((flash::sm90::launch_bwd_dkdv<Traits, false, kAtomic>(p, 0)));  // atomic: dQ summed over the runs
        }
      };
      // The dQ kernel rewrites D as rowsum(P∘dP), which does not depend on the D it read: repeated calls
      // see the same, finite, values.
      fill_rows<<<1024, 256>>>(lse, dpsum, rows, std::log(float(seqlen)) + 1.f);
      CHECK_AT(cudaDeviceSynchronize(), "the fills", seqlen, causal);
      run();
      CHECK_AT(cudaDeviceSynchronize(), names[KERNEL], seqlen, causal);
      for (int i = 0; i < 4; ++i) { run(); }
      CHECK_AT(cudaDeviceSynchronize(), names[KERNEL], seqlen, causal);
      cudaEvent_t start, stop;
      CHECK(cudaEventCreate(&start));
      CHECK(cudaEventCreate(&stop));
      constexpr int kReps = 30;
      CHECK(cudaEventRecord(start));
      for (int i = 0; i < kReps; ++i) { run(); }
      CHECK(cudaEventRecord(stop));
      CHECK_AT(cudaEventSynchronize(stop), names[KERNEL], seqlen, causal);
      float ms;
      CHECK(cudaEventElapsedTime(&ms, start, stop));
      ms /= kReps;
      if constexpr (kAtomic) { CHECK(cudaMemset(dq_accum, 0, n * sizeof(float))); }
      CHECK(cudaMemset(hash, 0, sizeof(*hash)));
      // A named array: a range-for over `cond ? initializer_list{...} : initializer_list{...}` walks a
      // backing array that died with the operand's temporary (g++ -O3 passed null or stale pointers here:
      // the "illegal memory access" / "misaligned address" every candidate reported at the copy below).
      Element *const grads[] = {KERNEL == 0 ? dq : dk, dv};
      for (int g = 0; g < (KERNEL == 0 ? 1 : 2); ++g) { hash_bits<<<1024, 256>>>(grads[g], n, hash); }
      unsigned long long hash_host;
      CHECK_AT(cudaMemcpy(&hash_host, hash, sizeof(hash_host), cudaMemcpyDeviceToHost), "hash_bits", seqlen, causal);
      double const flops = 4.0 * batch * kHeads * double(seqlen) * seqlen * HDIM / (causal ? 2 : 1) * flop_share;
      std::printf("%-9s hdim %3d  tile %3dx%-3d stages %d overlap %d prefetch %d desc %d  causal %d  S %5d  %7.3f ms"
                  "  %6.1f TFLOP/s  hash %016llx\n",
                  names[KERNEL], HDIM, BLOCK_M, BLOCK_N, STAGES, OVERLAP, PREFETCH_ROWS, DESC_PER_STEP, causal, seqlen, ms,
                  flops / ms / 1e9, hash_host);
      if constexpr (kAtomic) {
        // One run from a zeroed dq_accum, cast; then the split backward on the same inputs and D: its dK/dV
        // kernel of this tile, then its dQ kernel (which rewrites D, after both have read it).
        run();
        cast_dq<<<1024, 256>>>(dq_accum, dq_atomic, n);
        CHECK(cudaMemset(hash, 0, sizeof(*hash)));
        for (Element *grad : {dk, dv}) { hash_bits<<<1024, 256>>>(grad, n, hash); }
        unsigned long long hash_atomic, hash_split;
        CHECK_AT(cudaMemcpy(&hash_atomic, hash, sizeof(hash_atomic), cudaMemcpyDeviceToHost), names[KERNEL], seqlen,
                 causal);
        CHECK(flash::sm90::launch_bwd_dkdv<DkdvTraits>(p, 0));
        CHECK(cudaMemset(hash, 0, sizeof(*hash)));
        for (Element *grad : {dk, dv}) { hash_bits<<<1024, 256>>>(grad, n, hash); }
        CHECK_AT(cudaMemcpy(&hash_split, hash, sizeof(hash_split), cudaMemcpyDeviceToHost), "sm90 dkdv", seqlen,
                 causal);
        CHECK((flash::sm90::launch_bwd_dq<flash::sm90::BwdDqTraits<HDIM, Element>>(p, 0)));
        CHECK_AT(cudaDeviceSynchronize(), "sm90 dq", seqlen, causal);
        float dq_diff[2];
        compare(dq_atomic, dq, n, scratch, dq_diff);
        // Expected: dS rounded to 16 bits from fp32 Sᵀ, dPᵀ that may differ in their last bits from the dQ
        // kernel's S, dP, and fp32 sums in another order: a few bf16 roundings of dQ. A lost add or a race is
        // dQ's size.
        bool const mismatch = !(dq_diff[0] <= 0.02f * dq_diff[1]) || hash_atomic != hash_split;
        std::printf("%-9s vs split: dK/dV hash %016llx %s, max|ddQ| %.1e (max|dQ| %.1e)%s\n", names[KERNEL],
                    hash_split, hash_atomic == hash_split ? "same" : "DIFFERENT", dq_diff[0], dq_diff[1],
                    mismatch ? "  MISMATCH" : "");
      }
    }
    for (void *ptr : {(void *)q, (void *)k, (void *)v, (void *)o, (void *)dout, (void *)dq, (void *)dk, (void *)dv,
                      (void *)lse, (void *)dpsum, (void *)hash, (void *)scratch, (void *)dq_atomic, (void *)dq_accum}) {
      CHECK(cudaFree(ptr));
    }
  }
  return 0;
}
