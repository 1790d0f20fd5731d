// The binding: the only file that knows torch. Checks tensors, fills the params structs, picks the
// kernel for the head dim and dtype, and launches it on the current stream of the inputs' device.
#include <ATen/cuda/CUDAGeneratorImpl.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cutlass/numeric_types.h>
#include <ATen/MemoryOverlap.h>
#include <torch/extension.h>

#include <cmath>
#include <cstdlib>
#include <limits>
#include <algorithm>
#include <map>
#include <mutex>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "common/decode_plan.h"  // torch- and CUDA-free: GQA packing and the split count
#include "common/dropout_mask.h"
#include "instantiations/kernels.h"
#include "sm80/tile_config.h"  // torch- and CUDA-free: the KV-cache tiles, for the split heuristic

namespace {

constexpr int kBuiltHeadDims[] = {FLASH_ATTN2_BUILT_HEAD_DIMS};
#ifndef FLASH_ATTN2_SM90
#define FLASH_ATTN2_SM90 0  // setup.py defines it: 1 when the Hopper kernels (sm_90a) are built
#endif
#ifndef FLASH_ATTN2_ATOMIC_BWD
#define FLASH_ATTN2_ATOMIC_BWD 0  // setup.py defines it: 1 when the atomic-dQ backward is built (opt-in)
#endif
#ifndef FLASH_ATTN2_SM90_BWD
#define FLASH_ATTN2_SM90_BWD 0  // setup.py defines it: 1 when the Hopper backward kernels are built (sm_90a)
#endif

template <size_t N>
constexpr bool contains(int const (&values)[N], int value) {
  for (int v : values) {
    if (v == value) { return true; }
  }
  return false;
}

constexpr bool is_built(int head_dim) { return contains(kBuiltHeadDims, head_dim); }
constexpr bool has_sm90_fwd(int head_dim) { return contains(flash::kSm90FwdHeadDims, head_dim); }
constexpr bool any_kernel(int) { return true; }
constexpr bool has_kvcache(int head_dim) { return contains(flash::kKvcacheHeadDims, head_dim); }
constexpr bool has_sm90_bwd(int head_dim) { return contains(flash::kSm90BwdHeadDims, head_dim); }

// Whether a device is compute capability 9.0, asked once per device (not through ATen/cuda/CUDAContext.h,
// which needs the CUDA math libraries' headers to build).
bool is_sm90(int device) {
  static std::map<int, bool> known;
  static std::mutex mutex;
  std::lock_guard<std::mutex> lock(mutex);
  auto it = known.find(device);
  if (it == known.end()) {
    int major = 0, minor = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device));
    it = known.emplace(device, major == 9 && minor == 0).first;
  }
  return it->second;
}

// The Hopper forward (csrc/sm90) takes a call when it is built, the GPU is sm_90 and it covers the call:
// a head dim that rounds up to one of kSm90FwdHeadDims (checked by the caller); both kernel variants
// (the general one: varlen, softcap, ALiBi, window left edges, dropout; mask.h). FLASH_ATTN2_FORCE_SM80=1
// sends every call to the mma.sync kernels, for A/B runs and bug reports; it is read at each call.
bool hopper_fwd(flash::FwdParams const &) {
  if (!FLASH_ATTN2_SM90) { return false; }
  char const *force = std::getenv("FLASH_ATTN2_FORCE_SM80");
  if (force != nullptr && force[0] != '\0' && std::string(force) != "0") { return false; }
  return is_sm90(c10::cuda::current_device());
}

// The Hopper backward kernels (csrc/sm90/bwd_dq_kernel.h, bwd_dkdv_kernel.h) take the split backward's dQ
// and dK/dV steps by default where they are built, on an sm_90 GPU, for the common variant they cover:
// plain, causal, GQA, varlen (fixed or packed lengths) and sinks (which the backward kernels never read: the
// LSE includes the sink, and its gradient comes from D in _ops.py); not windows with a right side > 0; the
// score mods (softcap, ALiBi, a window's left edge, dropout: needs_score_mod) only with general, which their
// general variant gives where it is built (sm90_bwd_general below; split backward only: the atomic mode's
// Hopper kernel has the common variant only).
// FLASH_ATTN2_SM90_BWD=0 (read at each call) sends them to the mma.sync kernels, for A/B runs and bug
// reports. One predicate for both, so that the dQ kernel's D rewrite always feeds the dK/dV kernel of the
// same path. FLASH_ATTN2_SM90_BWD=1 in a build without them: an error, before any launch. The head dim is the
// caller's to check (kSm90BwdHeadDims). hopper_bwd_covers: the same test without the switches (time_kernels).
bool hopper_bwd_covers(flash::BwdParams const &p, bool general) {
  if (!FLASH_ATTN2_SM90_BWD) { return false; }
  bool const variant = !p.needs_score_mod() || (FLASH_ATTN2_SM90_BWD_GENERAL && general);
  bool const covered = variant && (!p.is_windowed || p.window_right == 0);
  return covered && is_sm90(c10::cuda::current_device());
}
// The split backward's score-mod calls go to the Hopper kernels' general variant (csrc/sm90/bwd_launch.h
// run_bwd_dq_general, run_bwd_dkdv_general) where it is built (by default with the Hopper backward; on the H200
// 1.08-1.44x FlexAttention forward + backward where mma.sync gave 0.70-1.17x). FLASH_ATTN2_SM90_BWD_GENERAL=0
// (read at each call) keeps them on mma.sync; =1 in a build without it (FLASH_ATTN2_BUILD_SM90_BWD_GENERAL=0):
// an error.
bool sm90_bwd_general() {
  char const *asked = std::getenv("FLASH_ATTN2_SM90_BWD_GENERAL");
  std::string const switch_ = asked == nullptr ? "" : asked;
  if (switch_ == "0") { return false; }
  TORCH_CHECK(FLASH_ATTN2_SM90_BWD_GENERAL || switch_ != "1", "FLASH_ATTN2_SM90_BWD_GENERAL=1 asks for the Hopper "
              "backward's general variant, which this build does not have: rebuild without "
              "FLASH_ATTN2_BUILD_SM90_BWD_GENERAL=0 (and with FLASH_ATTN2_CUDA_ARCHS including 90a), or unset "
              "FLASH_ATTN2_SM90_BWD_GENERAL");
  return FLASH_ATTN2_SM90_BWD_GENERAL;
}
// deterministic: the split backward, whose score-mod calls the general variant may take; else the atomic one.
bool hopper_bwd(flash::BwdParams const &p, bool deterministic) {
  bool const general = sm90_bwd_general();  // its error first, whatever the other switch says
  char const *asked = std::getenv("FLASH_ATTN2_SM90_BWD");
  std::string const switch_ = asked == nullptr ? "" : asked;
  if (switch_ == "0") { return false; }
  TORCH_CHECK(FLASH_ATTN2_SM90_BWD || switch_ != "1", "FLASH_ATTN2_SM90_BWD=1 asks for the Hopper backward kernels, "
              "which this build does not have: rebuild with FLASH_ATTN2_CUDA_ARCHS including 90a (and without "
              "FLASH_ATTN2_BUILD_SM90_BWD=0), or unset FLASH_ATTN2_SM90_BWD");
  return hopper_bwd_covers(p, general && deterministic);
}

// The split backward's dQ and dK/dV steps: on the Hopper kernels where hopper (hopper_bwd) and they have this
// head dim, score-mod calls on their general variant (hopper_bwd takes those only where it is built and not
// switched off), else on the mma.sync ones.
template <int kHeadDim, typename Element>
cudaError_t run_split_dq(flash::BwdParams const &p, bool hopper, cudaStream_t stream) {
  if constexpr (FLASH_ATTN2_SM90_BWD && has_sm90_bwd(kHeadDim)) {
    if constexpr (FLASH_ATTN2_SM90_BWD_GENERAL) {
      if (hopper && p.needs_score_mod()) { return flash::sm90::run_bwd_dq_general<kHeadDim, Element>(p, stream); }
    }
    if (hopper) { return flash::sm90::run_bwd_dq<kHeadDim, Element>(p, stream); }
  }
  return flash::run_bwd_dq<kHeadDim, Element>(p, stream);
}
template <int kHeadDim, typename Element>
cudaError_t run_split_dkdv(flash::BwdParams const &p, bool hopper, cudaStream_t stream) {
  if constexpr (FLASH_ATTN2_SM90_BWD && has_sm90_bwd(kHeadDim)) {
    if constexpr (FLASH_ATTN2_SM90_BWD_GENERAL) {
      if (hopper && p.needs_score_mod()) { return flash::sm90::run_bwd_dkdv_general<kHeadDim, Element>(p, stream); }
    }
    if (hopper) { return flash::sm90::run_bwd_dkdv<kHeadDim, Element>(p, stream); }
  }
  return flash::run_bwd_dkdv<kHeadDim, Element>(p, stream);
}
// The atomic backward's dK/dV with dQ: on the Hopper kernel where hopper (hopper_bwd with deterministic false:
// the common variant's coverage) and it is built (FLASH_ATTN2_BUILD_ATOMIC_BWD=1 with the Hopper backward),
// else on the mma.sync one. The Hopper kernel is not yet verified on a GPU; FLASH_ATTN2_SM90_BWD=0 sends it to
// mma.sync too.
template <int kHeadDim, typename Element>
cudaError_t run_atomic_dkdv(flash::BwdParams const &p, bool hopper, cudaStream_t stream) {
  if constexpr (FLASH_ATTN2_ATOMIC_BWD && FLASH_ATTN2_SM90_BWD && has_sm90_bwd(kHeadDim)) {
    if (hopper) { return flash::sm90::run_bwd_dkdv_atomic_dq<kHeadDim, Element>(p, stream); }
  }
  return flash::run_bwd_dkdv_atomic_dq<kHeadDim, Element>(p, stream);
}

