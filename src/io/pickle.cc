#include "io/pickle.h"

#include <cstring>
#include <unordered_map>

#include "core/error.h"

namespace moetrace {

const char* PickleValue::kind_name() const {
  switch (kind) {
    case Kind::kNone:
      return "None";
    case Kind::kBool:
      return "bool";
    case Kind::kInt:
      return "int";
    case Kind::kFloat:
      return "float";
    case Kind::kString:
      return "str";
    case Kind::kBytes:
      return "bytes";
    case Kind::kTuple:
      return "tuple";
    case Kind::kList:
      return "list";
    case Kind::kDict:
      return "dict";
    case Kind::kGlobal:
      return "global";
    case Kind::kStorage:
      return "storage";
    case Kind::kTensor:
      return "tensor";
  }
  return "?";
}

bool torch_storage_dtype(std::string_view class_name, DType* out) {
  static const std::pair<std::string_view, DType> kStorages[] = {
      {"FloatStorage", DType::kF32},     {"HalfStorage", DType::kF16},
      {"BFloat16Storage", DType::kBF16}, {"DoubleStorage", DType::kF64},
      {"LongStorage", DType::kI64},      {"IntStorage", DType::kI32},
      {"ShortStorage", DType::kI16},     {"CharStorage", DType::kI8},
      {"ByteStorage", DType::kU8},       {"BoolStorage", DType::kBool},
      {"UntypedStorage", DType::kU8},
  };
  for (const auto& [name, dtype] : kStorages) {
    if (name == class_name) {
      *out = dtype;
      return true;
    }
  }
  return false;
}

namespace {

// The globals a torch.save state dict may name. Everything else is refused.
constexpr std::string_view kOrderedDict = "collections.OrderedDict";
constexpr std::string_view kRebuildTensorV2 = "torch._utils._rebuild_tensor_v2";
constexpr std::string_view kRebuildTensor = "torch._utils._rebuild_tensor";
constexpr std::string_view kRebuildParameter = "torch._utils._rebuild_parameter";

bool is_allowed_global(std::string_view module, std::string_view name) {
  DType unused;
  if (module == "torch") return torch_storage_dtype(name, &unused);
  if (module == "torch._utils") {
    return name == "_rebuild_tensor_v2" || name == "_rebuild_tensor" ||
           name == "_rebuild_parameter";
  }
  return module == "collections" && name == "OrderedDict";
}

// Opcodes (pickletools names).
enum Op : uint8_t {
  kMark = '(',
  kStop = '.',
  kPop = '0',
  kPopMark = '1',
  kDup = '2',
  kBinFloat = 'G',
  kBinInt = 'J',
  kBinInt1 = 'K',
  kBinInt2 = 'M',
  kNone = 'N',
  kBinPersId = 'Q',
  kReduce = 'R',
  kBinUnicode = 'X',
  kBinBytes = 'B',
  kShortBinBytes = 'C',
  kAppend = 'a',
  kBuild = 'b',
  kGlobal = 'c',
  kDict = 'd',
  kEmptyDict = '}',
  kAppends = 'e',
  kBinGet = 'h',
  kLongBinGet = 'j',
  kList = 'l',
  kEmptyList = ']',
  kBinPut = 'q',
  kLongBinPut = 'r',
  kSetItem = 's',
  kTuple = 't',
  kEmptyTuple = ')',
  kSetItems = 'u',
  kProto = 0x80,
  kNewObj = 0x81,
  kTuple1 = 0x85,
  kTuple2 = 0x86,
  kTuple3 = 0x87,
  kNewTrue = 0x88,
  kNewFalse = 0x89,
  kLong1 = 0x8a,
  kLong4 = 0x8b,
  kShortBinUnicode = 0x8c,
  kBinUnicode8 = 0x8d,
  kBinBytes8 = 0x8e,
  kStackGlobal = 0x93,
  kMemoize = 0x94,
  kFrame = 0x95,
};

}  // namespace

// The values a pickle builds may take at most this much memory: a fixed allowance plus a multiple
// of its size (torch state dicts take 15 to 25 bytes of values per pickle byte). Without it a
// 20 MB pickle of EMPTY_DICT opcodes would build 20M values, about 4 GB.
constexpr uint64_t kValueBytesBase = uint64_t{64} << 20;
constexpr uint64_t kValueBytesPerPickleByte = 32;
// Estimated bytes of one value (the struct, its allocation and the owning pointer) and of one memo
// entry (a hash node).
constexpr uint64_t kValueCost = sizeof(PickleValue) + 32;
constexpr uint64_t kMemoEntryCost = 64;

class Unpickler {
 public:
  Unpickler(std::string_view bytes, const std::string& what, Pickle* out)
      : in_(bytes),
        what_(what),
        out_(out),
        budget_(kValueBytesBase + kValueBytesPerPickleByte * bytes.size()) {}

