// Times one Hopper-forward candidate (HDIM, BLOCK_M, BLOCK_N, STAGES, OVERLAP, PINGPONG, PERSISTENT, EXP2_FMA:
// the fields of sm90/kernel_traits.h), torch-free, on the paper's shapes: bf16, 16k tokens, hidden 2048, causal
// and not. Built and run by benchmarks/tile_sweep_sm90.sh, for the tile choices in sm90/tile_config.h and
// the ablations in NOTES.md. Each shape's O and LSE are compared with the default kernel's for the head dim
// (tile_config.h's, which the test suite checks): a sanity check that a knob kept the results, not a test.
#include <cmath>
#include <cstdio>
#include <cstdlib>

#include "sweep_utils.cuh"

#include "sm90/fwd_launch.h"

#ifndef EXP2_FMA
#define EXP2_FMA 0  // of every 8 score columns, those whose exp2 runs on the FMA units
#endif

using Element = cutlass::bfloat16_t;
using Traits = flash::sm90::FwdTraits<HDIM, Element, BLOCK_M, BLOCK_N, STAGES, OVERLAP, PINGPONG, PERSISTENT, EXP2_FMA>;
using Reference = flash::sm90::FwdTraits<HDIM, Element>;

int main() {
  constexpr int kTokens = 16384, kHidden = 2048, kHeads = kHidden / HDIM;
  for (int seqlen : {512, 2048, 8192}) {
    int const batch = kTokens / seqlen;
    size_t const n = size_t(kTokens) * kHeads * HDIM;
    size_t const rows = size_t(kTokens) * kHeads;
    Element *q, *k, *v, *o, *o_ref;
    float *lse, *lse_ref;
    unsigned *scratch;
    for (Element **t : {&q, &k, &v, &o, &o_ref}) { CHECK(cudaMalloc(t, n * sizeof(Element))); }
    for (float **t : {&lse, &lse_ref}) { CHECK(cudaMalloc(t, rows * sizeof(float))); }
    CHECK(cudaMalloc(&scratch, 2 * sizeof(unsigned)));
    fill_random<<<1024, 256>>>(q, n, 1), fill_random<<<1024, 256>>>(k, n, 2), fill_random<<<1024, 256>>>(v, n, 3);
    flash::FwdParams p{};
    int64_t const row = int64_t(kHeads) * HDIM;
    auto head_tensor = [&](Element *ptr) { return flash::HeadTensor{ptr, row * seqlen, row, HDIM}; };
    p.q = head_tensor(q), p.k = head_tensor(k), p.v = head_tensor(v), p.o = head_tensor(o);
    p.lse = {lse, int64_t(kHeads) * seqlen, seqlen};
    p.batch = batch, p.heads = p.heads_kv = kHeads, p.seqlen_q = p.seqlen_k = seqlen, p.head_dim = HDIM;
    p.total_q = p.total_k = kTokens;
    p.softmax_scale = 1.f / std::sqrt(float(HDIM)), p.softmax_scale_log2 = p.softmax_scale * float(M_LOG2E);
    p.inv_score_scale = 1.f / p.softmax_scale;
    for (int causal = 0; causal < 2; ++causal) {
      p.is_windowed = causal, p.window_left = seqlen, p.window_right = causal ? 0 : seqlen;
      for (int i = 0; i < 5; ++i) { CHECK(flash::sm90::launch_fwd<Traits>(p, 0)); }
      cudaEvent_t start, stop;
      CHECK(cudaEventCreate(&start));
      CHECK(cudaEventCreate(&stop));
      constexpr int kReps = 30;
      CHECK(cudaEventRecord(start));
      for (int i = 0; i < kReps; ++i) { CHECK(flash::sm90::launch_fwd<Traits>(p, 0)); }
      CHECK(cudaEventRecord(stop));
      CHECK(cudaEventSynchronize(stop));
      float ms;
      CHECK(cudaEventElapsedTime(&ms, start, stop));
      double const flops = 4.0 * batch * kHeads * double(seqlen) * seqlen * HDIM / (causal ? 2 : 1);
      // o and lse hold the candidate's last run; the default kernel writes its own pair.
      flash::FwdParams p_ref = p;
      p_ref.o.ptr = o_ref, p_ref.lse.ptr = lse_ref;
      CHECK(flash::sm90::launch_fwd<Reference>(p_ref, 0));
      CHECK(cudaDeviceSynchronize());
      float o_diff[2], lse_diff[2];
      compare(o, o_ref, n, scratch, o_diff);
      compare(lse, lse_ref, rows, scratch, lse_diff);
      // Expected: bf16 roundings of P and O (and exp2_fma's 1e-4) at most; a wrong row or a race is O's size.
      bool const mismatch = !(o_diff[0] <= 0.05f * o_diff[1] && lse_diff[0] <= 5e-3f);
      std::printf("sm90 fwd hdim %3d  tile %3dx%-3d stages %d overlap %d pingpong %d persistent %d exp2fma %d/8  causal %d  S %5d  %6.1f TFLOP/s"
                  "  vs default: max|dO| %.1e (max|O| %.1e) max|dLSE| %.1e%s\n",
                  HDIM, BLOCK_M, BLOCK_N, STAGES, OVERLAP, PINGPONG, PERSISTENT, EXP2_FMA, causal, seqlen,
                  flops / (ms / kReps) / 1e9, o_diff[0], o_diff[1], lse_diff[0], mismatch ? "  MISMATCH" : "");
    }
    for (void *ptr : {(void *)q, (void *)k, (void *)v, (void *)o, (void *)o_ref, (void *)lse, (void *)lse_ref,
                      (void *)scratch}) {
      CHECK(cudaFree(ptr));
    }
  }
  return 0;
}
