// l2c::residual_delta_store_ on CUDA:  cache = out - inp.
#include "elementwise.cuh"

namespace l2c {
namespace cuda {
namespace {

struct Sub {
  static L2C_DEVICE float apply(float a, float b) { return a - b; }
};

}  // namespace

cudaError_t residual_delta_store(void* cache, const void* out, const void* inp, int64_t numel,
                                 DType dtype, cudaStream_t stream) {
  return detail::dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    // The cache is read at a later denoising step: stream it past L2 (evict-first stores).
    return detail::launch_binary_flat<T, Sub, detail::Store::kStream>(
        static_cast<T*>(cache), static_cast<const T*>(out), static_cast<const T*>(inp), numel,
        stream);
  });
}

}  // namespace cuda
}  // namespace l2c