  void run() {
    while (true) {
      op_pos_ = pos_;
      const uint8_t op = u8();
      switch (op) {
        case kProto: {
          const uint8_t version = u8();
          if (version > 5) bad("pickle protocol ", int{version}, " (expected 2 to 5)");
          break;
        }
        case kFrame: {
          const uint64_t n = uint_le(8);
          if (n > in_.size() - pos_) bad("frame of ", n, " bytes passes the end of the pickle");
          break;  // frames only group opcodes; the bytes are read as they come
        }
        case kStop:
          if (stack_.size() != 1 || !marks_.empty()) {
            bad("STOP with ", stack_.size(), " values on the stack (expected 1)");
          }
          out_->root_ = stack_.back();
          return;
        case kMark:
          marks_.push_back(stack_.size());
          break;
        case kPop:  // as Python: the top value, or the MARK itself when nothing is above it
          if (stack_.size() > stack_floor()) {
            stack_.pop_back();
          } else if (!marks_.empty()) {
            marks_.pop_back();
          } else {
            bad("POP on an empty stack");
          }
          break;
        case kPopMark:
          pop_mark();
          break;
        case kDup:
          push(top());
          break;
        case kNone:  // None, True and False are never changed: one value each per pickle
          if (none_ == nullptr) none_ = make(PickleValue::Kind::kNone);
          push(none_);
          break;
        case kNewTrue:
        case kNewFalse: {
          PickleValue*& v = op == kNewTrue ? true_ : false_;
          if (v == nullptr) {
            v = make(PickleValue::Kind::kBool);
            v->i = op == kNewTrue ? 1 : 0;
          }
          push(v);
          break;
        }
        case kBinInt:
          push_int(static_cast<int32_t>(static_cast<uint32_t>(uint_le(4))));
          break;
        case kBinInt1: {  // sizes, strides, offsets: one shared value per number
          const uint64_t i = uint_le(1);
          if (small_ints_[i] == nullptr) {
            small_ints_[i] = make(PickleValue::Kind::kInt);
            small_ints_[i]->i = static_cast<int64_t>(i);
          }
          push(small_ints_[i]);
          break;
        }
        case kBinInt2:
          push_int(static_cast<int64_t>(uint_le(2)));
          break;
        case kLong1:
          push_int(read_long(uint_le(1)));
          break;
        case kLong4:
          push_int(read_long(uint_le(4)));
          break;
        case kBinFloat: {
          uint64_t bits = 0;
          for (int k = 0; k < 8; ++k) bits = (bits << 8) | u8();  // big-endian
          PickleValue* v = make(PickleValue::Kind::kFloat);
          std::memcpy(&v->f, &bits, 8);
          push(v);
          break;
        }
        case kShortBinUnicode:
          push_string(PickleValue::Kind::kString, uint_le(1));
          break;
        case kBinUnicode:
          push_string(PickleValue::Kind::kString, uint_le(4));
          break;
        case kBinUnicode8:
          push_string(PickleValue::Kind::kString, uint_le(8));
          break;
        case kShortBinBytes:
          push_string(PickleValue::Kind::kBytes, uint_le(1));
          break;
        case kBinBytes:
          push_string(PickleValue::Kind::kBytes, uint_le(4));
          break;
        case kBinBytes8:
          push_string(PickleValue::Kind::kBytes, uint_le(8));
          break;
        case kEmptyDict:
          push(make(PickleValue::Kind::kDict));
          break;
        case kEmptyList:
          push(make(PickleValue::Kind::kList));
          break;
        case kEmptyTuple:
          push(make(PickleValue::Kind::kTuple));
          break;
        case kTuple:
          push(make_sequence(PickleValue::Kind::kTuple, pop_mark()));
          break;
        case kList:
          push(make_sequence(PickleValue::Kind::kList, pop_mark()));
          break;
        case kTuple1:
        case kTuple2:
        case kTuple3: {
          const size_t n = static_cast<size_t>(op - kTuple1 + 1);
          if (stack_.size() < n + stack_floor())
            bad("TUPLE", n, " needs ", n, " values on the stack");
          std::vector<PickleValue*> items(stack_.end() - static_cast<std::ptrdiff_t>(n),
                                          stack_.end());
          stack_.resize(stack_.size() - n);
          push(make_sequence(PickleValue::Kind::kTuple, items));
          break;
        }
        case kDict: {
          std::vector<PickleValue*> kv = pop_mark();
          if (kv.size() % 2 != 0) bad("DICT with an odd number of keys and values");
          push(make_sequence(PickleValue::Kind::kDict, kv));
          break;
        }
        case kAppend: {
          PickleValue* v = pop();
          charge(sizeof(PickleValue*));
          list_top("APPEND")->items.push_back(v);
          break;
        }
        case kAppends: {
          std::vector<PickleValue*> vs = pop_mark();
          PickleValue* list = list_top("APPENDS");
          charge(vs.size() * sizeof(PickleValue*));
          list->items.insert(list->items.end(), vs.begin(), vs.end());
          break;
        }
        case kSetItem: {
          PickleValue* value = pop();
          PickleValue* key = pop();
          PickleValue* dict = dict_top("SETITEM");
          charge(2 * sizeof(PickleValue*));
          dict->items.push_back(key);
          dict->items.push_back(value);
          break;
        }
        case kSetItems: {
          std::vector<PickleValue*> kv = pop_mark();
          if (kv.size() % 2 != 0) bad("SETITEMS with an odd number of keys and values");
          PickleValue* dict = dict_top("SETITEMS");
          charge(kv.size() * sizeof(PickleValue*));
          dict->items.insert(dict->items.end(), kv.begin(), kv.end());
          break;
        }
        case kBinPut:
          memo_put(uint_le(1), top());
          break;
        case kLongBinPut:
          memo_put(uint_le(4), top());
          break;
        case kMemoize:
          memo_put(memo_.size(), top());
          break;
        case kBinGet:
          push(memo_get(uint_le(1)));
          break;
        case kLongBinGet:
          push(memo_get(uint_le(4)));
          break;
        case kGlobal: {
          const std::string module = line();
          const std::string name = line();
          push(global(module, name));
          break;
        }
        case kStackGlobal: {
          PickleValue* name = pop();
          PickleValue* module = pop();
          if (name->kind != PickleValue::Kind::kString ||
              module->kind != PickleValue::Kind::kString) {
            bad("STACK_GLOBAL needs two strings");
          }
          push(global(module->s, name->s));
          break;
        }
        case kReduce: {
          PickleValue* args = pop();
          PickleValue* callable = pop();
          push(call(callable, args));
          break;
        }
        case kNewObj: {
          PickleValue* args = pop();
          PickleValue* cls = pop();
          if (cls->kind != PickleValue::Kind::kGlobal || cls->s != kOrderedDict) {
            bad("NEWOBJ of ", describe(cls), " (only collections.OrderedDict may be constructed)");
          }
          push(call(cls, args));
          break;
        }
        case kBuild: {
          PickleValue* state = pop();
          PickleValue* obj = top();
          // torch state dicts are OrderedDicts carrying a `_metadata` attribute: {"_metadata":
          // ...}.
          if (obj->kind != PickleValue::Kind::kDict || (state->kind != PickleValue::Kind::kDict &&
                                                        state->kind != PickleValue::Kind::kNone)) {
            bad("BUILD of ", describe(obj), " with ", describe(state),
                " (only attributes of a dict are accepted)");
          }
          break;  // the attributes (layer version metadata) are not needed
        }
        case kBinPersId:
          push(persistent_load(pop()));
          break;
        default:
          bad("unsupported pickle opcode ", op_name(),
              " (moetrace reads the binary protocols 2 to 5 that torch.save writes)");
      }
    }
  }

