// The only file that includes pybind11: thin bindings of the C++ core (cpp/) and, when built
// with CUDA, the GPU kernels (cuda/). Tensors arrive as raw addresses (uintptr_t) whose shape,
// strides, dtype and device the Python layer (python/any4/_tensor.py) has already checked.
// Every entry point releases the GIL. std::invalid_argument becomes ValueError.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "common.h"
#include "cpu_features.h"
#include "dequantize_rows.h"
#include "emulate_gpu.h"
#include "gemm_cpu.h"
#include "kmeans.h"
#include "layout.cuh"
#include "pack.h"
#include "pack_gpu.h"
#include "parallel.h"
#include "quantize.h"
#include "refine.h"
#include "refit_rows.h"

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
  m.attr("max_threads") = kMaxThreads;
  m.def(
      "use_openmp_runtime",
      [](const std::string& prefer_prefix) { return use_openmp_runtime(prefer_prefix.c_str()); },
      py::arg("prefer_prefix"));
  m.def("use_thread_pool", &use_thread_pool);
  m.def("parallel_backend", [] { return std::string(parallel_backend()); });

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
      [](uintptr_t packed, int64_t N, int64_t K, int bits, uintptr_t lut, int64_t lut_rows, int64_t lut_len,
         uintptr_t scales, int64_t n_groups, int64_t group_size, int table_dtype, uintptr_t w) {
        dequantize(ptr<const uint8_t>(packed), N, K, bits, ptr<const void>(lut), lut_rows, lut_len,
                   ptr<const void>(scales), n_groups, group_size, to_dtype(table_dtype), ptr<float>(w));
      },
      gil());

  m.def(
      "pack_codes",
      [](uintptr_t codes, int64_t N, int64_t K, int bits, uintptr_t packed) {
        pack_codes(ptr<const uint8_t>(codes), N, K, bits, ptr<uint8_t>(packed));
      },
      gil());
  m.def(
      "unpack_codes",
      [](uintptr_t packed, int64_t N, int64_t K, int bits, uintptr_t codes) {
        unpack_codes(ptr<const uint8_t>(packed), N, K, bits, ptr<uint8_t>(codes));
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
      "refit_normal_rows",
      [](uintptr_t codes, uintptr_t scales, uintptr_t hr, int64_t n, int64_t K, int L, int64_t group_size,
         bool zero, uintptr_t U, int r, uintptr_t d, uintptr_t diag_h, uintptr_t M, uintptr_t grad,
         uintptr_t curv) {
        refit_normal_rows(ptr<const uint8_t>(codes), ptr<const float>(scales), ptr<const float>(hr), n, K, L,
                          group_size, zero, ptr<const float>(U), r, ptr<const float>(d),
                          ptr<const float>(diag_h), ptr<double>(M), ptr<double>(grad), ptr<double>(curv));
      },
      gil());

  m.def(
      "refit_newton_rows",
      [](uintptr_t codes, uintptr_t scales, uintptr_t hr, int64_t n, int64_t K, int L, int64_t group_size,
         bool zero, uintptr_t U, int r, uintptr_t d, uintptr_t diag_h, double damp, uintptr_t x) {
        refit_newton_rows(ptr<const uint8_t>(codes), ptr<const float>(scales), ptr<const float>(hr), n, K, L,
                          group_size, zero, ptr<const float>(U), r, ptr<const float>(d),
                          ptr<const float>(diag_h), damp, ptr<double>(x));
      },
      gil());

  m.def(
      "refine_rows",
      [](uintptr_t w, int64_t N, int64_t K, int L, int64_t group_size, uintptr_t chan, int power,
         uintptr_t elem, int dtype, int rounds, uintptr_t codes, uintptr_t lut, uintptr_t scales) {
        return refine_rows(ptr<const float>(w), N, K, L, group_size, ptr<const float>(chan), power,
                           ptr<const float>(elem), to_dtype(dtype), rounds, ptr<uint8_t>(codes),
                           ptr<float>(lut), ptr<float>(scales));
      },
      gil());
  m.def(
      "refit_assign_rows",
      [](uintptr_t w, uintptr_t lut, uintptr_t scales, int64_t n, int64_t K, int L, int64_t group_size,
         uintptr_t codes, uintptr_t res) {
        refit_assign_rows(ptr<const float>(w), ptr<const float>(lut), ptr<const float>(scales), n, K, L,
                          group_size, ptr<uint8_t>(codes), ptr<float>(res));
      },
      gil());
  m.def(
      "gemm_cpu",
      [](uintptr_t x, int x_dtype, int64_t M, int64_t K, uintptr_t packed, int bits, int64_t N, uintptr_t lut,
         int64_t lut_rows, int64_t lut_len, uintptr_t scales, int64_t n_groups, int64_t group_size,
         int table_dtype, uintptr_t y, int impl) {
        GemmArgs a;
        a.x = ptr<const void>(x);
        a.x_dtype = to_dtype(x_dtype);
        a.M = M;
        a.K = K;
        a.packed = ptr<const uint8_t>(packed);
        a.bits = bits;
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
  m.def(
      "dequantize_rows",
      [](uintptr_t packed, int64_t N, int64_t K, uintptr_t lut, int64_t lut_rows, int64_t lut_len,
         uintptr_t scales, int64_t n_groups, int64_t group_size, int table_dtype, int64_t n0, int64_t n1,
         uintptr_t w, int w_dtype, int impl) {
        GemmArgs a;
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
        dequantize_rows(a, n0, n1, ptr<void>(w), to_dtype(w_dtype), static_cast<CpuImpl>(impl));
      },
      gil());
  m.def("cpu_features", [] {
    const CpuFeatures& f = cpu_features();
    py::dict d;
    d["avx2"] = f.avx2;
    d["avx512"] = f.avx512;
    d["avx512bf16"] = f.avx512bf16;
    d["amx_bf16"] = f.amx_bf16;
    return d;
  });
  m.def("best_cpu_impl", [] { return static_cast<int>(best_cpu_impl()); });
  m.def("cpu_impl_supported", [](int impl) { return cpu_impl_supported(static_cast<CpuImpl>(impl)); });

  // ---- GPU layout (pack_gpu.h), its CPU emulation (emulate_gpu.h) and the CUDA gemm kernels ----
  m.def("gpu_pack_sizes", [](int64_t N, int64_t K, int64_t group_size, int bits) {
    GpuPackSizes z = gpu_pack_sizes(N, K, group_size, bits);
    py::dict d;
    d["n_tiles"] = z.n_tiles;
    d["k_chunks"] = z.k_chunks;
    d["N_pad"] = z.N_pad;
    d["K_pad"] = z.K_pad;
    d["n_groups"] = z.n_groups;
    d["n_groups_pad"] = z.n_groups_pad;
    d["bits"] = z.bits;
    d["n_units"] = z.n_units;
    d["unit_bytes"] = z.unit_bytes;
    d["code_bytes"] = z.code_bytes;
    d["scale_elems"] = z.scale_elems;
    d["lut_bytes"] = z.lut_bytes;
    return d;
  });
  m.def(
      "pack_for_gpu",
      [](uintptr_t packed, int storage_bits, int64_t N, int64_t K, uintptr_t lut, int64_t lut_rows,
         int64_t lut_len, uintptr_t scales, int64_t n_groups, int64_t group_size, int table_dtype,
         int compute_dtype, int gpu_bits, uintptr_t codes_out, uintptr_t scales_out, uintptr_t lut_out) {
        pack_for_gpu(ptr<const uint8_t>(packed), storage_bits, N, K, ptr<const void>(lut), lut_rows, lut_len,
                     ptr<const void>(scales), n_groups, group_size, to_dtype(table_dtype),
                     to_dtype(compute_dtype), gpu_bits, ptr<uint8_t>(codes_out), ptr<uint16_t>(scales_out),
                     ptr<uint8_t>(lut_out));
      },
      gil());
  m.def("gpu_arith_constant",
        [](uintptr_t lut, int64_t lut_rows, int64_t lut_len, int table_dtype, int compute_dtype) {
          return gpu_arith_constant(ptr<const void>(lut), lut_rows, lut_len, to_dtype(table_dtype),
                                    to_dtype(compute_dtype));
        });
  m.def(
      "unpack_from_gpu",
      [](uintptr_t codes, uintptr_t scales_gpu, uintptr_t lut_gpu, int64_t N, int64_t K, int64_t group_size,
         int gpu_bits, int64_t lut_rows, int64_t lut_len, int storage_bits, uintptr_t packed_out,
         uintptr_t scales_out, uintptr_t lut_out) {
        unpack_from_gpu(ptr<const uint8_t>(codes), ptr<const uint16_t>(scales_gpu),
                        ptr<const uint8_t>(lut_gpu), N, K, group_size, gpu_bits, lut_rows, lut_len,
                        storage_bits, ptr<uint8_t>(packed_out), ptr<uint16_t>(scales_out),
                        ptr<uint16_t>(lut_out));
      },
      gil());
  m.def(
      "emulate_gpu_gemm",
      [](uintptr_t x, int dtype, int64_t M, int64_t K, int64_t N, int64_t group_size, uintptr_t codes,
         uintptr_t scales, uintptr_t lut, int dequant, uint32_t arith_neg2, int num_sms, int blocks_per_sm,
         int64_t force_splits, int split_waves, int stage_chunks, int bits, uintptr_t y) {
        EmulateGpuArgs a;
        a.x = ptr<const uint16_t>(x);
        a.dtype = to_dtype(dtype);
        a.M = M;
        a.K = K;
        a.N = N;
        a.group_size = group_size;
        a.codes = ptr<const uint8_t>(codes);
        a.scales = ptr<const uint16_t>(scales);
        a.lut = ptr<const uint8_t>(lut);
        a.dequant = dequant;
        a.arith_neg2 = arith_neg2;
        a.num_sms = num_sms;
        a.blocks_per_sm = blocks_per_sm;
        a.force_splits = force_splits;
        a.split_waves = split_waves;
        a.stage_chunks = stage_chunks;
        a.bits = bits;
        a.y = ptr<uint16_t>(y);
        emulate_gpu_gemm(a);
      },
      gil());
  m.def(
      "emulate_gpu_dequant",
      [](int dtype, int64_t K, int64_t N, int64_t group_size, uintptr_t codes, uintptr_t scales,
         uintptr_t lut, int dequant, uint32_t arith_neg2, int bits, uintptr_t w_out) {
        EmulateGpuArgs a;
        a.dtype = to_dtype(dtype);
        a.K = K;
        a.N = N;
        a.group_size = group_size;
        a.codes = ptr<const uint8_t>(codes);
        a.scales = ptr<const uint16_t>(scales);
        a.lut = ptr<const uint8_t>(lut);
        a.dequant = dequant;
        a.arith_neg2 = arith_neg2;
        a.bits = bits;
        emulate_gpu_dequant(a, ptr<uint16_t>(w_out));
      },
      gil());
  m.def("tc_scratch_bound", [](int num_sms, int blocks_per_sm) {
    return py::make_tuple(gpu::tc_workspace_floats_bound(num_sms, blocks_per_sm),
                          gpu::tc_counters_bound(num_sms, blocks_per_sm));
  });
  m.def("tc_plan", [](int64_t M, int64_t N, int64_t K, int num_sms, int blocks_per_sm, int64_t force_splits,
                      int split_waves, int bits) {
    if (split_waves < 1 || split_waves > gpu::kMaxSplitWaves)
      throw std::invalid_argument("split_waves must be 1 or 2");
    if (!gpu::valid_code_bits(bits)) throw std::invalid_argument("bits must be 2, 3 or 4");
    gpu::TcShape s = gpu::tc_shape(N, K, 16, bits);
    gpu::TcPlan p = gpu::make_tc_plan(M, s.n_tiles, s.k_chunks, num_sms, blocks_per_sm, force_splits,
                                      split_waves, gpu::chunks_per_unit(bits));
    py::dict d;
    d["mt"] = p.mt;
    d["m_tiles"] = p.m_tiles;
    d["grid_x"] = p.grid_x;
    d["splits"] = p.splits;
    d["chunks_per_split"] = p.chunks_per_split;
    d["workspace_floats"] = p.workspace_floats();
    d["counters"] = p.counters();
    return d;
  });
#ifdef ANY4_WITH_CUDA
  m.def("cuda_num_sms", &cuda::num_sms, py::arg("device"));
  m.def(
      "cuda_gemm_tc_scratch",
      [](int64_t M, int64_t N, int64_t K, int dtype, int dequant, int device, int64_t force_splits,
         int stage_chunks, int split_waves, int bits) {
        gpu::TcPlan p = cuda::gemm_tc_plan(M, N, K, dtype, dequant, device, force_splits, stage_chunks,
                                           split_waves, bits);
        return py::make_tuple(p.workspace_floats(), p.counters(), p.splits);
      },
      gil());
  m.def(
      "cuda_gemm_tc_scratch_bound",
      [](int device) {
        cuda::TcScratchBound b = cuda::gemm_tc_scratch_bound(device);
        return py::make_tuple(b.workspace_floats, b.counters);
      },
      gil());
  m.def(
      "cuda_gemm_tc_dequant",
      [](int dtype, int64_t N, int64_t K, int64_t group_size, uintptr_t codes, uintptr_t scales,
         uintptr_t lut, int dequant, uint32_t arith_neg2, int bits, uintptr_t w, int device,
         uintptr_t stream) {
        cuda::TcDequantArgs a;
        a.dtype = dtype;
        a.N = N;
        a.K = K;
        a.group_size = group_size;
        a.codes = ptr<const void>(codes);
        a.scales = ptr<const void>(scales);
        a.lut = ptr<const void>(lut);
        a.dequant = dequant;
        a.arith_neg2 = arith_neg2;
        a.bits = bits;
        a.w = ptr<void>(w);
        a.device = device;
        a.stream = stream;
        cuda::gemm_tc_dequant(a);
      },
      gil());
  m.def(
      "cuda_gemm_tc",
      [](uintptr_t x, int dtype, int64_t M, int64_t N, int64_t K, int64_t group_size, uintptr_t codes,
         uintptr_t scales, uintptr_t lut, int dequant, uint32_t arith_neg2, uintptr_t y, uintptr_t workspace,
         int64_t workspace_floats, uintptr_t counters, int64_t n_counters, int64_t force_splits,
         int stage_chunks, int split_waves, int bits, int device, uintptr_t stream) {
        cuda::TcGemmArgs a;
        a.x = ptr<const void>(x);
        a.dtype = dtype;
        a.M = M;
        a.N = N;
        a.K = K;
        a.group_size = group_size;
        a.codes = ptr<const void>(codes);
        a.scales = ptr<const void>(scales);
        a.lut = ptr<const void>(lut);
        a.dequant = dequant;
        a.arith_neg2 = arith_neg2;
        a.y = ptr<void>(y);
        a.workspace = ptr<float>(workspace);
        a.workspace_floats = workspace_floats;
        a.counters = ptr<int>(counters);
        a.n_counters = n_counters;
        a.force_splits = force_splits;
        a.stage_chunks = stage_chunks;
        a.split_waves = split_waves;
        a.bits = bits;
        a.device = device;
        a.stream = stream;
        cuda::gemm_tc(a);
      },
      gil());
  m.def(
      "cuda_gemm_simt",
      [](uintptr_t x, int x_dtype, int64_t M, int64_t K, uintptr_t packed, int64_t N, uintptr_t lut,
         int64_t lut_rows, int64_t lut_len, uintptr_t scales, int64_t n_groups, int64_t group_size,
         int table_dtype, uintptr_t y, int device, uintptr_t stream) {
        cuda::SimtGemmArgs a;
        a.x = ptr<const void>(x);
        a.x_dtype = x_dtype;
        a.M = M;
        a.K = K;
        a.N = N;
        a.packed = ptr<const uint8_t>(packed);
        a.lut = ptr<const void>(lut);
        a.lut_rows = lut_rows;
        a.lut_len = lut_len;
        a.scales = ptr<const void>(scales);
        a.n_groups = n_groups;
        a.group_size = group_size;
        a.table_dtype = table_dtype;
        a.y = ptr<void>(y);
        a.device = device;
        a.stream = stream;
        cuda::gemm_simt(a);
      },
      gil());
#endif
  // ---- end GPU layout / CUDA gemm ----

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
