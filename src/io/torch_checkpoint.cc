// torch.save checkpoints (the zip format of torch >= 1.6): `<prefix>/data.pkl` (the pickled state
// dict), `<prefix>/data/<key>` (one stored entry per storage), `<prefix>/byteorder`,
// `<prefix>/version`. Tensors that are dense views of their storage point into the mapped file;
// strided ones are copied.
#include <cstdint>
#include <cstring>
#include <map>
#include <unordered_set>

#include "core/error.h"
#include "core/log.h"
#include "core/mapped_file.h"
#include "io/checkpoint.h"
#include "io/pickle.h"
#include "io/zip.h"

namespace moetrace {

namespace fs = std::filesystem;

namespace {

constexpr int kMaxNesting = 16;
// A dotted tensor name ("model.encoder.block.0...") longer than this is not a real one; the cap
// also bounds the work of building names when a pickle repeats one long key many times.
constexpr size_t kMaxNameBytes = 4096;
// Strided tensors are copied densely. Copies of distinct storages add up to at most the file size;
// more only comes from overlapping or stride-0 (expanded) views, or many views of one storage.
// All copies of one checkpoint together may exceed the file size by at most this much.
constexpr uint64_t kMaxExpandBytes = uint64_t{1} << 28;

class TorchSource : public MapTensorSource {
 public:
  explicit TorchSource(const fs::path& path) : path_(path), file_(MappedFile::open(path)) {
    const std::string what = path.string();
    const auto* bytes = reinterpret_cast<const uint8_t*>(file_->data());
    if (file_->size() >= 2 && bytes[0] == 0x80 && bytes[1] <= 5) {
      fail(what,
           ": legacy (torch < 1.6, non-zip) torch.save format is not supported; re-save it with a "
           "recent torch or convert it to safetensors");
    }
    zip_ = ZipArchive::read(file_->data(), file_->size(), what);

    // The archive's records all sit under one folder, named after the file when it was written.
    const ZipEntry* pkl = nullptr;
    for (const ZipEntry& e : zip_.entries()) {
      const size_t slash = e.name.find('/');
      if (slash != std::string::npos &&
          e.name.compare(slash, std::string::npos, "/data.pkl") == 0) {
        if (pkl != nullptr)
          fail(what, ": more than one data.pkl ('", pkl->name, "', '", e.name, "')");
        pkl = &e;
      }
    }
    if (pkl == nullptr) fail(what, ": no <name>/data.pkl entry; not a torch.save checkpoint");
    prefix_ = pkl->name.substr(0, pkl->name.size() - std::string("data.pkl").size());

    if (const ZipEntry* e = zip_.find(prefix_ + "byteorder")) {
      const std::string_view order = small_record(*e);
      if (order != "little") {
        fail(what, ": byteorder is '", order, "'; only little-endian checkpoints are supported");
      }
    }
    if (const ZipEntry* e = zip_.find(prefix_ + "version")) check_version(*e);

    const std::string_view pickle_bytes = small_record(*pkl);
    const Pickle pickle = Pickle::parse(pickle_bytes, what + ": " + pkl->name);
    const PickleValue* root = pickle.root();
    if (root->kind != PickleValue::Kind::kDict) {
      fail(what, ": data.pkl holds a ", root->kind_name(),
           ", expected a dict of tensors (a state dict)");
    }
    std::map<std::string, const PickleValue*> tensors;
    std::unordered_set<const PickleValue*> visited;
    collect(root, "", 0, &visited, &tensors);
    for (const auto& [name, t] : tensors) add_tensor(name, *t);
  }

  std::vector<fs::path> files() const override { return {path_}; }
  std::string format() const override { return "pytorch"; }

 private:
  // A small metadata record, CRC-checked (storages are not: that would read gigabytes up front).
  std::string_view small_record(const ZipEntry& e) const {
    const std::string_view s = zip_.stored(e);
    if (crc32(s.data(), s.size()) != e.crc32) {
      fail(path_.string(), ": entry '", e.name, "' fails its CRC-32 check (corrupt file)");
    }
    return s;
  }