template <size_t I, bool (*Has)(int), class F>
bool try_kernel(int head_dim, F &f) {
  constexpr int kHeadDim = flash::kKernelHeadDims[I];
  if constexpr (is_built(kHeadDim) && Has(kHeadDim)) {
    if (head_dim <= kHeadDim) {
      f(std::integral_constant<int, kHeadDim>{});
      return true;
    }
  }
  return false;
}

// Calls f(integral_constant<kHeadDim>) for the smallest built kernel head dim >= head_dim that Has (a pass's
// own list of head dims, where it has fewer kernels than kKernelHeadDims).
template <bool (*Has)(int), class F, size_t... I>
bool dispatch_head_dim(int head_dim, F &&f, std::index_sequence<I...>) {
  return (try_kernel<I, Has>(head_dim, f) || ...);
}

template <bool (*Has)(int) = any_kernel, class F>
bool dispatch_head_dim(int head_dim, F &&f) {
  return dispatch_head_dim<Has>(head_dim, f, std::make_index_sequence<std::size(flash::kKernelHeadDims)>{});
}

template <class F>
void dispatch_dtype(at::ScalarType dtype, F &&f) {
  if (dtype == at::kHalf) {
    f(cutlass::half_t{});
  } else {
    f(cutlass::bfloat16_t{});
  }
}

// Numbers go into error messages as strings made here, never streamed: on the H100 machine, streaming an
// integer from this extension (c10::str -> ostream << long) crashed inside libstdc++, apparently a
// mismatch between the g++ that compiled us and the libstdc++ the process loads.
std::string num(int64_t x) { return std::to_string(x); }
std::string num(double x) { return std::to_string(x); }
std::string num(c10::IntArrayRef xs) {
  std::string s = "(";
  for (size_t i = 0; i < xs.size(); ++i) { s += (i ? ", " : "") + std::to_string(xs[i]); }
  return s + ")";
}

std::vector<int> built_head_dims() { return {std::begin(kBuiltHeadDims), std::end(kBuiltHeadDims)}; }

// (batch, seqlen, heads, head_dim) with a contiguous last dim, fp16/bf16, on a CUDA device.
// The kernels move 16-byte vectors: a 16-byte aligned base, and strides (of dims longer than 1) that are
// multiples of 8 elements. flash_attn_func copies tensors that are not.
void check_vector_aligned(at::Tensor const &t, char const *name) {
  bool aligned = reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
  for (int64_t d = 0; d + 1 < t.dim(); ++d) { aligned &= t.size(d) <= 1 || t.stride(d) % 8 == 0; }
  TORCH_CHECK_VALUE(aligned, name, " must have a 16-byte aligned data pointer and strides that are multiples of 8 "
                    "elements, got strides ", num(t.strides()));
}

// Fixed-length (batch, seqlen, heads, head_dim), or varlen (total, heads, head_dim).
void check_heads(at::Tensor const &t, char const *name, bool varlen) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16, name,
                   " must be float16 or bfloat16, got ", t.scalar_type());
  if (varlen) {
    TORCH_CHECK_VALUE(t.dim() == 3, name, " must be 3-D (total, heads, head_dim) with cu_seqlens, got ", num(t.dim()),
                      "-D");
  } else {
    TORCH_CHECK_VALUE(t.dim() == 4, name, " must be 4-D (batch, seqlen, heads, head_dim), got ", num(t.dim()), "-D");
  }
  TORCH_CHECK_VALUE(t.stride(-1) == 1, name, " must have a contiguous last dim (stride 1), got stride ",
                    num(t.stride(-1)));
  TORCH_CHECK_VALUE(t.is_cuda(), name, " must be a CUDA tensor, got one on ", t.device());
  check_vector_aligned(t, name);
}

void check_same(at::Tensor const &t, char const *name, at::Tensor const &like, char const *like_name) {
  TORCH_CHECK_TYPE(t.scalar_type() == like.scalar_type(), name, " has dtype ", t.scalar_type(), " but ", like_name,
                   " has ", like.scalar_type(), ": they must match");
  TORCH_CHECK_VALUE(t.device() == like.device(), name, " is on ", t.device(), " but ", like_name, " is on ",
                    like.device());
}

// A head tensor as the kernels see it (checked by check_heads beforehand). Varlen tensors have no batch
// dim: their sequences start at rows that cu_seqlens gives, so batch_stride is 0.
flash::HeadTensor head_tensor(at::Tensor const &t) {
  if (t.dim() == 3) { return {t.data_ptr(), 0, t.stride(0), t.stride(1)}; }
  return {t.data_ptr(), t.stride(0), t.stride(1), t.stride(2)};
}

// lse and D: contiguous (batch, heads, seqlen_q), or (heads, total_q) for varlen.
flash::RowTensor row_tensor(at::Tensor const &t) {
  return {t.data_ptr<float>(), t.dim() == 3 ? t.stride(0) : 0, t.stride(t.dim() - 2)};
}

// The batch of a varlen call: sequence b is rows [cu_seqlens[b], cu_seqlens[b + 1]) of q (k, v). Without
// cu_seqlens the batch is fixed-length. max_seqlen sizes the grid; the values in cu_seqlens are not read
// here (that would sync with the GPU): the kernels clamp them (block_info.h).
struct Seqlens {
  std::optional<at::Tensor> cu_q, cu_k;
  int64_t max_q = 0, max_k = 0;
  bool varlen() const { return cu_q.has_value(); }
};

void check_cu_seqlens(at::Tensor const &cu, char const *name, at::Tensor const &q) {
  TORCH_CHECK_TYPE(cu.scalar_type() == at::kInt, name, " must be int32, got ", cu.scalar_type());
  TORCH_CHECK_VALUE(cu.dim() == 1 && cu.size(0) >= 1, name, " must be 1-D (batch + 1,), got shape ", num(cu.sizes()));
  TORCH_CHECK_VALUE(cu.is_contiguous(), name, " must be contiguous");
  TORCH_CHECK_VALUE(cu.device() == q.device(), name, " is on ", cu.device(), " but q is on ", q.device());
}

// Sequence positions are 32-bit in the kernels (offsets are 64-bit); leave room for a block past the end.
constexpr int64_t kMaxSeqlen = (int64_t(1) << 31) - 1024;

void set_qkv(flash::AttnParams &p, at::Tensor const &q, at::Tensor const &k, at::Tensor const &v, Seqlens const &s) {
  bool const varlen = s.varlen();
  TORCH_CHECK_VALUE(s.cu_q.has_value() == s.cu_k.has_value(), "cu_seqlens_q and cu_seqlens_k must be given together");
  check_heads(q, "q", varlen);
  check_heads(k, "k", varlen);
  check_heads(v, "v", varlen);
  check_same(k, "k", q, "q");
  check_same(v, "v", q, "q");
  TORCH_CHECK_VALUE(k.sizes() == v.sizes(), "k and v must have the same shape, got ", num(k.sizes()), " and ",
                    num(v.sizes()));
  if (!varlen) {
    TORCH_CHECK_VALUE(k.size(0) == q.size(0), "k has batch ", num(k.size(0)), " but q has batch ", num(q.size(0)));
  }
  TORCH_CHECK_VALUE(k.size(-1) == q.size(-1), "k has head_dim ", num(k.size(-1)), " but q has head_dim ",
                    num(q.size(-1)));
  int64_t const head_dim = q.size(-1), heads = q.size(-2), heads_kv = k.size(-2);
  TORCH_CHECK_VALUE(head_dim > 0 && head_dim <= 256 && head_dim % 8 == 0, "q: head_dim must be a multiple of 8 in "
                    "[8, 256] at this level (flash_attn_func pads other head dims), got ", num(head_dim));
  TORCH_CHECK_VALUE(heads_kv > 0 && heads % heads_kv == 0, "q has ", num(heads),
                    " heads, which must be a multiple of the heads of k and v (", num(heads_kv), ")");
  TORCH_CHECK_VALUE(heads <= 65535, "q: heads must be at most 65535");

  if (varlen) {
    check_cu_seqlens(*s.cu_q, "cu_seqlens_q", q);
    check_cu_seqlens(*s.cu_k, "cu_seqlens_k", q);
    TORCH_CHECK_VALUE(s.cu_q->size(0) == s.cu_k->size(0), "cu_seqlens_q has ", num(s.cu_q->size(0)),
                      " entries but cu_seqlens_k has ", num(s.cu_k->size(0)), ": both must be (batch + 1,)");
    TORCH_CHECK_VALUE(s.max_q >= 0 && s.max_k >= 0, "max_seqlen_q and max_seqlen_k must be >= 0, got ", num(s.max_q),
                      " and ", num(s.max_k));
    TORCH_CHECK_VALUE(q.size(0) <= kMaxSeqlen && k.size(0) <= kMaxSeqlen, "q, k: total rows must be below 2^31 - 1024, "
                      "got ", num(q.size(0)), " and ", num(k.size(0)));
    p.batch = s.cu_q->size(0) - 1;
    p.total_q = q.size(0), p.total_k = k.size(0);
    // No sequence is longer than the tensor: a larger max_seqlen would only add blocks that leave at once.
    p.seqlen_q = std::min(s.max_q, int64_t(p.total_q)), p.seqlen_k = std::min(s.max_k, int64_t(p.total_k));
    p.cu_seqlens_q = s.cu_q->data_ptr<int>(), p.cu_seqlens_k = s.cu_k->data_ptr<int>();
  } else {
    TORCH_CHECK_VALUE(q.size(1) <= kMaxSeqlen && k.size(1) <= kMaxSeqlen, "q, k: seqlen must be below 2^31 - 1024, "
                      "got ", num(q.size(1)), " and ", num(k.size(1)));
    p.batch = q.size(0);
    p.seqlen_q = q.size(1), p.seqlen_k = k.size(1);
  }
  TORCH_CHECK_VALUE(p.batch <= 65535, "batch must be at most 65535, got ", num(int64_t(p.batch)));
  p.q = head_tensor(q), p.k = head_tensor(k), p.v = head_tensor(v);
  p.heads = heads, p.heads_kv = heads_kv;
  p.head_dim = head_dim;
}

