// oneDNN convolutions as XLA FFI handlers for XLA:CPU (see nfnet_jax/cpu/onednn.py).
//
// Input and output are NHWC, the kernel HWIO with O = groups * O/groups, as everywhere in
// nfnet_jax; each array is float32 or bfloat16. oneDNN reads and writes the activations in place
// (its `nhwc` layout) and keeps the kernel in the blocked layout its fastest kernels want: the
// kernel (or its gradient) is reordered on every call, one pass over the weights.
//
// Three handlers, one per pass of a training step: the forward, the input gradient and the kernel
// gradient. Each pass of each convolution (shapes, dtypes, strides, padding, groups) gets its
// primitive once, cached for the process; the calls run one at a time (`execution_mutex`).

#include <algorithm>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;

namespace {

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

enum class Pass { kForward, kBackwardData, kBackwardWeights };

// What a pass's primitive depends on. `activations_in` is the input side (x, or the input
// gradient), `activations_out` the output side (y, or the output gradient).
struct Geometry {
  int64_t n, h, w, c, kh, kw, o, oh, ow, stride_h, stride_w, pad_top, pad_bottom, pad_left, pad_right, groups;
  memory::data_type activations_in, weights, activations_out;

  // The NHWC activations of the input side and of the output side, in oneDNN's (n, c, h, w) order.
  memory::desc In() const { return memory::desc({n, c, h, w}, activations_in, memory::format_tag::nhwc); }
  memory::desc Out() const { return memory::desc({n, o, oh, ow}, activations_out, memory::format_tag::nhwc); }
};

std::vector<int64_t> Key(Pass pass, const Geometry& g) {
  return {static_cast<int64_t>(pass), g.n, g.h, g.w, g.c, g.kh, g.kw, g.o, g.oh, g.ow, g.stride_h, g.stride_w,
          g.pad_top, g.pad_bottom, g.pad_left, g.pad_right, g.groups, static_cast<int64_t>(g.activations_in),
          static_cast<int64_t>(g.weights), static_cast<int64_t>(g.activations_out)};
}

// The kernel's dimensions for oneDNN ((groups,) out, in, kh, kw): in the HWIO layout (`hwio`), or
// in any layout oneDNN picks.
memory::desc Weights(const Geometry& g, bool hwio) {
  const int64_t in = g.c / g.groups;
  if (g.groups == 1) {
    memory::dims dims = {g.o, in, g.kh, g.kw};
    if (hwio) return memory::desc(dims, g.weights, memory::dims{1, g.o, g.kw * in * g.o, in * g.o});
    return memory::desc(dims, g.weights, memory::format_tag::any);
  }
  const int64_t out = g.o / g.groups;
  memory::dims dims = {g.groups, out, in, g.kh, g.kw};
  if (hwio) return memory::desc(dims, g.weights, memory::dims{out, 1, g.o, g.kw * in * g.o, in * g.o});
  return memory::desc(dims, g.weights, memory::format_tag::any);
}

// One pass of one convolution: its primitive and the kernel layout that primitive takes or gives.
struct Conv {
  dnnl::primitive primitive;
  memory::desc weights;
};

std::mutex cache_mutex;
std::map<std::vector<int64_t>, std::shared_ptr<const Conv>> cache;

// One oneDNN call at a time in the process. Each call already uses every core (OpenMP), and
// XLA may run independent calls on several of its threads at once: each would bring its own
// OpenMP team, whose threads wait for each other in spin barriers, and on a machine with few
// cores those teams starve each other (a training step of a process with 8 host devices took
// minutes instead of seconds).
std::mutex execution_mutex;

std::shared_ptr<const Conv> Get(Pass pass, const Geometry& g) {
  std::lock_guard<std::mutex> lock(cache_mutex);
  auto& entry = cache[Key(pass, g)];
  if (entry) return entry;
  const memory::dims strides = {g.stride_h, g.stride_w}, pad_l = {g.pad_top, g.pad_left},
                     pad_r = {g.pad_bottom, g.pad_right};
  const memory::desc in = g.In(), out = g.Out();
  const auto direct = dnnl::algorithm::convolution_direct;
  // The forward that the backward passes take as their hint: for the kernel gradient, one whose
  // kernel has the activations' type (a bfloat16 forward has no float32 kernel).
  Geometry hinted = g;
  if (pass == Pass::kBackwardWeights) hinted.weights = g.activations_in;
  dnnl::convolution_forward::primitive_desc forward(Engine(), dnnl::prop_kind::forward_training, direct, in,
                                                    Weights(hinted, false), out, strides, pad_l, pad_r);
  if (pass == Pass::kForward) {
    entry = std::make_shared<const Conv>(Conv{dnnl::convolution_forward(forward), forward.weights_desc()});
  } else if (pass == Pass::kBackwardData) {
    dnnl::convolution_backward_data::primitive_desc pd(Engine(), direct, in, Weights(g, false), out, strides, pad_l,
                                                       pad_r, forward);
    entry = std::make_shared<const Conv>(Conv{dnnl::convolution_backward_data(pd), pd.weights_desc()});
  } else {
    dnnl::convolution_backward_weights::primitive_desc pd(Engine(), direct, in, Weights(g, false), out, strides,
                                                          pad_l, pad_r, forward);
    entry = std::make_shared<const Conv>(Conv{dnnl::convolution_backward_weights(pd), pd.diff_weights_desc()});
  }
  return entry;
}

memory::data_type Type(ffi::DataType type) {
  if (type == ffi::DataType::F32) return memory::data_type::f32;
  if (type == ffi::DataType::BF16) return memory::data_type::bf16;
  throw std::invalid_argument("arrays must be float32 or bfloat16");
}

Geometry Make(const ffi::AnyBuffer& in, const ffi::AnyBuffer& hwio, const ffi::AnyBuffer& out, int64_t stride_h,
              int64_t stride_w, int64_t pad_top, int64_t pad_bottom, int64_t pad_left, int64_t pad_right,
              int64_t groups) {
  const auto i = in.dimensions(), k = hwio.dimensions(), o = out.dimensions();
  return Geometry{i[0],       i[1],     i[2],      i[3],     k[0],    k[1],
                  k[3],       o[1],     o[2],      stride_h, stride_w, pad_top,
                  pad_bottom, pad_left, pad_right, groups,   Type(in.element_type()),
                  Type(hwio.element_type()), Type(out.element_type())};
}

memory Memory(const memory::desc& desc, const ffi::AnyBuffer& buffer) {
  return memory(desc, Engine(), buffer.untyped_data());
}

template <typename F>
ffi::Error Guarded(F run) {
  try {
    std::lock_guard<std::mutex> lock(execution_mutex);
    run();
  } catch (const std::exception& e) {
    return ffi::Error(ffi::ErrorCode::kInternal, std::string("oneDNN: ") + e.what());
  }
  return ffi::Error::Success();
}

// The kernel `hwio` in the layout `conv` takes: itself, or a reordered copy.
memory KernelFor(const Conv& conv, const Geometry& g, const ffi::AnyBuffer& hwio, dnnl::stream& stream) {
  memory given = Memory(Weights(g, true), hwio);
  if (conv.weights == given.get_desc()) return given;
  memory wanted(conv.weights, Engine());
  dnnl::reorder(given, wanted).execute(stream, given, wanted);
  return wanted;
}

ffi::Error Forward(ffi::AnyBuffer x, ffi::AnyBuffer kernel, ffi::Result<ffi::AnyBuffer> y, int64_t stride_h,
                   int64_t stride_w, int64_t pad_top, int64_t pad_bottom, int64_t pad_left, int64_t pad_right,
                   int64_t groups) {
  return Guarded([&] {
    const Geometry g = Make(x, kernel, *y, stride_h, stride_w, pad_top, pad_bottom, pad_left, pad_right, groups);
    auto conv = Get(Pass::kForward, g);
    dnnl::stream stream(Engine());
    memory weights = KernelFor(*conv, g, kernel, stream);
    conv->primitive.execute(stream, {{DNNL_ARG_SRC, Memory(g.In(), x)},
                                     {DNNL_ARG_WEIGHTS, weights},
                                     {DNNL_ARG_DST, Memory(g.Out(), *y)}});
    stream.wait();
  });
}

ffi::Error BackwardData(ffi::AnyBuffer dy, ffi::AnyBuffer kernel, ffi::Result<ffi::AnyBuffer> dx, int64_t stride_h,
                        int64_t stride_w, int64_t pad_top, int64_t pad_bottom, int64_t pad_left, int64_t pad_right,
                        int64_t groups) {
  return Guarded([&] {
    const Geometry g = Make(*dx, kernel, dy, stride_h, stride_w, pad_top, pad_bottom, pad_left, pad_right, groups);
    auto conv = Get(Pass::kBackwardData, g);
    dnnl::stream stream(Engine());
    memory weights = KernelFor(*conv, g, kernel, stream);
    conv->primitive.execute(
        stream, {{DNNL_ARG_DIFF_DST, Memory(g.Out(), dy)},
                 {DNNL_ARG_WEIGHTS, weights},
                 {DNNL_ARG_DIFF_SRC, Memory(g.In(), *dx)}});
    stream.wait();
  });
}

ffi::Error BackwardWeights(ffi::AnyBuffer x, ffi::AnyBuffer dy, ffi::Result<ffi::AnyBuffer> dkernel,
                           int64_t stride_h, int64_t stride_w, int64_t pad_top, int64_t pad_bottom, int64_t pad_left,
                           int64_t pad_right, int64_t groups) {
  return Guarded([&] {
    const Geometry g = Make(x, *dkernel, dy, stride_h, stride_w, pad_top, pad_bottom, pad_left, pad_right, groups);
    auto conv = Get(Pass::kBackwardWeights, g);
    dnnl::stream stream(Engine());
    memory user = Memory(Weights(g, true), *dkernel);
    const bool direct = conv->weights == user.get_desc();
    memory diff_weights = direct ? user : memory(conv->weights, Engine());
    conv->primitive.execute(stream,
                            {{DNNL_ARG_SRC, Memory(g.In(), x)},
                             {DNNL_ARG_DIFF_DST, Memory(g.Out(), dy)},
                             {DNNL_ARG_DIFF_WEIGHTS, diff_weights}});
    if (!direct) dnnl::reorder(diff_weights, user).execute(stream, diff_weights, user);
    stream.wait();
  });
}

// Two arrays in, one out, and the convolution's geometry as attributes (nfnet_jax.onednn._call).
auto ConvBinding() {
  return ffi::Ffi::Bind()
      .Arg<ffi::AnyBuffer>()
      .Arg<ffi::AnyBuffer>()
      .Ret<ffi::AnyBuffer>()
      .Attr<int64_t>("stride_h")
      .Attr<int64_t>("stride_w")
      .Attr<int64_t>("pad_top")
      .Attr<int64_t>("pad_bottom")
      .Attr<int64_t>("pad_left")
      .Attr<int64_t>("pad_right")
      .Attr<int64_t>("groups");
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(NfnetOnednnConvForward, Forward, ConvBinding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(NfnetOnednnConvBackwardData, BackwardData, ConvBinding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(NfnetOnednnConvBackwardWeights, BackwardWeights, ConvBinding());
