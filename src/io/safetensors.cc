#include "io/safetensors.h"

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <nlohmann/json.hpp>
#include <optional>

#include "core/error.h"
#include "core/sha256.h"

namespace moetrace {

using json = nlohmann::json;

std::vector<std::pair<std::string, std::pair<TensorView, std::pair<size_t, size_t>>>>
SafetensorsFile::parse_header(std::string_view header, size_t data_size, const std::string& what,
                              std::map<std::string, std::string>* metadata) {
  json j;
  try {
    j = json::parse(header.begin(), header.end());
  } catch (const json::exception& e) {
    fail(what, ": header is not valid JSON (", e.what(), ")");
  }
  if (!j.is_object()) fail(what, ": header must be a JSON object");
  std::vector<std::pair<std::string, std::pair<TensorView, std::pair<size_t, size_t>>>> out;
  for (auto it = j.begin(); it != j.end(); ++it) {
    const std::string& name = it.key();
    const json& e = it.value();
    if (name == "__metadata__") {
      if (!e.is_object()) fail(what, ": __metadata__ must be an object of strings");
      for (auto m = e.begin(); m != e.end(); ++m) {
        if (!m.value().is_string())
          fail(what, ": __metadata__ value '", m.key(), "' is not a string");
        if (metadata != nullptr) (*metadata)[m.key()] = m.value().get<std::string>();
      }
      continue;
    }
    if (!e.is_object() || !e.contains("dtype") || !e.contains("shape") ||
        !e.contains("data_offsets")) {
      fail(what, ": tensor '", name, "': expected an object with dtype, shape and data_offsets");
    }
    TensorView v;
    if (!e["dtype"].is_string() || !parse_dtype(e["dtype"].get<std::string>(), &v.dtype)) {
      fail(what, ": tensor '", name, "': unknown dtype ", e["dtype"].dump(),
           " (expected F32, F16, BF16, F64, I64, I32, I16, I8, U8 or BOOL)");
    }
    const json& shape = e["shape"];
    if (!shape.is_array()) fail(what, ": tensor '", name, "': shape must be an array");
    uint64_t numel = 1;
    for (const json& d : shape) {
      if (!d.is_number_unsigned()) fail(what, ": tensor '", name, "': shape entries must be >= 0");
      const uint64_t dim = d.get<uint64_t>();
      // numel <= 2^59 keeps numel * 8 bytes (F64) from wrapping.
      if (dim > (uint64_t{1} << 40) || (dim != 0 && numel > (uint64_t{1} << 59) / dim)) {
        fail(what, ": tensor '", name, "': shape ", shape.dump(), " is too large");
      }
      numel *= dim;
      v.shape.push_back(static_cast<int64_t>(dim));
    }
    const json& off = e["data_offsets"];
    if (!off.is_array() || off.size() != 2 || !off[0].is_number_unsigned() ||
        !off[1].is_number_unsigned()) {
      fail(what, ": tensor '", name, "': data_offsets must be [begin, end]");
    }
    const uint64_t begin = off[0].get<uint64_t>();
    const uint64_t end = off[1].get<uint64_t>();
    if (begin > end || end > data_size) {
      fail(what, ": tensor '", name, "': data_offsets [", begin, ", ", end,
           "] pass the end of the data region (", data_size, " bytes; file truncated?)");
    }
    if (end - begin != numel * dtype_size(v.dtype)) {
      fail(what, ": tensor '", name, "': shape ", shape.dump(), " of ", dtype_name(v.dtype),
           " needs ", numel * dtype_size(v.dtype), " bytes but data_offsets span ", end - begin);
    }
    out.push_back({name, {v, {static_cast<size_t>(begin), static_cast<size_t>(end)}}});
  }
  // Regions must not overlap (empty tensors may sit anywhere).
  std::vector<std::pair<std::pair<size_t, size_t>, const std::string*>> spans;
  for (const auto& t : out) {
    if (t.second.second.second > t.second.second.first)
      spans.push_back({t.second.second, &t.first});
  }
  std::sort(spans.begin(), spans.end());
  for (size_t i = 1; i < spans.size(); ++i) {
    if (spans[i].first.first < spans[i - 1].first.second) {
      fail(what, ": tensors '", *spans[i - 1].second, "' and '", *spans[i].second,
           "' have overlapping data_offsets");
    }
  }
  return out;
}

SafetensorsFile SafetensorsFile::open(const std::filesystem::path& path) {
  SafetensorsFile f;
  f.file_ = MappedFile::open(path);
  const std::string what = path.string();
  const size_t size = f.file_->size();
  if (size < 8)
    fail(what, ": truncated safetensors file (", size, " bytes, expected an 8-byte header length)");
  uint64_t header_len = 0;
  std::memcpy(&header_len, f.file_->data(), 8);  // little-endian hosts only
  if (header_len > size - 8) {
    fail(what, ": header length ", header_len, " passes the end of the file (", size,
         " bytes; truncated?)");
  }
  const std::string_view header(reinterpret_cast<const char*>(f.file_->data()) + 8, header_len);
  const size_t data_begin = 8 + header_len;
  auto entries = parse_header(header, size - data_begin, what, &f.metadata_);
  for (auto& [name, rest] : entries) {
    TensorView v = rest.first;
    v.data = f.file_->data() + data_begin + rest.second.first;
    f.by_name_[name] = f.tensors_.size();
    f.tensors_.push_back({name, v});
  }
  return f;
}

const NamedView* SafetensorsFile::find(const std::string& name) const {
  auto it = by_name_.find(name);
  return it == by_name_.end() ? nullptr : &tensors_[it->second];
}

void write_safetensors(const std::filesystem::path& path, const std::vector<NamedView>& tensors,
                       const std::map<std::string, std::string>& metadata, std::string* sha256) {
  json header = json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  std::vector<const NamedView*> order;
  for (const auto& t : tensors) order.push_back(&t);
  // Data region: widest element type first, so every tensor starts aligned to its element size
  // (the header is padded to a multiple of 8), then by name.
  std::sort(order.begin(), order.end(), [](const NamedView* a, const NamedView* b) {
    const size_t sa = dtype_size(a->view.dtype), sb = dtype_size(b->view.dtype);
    return sa != sb ? sa > sb : a->name < b->name;
  });
  size_t offset = 0;
  for (const NamedView* t : order) {
    const size_t n = t->view.nbytes();
    header[t->name] = {{"dtype", std::string(dtype_name(t->view.dtype))},
                       {"shape", t->view.shape},
                       {"data_offsets", {offset, offset + n}}};
    offset += n;
  }
  std::string text = header.dump();
  while ((8 + text.size()) % 8 != 0) text.push_back(' ');  // keep the data region 8-aligned
  FILE* fp = std::fopen(path.c_str(), "wb");
  if (fp == nullptr) fail(path.string(), ": cannot create: ", std::strerror(errno));
  const uint64_t len = text.size();
  std::optional<Sha256> hash;
  if (sha256 != nullptr) hash.emplace();
  // Hashes each piece right before writing it, in cache-sized chunks (one pass over the data).
  auto put = [&](const void* data, size_t n) {
    constexpr size_t kChunk = size_t{1} << 20;
    const auto* p = static_cast<const uint8_t*>(data);
    for (size_t i = 0; i < n; i += kChunk) {
      const size_t m = std::min(kChunk, n - i);
      if (hash) hash->update(p + i, m);
      if (std::fwrite(p + i, 1, m, fp) != m) return false;
    }
    return true;
  };
  bool ok = put(&len, 8) && put(text.data(), text.size());
  for (const NamedView* t : order) {
    if (ok) ok = put(t->view.data, t->view.nbytes());
  }
  ok = (std::fflush(fp) == 0) && ok;
  const int err = errno;
  ok = (std::fclose(fp) == 0) && ok;
  if (!ok) fail(path.string(), ": write failed: ", std::strerror(err));
  if (sha256 != nullptr) *sha256 = hash->hex_digest();
}

}  // namespace moetrace