  void check_version(const ZipEntry& e) const {
    std::string_view v = small_record(e);
    while (!v.empty() && (v.back() == '\n' || v.back() == '\r' || v.back() == ' '))
      v.remove_suffix(1);
    int64_t n = 0;
    if (v.empty() || v.size() > 6) n = -1;
    for (char c : v) n = (c >= '0' && c <= '9' && n >= 0) ? n * 10 + (c - '0') : -1;
    if (n <= 0) fail(path_.string(), ": entry '", e.name, "' is not a format version number");
    // torch writes 3 today; later versions have kept the tensor layout, so only note them.
    if (n > 10)
      log_warn(path_.string(), ": torch.save format version ", n, " is newer than tested");
  }

  // Flattens nested dicts ({"model": {...}} -> "model.x") and keeps the tensors; other values
  // (ints, strings, ...) and non-string keys are not tensors and are skipped. Each dict is visited
  // once: a dict the pickle shares between several keys (or nests in itself) is refused, since
  // walking every path to it can take exponential time (16 levels of 16 keys sharing the level
  // below: 16^16 paths in a 4 KB file). The work is thus bounded by the pickle's values.
  void collect(const PickleValue* dict, const std::string& prefix, int depth,
               std::unordered_set<const PickleValue*>* visited,
               std::map<std::string, const PickleValue*>* out) const {
    if (depth > kMaxNesting)
      fail(path_.string(), ": data.pkl nests dicts deeper than ", kMaxNesting);
    if (!visited->insert(dict).second) {
      fail(path_.string(), ": data.pkl reaches the same dict again at '", prefix,
           "' (shared or cyclic dicts are not a state dict)");
    }
    for (size_t i = 0; i + 1 < dict->items.size(); i += 2) {
      const PickleValue* key = dict->items[i];
      const PickleValue* value = dict->items[i + 1];
      if (key->kind != PickleValue::Kind::kString) continue;
      if (prefix.size() + key->s.size() > kMaxNameBytes) {
        fail(path_.string(), ": data.pkl has a key of ", key->s.size(), " bytes under '",
             prefix.substr(0, 64), "' (tensor names are at most ", kMaxNameBytes, " bytes)");
      }
      const std::string name = prefix + key->s;
      if (value->kind == PickleValue::Kind::kTensor) {
        (*out)[name] = value;  // a repeated key keeps the last value, as Python does
      } else if (value->kind == PickleValue::Kind::kDict) {
        collect(value, name + ".", depth + 1, visited, out);
      } else {
        log_debug(path_.string(), ": skipping '", name, "' (a ", value->kind_name(),
                  ", not a tensor)");
      }
    }
  }