// An input or output shaped like `like`; outputs must not overlap themselves (blocks would race).
void check_out(at::Tensor const &t, char const *name, at::Tensor const &like, char const *like_name) {
  check_same(t, name, like, like_name);
  TORCH_CHECK_VALUE(t.sizes() == like.sizes(), name, " must have shape ", num(like.sizes()), ", got ",
                    num(t.sizes()));
  TORCH_CHECK_VALUE(t.stride(-1) == 1, name, " must have a contiguous last dim");
  check_vector_aligned(t, name);
}

void check_output(at::Tensor const &t, char const *name, at::Tensor const &like, char const *like_name) {
  check_out(t, name, like, like_name);
  TORCH_CHECK_VALUE(at::has_internal_overlap(t) != at::MemOverlap::Yes, name,
                    " must not have overlapping elements (e.g. a stride of 0), got strides ", num(t.strides()));
}

void check_lse(at::Tensor const &lse, at::Tensor const &q, flash::AttnParams const &p) {
  TORCH_CHECK_TYPE(lse.scalar_type() == at::kFloat, "lse must be float32, got ", lse.scalar_type());
  TORCH_CHECK_VALUE(lse.device() == q.device(), "lse is on ", lse.device(), " but q is on ", q.device());
  if (p.cu_seqlens_q != nullptr) {
    TORCH_CHECK_VALUE(lse.dim() == 2 && lse.size(0) == p.heads && lse.size(1) == p.total_q && lse.is_contiguous(),
                      "lse must be a contiguous (heads, total_q) tensor, got ", num(lse.sizes()));
  } else {
    TORCH_CHECK_VALUE(lse.dim() == 3 && lse.size(0) == p.batch && lse.size(1) == p.heads &&
                          lse.size(2) == p.seqlen_q && lse.is_contiguous(),
                      "lse must be a contiguous (batch, heads, seqlen_q) tensor, got ", num(lse.sizes()));
  }
}

// How scores are made and which are visible (flash.h states the formula). A side of the window given as -1
// is unbounded; causal bounds the right side at 0.
struct Scores {
  double softmax_scale = 0;
  bool causal = false;
  int64_t window_left = -1, window_right = -1;
  double softcap = 0;
  std::optional<at::Tensor> alibi_slopes, sinks;
};

// A (heads,) or, where allowed, (batch, heads) fp32 vector on q's device with a contiguous last dim.
void check_per_head(at::Tensor const &t, char const *name, at::Tensor const &q, flash::AttnParams const &p,
                    bool per_batch) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat, name, " must be float32, got ", t.scalar_type());
  bool const heads_only = t.dim() == 1 && t.size(0) == p.heads;
  bool const batch_heads = per_batch && t.dim() == 2 && t.size(0) == p.batch && t.size(1) == p.heads;
  std::string const heads = num(int64_t(p.heads)), batch = num(int64_t(p.batch));
  std::string const expected = per_batch ? "(heads,) = (" + heads + ",) or (batch, heads) = (" + batch + ", " + heads + ")"
                                         : "(heads,) = (" + heads + ",)";
  TORCH_CHECK_VALUE(heads_only || batch_heads, name, " must have shape ", expected, ", got ", num(t.sizes()));
  TORCH_CHECK_VALUE(t.stride(-1) == 1, name, " must have a contiguous last dim (stride 1)");
  TORCH_CHECK_VALUE(t.device() == q.device(), name, " is on ", t.device(), " but q is on ", q.device());
}

// After set_qkv, which gives the longest sequences.
void set_scores(flash::AttnParams &p, Scores const &s, at::Tensor const &q) {
  // Masking relies on -inf * scale staying -inf.
  TORCH_CHECK_VALUE(std::isfinite(s.softmax_scale) && s.softmax_scale > 0, "softmax_scale must be finite and positive, "
                    "got ", num(s.softmax_scale));
  TORCH_CHECK_VALUE(std::isfinite(s.softcap) && s.softcap >= 0, "softcap must be finite and >= 0 (0 for none), got ",
                    num(s.softcap));
  double const score_scale = s.softcap > 0 ? s.softcap : s.softmax_scale;
  p.softmax_scale = float(s.softmax_scale);
  p.softcap_premul = s.softcap > 0 ? float(s.softmax_scale / s.softcap) : 0.f;
  p.softmax_scale_log2 = float(score_scale * M_LOG2E);
  p.inv_score_scale = float(1.0 / score_scale);

  TORCH_CHECK_VALUE(s.window_left >= -1 && s.window_right >= -1, "window_size entries must be >= -1 (-1: unbounded), "
                    "got (", num(s.window_left), ", ", num(s.window_right), ")");
  // Query i of a sequence sees keys j in [i + Sk - Sq - left, i + Sk - Sq + right]: a left side >= Sk - 1 and a
  // right side >= Sq - 1 cut nothing for any sequence up to the longest, so unbounded sides become those.
  int64_t const left = s.window_left < 0 ? p.seqlen_k : std::min<int64_t>(s.window_left, p.seqlen_k);
  int64_t const right = s.causal ? 0 : s.window_right < 0 ? p.seqlen_q : std::min<int64_t>(s.window_right, p.seqlen_q);
  p.window_left = int(left), p.window_right = int(right);
  p.is_windowed = left < p.seqlen_k - 1 || right < p.seqlen_q - 1;

  p.alibi_slopes = nullptr, p.alibi_batch_stride = 0;
  if (s.alibi_slopes) {
    check_per_head(*s.alibi_slopes, "alibi_slopes", q, p, true);
    p.alibi_slopes = s.alibi_slopes->data_ptr<float>();
    p.alibi_batch_stride = s.alibi_slopes->dim() == 2 ? s.alibi_slopes->stride(0) : 0;
  }
  p.sinks = nullptr;
  if (s.sinks) {
    check_per_head(*s.sinks, "s_aux", q, p, false);
    p.sinks = s.sinks->data_ptr<float>();
  }
}

void set_out(flash::FwdParams &p, at::Tensor const &out, at::Tensor const &lse) {
  p.o = head_tensor(out);
  p.lse = row_tensor(lse);
}

// Dropout: an entry is dropped iff its 16 random bits are below the threshold (dropout.h). At least 1 for any
// p > 0, so that asking for dropout always turns it on (a p below 2^-17 then drops with probability 2^-16).
void set_dropout_rate(flash::AttnParams &p, double dropout_p) {
  TORCH_CHECK_VALUE(std::isfinite(dropout_p) && dropout_p >= 0 && dropout_p < 1, "dropout_p must be in [0, 1), got ",
                    num(dropout_p));
  if (dropout_p == 0) { return; }
  p.dropout_threshold = uint32_t(std::max<int64_t>(1, std::llround(dropout_p * 65536.0)));
  p.dropout_scale = float(1.0 / (1.0 - dropout_p));
}

void check_rng_state(at::Tensor const &rng_state, at::Tensor const &q) {
  TORCH_CHECK_TYPE(rng_state.scalar_type() == at::kLong, "rng_state must be int64, got ", rng_state.scalar_type());
  TORCH_CHECK_VALUE(rng_state.dim() == 1 && rng_state.size(0) == 2 && rng_state.is_contiguous(),
                    "rng_state must be a contiguous (2,) tensor (seed, offset), got shape ", num(rng_state.sizes()));
  TORCH_CHECK_VALUE(rng_state.device() == q.device(), "rng_state is on ", rng_state.device(), " but q is on ",
                    q.device());
}

