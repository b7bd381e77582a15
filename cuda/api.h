// Host-side entry points of the CUDA kernels (built only when nvcc is found; see CMakeLists.txt).
// Nothing here includes pybind11 or torch: raw device pointers in, errors as C++ exceptions.
#pragma once

#include <cstdint>
#include <string>

namespace any4 {
namespace cuda {

// Number of visible CUDA devices; 0 when there is no driver or no device (never throws).
int device_count();

// Throws std::runtime_error with a clear message unless `device` exists and is sm_80 or newer.
void check_device(int device);

// "major.minor" compute capability of a device.
std::string device_capability(int device);

}  // namespace cuda
}  // namespace any4
