#include "io/checkpoint.h"

#include <fstream>
#include <map>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "io/safetensors.h"

namespace moetrace {

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

class SafetensorsSource : public MapTensorSource {
 public:
  explicit SafetensorsSource(const fs::path& file) : file_(SafetensorsFile::open(file)) {
    for (const auto& t : file_.tensors()) {
      by_name_[t.name] = CheckpointTensor{t.name, t.view, file};
    }
  }
  std::vector<fs::path> files() const override { return {file_.path()}; }
  std::string format() const override { return "safetensors"; }

 private:
  SafetensorsFile file_;
};

// An index.json ({"weight_map": {tensor: shard file}}) over shards of one format. Every tensor the
// index names must be in its shard; tensors a shard holds beyond the index are ignored.
class ShardedSource : public TensorSource {
 public:
  ShardedSource(const fs::path& index, std::unique_ptr<TensorSource> (*open_shard)(const fs::path&),
                std::string format)
      : format_(std::move(format)) {
    std::ifstream in(index);
    if (!in) fail(index.string(), ": cannot open index");
    json j;
    try {
      j = json::parse(in);
    } catch (const json::exception& e) {
      fail(index.string(), ": not valid JSON (", e.what(), ")");
    }
    if (!j.is_object() || !j.contains("weight_map") || !j["weight_map"].is_object()) {
      fail(index.string(), ": expected an object with a \"weight_map\" object");
    }
    const fs::path dir = index.parent_path();
    for (auto it = j["weight_map"].begin(); it != j["weight_map"].end(); ++it) {
      if (!it.value().is_string())
        fail(index.string(), ": weight_map['", it.key(), "'] is not a file name");
      const std::string shard = it.value().get<std::string>();
      if (shard.find('/') != std::string::npos || shard == "..") {
        fail(index.string(), ": weight_map['", it.key(), "'] = '", shard, "' is not a file in ",
             dir.string());
      }
      if (!shards_.count(shard)) {
        const fs::path p = dir / shard;
        if (!fs::exists(p))
          fail(index.string(), ": shard '", shard, "' (for tensor '", it.key(), "') is missing");
        shards_[shard] = open_shard(p);
        order_.push_back(p);
      }
      const CheckpointTensor* t = shards_[shard]->find(it.key());
      if (t == nullptr)
        fail(dir / shard, ": tensor '", it.key(), "' named by ", index.filename().string(),
             " is missing");
      by_name_[it.key()] = t;
    }
  }
  std::vector<std::string> names() const override {
    std::vector<std::string> out;
    for (const auto& [n, t] : by_name_) out.push_back(n);
    return out;
  }
  const CheckpointTensor* find(const std::string& name) const override {
    auto it = by_name_.find(name);
    return it == by_name_.end() ? nullptr : it->second;
  }
  std::vector<fs::path> files() const override { return order_; }
  std::string format() const override { return format_; }

 private:
  std::string format_;
  std::map<std::string, std::unique_ptr<TensorSource>> shards_;
  std::map<std::string, const CheckpointTensor*> by_name_;
  std::vector<fs::path> order_;
};

}  // namespace

std::vector<std::string> MapTensorSource::names() const {
  std::vector<std::string> out;
  for (const auto& [n, t] : by_name_) out.push_back(n);
  return out;
}

const CheckpointTensor* MapTensorSource::find(const std::string& name) const {
  auto it = by_name_.find(name);
  return it == by_name_.end() ? nullptr : &it->second;
}

std::unique_ptr<TensorSource> open_safetensors(const fs::path& file) {
  return std::make_unique<SafetensorsSource>(file);
}

std::unique_ptr<TensorSource> open_safetensors_index(const fs::path& index_json) {
  return std::make_unique<ShardedSource>(index_json, &open_safetensors, "safetensors (sharded)");
}

std::unique_ptr<TensorSource> open_torch_index(const fs::path& index_json) {
  return std::make_unique<ShardedSource>(index_json, &open_torch_checkpoint, "pytorch (sharded)");
}

std::unique_ptr<TensorSource> open_checkpoint(const fs::path& dir_or_file) {
  if (fs::is_regular_file(dir_or_file)) {
    const std::string name = dir_or_file.filename().string();
    auto ends_with = [&](const std::string& s) {
      return name.size() >= s.size() && name.compare(name.size() - s.size(), s.size(), s) == 0;
    };
    if (ends_with(".safetensors.index.json")) return open_safetensors_index(dir_or_file);
    if (ends_with(".bin.index.json")) return open_torch_index(dir_or_file);
    if (ends_with(".safetensors")) return open_safetensors(dir_or_file);
    return open_torch_checkpoint(dir_or_file);
  }
  if (!fs::is_directory(dir_or_file))
    fail(dir_or_file.string(), ": no such model directory or checkpoint file");
  const std::pair<const char*, std::unique_ptr<TensorSource> (*)(const fs::path&)> kinds[] = {
      {"model.safetensors", &open_safetensors},
      {"model.safetensors.index.json", &open_safetensors_index},
      {"pytorch_model.bin", &open_torch_checkpoint},
      {"pytorch_model.bin.index.json", &open_torch_index},
  };
  for (const auto& [file, open] : kinds) {
    if (fs::exists(dir_or_file / file)) return open(dir_or_file / file);
  }
  fail(dir_or_file.string(),
       ": no checkpoint found (expected model.safetensors, model.safetensors.index.json, "
       "pytorch_model.bin or pytorch_model.bin.index.json)");
}

}  // namespace moetrace