// The forward's (seed, offset), from PyTorch's default CUDA generator of q's device, which then moves on by
// batch * heads (each (sequence, head) has its own Philox stream, dropout.h). Under CUDA-graph capture the
// generator hands out device pointers that each replay fills afresh; the kernel writes what it read into
// rng_state either way.
void draw_rng(flash::FwdParams &p, at::Tensor &rng_state, at::Tensor const &q) {
  auto *gen = at::get_generator_or_default<at::CUDAGeneratorImpl>(
      std::nullopt, at::cuda::detail::getDefaultCUDAGenerator(q.device().index()));
  uint64_t const streams = uint64_t(p.batch) * uint64_t(p.heads);
  at::PhiloxCudaState state;
  {
    std::lock_guard<std::mutex> lock(gen->mutex_);
    state = gen->philox_cuda_state((streams + 3) / 4 * 4);  // PyTorch wants multiples of 4
  }
  if (state.captured_) {
    p.rng.seed_ptr = state.seed_.ptr;
    p.rng.offset_ptr = state.offset_.ptr;
    p.rng.offset_intragraph = state.offset_intragraph_;
  } else {
    p.rng.seed = state.seed_.val;
    p.rng.offset = state.offset_.val;
  }
  p.rng_state_out = rng_state.data_ptr<int64_t>();
}

// Nothing to launch: no sequence, no query or no key (a grid of size 0 is invalid).
bool nothing_attends(flash::AttnParams const &p) {
  return p.batch == 0 || p.heads == 0 || p.seqlen_q == 0 || p.seqlen_k == 0;
}

template <bool (*Has)(int) = any_kernel, class Launch>
void launch(flash::AttnParams const &p, at::ScalarType dtype, Launch &&run) {
  bool const found = dispatch_head_dim<Has>(p.head_dim, [&](auto head_dim) {
    dispatch_dtype(dtype, [&](auto element) {
      C10_CUDA_CHECK((run(head_dim, element)));
    });
  });
  TORCH_CHECK_VALUE(found, "no kernel built for head_dim ", num(int64_t(p.head_dim)), "; this build has ",
                    num(std::vector<int64_t>(std::begin(kBuiltHeadDims), std::end(kBuiltHeadDims))),
                    " (rebuild with FLASH_ATTN2_HEAD_DIMS)");
}

// out <- softmax(q·kᵀ·scale)·v and lse <- logsumexp(q·kᵀ·scale) per query row; returns nothing. With
// dropout_p > 0, P's entries are dropped (the rest scaled by 1 / (1 - p)) before P·V, and rng_state ((2,)
// int64) receives the (seed, offset) that the backward needs to drop the same entries.
void fwd(at::Tensor const &q, at::Tensor const &k, at::Tensor const &v, at::Tensor &out, at::Tensor &lse,
         Scores const &scores, Seqlens const &seqlens, double dropout_p, std::optional<at::Tensor> rng_state) {
  flash::FwdParams p{};
  set_qkv(p, q, k, v, seqlens);
  set_scores(p, scores, q);
  set_dropout_rate(p, dropout_p);
  check_output(out, "out", q, "q");
  check_lse(lse, q, p);
  if (p.has_dropout()) {
    TORCH_CHECK_VALUE(rng_state.has_value(), "dropout_p > 0 needs an rng_state tensor to write (seed, offset) into");
    check_rng_state(*rng_state, q);
  }
  if (q.numel() == 0 || nothing_attends(p)) {  // nothing is dropped: no draw from the generator
    if (p.has_dropout()) { rng_state->zero_(); }
  }
  if (q.numel() == 0) { return; }
  if (nothing_attends(p)) {  // e.g. no keys at all: every row sees nothing (but the sink)
    out.zero_();
    if (scores.sinks) {
      lse.copy_(scores.sinks->view(lse.dim() == 2 ? std::vector<int64_t>{-1, 1} : std::vector<int64_t>{1, -1, 1})
                    .expand_as(lse));
    } else {
      lse.fill_(std::numeric_limits<float>::infinity());
    }
    return;
  }
  set_out(p, out, lse);

  c10::cuda::CUDAGuard device_guard(q.device());
  if (p.has_dropout()) { draw_rng(p, *rng_state, q); }
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  launch(p, q.scalar_type(), [&](auto head_dim, auto element) {
    constexpr int kHeadDim = decltype(head_dim)::value;
    using Element = decltype(element);
    if constexpr (FLASH_ATTN2_SM90 && has_sm90_fwd(kHeadDim)) {
      if (hopper_fwd(p)) {
        return p.needs_general() ? flash::sm90::run_fwd_general<kHeadDim, Element>(p, stream)
                                 : flash::sm90::run_fwd<kHeadDim, Element>(p, stream);
      }
    }
    return flash::run_fwd<kHeadDim, Element>(p, stream);
  });
}

// Everything the backward kernels read and write. With GQA, dK and dV are written per query head into
// dk_heads/dv_heads and summed over each group afterwards, in a fixed order (no atomics: bit-identical
// from run to run).
struct BwdLaunch {
  flash::BwdParams params{};
  at::Tensor dk_heads, dv_heads, dpsum;
};

// A k-shaped tensor with one head per query head: dK or dV before the group sum.
at::Tensor per_query_head(at::Tensor const &k, int64_t heads) {
  std::vector<int64_t> shape = k.sizes().vec();
  shape[k.dim() - 2] = heads;
  return at::empty(shape, k.options());
}

// grad <- per-query-head gradients summed over each group of query heads, in a fixed order.
void sum_groups(at::Tensor &grad, at::Tensor const &grad_heads, int64_t heads_kv) {
  std::vector<int64_t> shape = grad_heads.sizes().vec();  // (..., heads, head_dim) -> (..., heads_kv, groups, head_dim)
  int64_t const groups = shape[shape.size() - 2] / heads_kv;
  shape[shape.size() - 2] = heads_kv;
  shape.insert(shape.end() - 1, groups);
  at::sum_out(grad, grad_heads.view(shape), {int64_t(shape.size()) - 2});
}

BwdLaunch prepare_bwd(at::Tensor const &dout, at::Tensor const &q, at::Tensor const &k, at::Tensor const &v,
                      at::Tensor const &out, at::Tensor const &lse, at::Tensor &dq, at::Tensor &dk, at::Tensor &dv,
                      Scores const &scores, Seqlens const &seqlens, double dropout_p = 0,
                      std::optional<at::Tensor> const &rng_state = std::nullopt) {
  BwdLaunch b;
  flash::BwdParams &p = b.params;
  set_qkv(p, q, k, v, seqlens);
  set_scores(p, scores, q);
  set_dropout_rate(p, dropout_p);
  if (p.has_dropout()) {  // the forward's (seed, offset), read by the kernels from the forward's rng_state
    TORCH_CHECK_VALUE(rng_state.has_value(), "dropout_p > 0 needs the forward's rng_state");
    check_rng_state(*rng_state, q);
    p.rng.seed_ptr = rng_state->data_ptr<int64_t>();
    p.rng.offset_ptr = p.rng.seed_ptr + 1;
    p.rng.offset_intragraph = 0;
  }
  check_out(out, "out", q, "q");
  check_out(dout, "dout", q, "q");
  check_lse(lse, q, p);
  check_output(dq, "dq", q, "q");
  check_output(dk, "dk", k, "k");
  check_output(dv, "dv", v, "v");
  set_out(p, out, lse);
  p.dout = head_tensor(dout), p.dq = head_tensor(dq);
  bool const grouped = p.heads != p.heads_kv;
  b.dk_heads = grouped ? per_query_head(k, p.heads) : dk;
  b.dv_heads = grouped ? per_query_head(v, p.heads) : dv;
  p.dk = head_tensor(b.dk_heads), p.dv = head_tensor(b.dv_heads);
  b.dpsum = at::empty_like(lse);
  p.dpsum = row_tensor(b.dpsum);
  return b;
}