 private:
  template <class... Parts>
  [[noreturn]] void bad(Parts&&... parts) const {
    fail(what_, ": pickle byte ", op_pos_, ": ", std::forward<Parts>(parts)...);
  }

  static std::string hex(uint8_t b) {
    const char* digits = "0123456789abcdef";
    return {digits[b >> 4], digits[b & 15]};
  }

  // The current opcode as "'s'" or "0x85".
  std::string op_name() const {
    const auto op = static_cast<uint8_t>(in_[op_pos_]);
    if (op >= 0x20 && op < 0x7f) return std::string("'") + static_cast<char>(op) + "'";
    return "0x" + hex(op);
  }

  std::string describe(const PickleValue* v) const {
    if (v->kind == PickleValue::Kind::kGlobal) return v->s;
    return std::string("a ") + v->kind_name();
  }

  uint8_t u8() {
    if (pos_ >= in_.size()) bad("pickle ends without STOP (", in_.size(), " bytes)");
    return static_cast<uint8_t>(in_[pos_++]);
  }
  uint64_t uint_le(int n) {
    if (in_.size() - pos_ < static_cast<size_t>(n)) bad("pickle ends inside an opcode argument");
    uint64_t v = 0;
    for (int k = 0; k < n; ++k)
      v |= uint64_t{static_cast<uint8_t>(in_[pos_ + static_cast<size_t>(k)])} << (8 * k);
    pos_ += static_cast<size_t>(n);
    return v;
  }
  std::string_view take(uint64_t n) {
    if (n > in_.size() - pos_) bad("length ", n, " passes the end of the pickle");
    std::string_view s = in_.substr(pos_, static_cast<size_t>(n));
    pos_ += static_cast<size_t>(n);
    return s;
  }
  std::string line() {
    const size_t nl = in_.find('\n', pos_);
    if (nl == std::string_view::npos) bad("GLOBAL without a newline-terminated name");
    std::string s(in_.substr(pos_, nl - pos_));
    pos_ = nl + 1;
    return s;
  }
  // Little-endian two's complement of n bytes; moetrace needs no more than 64 bits.
  int64_t read_long(uint64_t n) {
    std::string_view b = take(n);
    if (n == 0) return 0;
    if (n > 8) bad("integer of ", n, " bytes does not fit 64 bits");
    uint64_t v = 0;
    for (size_t k = 0; k < n; ++k) v |= uint64_t{static_cast<uint8_t>(b[k])} << (8 * k);
    if (n < 8 && (static_cast<uint8_t>(b[n - 1]) & 0x80))
      v |= ~uint64_t{0} << (8 * n);  // sign-extend
    return static_cast<int64_t>(v);
  }

