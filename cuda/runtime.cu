#include <cuda_runtime.h>

#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

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
  // Devices found good are remembered: this runs before every kernel launch.
  static std::mutex mu;
  static std::vector<char> ok;
  {
    std::lock_guard<std::mutex> lock(mu);
    if (device >= 0 && device < static_cast<int>(ok.size()) && ok[device]) return;
  }
  int major = 0, minor = 0;
  capability(device, &major, &minor);
  if (major < 8)
    throw std::runtime_error("any4: the CUDA kernels need compute capability 8.0 (Ampere) or newer; device " +
                             std::to_string(device) + " is sm_" + std::to_string(major) +
                             std::to_string(minor));
  std::lock_guard<std::mutex> lock(mu);
  if (static_cast<int>(ok.size()) <= device) ok.resize(device + 1, 0);
  ok[device] = 1;
}

int num_sms(int device) {
  static std::mutex mu;
  static std::vector<int> cache;
  std::lock_guard<std::mutex> lock(mu);
  if (device >= 0 && device < static_cast<int>(cache.size()) && cache[device] > 0) return cache[device];
  int n = device_count();
  if (device < 0 || device >= n)
    throw std::runtime_error("any4: CUDA device " + std::to_string(device) + " does not exist");
  int sms = 0;
  if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || sms <= 0)
    throw std::runtime_error("any4: cannot query the multiprocessor count of device " +
                             std::to_string(device));
  if (static_cast<int>(cache.size()) < n) cache.resize(n, 0);
  cache[device] = sms;
  return sms;
}

}  // namespace cuda
}  // namespace any4