// dq, dk, dv <- gradients of sum(out * dout) w.r.t. q, k, v, given the forward's out and lse. Returns D =
// rowsum(dout * out), laid out as lse: with a sink, its gradient is -sum(exp(sink - lse) * D).
// deterministic: the split backward (dQ and dK/dV kernels, no atomics: bit-identical from run to run); else
// dK/dV adds dQ into an fp32 buffer with atomics (fewer matmuls; dQ's rounding varies with their order).
at::Tensor bwd(at::Tensor const &dout, at::Tensor const &q, at::Tensor const &k, at::Tensor const &v,
               at::Tensor const &out, at::Tensor const &lse, at::Tensor &dq, at::Tensor &dk, at::Tensor &dv,
               Scores const &scores, Seqlens const &seqlens, double dropout_p, std::optional<at::Tensor> rng_state,
               bool deterministic) {
  BwdLaunch b = prepare_bwd(dout, q, k, v, out, lse, dq, dk, dv, scores, seqlens, dropout_p, rng_state);
  flash::BwdParams &p = b.params;
  if (nothing_attends(p)) {  // nothing attends to anything
    dq.zero_();
    dk.zero_();
    dv.zero_();
    return b.dpsum.zero_();  // out is 0
  }
  TORCH_CHECK(deterministic || FLASH_ATTN2_ATOMIC_BWD, "the atomic backward (FLASH_ATTN2_ATOMIC_BWD=1) is not in this "
              "build: rebuild with FLASH_ATTN2_BUILD_ATOMIC_BWD=1, or unset FLASH_ATTN2_ATOMIC_BWD");
  c10::cuda::CUDAGuard device_guard(q.device());
  bool const hopper = hopper_bwd(p, deterministic);
  at::Tensor dq_accum;  // fp32 dQ, shaped as q, for the atomic adds
  if (!deterministic) {
    dq_accum = at::zeros(q.sizes(), q.options().dtype(at::kFloat));
    p.dq_accum = head_tensor(dq_accum);
  }
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  launch(p, q.scalar_type(), [&](auto head_dim, auto element) {
    constexpr int kHeadDim = decltype(head_dim)::value;
    using Element = decltype(element);
    cudaError_t err = flash::run_bwd_preprocess<Element>(p, stream);
    if (deterministic) {
      if (err == cudaSuccess) { err = run_split_dq<kHeadDim, Element>(p, hopper, stream); }
      if (err == cudaSuccess) { err = run_split_dkdv<kHeadDim, Element>(p, hopper, stream); }
    } else if constexpr (FLASH_ATTN2_ATOMIC_BWD) {
      if (err == cudaSuccess) { err = run_atomic_dkdv<kHeadDim, Element>(p, hopper, stream); }
    }
    return err;
  });
  if (!deterministic) { dq.copy_(dq_accum); }  // already scaled by the kernel: the cast into dq's dtype, strides
  if (p.heads != p.heads_kv) {
    sum_groups(dk, b.dk_heads, p.heads_kv);
    sum_groups(dv, b.dv_heads, p.heads_kv);
  }
  return b.dpsum;
}

// Milliseconds per launch of each kernel on its own (forward, preprocess, dQ, dK/dV, dK/dV with the atomic
// dQ, the Hopper dQ and dK/dV where built), from a launch loop between CUDA events on the current stream: places a
// regression in one kernel. Writes out, lse and scratch gradients as it goes.
std::map<std::string, double> time_kernels(at::Tensor const &dout, at::Tensor const &q, at::Tensor const &k,
                                           at::Tensor const &v, at::Tensor &out, at::Tensor &lse,
                                           double softmax_scale, bool causal, int64_t reps) {
  TORCH_CHECK_VALUE(reps > 0, "reps must be positive, got ", num(reps));
  at::Tensor dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v);
  BwdLaunch b = prepare_bwd(dout, q, k, v, out, lse, dq, dk, dv, Scores{softmax_scale, causal}, Seqlens{});
  flash::BwdParams &p = b.params;
  TORCH_CHECK_VALUE(q.numel() > 0 && k.numel() > 0, "time_kernels needs non-empty q, k and v");
  at::Tensor dq_accum;  // the atomic dQ's, summed over reps (where it is built)
  if (FLASH_ATTN2_ATOMIC_BWD) {
    dq_accum = at::zeros(q.sizes(), q.options().dtype(at::kFloat));
    p.dq_accum = head_tensor(dq_accum);
  }
  c10::cuda::CUDAGuard device_guard(q.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  std::map<std::string, double> ms;
  auto time = [&](char const *name, auto run) {
    C10_CUDA_CHECK(run());  // warm-up, and the first launch's error
    cudaEvent_t start, stop;
    C10_CUDA_CHECK(cudaEventCreate(&start));
    C10_CUDA_CHECK(cudaEventCreate(&stop));
    C10_CUDA_CHECK(cudaEventRecord(start, stream));
    for (int64_t i = 0; i < reps; ++i) { C10_CUDA_CHECK(run()); }
    C10_CUDA_CHECK(cudaEventRecord(stop, stream));
    C10_CUDA_CHECK(cudaEventSynchronize(stop));
    float elapsed = 0.f;
    C10_CUDA_CHECK(cudaEventElapsedTime(&elapsed, start, stop));
    C10_CUDA_CHECK(cudaEventDestroy(start));
    C10_CUDA_CHECK(cudaEventDestroy(stop));
    ms[name] = double(elapsed) / reps;
  };
  launch(p, q.scalar_type(), [&](auto head_dim, auto element) {
    constexpr int kHeadDim = decltype(head_dim)::value;
    using Element = decltype(element);
    time("fwd", [&] { return flash::run_fwd<kHeadDim, Element>(p, stream); });
    time("bwd_preprocess", [&] { return flash::run_bwd_preprocess<Element>(p, stream); });
    time("bwd_dq", [&] { return flash::run_bwd_dq<kHeadDim, Element>(p, stream); });
    time("bwd_dkdv", [&] { return flash::run_bwd_dkdv<kHeadDim, Element>(p, stream); });
    if constexpr (FLASH_ATTN2_ATOMIC_BWD) {
      time("bwd_dkdv_atomic_dq", [&] { return flash::run_bwd_dkdv_atomic_dq<kHeadDim, Element>(p, stream); });
    }
    if constexpr (FLASH_ATTN2_SM90_BWD && has_sm90_bwd(kHeadDim)) {  // built, and this call is one it covers
      if (hopper_bwd_covers(p, false)) {  // no score mod here: the common variant
        time("bwd_dq_sm90", [&] { return flash::sm90::run_bwd_dq<kHeadDim, Element>(p, stream); });
        time("bwd_dkdv_sm90", [&] { return flash::sm90::run_bwd_dkdv<kHeadDim, Element>(p, stream); });
        if constexpr (FLASH_ATTN2_ATOMIC_BWD) {
          time("bwd_dkdv_atomic_dq_sm90", [&] { return flash::sm90::run_bwd_dkdv_atomic_dq<kHeadDim, Element>(p, stream); });
        }
      }
    }
    return cudaSuccess;
  });
  return ms;
}

// The keep mask (uint8, 1 kept) of every (batch, head, query, key) for the (seed, offset) in rng_state, each
// sequence in its own coordinates: what the kernels drop with it. For tests at small shapes.
at::Tensor dropout_mask(at::Tensor const &rng_state, double dropout_p, int64_t batch, int64_t heads, int64_t seqlen_q,
                        int64_t seqlen_k) {
  flash::AttnParams rate{};
  set_dropout_rate(rate, dropout_p);
  TORCH_CHECK_VALUE(rng_state.is_cuda(), "rng_state must be a CUDA tensor, got one on ", rng_state.device());
  check_rng_state(rng_state, rng_state);
  TORCH_CHECK_VALUE(batch >= 0 && heads >= 0 && seqlen_q >= 0 && seqlen_k >= 0 && seqlen_q <= 65535 &&
                        batch * heads <= 65535,
                    "dropout_mask: sizes must be >= 0, with seqlen_q and batch * heads at most 65535");
  at::Tensor keep = at::empty({batch, heads, seqlen_q, seqlen_k}, rng_state.options().dtype(at::kByte));
  if (keep.numel() == 0) { return keep; }
  if (!rate.has_dropout()) { return keep.fill_(1); }
  c10::cuda::CUDAGuard device_guard(rng_state.device());
  flash::DropoutMaskParams p{keep.data_ptr<uint8_t>(), rng_state.data_ptr<int64_t>(), int(batch), int(heads),
                             int(seqlen_q), int(seqlen_k), rate.dropout_threshold};
  C10_CUDA_CHECK(flash::run_dropout_mask(p, c10::cuda::getCurrentCUDAStream().stream()));
  return keep;
}

// ---- flash_attn_with_kvcache ----

// Streaming multiprocessors of a device, asked once per device.
int sm_count(int device) {
  static std::map<int, int> known;
  static std::mutex mutex;
  std::lock_guard<std::mutex> lock(mutex);
  auto it = known.find(device);
  if (it == known.end()) {
    int sms = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    it = known.emplace(device, sms).first;
  }
  return it->second;
}

// FLASH_ATTN2_DECODE_FUSED_COMBINE=1 (read at each call; off by default, not yet run on a GPU; an error in a
// build without it, FLASH_ATTN2_BUILD_DECODE_FUSED=1): a split
// KV-cache launch folds the combine into its last block per tile (split_combine.h combine_in_last_split)
// instead of a second kernel, and num_splits = 0 prices splitting by that (decode_plan.h). Only the common
// kernels have the fused variant (sm80/fwd_launch.h): softcap, ALiBi and a window's left edge keep the
// combine kernel.
bool decode_fused_combine(flash::FwdParams const &p) {
  char const *asked = std::getenv("FLASH_ATTN2_DECODE_FUSED_COMBINE");
  if (asked == nullptr || std::string(asked) != "1") { return false; }
  TORCH_CHECK(FLASH_ATTN2_DECODE_FUSED, "FLASH_ATTN2_DECODE_FUSED_COMBINE=1 asks for the KV-cache kernels' fused "
              "split combine, which this build does not have: rebuild with FLASH_ATTN2_BUILD_DECODE_FUSED=1, or unset "
              "FLASH_ATTN2_DECODE_FUSED_COMBINE");
  return !p.needs_general();
}

