// libFuzzer: arbitrary bytes through the restricted unpickler (torch.save's data.pkl). Any outcome
// but a value tree or a moetrace::Error is a bug; so is a tensor whose size and stride ranks
// differ.
#include <cstddef>
#include <cstdint>
#include <string>

#include "core/error.h"
#include "io/pickle.h"

namespace {

// Walks what a checkpoint reader walks, bounded (values may form cycles).
void walk(const moetrace::PickleValue* v, int depth) {
  if (depth > 8) return;
  if (v->kind == moetrace::PickleValue::Kind::kTensor) {
    if (v->storage == nullptr || v->storage->kind != moetrace::PickleValue::Kind::kStorage)
      __builtin_trap();
    if (v->size.size() != v->stride.size()) __builtin_trap();
  }
  for (const moetrace::PickleValue* c : v->items) walk(c, depth + 1);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  try {
    const moetrace::Pickle p = moetrace::Pickle::parse(
        std::string_view(reinterpret_cast<const char*>(data), size), "fuzz");
    walk(p.root(), 0);
  } catch (const moetrace::Error&) {
  }
  return 0;
}
