// The engine's observation hook. At each point of interest the model asks wants(key) first and only
// then materialises and offers the tensor, so observation costs nothing for keys nobody asked for.
//
// Keys (i = block index, the same names as the trace store's tensors):
//   enc.{i}.input          [B,S,d]  f32  input of encoder block i
//   enc.{i}.hidden         [B,S,d]  f32  router input (RMS-normed) of sparse block i
//   enc.{i}.router_logits  [B,S,E]  f32
//   enc.{i}.expert         [B,S]    I32  top-1 choice (ties -> lowest index), also when dropped
//   enc.{i}.dropped        [B,S]    U8   1 = over expert capacity, expert skipped
//   enc.{i}.gate           [B,S]    f32  top-1 probability
//   enc.output             [B,S,d]  f32  after the final RMS norm
//   dec.{i}.*              the same for decoder blocks: [B,T,...] in a teacher-forced pass,
//                          [B,1,...] per generation step
#pragma once

#include <string>
#include <string_view>

#include "core/tensor.h"

namespace moetrace {

class Observer {
 public:
  virtual ~Observer() = default;
  virtual bool wants(std::string_view key) const = 0;
  // The view is valid only during the call.
  virtual void observe(std::string_view key, const TensorView& tensor) = 0;
};

}  // namespace moetrace