// The grid of a KV-cache launch for the split count (csrc/common/decode_plan.h), after pack_gqa_decode. The
// capacity of the cache sizes it (the lengths are on the device); the kernel spreads each sequence's own
// keys over the splits.
flash::DecodeGrid kvcache_grid(flash::FwdParams const &p, flash::TileShape tile, int sms) {
  return flash::decode_grid(p.batch, p.heads, p.seqlen_q, p.seqlen_k, p.head_dim, tile.block_m, tile.block_n, sms,
                            decode_fused_combine(p));
}

// The split count of a KV-cache launch: num_splits = 0 picks by the cost model, n > 0 asks for n, at most the
// key blocks and 128.
int kvcache_splits(flash::FwdParams const &p, flash::TileShape tile, int64_t requested, int sms) {
  return flash::decode_num_splits(kvcache_grid(p, tile, sms), requested);
}

// The fused combine's counts: flash::kMaxFusedCombineTiles int32, zero between launches (the last block of
// each tile sets its count back), so no call pays a memset, which under a CUDA graph would be one more
// dependent node, what the fusion removes. Not per call from PyTorch's allocator: the zeros must outlive the
// call, for the next one and for graph replays. One buffer per (device, stream): launches on one stream run in
// order, so no two count in one buffer at once, and two streams never share one. Allocated at a stream's
// first fused call, under graph capture too (relaxed capture mode, as PyTorch's allocator does; zeroed on a
// private stream, which capture does not see, and waited for), and never freed: captured graphs keep the
// address. Not covered: two graphs captured on one stream, replayed at the same time on two others.
int *split_counters(int device, cudaStream_t stream) {
  static std::map<std::pair<int, cudaStream_t>, int *> known;
  static std::mutex mutex;
  std::lock_guard<std::mutex> lock(mutex);
  int *&counts = known[{device, stream}];
  if (counts == nullptr) {
    size_t const bytes = size_t(flash::kMaxFusedCombineTiles) * sizeof(int);
    c10::cuda::CUDAStreamCaptureModeGuard relaxed{cudaStreamCaptureModeRelaxed};
    cudaStream_t zeroing = nullptr;
    int *buffer = nullptr;
    C10_CUDA_CHECK(cudaMalloc(&buffer, bytes));
    C10_CUDA_CHECK(cudaStreamCreateWithFlags(&zeroing, cudaStreamNonBlocking));
    C10_CUDA_CHECK(cudaMemsetAsync(buffer, 0, bytes, zeroing));
    C10_CUDA_CHECK(cudaStreamSynchronize(zeroing));
    C10_CUDA_CHECK(cudaStreamDestroy(zeroing));
    counts = buffer;
  }
  return counts;
}

// A cache whose rows are not q's batch: paged, k_cache and v_cache (num_pages, page_size, heads_kv, head_dim)
// with block_table (batch, max_pages) int32, a sequence holding up to max_pages * page_size rows; or contiguous
// (batch_cache, seqlen_cache, heads_kv, head_dim) read through cache_batch_idx. set_qkv's rules otherwise.
void set_cache_qkv(flash::FwdParams &p, at::Tensor const &q, at::Tensor const &k_cache, at::Tensor const &v_cache,
                   std::optional<at::Tensor> const &block_table) {
  check_heads(q, "q", false);
  check_heads(k_cache, "k_cache", false);
  check_heads(v_cache, "v_cache", false);
  check_same(k_cache, "k_cache", q, "q");
  check_same(v_cache, "v_cache", q, "q");
  TORCH_CHECK_VALUE(k_cache.sizes() == v_cache.sizes(), "k_cache and v_cache must have the same shape");
  int64_t const head_dim = q.size(3), heads = q.size(2), heads_kv = k_cache.size(2);
  TORCH_CHECK_VALUE(k_cache.size(0) > 0, "k_cache: a cache read through block_table or cache_batch_idx needs at "
                    "least one page or row");
  int64_t capacity = k_cache.size(1);
  if (block_table) {
    TORCH_CHECK_TYPE(block_table->scalar_type() == at::kInt, "block_table must be int32, got ",
                     block_table->scalar_type());
    TORCH_CHECK_VALUE(block_table->dim() == 2 && block_table->size(0) == q.size(0) && block_table->size(1) > 0 &&
                          block_table->stride(1) == 1,
                      "block_table must be (batch, max_pages) with a contiguous last dim, got ",
                      num(block_table->sizes()));
    TORCH_CHECK_VALUE(block_table->device() == q.device(), "block_table is on ", block_table->device(),
                      " but q is on ", q.device());
    int64_t const page_size = k_cache.size(1);
    TORCH_CHECK_VALUE(page_size > 0 && page_size % 16 == 0, "k_cache: the page size (dim 1) must be a positive "
                      "multiple of 16, got ", num(page_size));
    capacity = block_table->size(1) * page_size;
    p.pages = {block_table->data_ptr<int>(), block_table->stride(0), int(page_size), int(block_table->size(1)),
               int(k_cache.size(0))};
  }
  TORCH_CHECK_VALUE(k_cache.size(3) == head_dim && head_dim % 8 == 0 && head_dim <= 256,
                    "k_cache and q must share a head_dim that is a multiple of 8 up to 256");
  TORCH_CHECK_VALUE(heads_kv > 0 && heads % heads_kv == 0 && heads <= 65535, "q has ", num(heads),
                    " heads, which must be a multiple of the heads of k_cache (", num(heads_kv), ")");
  TORCH_CHECK_VALUE(q.size(1) <= kMaxSeqlen && capacity <= kMaxSeqlen && k_cache.size(0) <= kMaxSeqlen,
                    "q, k_cache: seqlen, seqlen_cache (max_pages * page_size) and the cache's rows (pages) must be "
                    "below 2^31 - 1024");
  TORCH_CHECK_VALUE(q.size(0) <= 65535, "batch must be at most 65535, got ", num(q.size(0)));
  p.batch = q.size(0), p.seqlen_q = q.size(1), p.seqlen_k = int(capacity);
  p.heads = heads, p.heads_kv = heads_kv, p.head_dim = head_dim;
  p.q = head_tensor(q), p.k = head_tensor(k_cache), p.v = head_tensor(v_cache);
  p.cache_rows.batch_cache = int(k_cache.size(0));
}

// cache_batch_idx or cache_leftpad: int32 (batch,) on q's device.
void check_cache_index(at::Tensor const &t, char const *name, at::Tensor const &q) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kInt, name, " must be int32, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == q.size(0) && t.is_contiguous(), name,
                    " must be a contiguous (batch,) tensor, got shape ", num(t.sizes()));
  TORCH_CHECK_VALUE(t.device() == q.device(), name, " is on ", t.device(), " but q is on ", q.device());
}

// Decoding with GQA (one query, heads > heads_kv): the query heads of one kv head become the rows of one
// block, so that K and V are read once per kv head, not once per query head. A view, nothing copied: q and out
// (batch, 1, heads, head_dim) are seen as (batch, groups, heads_kv, head_dim), row i of kv head h being query
// head h * groups + i, and lse (batch, heads, 1) as (batch, heads_kv, groups). Where flash::packs_gqa_decode
// allows it (decode_plan.h: one query, no window's left edge, no ALiBi), after set_scores and set_out.
// Returns whether it packed; kvcache_num_splits goes through here too, so that it counts what a call runs.
bool pack_gqa_decode(flash::FwdParams &p) {
  if (!flash::packs_gqa_decode(p.seqlen_q, p.heads, p.heads_kv, p.alibi_slopes != nullptr, p.window_left,
                               p.seqlen_k)) {
    return false;
  }
  int const groups = p.heads / p.heads_kv;
  for (flash::HeadTensor *t : {&p.q, &p.o}) {
    t->row_stride = t->head_stride;
    t->head_stride *= groups;
  }
  p.lse.head_stride = groups;  // lse is contiguous (check_lse)
  p.seqlen_q = groups, p.heads = p.heads_kv;
  p.window_right = groups, p.is_windowed = false;  // one query: no key lies right of its diagonal
  return true;
}

// What flash_attn_with_kvcache appends before the attention: new k and v, and the rotary tables.
struct KvCacheNew {
  std::optional<at::Tensor> k, v, rotary_cos, rotary_sin;
  bool rotary_interleaved = true;
};