  // Counts bytes against the pickle's budget of value memory.
  void charge(uint64_t bytes) {
    used_ += bytes;
    if (used_ > budget_) {
      bad("the values of this ", in_.size(), "-byte pickle would take more than ", budget_,
          " bytes of memory (at most 64 MiB + ", kValueBytesPerPickleByte,
          " bytes per pickle byte)");
    }
  }
  void memo_put(uint64_t key, PickleValue* v) {
    auto [it, added] = memo_.try_emplace(key, v);
    if (added) {
      charge(kMemoEntryCost);
    } else {
      it->second = v;
    }
  }

  PickleValue* make(PickleValue::Kind kind) {
    charge(kValueCost);
    out_->values_.push_back(std::make_unique<PickleValue>());
    out_->values_.back()->kind = kind;
    return out_->values_.back().get();
  }
  PickleValue* make_sequence(PickleValue::Kind kind, const std::vector<PickleValue*>& items) {
    PickleValue* v = make(kind);
    charge(items.size() * sizeof(PickleValue*));
    v->items.assign(items.begin(), items.end());
    return v;
  }
  void push(PickleValue* v) { stack_.push_back(v); }
  void push_int(int64_t i) {
    PickleValue* v = make(PickleValue::Kind::kInt);
    v->i = i;
    push(v);
  }
  void push_string(PickleValue::Kind kind, uint64_t n) {
    PickleValue* v = make(kind);
    const std::string_view bytes = take(n);
    charge(bytes.size());
    v->s = std::string(bytes);
    push(v);
  }

