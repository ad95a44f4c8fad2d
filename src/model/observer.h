// The engine's observation hook, the one mechanism of both engines. At each point of interest the
// model asks wants(key) first and only then materialises and offers the tensor, so observation
// costs nothing for keys nobody asked for. The keys and their shapes are core/keys.h's.
//
// An observer is also the request of the collection pipeline (Engine::submit): there, wants(key)
// picks the tensors a batch hands back and preferred_dtype(key) the dtype they cross the bus in.
#pragma once

#include <optional>
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
  // The dtype the observer would like `key` in. Only the GPU pipeline honours it (it converts on
  // the device, so that half the bytes cross the bus: router_logits in F16 or F32, hidden in F32,
  // BF16 or F16); every other path offers the engine's own dtype (F32, I32, U8) and the observer
  // converts. nullopt: the engine's own.
  virtual std::optional<DType> preferred_dtype(std::string_view key) const { return std::nullopt; }
};

}  // namespace moetrace