// The append's params (common/kvcache_append.h), after set_qkv and the cache_seqlens checks; q_rotated: a
// buffer like q that receives the rotated q (undefined: no rotary).
flash::KvCacheAppendParams append_params(flash::FwdParams const &p, at::Tensor const &q, at::Tensor const &k_cache,
                                         at::Tensor const &v_cache, KvCacheNew const &n, at::Tensor const &seqlens,
                                         at::Tensor const &q_rotated, bool q_per_row) {
  flash::KvCacheAppendParams a{};
  a.k_cache = head_tensor(k_cache), a.v_cache = head_tensor(v_cache);
  a.q = head_tensor(q);
  a.cache_seqlens = seqlens.data_ptr<int>();
  a.batch = p.batch, a.heads = p.heads, a.heads_kv = p.heads_kv, a.head_dim = p.head_dim;
  a.seqlen_q = p.seqlen_q, a.seqlen_cache = p.seqlen_k;
  a.pages = p.pages;
  a.cache_rows = p.cache_rows;
  TORCH_CHECK_VALUE(n.k.has_value() == n.v.has_value(), "k and v must be given together");
  if (n.k) {
    for (auto [t, name] : {std::pair{&*n.k, "k"}, std::pair{&*n.v, "v"}}) {
      check_heads(*t, name, false);
      check_same(*t, name, q, "q");
      TORCH_CHECK_VALUE(t->size(0) == p.batch && t->size(1) == n.k->size(1) && t->size(2) == p.heads_kv &&
                            t->size(3) == p.head_dim,
                        name, " must be (batch, seqlen_new, heads_kv, head_dim), got ", num(t->sizes()));
    }
    TORCH_CHECK_VALUE(n.k->size(1) <= p.seqlen_k, "k, v: ", num(n.k->size(1)), " new rows do not fit the cache (",
                      num(int64_t(p.seqlen_k)), " rows)");
    a.k_new = head_tensor(*n.k), a.v_new = head_tensor(*n.v);
    a.seqlen_new = n.k->size(1);
  }
  TORCH_CHECK_VALUE(n.rotary_cos.has_value() == n.rotary_sin.has_value(), "rotary_cos and rotary_sin must be given together");
  if (n.rotary_cos) {
    TORCH_CHECK_VALUE(n.k.has_value(), "rotary_cos, rotary_sin need k and v");
    for (auto [t, name] : {std::pair{&*n.rotary_cos, "rotary_cos"}, std::pair{&*n.rotary_sin, "rotary_sin"}}) {
      check_same(*t, name, q, "q");
      TORCH_CHECK_VALUE(t->dim() == 2 && t->sizes() == n.rotary_cos->sizes() && t->stride(1) == 1 &&
                            t->stride(0) == n.rotary_cos->stride(0),
                        name, " must be (seqlen_ro, rotary_dim / 2) with a contiguous last dim, like rotary_cos");
    }
    int64_t const rotary_dim = 2 * n.rotary_cos->size(1);
    TORCH_CHECK_VALUE(rotary_dim > 0 && rotary_dim % 16 == 0 && rotary_dim <= p.head_dim && n.rotary_cos->size(0) > 0,
                      "rotary_cos: rotary_dim must be a positive multiple of 16 up to head_dim, got ", num(rotary_dim));
    a.rotary_cos = n.rotary_cos->data_ptr(), a.rotary_sin = n.rotary_sin->data_ptr();
    a.rotary_row_stride = n.rotary_cos->stride(0);
    a.rotary_dim = int(rotary_dim), a.seqlen_ro = int(n.rotary_cos->size(0));
    a.rotary_interleaved = n.rotary_interleaved;
    a.rotary_q_per_row = q_per_row;
    a.q_rotated = head_tensor(q_rotated);
  }
  return a;
}

// fwd_kvcache's params from its inputs and scores, before the lengths, the outputs and the packing.
void set_kvcache_inputs(flash::FwdParams &p, at::Tensor const &q, at::Tensor const &k_cache,
                        at::Tensor const &v_cache, Scores const &scores,
                        std::optional<at::Tensor> const &block_table,
                        std::optional<at::Tensor> const &cache_batch_idx,
                        std::optional<at::Tensor> const &cache_leftpad) {
  if (block_table || cache_batch_idx) {
    TORCH_CHECK_VALUE(!(block_table && (cache_batch_idx || cache_leftpad)), "block_table cannot be combined with "
                      "cache_batch_idx or cache_leftpad");
    set_cache_qkv(p, q, k_cache, v_cache, block_table);
  } else {
    set_qkv(p, q, k_cache, v_cache, Seqlens{});
  }
  if (cache_batch_idx) {
    check_cache_index(*cache_batch_idx, "cache_batch_idx", q);
    p.cache_rows.batch_idx = cache_batch_idx->data_ptr<int>();
  }
  if (cache_leftpad) {
    check_cache_index(*cache_leftpad, "cache_leftpad", q);
    p.cache_rows.leftpad = cache_leftpad->data_ptr<int>();
  }
  set_scores(p, scores, q);
}

