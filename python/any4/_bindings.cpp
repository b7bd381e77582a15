// The only file that includes pybind11: thin bindings of the C++ core (cpp/) and, when built
// with CUDA, the GPU kernels (cuda/). Tensors arrive as raw addresses (uintptr_t) whose shape,
// strides, dtype and device the Python layer (python/any4/_tensor.py) has already checked.
// Every entry point releases the GIL. std::invalid_argument becomes ValueError.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "common.h"
#include "gemm_cpu.h"
#include "kmeans.h"
#include "pack.h"
#include "parallel.h"
#include "quantize.h"

#ifdef ANY4_WITH_CUDA
#include "api.h"
#endif

namespace py = pybind11;
using namespace any4;

template <class T>
static T* ptr(uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

PYBIND11_MODULE(_C, m) {
  m.doc() = "any4 C++ core (raw-buffer interface; use the any4 Python package instead)";
  using gil = py::call_guard<py::gil_scoped_release>;

  m.def("get_num_threads", &get_num_threads);
  m.def("set_num_threads", &set_num_threads, py::arg("n"));

  m.def(
      "quantize",
      [](uintptr_t w, int64_t N, int64_t K, int bits, uintptr_t table, bool absmax, int64_t group_size,
         int out_dtype, uintptr_t channel_weight, int scale_power, uintptr_t element_weight, int method,
         int max_iter, int n_init, uint64_t seed, uintptr_t codes, uintptr_t lut, uintptr_t scales) {
        QuantizeParams p;
        p.bits = bits;
        p.table = ptr<const float>(table);
        p.absmax = absmax;
        p.group_size = group_size;
        p.out_dtype = to_dtype(out_dtype);
        p.channel_weight = ptr<const float>(channel_weight);
        p.scale_power = scale_power;
        p.element_weight = ptr<const float>(element_weight);
        p.kmeans.method = static_cast<KMeansMethod>(method);
        p.kmeans.max_iter = max_iter;
        p.kmeans.n_init = n_init;
        p.kmeans.seed = seed;
        quantize(ptr<const float>(w), N, K, p, ptr<uint8_t>(codes), ptr<float>(lut), ptr<float>(scales));
      },
      gil());

  m.def(
      "dequantize",
      [](uintptr_t packed, int64_t N, int64_t K, uintptr_t lut, int64_t lut_rows, int64_t lut_len,
         uintptr_t scales, int64_t n_groups, int64_t group_size, int table_dtype, uintptr_t w) {
        dequantize(ptr<const uint8_t>(packed), N, K, ptr<const void>(lut), lut_rows, lut_len,
                   ptr<const void>(scales), n_groups, group_size, to_dtype(table_dtype), ptr<float>(w));
      },
      gil());

  m.def(
      "pack_nibbles",
      [](uintptr_t codes, int64_t N, int64_t K, uintptr_t packed) {
        pack_nibbles(ptr<const uint8_t>(codes), N, K, ptr<uint8_t>(packed));
      },
      gil());
  m.def(
      "unpack_nibbles",
      [](uintptr_t packed, int64_t N, int64_t K, uintptr_t codes) {
        unpack_nibbles(ptr<const uint8_t>(packed), N, K, ptr<uint8_t>(codes));
      },
      gil());

  m.def(
      "kmeans_rows",
      [](uintptr_t values, uintptr_t weights, int64_t rows, int64_t n, int k, int method, int max_iter,
         int n_init, uint64_t seed, uintptr_t centroids, uintptr_t codes, uintptr_t inertia) {
        KMeansParams p;
        p.method = static_cast<KMeansMethod>(method);
        p.max_iter = max_iter;
        p.n_init = n_init;
        p.seed = seed;
        kmeans_rows(ptr<const float>(values), ptr<const float>(weights), rows, n, k, p, ptr<float>(centroids),
                    ptr<uint8_t>(codes), ptr<double>(inertia));
      },
      gil());

  m.def(
      "gemm_cpu",
      [](uintptr_t x, int x_dtype, int64_t M, int64_t K, uintptr_t packed, int64_t N, uintptr_t lut,
         int64_t lut_rows, int64_t lut_len, uintptr_t scales, int64_t n_groups, int64_t group_size,
         int table_dtype, uintptr_t y, int impl) {
        GemmArgs a;
        a.x = ptr<const void>(x);
        a.x_dtype = to_dtype(x_dtype);
        a.M = M;
        a.K = K;
        a.packed = ptr<const uint8_t>(packed);
        a.N = N;
        a.lut = ptr<const void>(lut);
        a.lut_rows = lut_rows;
        a.lut_len = lut_len;
        a.scales = ptr<const void>(scales);
        a.n_groups = n_groups;
        a.group_size = group_size;
        a.table_dtype = to_dtype(table_dtype);
        a.y = ptr<void>(y);
        gemm_cpu(a, static_cast<CpuImpl>(impl));
      },
      gil());
  m.def("best_cpu_impl", [] { return static_cast<int>(best_cpu_impl()); });
  m.def("cpu_impl_supported", [](int impl) { return cpu_impl_supported(static_cast<CpuImpl>(impl)); });

#ifdef ANY4_WITH_CUDA
  m.attr("cuda_compiled") = true;
  m.def("cuda_device_count", &cuda::device_count);
  m.def("cuda_check_device", &cuda::check_device, py::arg("device"));
  m.def("cuda_device_capability", &cuda::device_capability, py::arg("device"));
#else
  m.attr("cuda_compiled") = false;
#endif
#ifdef ANY4_CUDA_ARCHS
  m.attr("cuda_archs") = std::string(ANY4_CUDA_ARCHS);
#else
  m.attr("cuda_archs") = std::string();
#endif
}
