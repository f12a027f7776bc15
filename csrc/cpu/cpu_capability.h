// Which variant of the CPU kernels runs (see cpu_common.h). Free of torch headers.
#pragma once

namespace l2c {
namespace cpu {

// "avx2" or "default": the variant the CPU kernels use in this process.
const char* capability();

// Comma-separated variants compiled into this build, e.g. "default,avx2".
const char* compiled_variants();

}  // namespace cpu
}  // namespace l2c