  void add_tensor(const std::string& name, const PickleValue& t) {
    const std::string what = path_.string();
    const PickleValue& storage = *t.storage;
    const std::string entry_name = prefix_ + "data/" + storage.s;
    const ZipEntry* entry = zip_.find(entry_name);
    if (entry == nullptr) {
      fail(what, ": tensor '", name, "': storage entry '", entry_name,
           "' is missing from the archive");
    }
    if (entry->method != 0 || (entry->flags & 1)) {
      fail(what, ": tensor '", name, "': storage entry '", entry_name, "' is ",
           (entry->flags & 1) ? "encrypted" : "compressed",
           "; torch.save stores storages uncompressed and moetrace maps them as they are");
    }
    const std::string_view bytes = zip_.stored(*entry);
    const uint64_t es = dtype_size(t.dtype);
    uint64_t storage_bytes = 0;
    if (__builtin_mul_overflow(static_cast<uint64_t>(storage.numel), es, &storage_bytes) ||
        storage_bytes > bytes.size()) {
      fail(what, ": tensor '", name, "': storage '", storage.s, "' declares ", storage.numel, " ",
           dtype_name(t.dtype), " elements but its entry holds ", bytes.size(), " bytes");
    }

    // Extent: the last element addressed is offset + sum((size_i - 1) * stride_i).
    uint64_t numel = 1;
    uint64_t last = static_cast<uint64_t>(t.i);
    bool overflow = false;
    for (size_t d = 0; d < t.size.size(); ++d) {
      const uint64_t n = static_cast<uint64_t>(t.size[d]);
      uint64_t step = 0;
      overflow |= __builtin_mul_overflow(numel, n, &numel);
      if (n > 0) {
        overflow |= __builtin_mul_overflow(n - 1, static_cast<uint64_t>(t.stride[d]), &step);
        overflow |= __builtin_add_overflow(last, step, &last);
      }
    }
    uint64_t copy_bytes = 0;
    overflow |= __builtin_mul_overflow(numel, es, &copy_bytes);
    if (overflow || (numel > 0 && last >= static_cast<uint64_t>(storage.numel))) {
      fail(what, ": tensor '", name, "': shape ", shape_str(t.size), " with storage offset ", t.i,
           " and strides ", shape_str(t.stride), " reaches past its storage '", storage.s, "' of ",
           storage.numel, " elements");
    }

    CheckpointTensor ct{name, TensorView{t.dtype, t.size, nullptr}, path_};
    const std::byte* base = reinterpret_cast<const std::byte*>(bytes.data());
    if (numel == 0) {
      ct.view.data = base;
    } else if (is_dense(t) && reinterpret_cast<uintptr_t>(base + t.i * es) % es == 0) {
      ct.view.data = base + static_cast<uint64_t>(t.i) * es;
    } else {
      const uint64_t budget = file_->size() + kMaxExpandBytes;
      if (copy_bytes > budget - copied_bytes_) {
        fail(what, ": tensor '", name, "': strided view of shape ", shape_str(t.size),
             " would copy its ", storage_bytes, "-byte storage to ", copy_bytes,
             " bytes; the checkpoint's dense copies would exceed ", budget,
             " bytes (its size + 256 MiB)");
      }
      copied_bytes_ += copy_bytes;
      owned_.emplace_back(t.dtype, t.size);
      copy_strided(t, base, static_cast<std::byte*>(owned_.back().raw()));
      ct.view.data = owned_.back().raw();
    }
    by_name_[name] = std::move(ct);
  }

  // Row-major contiguous; dimensions of size 1 may have any stride.
  static bool is_dense(const PickleValue& t) {
    int64_t expected = 1;
    for (size_t d = t.size.size(); d-- > 0;) {
      if (t.size[d] != 1 && t.stride[d] != expected) return false;
      expected *= t.size[d];
    }
    return true;
  }

  static void copy_strided(const PickleValue& t, const std::byte* base, std::byte* dst) {
    const size_t es = dtype_size(t.dtype);
    const size_t rank = t.size.size();
    std::vector<int64_t> index(rank, 0);
    int64_t src = t.i;  // element index into the storage
    const int64_t numel = shape_numel(t.size);
    for (int64_t n = 0; n < numel; ++n) {
      std::memcpy(dst + static_cast<size_t>(n) * es, base + static_cast<size_t>(src) * es, es);
      for (size_t d = rank; d-- > 0;) {  // odometer over the indices, last dimension fastest
        if (++index[d] < t.size[d]) {
          src += t.stride[d];
          break;
        }
        src -= (t.size[d] - 1) * t.stride[d];
        index[d] = 0;
      }
    }
  }

  fs::path path_;
  std::shared_ptr<MappedFile> file_;
  ZipArchive zip_;
  std::string prefix_;
  std::vector<Tensor> owned_;  // dense copies of strided tensors
  uint64_t copied_bytes_ = 0;  // their bytes, against one budget per checkpoint
};

}  // namespace

std::unique_ptr<TensorSource> open_torch_checkpoint(const fs::path& file) {
  return std::make_unique<TorchSource>(file);
}

}  // namespace moetrace
