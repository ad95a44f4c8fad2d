// Builds torch.save-style zip archives (stored entries only) and data.pkl pickles in tests, so
// hostile checkpoints are generated where they are used rather than kept as binary fixtures.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "io/zip.h"

namespace moetrace::testing {

inline void put_le(std::string* out, uint64_t v, int bytes) {
  for (int k = 0; k < bytes; ++k) out->push_back(static_cast<char>((v >> (8 * k)) & 0xff));
}

// A zip archive of stored entries (name, bytes), as torch.save writes it.
inline std::string stored_zip(const std::vector<std::pair<std::string, std::string>>& entries) {
  std::string out, cd;
  for (const auto& [name, data] : entries) {
    const uint32_t crc = crc32(data.data(), data.size());
    const uint64_t local = out.size();
    put_le(&out, 0x04034b50, 4);
    put_le(&out, 20, 2);  // version needed
    put_le(&out, 0, 2);   // flags
    put_le(&out, 0, 2);   // method: stored
    put_le(&out, 0, 4);   // time, date
    put_le(&out, crc, 4);
    put_le(&out, data.size(), 4);
    put_le(&out, data.size(), 4);
    put_le(&out, name.size(), 2);
    put_le(&out, 0, 2);  // extra
    out += name;
    out += data;
    put_le(&cd, 0x02014b50, 4);
    put_le(&cd, 20, 2);  // version made by
    put_le(&cd, 20, 2);
    put_le(&cd, 0, 2);
    put_le(&cd, 0, 2);
    put_le(&cd, 0, 4);
    put_le(&cd, crc, 4);
    put_le(&cd, data.size(), 4);
    put_le(&cd, data.size(), 4);
    put_le(&cd, name.size(), 2);
    put_le(&cd, 0, 2);  // extra
    put_le(&cd, 0, 2);  // comment
    put_le(&cd, 0, 2);  // disk
    put_le(&cd, 0, 2);  // internal attributes
    put_le(&cd, 0, 4);  // external attributes
    put_le(&cd, local, 4);
    cd += name;
  }
  const uint64_t cd_offset = out.size();
  out += cd;
  put_le(&out, 0x06054b50, 4);
  put_le(&out, 0, 2);
  put_le(&out, 0, 2);
  put_le(&out, entries.size(), 2);
  put_le(&out, entries.size(), 2);
  put_le(&out, cd.size(), 4);
  put_le(&out, cd_offset, 4);
  put_le(&out, 0, 2);
  return out;
}

// Pickle snippets (protocol 2 opcodes).
struct PickleBuilder {
  std::string p = "\x80\x02";
  PickleBuilder& op(char c) {
    p.push_back(c);
    return *this;
  }
  PickleBuilder& str(const std::string& s) {  // BINUNICODE
    p.push_back('X');
    put_le(&p, s.size(), 4);
    p += s;
    return *this;
  }
  PickleBuilder& integer(uint32_t v) {  // BININT
    p.push_back('J');
    put_le(&p, v, 4);
    return *this;
  }
  PickleBuilder& put(uint32_t memo) {  // LONG_BINPUT
    p.push_back('r');
    put_le(&p, memo, 4);
    return *this;
  }
  PickleBuilder& get(uint32_t memo) {  // LONG_BINGET
    p.push_back('j');
    put_le(&p, memo, 4);
    return *this;
  }
  PickleBuilder& global(const std::string& module, const std::string& name) {
    p.push_back('c');  // appended piece by piece: GCC 12 warns (-Wrestrict) on "c" + module
    p.append(module).append("\n").append(name).append("\n");
    return *this;
  }
  // A float tensor of `size` and `stride` (1 or 2 dims) on storage `key` of `numel` elements:
  // _rebuild_tensor_v2(storage, 0, size, stride, False, OrderedDict()).
  PickleBuilder& tensor(const std::string& key, uint32_t numel, std::vector<uint32_t> size,
                        std::vector<uint32_t> stride) {
    global("torch._utils", "_rebuild_tensor_v2");
    op('(');  // args tuple
    op('(').str("storage").global("torch", "FloatStorage").str(key).str("cpu").integer(numel);
    op('t').op('Q');  // persistent id -> storage
    integer(0);
    op('(');
    for (uint32_t s : size) integer(s);
    op('t');
    op('(');
    for (uint32_t s : stride) integer(s);
    op('t');
    op('\x89');  // False
    global("collections", "OrderedDict").op(')').op('R');
    op('t').op('R');
    return *this;
  }
  std::string stop() const { return p + "."; }
};

// A torch.save archive of data.pkl plus storages ("archive/data/<key>", bytes).
inline std::string torch_zip(const std::string& pickle,
                             const std::vector<std::pair<std::string, std::string>>& storages) {
  std::vector<std::pair<std::string, std::string>> entries = {{"archive/data.pkl", pickle}};
  for (const auto& [key, bytes] : storages) entries.push_back({"archive/data/" + key, bytes});
  entries.push_back({"archive/byteorder", "little"});
  entries.push_back({"archive/version", "3\n"});
  return stored_zip(entries);
}

}  // namespace moetrace::testing
