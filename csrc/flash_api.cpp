// The binding: the only file that knows torch. Checks tensors, fills the params structs, picks the
// kernel for the head dim and dtype, and launches it on the current stream of the inputs' device.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cutlass/numeric_types.h>
#include <ATen/MemoryOverlap.h>
#include <torch/extension.h>

#include <cmath>
#include <limits>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "instantiations/kernels.h"

namespace {

constexpr int kBuiltHeadDims[] = {FLASH_ATTN2_BUILT_HEAD_DIMS};

constexpr bool is_built(int head_dim) {
  for (int d : kBuiltHeadDims) {
    if (d == head_dim) { return true; }
  }
  return false;
}

template <size_t I, class F>
bool try_kernel(int head_dim, F &f) {
  constexpr int kHeadDim = flash::kKernelHeadDims[I];
  if constexpr (is_built(kHeadDim)) {
    if (head_dim <= kHeadDim) {
      f(std::integral_constant<int, kHeadDim>{});
      return true;
    }
  }
  return false;
}

// Calls f(integral_constant<kHeadDim>) for the smallest built kernel head dim >= head_dim.
template <class F, size_t... I>
bool dispatch_head_dim(int head_dim, F &&f, std::index_sequence<I...>) {
  return (try_kernel<I>(head_dim, f) || ...);
}

template <class F>
bool dispatch_head_dim(int head_dim, F &&f) {
  return dispatch_head_dim(head_dim, f, std::make_index_sequence<std::size(flash::kKernelHeadDims)>{});
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

void check_bshd(at::Tensor const &t, char const *name) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16, name,
                   " must be float16 or bfloat16, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == 4, name, " must be 4-D (batch, seqlen, heads, head_dim), got ", num(t.dim()), "-D");
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

// A (batch, seqlen, heads, head_dim) tensor as the kernels see it (checked by check_bshd beforehand).
flash::HeadTensor head_tensor(at::Tensor const &t) { return {t.data_ptr(), t.stride(0), t.stride(1), t.stride(2)}; }

void set_qkv(flash::AttnParams &p, at::Tensor const &q, at::Tensor const &k, at::Tensor const &v) {
  check_bshd(q, "q");
  check_bshd(k, "k");
  check_bshd(v, "v");
  check_same(k, "k", q, "q");
  check_same(v, "v", q, "q");
  TORCH_CHECK_VALUE(k.sizes() == v.sizes(), "k and v must have the same shape, got ", num(k.sizes()), " and ",
                    num(v.sizes()));
  TORCH_CHECK_VALUE(k.size(0) == q.size(0), "k has batch ", num(k.size(0)), " but q has batch ", num(q.size(0)));
  TORCH_CHECK_VALUE(k.size(3) == q.size(3), "k has head_dim ", num(k.size(3)), " but q has head_dim ",
                    num(q.size(3)));
  int64_t const head_dim = q.size(3);
  TORCH_CHECK_VALUE(head_dim > 0 && head_dim <= 256 && head_dim % 8 == 0, "q: head_dim must be a multiple of 8 in "
                    "[8, 256] at this level (flash_attn_func pads other head dims), got ", num(head_dim));
  TORCH_CHECK_VALUE(k.size(2) > 0 && q.size(2) % k.size(2) == 0, "q has ", num(q.size(2)),
                    " heads, which must be a multiple of the heads of k and v (", num(k.size(2)), ")");
  TORCH_CHECK_VALUE(q.size(0) <= 65535 && q.size(2) <= 65535, "q: batch and heads must each be at most 65535");
  // Sequence positions are 32-bit in the kernels (offsets are 64-bit); leave room for a block past the end.
  constexpr int64_t kMaxSeqlen = (int64_t(1) << 31) - 1024;
  TORCH_CHECK_VALUE(q.size(1) <= kMaxSeqlen && k.size(1) <= kMaxSeqlen, "q, k: seqlen must be below 2^31 - 1024, got ",
                    num(q.size(1)), " and ", num(k.size(1)));

  p.q = head_tensor(q), p.k = head_tensor(k), p.v = head_tensor(v);
  p.batch = q.size(0), p.heads = q.size(2), p.heads_kv = k.size(2);
  p.seqlen_q = q.size(1), p.seqlen_k = k.size(1);
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

void check_lse(at::Tensor const &lse, at::Tensor const &q) {
  TORCH_CHECK_TYPE(lse.scalar_type() == at::kFloat, "lse must be float32, got ", lse.scalar_type());
  TORCH_CHECK_VALUE(lse.device() == q.device(), "lse is on ", lse.device(), " but q is on ", q.device());
  TORCH_CHECK_VALUE(lse.dim() == 3 && lse.size(0) == q.size(0) && lse.size(1) == q.size(2) &&
                        lse.size(2) == q.size(1) && lse.is_contiguous(),
                    "lse must be a contiguous (batch, heads, seqlen_q) tensor, got ", num(lse.sizes()));
}

void set_softmax(flash::AttnParams &p, double softmax_scale, bool causal) {
  // Masking relies on -inf * scale staying -inf.
  TORCH_CHECK_VALUE(std::isfinite(softmax_scale) && softmax_scale > 0, "softmax_scale must be finite and positive, got ",
                    num(softmax_scale));
  p.softmax_scale = float(softmax_scale);
  p.softmax_scale_log2 = float(softmax_scale * M_LOG2E);
  p.is_causal = causal;
}

void set_out_strides(flash::FwdParams &p, at::Tensor const &out, at::Tensor const &lse) {
  p.o = head_tensor(out);
  p.lse_ptr = lse.data_ptr<float>();
}

template <class Launch>
void launch(flash::AttnParams const &p, at::ScalarType dtype, Launch &&run) {
  bool const found = dispatch_head_dim(p.head_dim, [&](auto head_dim) {
    dispatch_dtype(dtype, [&](auto element) {
      C10_CUDA_CHECK((run(head_dim, element)));
    });
  });
  TORCH_CHECK_VALUE(found, "no kernel built for head_dim ", num(int64_t(p.head_dim)), "; this build has ",
                    num(std::vector<int64_t>(std::begin(kBuiltHeadDims), std::end(kBuiltHeadDims))),
                    " (rebuild with FLASH_ATTN2_HEAD_DIMS)");
}

// out <- softmax(q·kᵀ·scale)·v and lse <- logsumexp(q·kᵀ·scale) per query row; returns nothing.
void fwd(at::Tensor const &q, at::Tensor const &k, at::Tensor const &v, at::Tensor &out, at::Tensor &lse,
         double softmax_scale, bool causal) {
  flash::FwdParams p{};
  set_qkv(p, q, k, v);
  set_softmax(p, softmax_scale, causal);
  check_output(out, "out", q, "q");
  check_lse(lse, q);
  if (q.numel() == 0) { return; }
  if (p.seqlen_k == 0) {  // no keys at all: every row sees nothing
    out.zero_();
    lse.fill_(std::numeric_limits<float>::infinity());
    return;
  }
  set_out_strides(p, out, lse);

  c10::cuda::CUDAGuard device_guard(q.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  launch(p, q.scalar_type(), [&](auto head_dim, auto element) {
    return flash::run_fwd<decltype(head_dim)::value, decltype(element)>(p, stream);
  });
}

// Everything the backward kernels read and write. With GQA, dK and dV are written per query head into
// dk_heads/dv_heads and summed over each group afterwards, in a fixed order (no atomics: bit-identical
// from run to run).
struct BwdLaunch {
  flash::BwdParams params{};
  at::Tensor dk_heads, dv_heads, dpsum;
};

BwdLaunch prepare_bwd(at::Tensor const &dout, at::Tensor const &q, at::Tensor const &k, at::Tensor const &v,
                      at::Tensor const &out, at::Tensor const &lse, at::Tensor &dq, at::Tensor &dk, at::Tensor &dv,
                      double softmax_scale, bool causal) {
  BwdLaunch b;
  flash::BwdParams &p = b.params;
  set_qkv(p, q, k, v);
  set_softmax(p, softmax_scale, causal);
  check_out(out, "out", q, "q");
  check_out(dout, "dout", q, "q");
  check_lse(lse, q);
  check_output(dq, "dq", q, "q");
  check_output(dk, "dk", k, "k");
  check_output(dv, "dv", v, "v");
  set_out_strides(p, out, lse);
  p.dout = head_tensor(dout), p.dq = head_tensor(dq);
  bool const grouped = p.heads != p.heads_kv;
  b.dk_heads = grouped ? at::empty({p.batch, p.seqlen_k, p.heads, k.size(3)}, k.options()) : dk;
  b.dv_heads = grouped ? at::empty({p.batch, p.seqlen_k, p.heads, v.size(3)}, v.options()) : dv;
  p.dk = head_tensor(b.dk_heads), p.dv = head_tensor(b.dv_heads);
  b.dpsum = at::empty({p.batch, p.heads, p.seqlen_q}, q.options().dtype(at::kFloat));
  p.dpsum_ptr = b.dpsum.data_ptr<float>();
  return b;
}

// dq, dk, dv <- gradients of sum(out * dout) w.r.t. q, k, v, given the forward's out and lse.
void bwd(at::Tensor const &dout, at::Tensor const &q, at::Tensor const &k, at::Tensor const &v,
         at::Tensor const &out, at::Tensor const &lse, at::Tensor &dq, at::Tensor &dk, at::Tensor &dv,
         double softmax_scale, bool causal) {
  BwdLaunch b = prepare_bwd(dout, q, k, v, out, lse, dq, dk, dv, softmax_scale, causal);
  flash::BwdParams const &p = b.params;
  if (p.batch == 0 || p.heads == 0 || p.seqlen_q == 0 || p.seqlen_k == 0) {  // nothing attends to anything
    dq.zero_();
    dk.zero_();
    dv.zero_();
    return;
  }
  c10::cuda::CUDAGuard device_guard(q.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  launch(p, q.scalar_type(), [&](auto head_dim, auto element) {
    constexpr int kHeadDim = decltype(head_dim)::value;
    using Element = decltype(element);
    cudaError_t err = flash::run_bwd_preprocess<Element>(p, stream);
    if (err == cudaSuccess) { err = flash::run_bwd_dq<kHeadDim, Element>(p, stream); }
    if (err == cudaSuccess) { err = flash::run_bwd_dkdv<kHeadDim, Element>(p, stream); }
    return err;
  });
  if (p.heads != p.heads_kv) {
    int64_t const groups = p.heads / p.heads_kv;
    at::sum_out(dk, b.dk_heads.view({p.batch, p.seqlen_k, p.heads_kv, groups, k.size(3)}), {3});
    at::sum_out(dv, b.dv_heads.view({p.batch, p.seqlen_k, p.heads_kv, groups, v.size(3)}), {3});
  }
}

// Milliseconds per launch of each kernel on its own (forward, preprocess, dQ, dK/dV), from a launch loop
// between CUDA events on the current stream: places a regression in one kernel. Writes out, lse and
// scratch gradients as it goes.
std::map<std::string, double> time_kernels(at::Tensor const &dout, at::Tensor const &q, at::Tensor const &k,
                                           at::Tensor const &v, at::Tensor &out, at::Tensor &lse,
                                           double softmax_scale, bool causal, int64_t reps) {
  TORCH_CHECK_VALUE(reps > 0, "reps must be positive, got ", num(reps));
  at::Tensor dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v);
  BwdLaunch b = prepare_bwd(dout, q, k, v, out, lse, dq, dk, dv, softmax_scale, causal);
  flash::BwdParams const &p = b.params;
  TORCH_CHECK_VALUE(q.numel() > 0 && k.numel() > 0, "time_kernels needs non-empty q, k and v");
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
    return cudaSuccess;
  });
  return ms;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "flash_attn2 CUDA kernels (use flash_attn2.flash_attn_func)";
  m.def("fwd", &fwd, "Attention forward into out and lse", py::arg("q"), py::arg("k"), py::arg("v"),
        py::arg("out"), py::arg("lse"), py::arg("softmax_scale"), py::arg("causal"));
  m.def("bwd", &bwd, "Attention backward into dq, dk and dv", py::arg("dout"), py::arg("q"), py::arg("k"),
        py::arg("v"), py::arg("out"), py::arg("lse"), py::arg("dq"), py::arg("dk"), py::arg("dv"),
        py::arg("softmax_scale"), py::arg("causal"));
  m.def("time_kernels", &time_kernels, "Milliseconds per launch of each kernel, timed from C++",
        py::arg("dout"), py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"), py::arg("lse"),
        py::arg("softmax_scale"), py::arg("causal"), py::arg("reps"));
  m.def("built_head_dims", &built_head_dims, "Kernel head dims compiled into this build");
}
