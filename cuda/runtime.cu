#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "api.h"

namespace any4 {
namespace cuda {

int device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no driver" error
    return 0;
  }
  return n;
}

static void capability(int device, int* major, int* minor) {
  int n = device_count();
  if (device < 0 || device >= n)
    throw std::runtime_error("any4: CUDA device " + std::to_string(device) + " does not exist (" +
                             std::to_string(n) + " visible)");
  cudaDeviceGetAttribute(major, cudaDevAttrComputeCapabilityMajor, device);
  cudaDeviceGetAttribute(minor, cudaDevAttrComputeCapabilityMinor, device);
}

std::string device_capability(int device) {
  int major = 0, minor = 0;
  capability(device, &major, &minor);
  return std::to_string(major) + "." + std::to_string(minor);
}

void check_device(int device) {
  int major = 0, minor = 0;
  capability(device, &major, &minor);
  if (major < 8)
    throw std::runtime_error("any4: the CUDA kernels need compute capability 8.0 (Ampere) or newer; device " +
                             std::to_string(device) + " is sm_" + std::to_string(major) +
                             std::to_string(minor));
}

}  // namespace cuda
}  // namespace any4
