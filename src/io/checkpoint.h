// A checkpoint as a set of named, dense, read-only tensors, whatever the files behind it:
// model.safetensors, model.safetensors.index.json (+ shards), pytorch_model.bin (torch.save zip),
// pytorch_model.bin.index.json (+ shards). Tensors point into memory-mapped files where the stored
// layout is dense; otherwise the source owns a dense copy.
#pragma once

#include <filesystem>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "core/tensor.h"

namespace moetrace {

struct CheckpointTensor {
  std::string name;
  TensorView view;             // dense row-major; data valid while the source lives
  std::filesystem::path file;  // the file it came from (for error messages)
};

class TensorSource {
 public:
  virtual ~TensorSource() = default;
  virtual std::vector<std::string> names() const = 0;
  // nullptr when absent.
  virtual const CheckpointTensor* find(const std::string& name) const = 0;
  // The files read (for manifests and `inspect`).
  virtual std::vector<std::filesystem::path> files() const = 0;
  // "safetensors", "safetensors (sharded)", "pytorch", "pytorch (sharded)"
  virtual std::string format() const = 0;
};

// A source whose tensors live in a name-ordered map: names() and find() for every concrete source.
class MapTensorSource : public TensorSource {
 public:
  std::vector<std::string> names() const override;
  const CheckpointTensor* find(const std::string& name) const override;

 protected:
  std::map<std::string, CheckpointTensor> by_name_;
};

// Opens the checkpoint in a model directory (preferring safetensors over .bin) or a single file.
// Throws Error naming the directory when no checkpoint file is found.
std::unique_ptr<TensorSource> open_checkpoint(const std::filesystem::path& dir_or_file);

// Individual formats (used by open_checkpoint and tests).
std::unique_ptr<TensorSource> open_safetensors(const std::filesystem::path& file);
std::unique_ptr<TensorSource> open_safetensors_index(const std::filesystem::path& index_json);
std::unique_ptr<TensorSource> open_torch_checkpoint(const std::filesystem::path& file);
std::unique_ptr<TensorSource> open_torch_index(const std::filesystem::path& index_json);

}  // namespace moetrace