// out <- attention of q over the first cache_seqlens[b] rows of k_cache and v_cache (batch, seqlen_cache,
// heads_kv, head_dim), lse <- its logsumexp per query row; causal and the window aligned to each cache's
// end. With new k and v, they are first written into the caches at rows cache_seqlens[b] + j (in place) and
// attended to; with rotary, the new keys and q are rotated at their positions. num_splits: 0 picks
// (kvcache_splits), 1 none, n > 1 that many (at most the key blocks and 128).
void fwd_kvcache(at::Tensor const &q, at::Tensor const &k_cache, at::Tensor const &v_cache, at::Tensor &out,
                 at::Tensor &lse, at::Tensor const &cache_seqlens, Scores const &scores, int64_t num_splits,
                 KvCacheNew const &new_rows = {}, std::optional<at::Tensor> const &block_table = std::nullopt,
                 std::optional<at::Tensor> const &cache_batch_idx = std::nullopt,
                 std::optional<at::Tensor> const &cache_leftpad = std::nullopt) {
  flash::FwdParams p{};
  set_kvcache_inputs(p, q, k_cache, v_cache, scores, block_table, cache_batch_idx, cache_leftpad);
  TORCH_CHECK_TYPE(cache_seqlens.scalar_type() == at::kInt, "cache_seqlens must be int32, got ",
                   cache_seqlens.scalar_type());
  TORCH_CHECK_VALUE(cache_seqlens.dim() == 1 && cache_seqlens.size(0) == p.batch && cache_seqlens.is_contiguous(),
                    "cache_seqlens must be a contiguous (batch,) tensor, got shape ", num(cache_seqlens.sizes()));
  TORCH_CHECK_VALUE(cache_seqlens.device() == q.device(), "cache_seqlens is on ", cache_seqlens.device(),
                    " but q is on ", q.device());
  TORCH_CHECK_VALUE(num_splits >= 0, "num_splits must be >= 0 (0: chosen from the shape), got ", num(num_splits));
  check_output(out, "out", q, "q");
  check_lse(lse, q, p);
  bool const q_per_row = scores.causal || scores.window_left >= 0 || scores.window_right >= 0;
  at::Tensor const q_rotated = new_rows.rotary_cos ? at::empty_like(q) : at::Tensor();
  flash::KvCacheAppendParams const append =
      append_params(p, q, k_cache, v_cache, new_rows, cache_seqlens, q_rotated, q_per_row);

  c10::cuda::CUDAGuard device_guard(q.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  if (p.heads_kv > 0 && p.head_dim > 0) {  // before any early return: the cache grows even without queries
    dispatch_dtype(q.scalar_type(), [&](auto element) {
      C10_CUDA_CHECK((flash::run_kvcache_append<decltype(element)>(append, stream)));
    });
  }
  if (q.numel() == 0) { return; }
  if (nothing_attends(p)) {  // a cache of capacity 0: every row sees nothing
    out.zero_();
    lse.fill_(std::numeric_limits<float>::infinity());
    return;
  }
  set_out(p, out, lse);
  p.cache_seqlens = cache_seqlens.data_ptr<int>();
  p.seqlen_new = append.seqlen_new;
  if (q_rotated.defined()) { p.q = head_tensor(q_rotated); }
  pack_gqa_decode(p);

  at::Tensor o_partial, lse_partial;  // split-KV scratch, alive until the launches are queued
  launch<has_kvcache>(p, q.scalar_type(), [&](auto head_dim, auto element) {
    constexpr int kHeadDim = decltype(head_dim)::value;
    flash::DecodeGrid const grid = kvcache_grid(p, flash::fwd_kvcache_tile(kHeadDim), sm_count(q.device().index()));
    p.num_splits = flash::decode_num_splits(grid, num_splits);
    if (p.num_splits > 1) {
      auto const options = q.options().dtype(at::kFloat);
      o_partial = at::empty({p.num_splits, p.batch, p.heads, p.seqlen_q, p.head_dim}, options);
      lse_partial = at::empty({p.num_splits, p.batch, p.heads, p.seqlen_q}, options);
      p.o_partial = o_partial.data_ptr<float>();
      p.lse_partial = lse_partial.data_ptr<float>();
      if (grid.fused_combine) { p.split_counters = split_counters(q.device().index(), stream); }
    }
    return flash::run_fwd_kvcache<kHeadDim, decltype(element)>(p, stream);
  });
}

// The split count fwd_kvcache would use (num_splits = 0: the heuristic's), for tests and benchmarks: the same
// inputs' checks, scores and packing (pack_gqa_decode) as a call with these q, k_cache (as v_cache too),
// block_table, causal, window and alibi_slopes.
int64_t kvcache_num_splits(at::Tensor const &q, at::Tensor const &k_cache, int64_t num_splits,
                           std::optional<at::Tensor> const &block_table, bool causal, int64_t window_left,
                           int64_t window_right, std::optional<at::Tensor> const &alibi_slopes) {
  TORCH_CHECK_VALUE(num_splits >= 0, "num_splits must be >= 0 (0: chosen from the shape), got ", num(num_splits));
  flash::FwdParams p{};
  set_kvcache_inputs(p, q, k_cache, k_cache,
                     Scores{1.0, causal, window_left, window_right, 0.0, alibi_slopes, std::nullopt}, block_table,
                     std::nullopt, std::nullopt);
  pack_gqa_decode(p);
  int splits = 1;
  bool const found = dispatch_head_dim<has_kvcache>(q.size(3), [&](auto head_dim) {
    splits = kvcache_splits(p, flash::fwd_kvcache_tile(decltype(head_dim)::value), num_splits,
                            sm_count(q.device().index()));
  });
  TORCH_CHECK_VALUE(found, "no kernel built for head_dim ", num(q.size(3)));
  return splits;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "flash_attn2 CUDA kernels (use flash_attn2.flash_attn_func)";
  // Varlen when cu_seqlens_q and cu_seqlens_k are given: q, k, v, out (and gradients) are (total, heads,
  // head_dim) and lse (heads, total_q).
  // Scores: softcap 0 and window (-1, -1) for none; alibi_slopes fp32 (heads) or (batch, heads), s_aux
  // (the sinks) fp32 (heads), or None.
  auto scores = [](double softmax_scale, bool causal, int64_t window_left, int64_t window_right, double softcap,
                   std::optional<at::Tensor> alibi_slopes, std::optional<at::Tensor> s_aux) {
    return Scores{softmax_scale, causal, window_left, window_right, softcap, alibi_slopes, s_aux};
  };
  m.def("fwd", [=](at::Tensor const &q, at::Tensor const &k, at::Tensor const &v, at::Tensor &out, at::Tensor &lse,
                   double softmax_scale, bool causal, std::optional<at::Tensor> cu_seqlens_q,
                   std::optional<at::Tensor> cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k,
                   int64_t window_left, int64_t window_right, double softcap, std::optional<at::Tensor> alibi_slopes,
                   std::optional<at::Tensor> s_aux, double dropout_p, std::optional<at::Tensor> rng_state) {
          fwd(q, k, v, out, lse, scores(softmax_scale, causal, window_left, window_right, softcap, alibi_slopes, s_aux),
              {cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k}, dropout_p, rng_state);
        }, "Attention forward into out and lse (and, with dropout, its (seed, offset) into rng_state)", py::arg("q"),
        py::arg("k"), py::arg("v"), py::arg("out"),
        py::arg("lse"), py::arg("softmax_scale"), py::arg("causal"), py::arg("cu_seqlens_q") = py::none(),
        py::arg("cu_seqlens_k") = py::none(), py::arg("max_seqlen_q") = 0, py::arg("max_seqlen_k") = 0,
        py::arg("window_left") = -1, py::arg("window_right") = -1, py::arg("softcap") = 0.0,
        py::arg("alibi_slopes") = py::none(), py::arg("s_aux") = py::none(), py::arg("dropout_p") = 0.0,
        py::arg("rng_state") = py::none());
  m.def("bwd", [=](at::Tensor const &dout, at::Tensor const &q, at::Tensor const &k, at::Tensor const &v,
                   at::Tensor const &out, at::Tensor const &lse, at::Tensor &dq, at::Tensor &dk, at::Tensor &dv,
                   double softmax_scale, bool causal, std::optional<at::Tensor> cu_seqlens_q,
                   std::optional<at::Tensor> cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k,
                   int64_t window_left, int64_t window_right, double softcap, std::optional<at::Tensor> alibi_slopes,
                   std::optional<at::Tensor> s_aux, double dropout_p, std::optional<at::Tensor> rng_state,
                   bool deterministic) {
          return bwd(dout, q, k, v, out, lse, dq, dk, dv,
                     scores(softmax_scale, causal, window_left, window_right, softcap, alibi_slopes, s_aux),
                     {cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k}, dropout_p, rng_state, deterministic);
        }, "Attention backward into dq, dk and dv (dropout: with the forward's rng_state); returns rowsum(dout * out). "
           "deterministic: the split backward (bit-identical run to run), else dQ by fp32 atomics",
        py::arg("dout"), py::arg("q"),
        py::arg("k"), py::arg("v"), py::arg("out"), py::arg("lse"), py::arg("dq"), py::arg("dk"), py::arg("dv"),
        py::arg("softmax_scale"), py::arg("causal"), py::arg("cu_seqlens_q") = py::none(),
        py::arg("cu_seqlens_k") = py::none(), py::arg("max_seqlen_q") = 0, py::arg("max_seqlen_k") = 0,
        py::arg("window_left") = -1, py::arg("window_right") = -1, py::arg("softcap") = 0.0,
        py::arg("alibi_slopes") = py::none(), py::arg("s_aux") = py::none(), py::arg("dropout_p") = 0.0,
        py::arg("rng_state") = py::none(), py::arg("deterministic") = true);
  m.def("dropout_mask", &dropout_mask, "Keep mask (uint8, 1 kept) that dropout with rng_state drops by",
        py::arg("rng_state"), py::arg("dropout_p"), py::arg("batch"), py::arg("heads"), py::arg("seqlen_q"),
        py::arg("seqlen_k"));
  m.def("time_kernels", &time_kernels, "Milliseconds per launch of each kernel, timed from C++",
        py::arg("dout"), py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"), py::arg("lse"),
        py::arg("softmax_scale"), py::arg("causal"), py::arg("reps"));
  m.def("fwd_kvcache", [=](at::Tensor const &q, at::Tensor const &k_cache, at::Tensor const &v_cache, at::Tensor &out,
                           at::Tensor &lse, at::Tensor const &cache_seqlens, double softmax_scale, bool causal,
                           int64_t window_left, int64_t window_right, double softcap,
                           std::optional<at::Tensor> alibi_slopes, int64_t num_splits, std::optional<at::Tensor> k,
                           std::optional<at::Tensor> v, std::optional<at::Tensor> rotary_cos,
                           std::optional<at::Tensor> rotary_sin, bool rotary_interleaved,
                           std::optional<at::Tensor> block_table, std::optional<at::Tensor> cache_batch_idx,
                           std::optional<at::Tensor> cache_leftpad) {
          fwd_kvcache(q, k_cache, v_cache, out, lse, cache_seqlens,
                      scores(softmax_scale, causal, window_left, window_right, softcap, alibi_slopes, std::nullopt),
                      num_splits, KvCacheNew{k, v, rotary_cos, rotary_sin, rotary_interleaved}, block_table,
                      cache_batch_idx, cache_leftpad);
        }, "Attention over a KV cache into out and lse, after appending k and v (rotated) to it in place "
           "(flash_attn_with_kvcache)", py::arg("q"), py::arg("k_cache"),
        py::arg("v_cache"), py::arg("out"), py::arg("lse"), py::arg("cache_seqlens"), py::arg("softmax_scale"),
        py::arg("causal"), py::arg("window_left") = -1, py::arg("window_right") = -1, py::arg("softcap") = 0.0,
        py::arg("alibi_slopes") = py::none(), py::arg("num_splits") = 0, py::arg("k") = py::none(),
        py::arg("v") = py::none(), py::arg("rotary_cos") = py::none(), py::arg("rotary_sin") = py::none(),
        py::arg("rotary_interleaved") = true, py::arg("block_table") = py::none(),
        py::arg("cache_batch_idx") = py::none(), py::arg("cache_leftpad") = py::none());
  m.def("kvcache_num_splits", &kvcache_num_splits, "The split count fwd_kvcache uses for this shape",
        py::arg("q"), py::arg("k_cache"), py::arg("num_splits") = 0, py::arg("block_table") = py::none(),
        py::arg("causal") = false, py::arg("window_left") = -1, py::arg("window_right") = -1,
        py::arg("alibi_slopes") = py::none());
  m.def("built_head_dims", &built_head_dims, "Kernel head dims compiled into this build");
  m.def("has_sm90", [] { return bool(FLASH_ATTN2_SM90); }, "Whether this build has the Hopper (sm_90a) kernels");
  m.def("has_decode_fused", [] { return bool(FLASH_ATTN2_DECODE_FUSED); },
        "Whether this build has the KV-cache kernels' fused split combine (FLASH_ATTN2_BUILD_DECODE_FUSED=1)");
  m.def("has_atomic_bwd", [] { return bool(FLASH_ATTN2_ATOMIC_BWD); },
        "Whether this build has the atomic-dQ backward (FLASH_ATTN2_BUILD_ATOMIC_BWD=1)");
  m.def("has_sm90_bwd_general", [] { return bool(FLASH_ATTN2_SM90_BWD_GENERAL); },
        "Whether this build has the Hopper backward's general variant (built by default with the Hopper "
        "backward; FLASH_ATTN2_BUILD_SM90_BWD_GENERAL=0 leaves it out)");
  m.def("has_sm90_bwd", [] { return bool(FLASH_ATTN2_SM90_BWD); },
        "Whether this build has the Hopper backward kernels (dQ, dK/dV): sm_90a built, FLASH_ATTN2_BUILD_SM90_BWD not 0");
}
