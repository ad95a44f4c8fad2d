// An Observer that copies the tensors it is offered, for tests and `moetrace forward`. Keys offered
// several times (one per generation step) accumulate in order.
#pragma once

#include <functional>
#include <map>
#include <string>
#include <vector>

#include "model/observer.h"

namespace moetrace {

class RecordingObserver : public Observer {
 public:
  // filter(key) says which keys to keep; the default keeps all.
  explicit RecordingObserver(std::function<bool(std::string_view)> filter = nullptr)
      : filter_(std::move(filter)) {}

  bool wants(std::string_view key) const override { return !filter_ || filter_(key); }
  void observe(std::string_view key, const TensorView& t) override {
    records_[std::string(key)].push_back(Tensor::from_view(t));
  }
  bool has(const std::string& key) const { return records_.count(key) > 0; }
  const std::vector<Tensor>& all(const std::string& key) const { return records_.at(key); }
  const Tensor& last(const std::string& key) const { return records_.at(key).back(); }
  void clear() { records_.clear(); }

 private:
  std::function<bool(std::string_view)> filter_;
  std::map<std::string, std::vector<Tensor>> records_;
};

}  // namespace moetrace
