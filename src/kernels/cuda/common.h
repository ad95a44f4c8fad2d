// CUDA plumbing shared by the GPU kernels and the GPU engine: checked calls, device buffers,
// streams and events with RAII, and the activation dtype names. Every CUDA/cuBLAS call goes through
// a check.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>
#include <string_view>
#include <utility>

#include "core/dtype.h"

namespace moetrace::cuda {

// Throws moetrace::Error naming the call, file and line when err is not cudaSuccess.
void check_cuda(cudaError_t err, const char* call, const char* file, int line);
void check_cublas(int status, const char* call, const char* file, int line);

#define MT_CUDA_CHECK(call) ::moetrace::cuda::check_cuda((call), #call, __FILE__, __LINE__)
#define MT_CUBLAS_CHECK(call) \
  ::moetrace::cuda::check_cublas(static_cast<int>(call), #call, __FILE__, __LINE__)
// After every kernel launch: catches bad launch configurations at once.
#define MT_CUDA_CHECK_LAUNCH() MT_CUDA_CHECK(cudaGetLastError())

// True when a CUDA device is usable (driver present, at least one GPU). Never throws.
bool device_available();
// "NVIDIA H200 (sm_90, 132 SMs, 139.8 GiB)" for the current device.
std::string_view device_name();

// Bytes of one element of an activation dtype (kF32, kBF16, kF16).
size_t act_size(DType t);

// Owning device allocation (cudaMalloc). Movable, not copyable.
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  explicit DeviceBuffer(size_t bytes);
  ~DeviceBuffer();
  DeviceBuffer(DeviceBuffer&& o) noexcept
      : ptr_(std::exchange(o.ptr_, nullptr)), bytes_(std::exchange(o.bytes_, 0)) {}
  DeviceBuffer& operator=(DeviceBuffer&& o) noexcept;
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;

  // Grows (never shrinks) to at least `bytes`; contents are lost when it grows.
  void reserve(size_t bytes);
  void* get() const { return ptr_; }
  template <class T>
  T* as() const {
    return static_cast<T*>(ptr_);
  }
  size_t bytes() const { return bytes_; }

 private:
  void* ptr_ = nullptr;
  size_t bytes_ = 0;
};

// Owning page-locked host allocation (cudaHostAlloc), for asynchronous copies.
class PinnedBuffer {
 public:
  PinnedBuffer() = default;
  explicit PinnedBuffer(size_t bytes);
  ~PinnedBuffer();
  PinnedBuffer(PinnedBuffer&& o) noexcept
      : ptr_(std::exchange(o.ptr_, nullptr)), bytes_(std::exchange(o.bytes_, 0)) {}
  PinnedBuffer& operator=(PinnedBuffer&& o) noexcept;
  PinnedBuffer(const PinnedBuffer&) = delete;
  PinnedBuffer& operator=(const PinnedBuffer&) = delete;
  void reserve(size_t bytes);
  void* get() const { return ptr_; }
  template <class T>
  T* as() const {
    return static_cast<T*>(ptr_);
  }
  size_t bytes() const { return bytes_; }

 private:
  void* ptr_ = nullptr;
  size_t bytes_ = 0;
};

class Stream {
 public:
  Stream();  // non-blocking with respect to the legacy default stream
  ~Stream();
  Stream(const Stream&) = delete;
  Stream& operator=(const Stream&) = delete;
  cudaStream_t get() const { return s_; }
  void sync() const;

 private:
  cudaStream_t s_ = nullptr;
};

class Event {
 public:
  explicit Event(bool timing = false);
  ~Event();
  Event(const Event&) = delete;
  Event& operator=(const Event&) = delete;
  cudaEvent_t get() const { return e_; }
  void record(cudaStream_t s) const;
  bool done() const;  // cudaEventQuery
  void sync() const;

 private:
  cudaEvent_t e_ = nullptr;
};

// Copies n bytes host->device / device->host on `stream` and waits for them (simple paths, tests).
void upload(void* dst, const void* src, size_t n, cudaStream_t stream = nullptr);
void download(void* dst, const void* src, size_t n, cudaStream_t stream = nullptr);

}  // namespace moetrace::cuda