  size_t stack_floor() const { return marks_.empty() ? 0 : marks_.back(); }
  PickleValue* top() {
    if (stack_.size() <= stack_floor()) bad("opcode ", op_name(), " needs a value on the stack");
    return stack_.back();
  }
  PickleValue* pop() {
    PickleValue* v = top();
    stack_.pop_back();
    return v;
  }
  std::vector<PickleValue*> pop_mark() {
    if (marks_.empty()) bad("opcode ", op_name(), " needs a MARK");
    const size_t m = marks_.back();
    marks_.pop_back();
    std::vector<PickleValue*> items(stack_.begin() + static_cast<std::ptrdiff_t>(m), stack_.end());
    stack_.resize(m);
    return items;
  }
  PickleValue* list_top(const char* op) {
    PickleValue* v = top();
    if (v->kind != PickleValue::Kind::kList) bad(op, " on ", describe(v), " (expected a list)");
    return v;
  }
  PickleValue* dict_top(const char* op) {
    PickleValue* v = top();
    if (v->kind != PickleValue::Kind::kDict) bad(op, " on ", describe(v), " (expected a dict)");
    return v;
  }
  PickleValue* memo_get(uint64_t key) {
    auto it = memo_.find(key);
    if (it == memo_.end()) bad("memo key ", key, " was never stored");
    return it->second;
  }

  PickleValue* global(const std::string& module, const std::string& name) {
    if (!is_allowed_global(module, name)) {
      fail(what_, ": pickle names the global '", module, ".", name,
           "', which is not one of torch's tensor-rebuilding globals; refusing to load it");
    }
    PickleValue* v = make(PickleValue::Kind::kGlobal);
    v->s = module + "." + name;
    return v;
  }

  int64_t int_arg(const PickleValue* v, const char* what) const {
    if (v->kind != PickleValue::Kind::kInt) bad(what, " must be an int, not ", describe(v));
    return v->i;
  }
  std::vector<int64_t> int_tuple_arg(const PickleValue* v, const char* what) const {
    if (v->kind != PickleValue::Kind::kTuple) bad(what, " must be a tuple, not ", describe(v));
    std::vector<int64_t> out;
    for (const PickleValue* d : v->items) {
      const int64_t x = int_arg(d, what);
      if (x < 0) bad(what, " has a negative entry ", x);
      out.push_back(x);
    }
    return out;
  }

