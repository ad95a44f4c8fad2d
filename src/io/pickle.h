// A restricted unpickler for the data.pkl of torch.save checkpoints. It interprets the pickle
// opcodes (protocols 2 to 5, binary forms only) into plain values and knows a fixed list of
// globals: the ones torch uses to rebuild tensors (torch._utils._rebuild_tensor_v2,
// _rebuild_tensor, _rebuild_parameter), the storage types (torch.FloatStorage, BFloat16Storage,
// ...) and collections.OrderedDict. Any other global (os.system, builtins.eval, ...) is rejected
// with an Error naming the file and the global when the pickle names it: nothing is ever imported,
// called or skipped.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "core/dtype.h"
#include "core/tensor.h"

namespace moetrace {

struct PickleValue {
  enum class Kind : uint8_t {
    kNone,
    kBool,
    kInt,
    kFloat,
    kString,  // str (UTF-8 bytes as written)
    kBytes,   // bytes
    kTuple,
    kList,
    kDict,     // dict and collections.OrderedDict, in insertion order
    kGlobal,   // one of the allowed globals, as "module.name"
    kStorage,  // a torch storage named by a persistent id
    kTensor,   // the result of torch._utils._rebuild_tensor[_v2]
  };
  Kind kind = Kind::kNone;
  int64_t i = 0;   // kBool (0/1), kInt; kTensor: storage offset in elements
  double f = 0.0;  // kFloat
  std::string
      s;  // kString, kBytes; kGlobal: "module.name"; kStorage: the storage key ("0", "1", ...)
  // kTuple, kList: the items. kDict: keys and values interleaved (k0, v0, k1, v1, ...).
  std::vector<const PickleValue*> items;

  // kStorage: element type, device string ("cpu", "cuda:0"), element count.
  // kTensor: element type of its storage.
  DType dtype = DType::kU8;
  std::string location;
  int64_t numel = 0;

  // kTensor
  const PickleValue* storage = nullptr;
  Shape size;
  std::vector<int64_t> stride;

  const char* kind_name() const;
};

// The values of one pickle; they live as long as this object (values may point to each other, even
// in cycles, so they are owned here rather than by each other).
class Pickle {
 public:
  // Interprets bytes up to STOP. `what` names the source in errors ("ckpt.bin: data.pkl").
  // Throws Error on malformed input, unsupported opcodes and globals outside the allowed list.
  static Pickle parse(std::string_view bytes, const std::string& what);

  const PickleValue* root() const { return root_; }
  size_t value_count() const { return values_.size(); }

 private:
  friend class Unpickler;
  std::vector<std::unique_ptr<PickleValue>> values_;
  const PickleValue* root_ = nullptr;
};

// The element type of a torch storage class name ("FloatStorage" -> kF32); false if not one.
bool torch_storage_dtype(std::string_view class_name, DType* out);

}  // namespace moetrace
