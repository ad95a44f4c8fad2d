#include "core/tensor.h"

#include <cstdlib>
#include <cstring>
#include <sstream>

#include "core/error.h"

namespace moetrace {

int64_t shape_numel(const Shape& shape) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

std::string shape_str(const Shape& shape) {
  std::ostringstream os;
  os << "[";
  for (size_t i = 0; i < shape.size(); ++i) os << (i ? ", " : "") << shape[i];
  os << "]";
  return os.str();
}

void Tensor::Free::operator()(void* p) const { std::free(p); }

Tensor::Tensor(DType dtype, Shape shape) : dtype_(dtype), shape_(std::move(shape)) {
  for (int64_t d : shape_) MT_ASSERT(d >= 0);
  const size_t bytes = nbytes();
  const size_t padded = (bytes + 63) / 64 * 64 + 64;
  void* p = std::aligned_alloc(64, padded);
  if (p == nullptr)
    fail("out of memory allocating a tensor of ", padded, " bytes ", shape_str(shape_));
  std::memset(p, 0, padded);
  data_.reset(p);
}

Tensor Tensor::from_view(const TensorView& v) {
  Tensor t(v.dtype, v.shape);
  if (v.nbytes() > 0) std::memcpy(t.raw(), v.data, v.nbytes());
  return t;
}

void Tensor::reshape(Shape shape) {
  MT_ASSERT(shape_numel(shape) == numel());
  shape_ = std::move(shape);
}

}  // namespace moetrace