  PickleValue* call(const PickleValue* callable, const PickleValue* args) {
    if (callable->kind != PickleValue::Kind::kGlobal)
      bad("REDUCE on ", describe(callable), " (not callable)");
    if (args->kind != PickleValue::Kind::kTuple)
      bad("arguments of ", callable->s, " must be a tuple");
    const std::vector<const PickleValue*>& a = args->items;
    if (callable->s == kOrderedDict) {
      if (!a.empty()) bad("collections.OrderedDict called with arguments (expected none)");
      return make(PickleValue::Kind::kDict);
    }
    if (callable->s == kRebuildTensorV2 || callable->s == kRebuildTensor) {
      // _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, backward_hooks[,
      // metadata]); _rebuild_tensor(storage, storage_offset, size, stride).
      const bool v2 = callable->s == kRebuildTensorV2;
      if (v2 ? (a.size() != 6 && a.size() != 7) : a.size() != 4) {
        bad(callable->s, " called with ", a.size(), " arguments (expected ", v2 ? "6 or 7" : "4",
            ")");
      }
      if (a[0]->kind != PickleValue::Kind::kStorage)
        bad(callable->s, " needs a storage, not ", describe(a[0]));
      PickleValue* t = make(PickleValue::Kind::kTensor);
      t->storage = a[0];
      t->dtype = a[0]->dtype;
      t->i = int_arg(a[1], "storage_offset");
      if (t->i < 0) bad("negative storage_offset ", t->i);
      t->size = int_tuple_arg(a[2], "size");
      t->stride = int_tuple_arg(a[3], "stride");
      if (t->size.size() != t->stride.size()) {
        bad("size has ", t->size.size(), " dimensions but stride has ", t->stride.size());
      }
      return t;
    }
    if (callable->s == kRebuildParameter) {
      // _rebuild_parameter(data, requires_grad, backward_hooks): the parameter is its data.
      if (a.size() != 3 || a[0]->kind != PickleValue::Kind::kTensor) {
        bad(callable->s, " expects (tensor, requires_grad, backward_hooks)");
      }
      return const_cast<PickleValue*>(a[0]);
    }
    bad(callable->s, " cannot be called");
  }

  // torch.save's persistent id of a storage: ('storage', storage_type, key, location, numel).
  PickleValue* persistent_load(const PickleValue* pid) {
    const auto& a = pid->items;
    if (pid->kind != PickleValue::Kind::kTuple || a.size() != 5 ||
        a[0]->kind != PickleValue::Kind::kString || a[0]->s != "storage") {
      bad("persistent id must be ('storage', type, key, location, numel), got ", describe(pid));
    }
    if (a[1]->kind != PickleValue::Kind::kGlobal || a[1]->s.rfind("torch.", 0) != 0) {
      bad("persistent id names ", describe(a[1]),
          " as storage type (expected a torch storage class)");
    }
    if (a[2]->kind != PickleValue::Kind::kString || a[3]->kind != PickleValue::Kind::kString) {
      bad("persistent id key and location must be strings");
    }
    PickleValue* s = make(PickleValue::Kind::kStorage);
    if (!torch_storage_dtype(std::string_view(a[1]->s).substr(6), &s->dtype)) {
      bad(a[1]->s, " is not a storage type");
    }
    s->s = a[2]->s;
    s->location = a[3]->s;
    s->numel = int_arg(a[4], "storage numel");
    if (s->numel < 0) bad("negative storage numel ", s->numel);
    return s;
  }

  std::string_view in_;
  const std::string& what_;
  Pickle* out_;
  size_t pos_ = 0;
  size_t op_pos_ = 0;
  std::vector<PickleValue*> stack_;
  std::vector<size_t> marks_;
  std::unordered_map<uint64_t, PickleValue*> memo_;
  PickleValue* small_ints_[256] = {};  // the shared BININT1 values
  PickleValue* none_ = nullptr;        // the shared None, True and False
  PickleValue* true_ = nullptr;
  PickleValue* false_ = nullptr;
  const uint64_t budget_;  // bytes the values may take
  uint64_t used_ = 0;
};

Pickle Pickle::parse(std::string_view bytes, const std::string& what) {
  Pickle p;
  Unpickler(bytes, what, &p).run();
  return p;
}

}  // namespace moetrace
