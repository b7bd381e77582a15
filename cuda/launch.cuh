// Launch helpers shared by the kernel files: device selection and error reporting.
#pragma once

#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "api.h"

namespace any4 {
namespace cuda {

// Makes `device` current for the scope (the kernels run on the tensors' device, whatever the
// caller's current device is) after checking it is sm_80 or newer.
class DeviceScope {
 public:
  explicit DeviceScope(int device) {
    check_device(device);
    if (cudaGetDevice(&prev_) != cudaSuccess) throw std::runtime_error("any4: cudaGetDevice failed");
    if (prev_ == device) {
      prev_ = -1;
    } else if (cudaSetDevice(device) != cudaSuccess) {
      throw std::runtime_error("any4: cannot select CUDA device " + std::to_string(device));
    }
  }
  ~DeviceScope() {
    if (prev_ >= 0) cudaSetDevice(prev_);
  }
  DeviceScope(const DeviceScope&) = delete;
  DeviceScope& operator=(const DeviceScope&) = delete;

 private:
  int prev_ = -1;
};

inline void check_launch(const char* what) {
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess)
    throw std::runtime_error(std::string("any4: ") + what + " launch failed: " + cudaGetErrorString(e));
}

}  // namespace cuda
}  // namespace any4
