// How the GPU engines hand observed tensors to an Observer (model/observer.h): the observer decides
// what is wanted (wants(key)); the pass decides how it travels:
//  now:    downloaded and offered at once (prompt and encoder passes);
//  staged: copied on the stream into pinned memory and offered by flush(), after the step's one
//          synchronization (generation steps; the staging must be reserved for a step).
// CudaSwitchModel's Tap adds its pipeline slots on top; CudaLmModel uses it as it is.
#pragma once

#include <cuda_runtime_api.h>

#include <string>
#include <utility>
#include <vector>

#include "core/error.h"
#include "core/tensor.h"
#include "kernels/cuda/common.h"
#include "model/observer.h"

namespace moetrace {

inline size_t align256(size_t n) { return (n + 255) / 256 * 256; }

class ObservationTap {
 public:
  // staging == nullptr: now; else staged into it. `engine` names the engine in errors.
  ObservationTap(Observer* obs, cudaStream_t stream, cuda::PinnedBuffer* staging,
                 const char* engine)
      : obs_(obs), stream_(stream), staging_(staging), engine_(engine) {}

  bool wants(const std::string& k) const { return obs_ != nullptr && obs_->wants(k); }
  void put(const std::string& k, const void* dev, DType dt, Shape shape) {
    if (!wants(k)) return;
    const size_t bytes = static_cast<size_t>(shape_numel(shape)) * dtype_size(dt);
    if (staging_ == nullptr) {
      Tensor t(dt, std::move(shape));
      cuda::download(t.raw(), dev, bytes, stream_);
      obs_->observe(k, t.view());
      return;
    }
    const size_t off = used_;
    used_ = align256(used_ + bytes);
    if (used_ > staging_->bytes())
      fail(engine_, ": observation staging of ", staging_->bytes(), " bytes is too small for ", k);
    MT_CUDA_CHECK(cudaMemcpyAsync(staging_->as<uint8_t>() + off, dev, bytes, cudaMemcpyDeviceToHost,
                                  stream_));
    pending_.push_back(Pending{k, dt, std::move(shape), off});
  }
  // Staged: waits for the stream, then offers what was staged since the last flush.
  void flush() {
    MT_CUDA_CHECK(cudaStreamSynchronize(stream_));
    for (const Pending& p : pending_)
      obs_->observe(p.key, TensorView{p.dtype, p.shape, staging_->as<uint8_t>() + p.offset});
    pending_.clear();
    used_ = 0;
  }

 protected:
  cudaStream_t stream() const { return stream_; }

 private:
  struct Pending {
    std::string key;
    DType dtype;
    Shape shape;
    size_t offset;
  };
  Observer* obs_;
  cudaStream_t stream_;
  cuda::PinnedBuffer* staging_;
  const char* engine_;
  std::vector<Pending> pending_;
  size_t used_ = 0;
};

}  // namespace moetrace
