// safetensors: an 8-byte little-endian header length, a JSON header
// {"name": {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]}, "__metadata__": {..}},
// then the data region. Reading maps the file and points into it; every offset is checked.
#pragma once

#include <filesystem>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "core/mapped_file.h"
#include "core/tensor.h"

namespace moetrace {

struct NamedView {
  std::string name;
  TensorView view;
};

class SafetensorsFile {
 public:
  // Maps and validates the file: header length and JSON, known dtypes, shape·dtype = offsets span,
  // offsets inside the data region and not overlapping. Throws Error naming the file and tensor.
  static SafetensorsFile open(const std::filesystem::path& path);
  // Parses a header held in memory (used by open() and the fuzzer). data_size is the data region
  // size.
  static std::vector<std::pair<std::string, std::pair<TensorView, std::pair<size_t, size_t>>>>
  parse_header(std::string_view header, size_t data_size, const std::string& what,
               std::map<std::string, std::string>* metadata);

  const std::filesystem::path& path() const { return file_->path(); }
  const std::vector<NamedView>& tensors() const { return tensors_; }
  const NamedView* find(const std::string& name) const;
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  const std::shared_ptr<MappedFile>& file() const { return file_; }

 private:
  std::shared_ptr<MappedFile> file_;
  std::vector<NamedView> tensors_;
  std::map<std::string, size_t> by_name_;
  std::map<std::string, std::string> metadata_;
};

// Writes a safetensors file at path (not atomic: callers that need atomicity write to a temporary
// name and rename). Tensors are stored widest dtype first, then by name; metadata goes into
// "__metadata__". With sha256 non-null, it receives the file's SHA-256 (lowercase hex), computed
// from the bytes as they are written (no second pass over the file).
void write_safetensors(const std::filesystem::path& path, const std::vector<NamedView>& tensors,
                       const std::map<std::string, std::string>& metadata = {},
                       std::string* sha256 = nullptr);

}  // namespace moetrace
