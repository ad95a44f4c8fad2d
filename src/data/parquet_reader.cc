// Parquet through Apache Arrow C++: only the wanted top-level columns are decoded, one record batch
// at a time, so memory stays at about one row group whatever the file size. Arrow's exceptions
// and Status errors become Error naming the file.
#include <arrow/api.h>
#include <arrow/io/file.h>
#include <parquet/arrow/reader.h>
#include <parquet/arrow/schema.h>
#include <parquet/exception.h>
#include <parquet/file_reader.h>

#include <algorithm>
#include <system_error>

#include "core/error.h"
#include "data/records.h"

namespace moetrace::data {

namespace {

struct CellState {
  size_t limit = 0;  // max_record_bytes: past it nothing more of the row is copied
  bool bad_utf8 = false;
  size_t bytes = 0;
  bool too_large() const { return bytes > limit; }
};

nlohmann::json cell(const arrow::Array& a, int64_t i, CellState* st);

nlohmann::json text_cell(std::string_view v, bool must_be_utf8, CellState* st) {
  // Sizes are checked before anything is copied: a dictionary value is one copy in the file but
  // one per row here (2M rows sharing a 4 MB string would be 8 TB).
  st->bytes += v.size();
  if (st->too_large()) return nullptr;
  if (!valid_utf8(v)) {
    if (must_be_utf8) st->bad_utf8 = true;
    return nullptr;
  }
  return std::string(v);
}

template <class ListArray>
nlohmann::json list_cell(const arrow::Array& a, int64_t i, CellState* st) {
  const auto& list = static_cast<const ListArray&>(a);
  nlohmann::json out = nlohmann::json::array();
  auto values = list.values();
  for (auto k = list.value_offset(i); k < list.value_offset(i) + list.value_length(i); ++k) {
    if (st->too_large()) break;
    out.push_back(cell(*values, k, st));
  }
  return out;
}

nlohmann::json cell(const arrow::Array& a, int64_t i, CellState* st) {
  if (a.IsNull(i)) return nullptr;
  using T = arrow::Type;
  switch (a.type_id()) {
    case T::STRING:
      return text_cell(static_cast<const arrow::StringArray&>(a).GetView(i), true, st);
    case T::LARGE_STRING:
      return text_cell(static_cast<const arrow::LargeStringArray&>(a).GetView(i), true, st);
    case T::STRING_VIEW:
      return text_cell(static_cast<const arrow::StringViewArray&>(a).GetView(i), true, st);
    case T::BINARY:
      return text_cell(static_cast<const arrow::BinaryArray&>(a).GetView(i), false, st);
    case T::LARGE_BINARY:
      return text_cell(static_cast<const arrow::LargeBinaryArray&>(a).GetView(i), false, st);
    case T::BOOL:
      return static_cast<const arrow::BooleanArray&>(a).Value(i);
    case T::INT8:
      return static_cast<const arrow::Int8Array&>(a).Value(i);
    case T::INT16:
      return static_cast<const arrow::Int16Array&>(a).Value(i);
    case T::INT32:
      return static_cast<const arrow::Int32Array&>(a).Value(i);
    case T::INT64:
      return static_cast<const arrow::Int64Array&>(a).Value(i);
    case T::UINT8:
      return static_cast<const arrow::UInt8Array&>(a).Value(i);
    case T::UINT16:
      return static_cast<const arrow::UInt16Array&>(a).Value(i);
    case T::UINT32:
      return static_cast<const arrow::UInt32Array&>(a).Value(i);
    case T::UINT64:
      return static_cast<const arrow::UInt64Array&>(a).Value(i);
    case T::FLOAT:
      return static_cast<const arrow::FloatArray&>(a).Value(i);
    case T::DOUBLE:
      return static_cast<const arrow::DoubleArray&>(a).Value(i);
    case T::LIST:
      return list_cell<arrow::ListArray>(a, i, st);
    case T::LARGE_LIST:
      return list_cell<arrow::LargeListArray>(a, i, st);
    case T::FIXED_SIZE_LIST:
      return list_cell<arrow::FixedSizeListArray>(a, i, st);
    case T::STRUCT: {
      const auto& s = static_cast<const arrow::StructArray&>(a);
      nlohmann::json out = nlohmann::json::object();
      for (int f = 0; f < s.num_fields() && !st->too_large(); ++f) {
        out[s.struct_type()->field(f)->name()] = cell(*s.field(f), i, st);
      }
      return out;
    }
    case T::DICTIONARY: {
      const auto& d = static_cast<const arrow::DictionaryArray&>(a);
      return cell(*d.dictionary(), d.GetValueIndex(i), st);
    }
    default: {
      // Dates, decimals, maps, ...: their display form; never the text of a prompt in practice.
      auto scalar = a.GetScalar(i);
      if (!scalar.ok()) return nullptr;
      std::string s = (*scalar)->ToString();
      st->bytes += s.size();
      return valid_utf8(s) ? nlohmann::json(s) : nlohmann::json(nullptr);
    }
  }
}

void collect_leaves(const parquet::arrow::SchemaField& f, std::vector<int>* out) {
  if (f.is_leaf()) out->push_back(f.column_index);
  for (const auto& c : f.children) collect_leaves(c, out);
}

class ParquetReader : public RecordReader {
 public:
  ParquetReader(const std::filesystem::path& path, const ReadOptions& options)
      : RecordReader(path.string(), options.max_logged), options_(options) {
    try {
      open(path);
    } catch (const Error&) {
      throw;
    } catch (const std::exception& e) {
      fail(path.string(), ": not a readable Parquet file (", e.what(), ")");
    }
  }

  int64_t declared_rows() const override { return declared_rows_; }

  bool next(Record* out) override {
    while (true) {
      if (!batch_ || pos_ >= batch_->num_rows()) {
        if (!read_batch()) return false;
        continue;
      }
      const int64_t row = row_++;
      const int64_t i = pos_++;
      CellState st;
      st.limit = options_.max_record_bytes;
      nlohmann::json obj = nlohmann::json::object();
      for (int c = 0; c < batch_->num_columns() && !st.too_large(); ++c) {
        obj[batch_->column_name(c)] = cell(*batch_->column(c), i, &st);
      }
      if (st.too_large()) {
        skip(row, "too large");
        continue;
      }
      // Rows within the size limit are validated and copied: bound their total against the
      // file's size, or 2M rows sharing one 4 MB dictionary value would take hours.
      decoded_ += st.bytes;
      if (decoded_ > decode_budget_) {
        fail(name(), ": its values decode to over ", decode_budget_ >> 20, " MiB, more than ",
             kMaxExpansion, " times the file's ", file_bytes_,
             " bytes: refused as a decompression bomb (near row ", row, ")");
      }
      if (st.bad_utf8) {
        skip(row, "invalid UTF-8");
        continue;
      }
      out->row = row;
      out->fields = std::move(obj);
      ++counters_.rows;
      return true;
    }
  }

 private:
  void open(const std::filesystem::path& path) {
    auto file = arrow::io::ReadableFile::Open(path.string());
    if (!file.ok()) fail(path.string(), ": cannot open (", file.status().ToString(), ")");
    auto pq = parquet::ParquetFileReader::Open(*file);
    declared_rows_ = pq->metadata()->num_rows();
    std::error_code ec;
    const auto size = std::filesystem::file_size(path, ec);
    file_bytes_ = ec ? 0 : static_cast<uint64_t>(size);
    decode_budget_ = std::max(kMinDecodeBudget, file_bytes_ * kMaxExpansion);
    parquet::ArrowReaderProperties props;
    props.set_batch_size(1024);
    props.set_use_threads(false);
    // Dictionary-encoded strings stay dictionaries (indices into one copy of each value); read
    // plainly, every row of a batch would get its own copy, however large (see text_cell).
    // Arrow cannot decode delta-encoded pages into a dictionary: those columns are read plainly.
    const auto meta = pq->metadata();
    for (int c = 0; c < meta->schema()->num_columns(); ++c) {
      if (meta->schema()->Column(c)->physical_type() != parquet::Type::BYTE_ARRAY) continue;
      bool dictionary_only = true;
      for (int g = 0; g < meta->num_row_groups() && dictionary_only; ++g) {
        const auto row_group = meta->RowGroup(g);  // owns the chunk, which owns the list
        const auto chunk = row_group->ColumnChunk(c);
        for (auto enc : chunk->encodings()) {
          if (enc != parquet::Encoding::PLAIN && enc != parquet::Encoding::PLAIN_DICTIONARY &&
              enc != parquet::Encoding::RLE_DICTIONARY && enc != parquet::Encoding::RLE &&
              enc != parquet::Encoding::BIT_PACKED) {
            dictionary_only = false;
          }
        }
      }
      if (dictionary_only) props.set_read_dictionary(c, true);
    }
    auto reader =
        parquet::arrow::FileReader::Make(arrow::default_memory_pool(), std::move(pq), props);
    if (!reader.ok()) {
      fail(path.string(), ": not a readable Parquet file (", reader.status().ToString(), ")");
    }
    reader_ = std::move(*reader);
    std::vector<int> leaves;
    const auto& fields = reader_->manifest().schema_fields;
    for (const auto& f : fields) {
      const auto& want = options_.wanted_columns;
      if (want.empty() || std::find(want.begin(), want.end(), f.field->name()) != want.end()) {
        collect_leaves(f, &leaves);
      }
    }
    std::vector<int> row_groups(static_cast<size_t>(reader_->num_row_groups()));
    for (size_t g = 0; g < row_groups.size(); ++g) row_groups[g] = static_cast<int>(g);
    if (leaves.empty()) return;  // none of the wanted columns: rows exist but carry nothing
    // A column chunk is decoded whole; refuse the ones that would not fit the streaming budget
    // (parquet-testing's large_string_map holds 2 GiB of strings in a 4 kB file).
    auto md = reader_->parquet_reader()->metadata();
    for (int g = 0; g < md->num_row_groups(); ++g) {
      auto rg = md->RowGroup(g);
      for (int leaf : leaves) {
        auto chunk = rg->ColumnChunk(leaf);
        if (chunk->total_uncompressed_size() > kMaxChunkBytes) {
          fail(path.string(), ": row group ", g, " column ", chunk->path_in_schema()->ToDotString(),
               " holds ", chunk->total_uncompressed_size(), " bytes uncompressed (over the ",
               kMaxChunkBytes >> 20, " MiB a column chunk may have)");
        }
      }
    }
    auto batches = reader_->GetRecordBatchReader(row_groups, leaves);
    if (!batches.ok()) {
      fail(path.string(), ": not a readable Parquet file (", batches.status().ToString(), ")");
    }
    batches_ = std::move(*batches);
  }

  bool read_batch() {
    if (!batches_) return false;
    std::shared_ptr<arrow::RecordBatch> batch;
    arrow::Status status;
    try {
      status = batches_->ReadNext(&batch);
    } catch (const std::exception& e) {
      fail(name(), ": corrupt Parquet data near row ", row_, " (", e.what(), ")");
    }
    if (!status.ok())
      fail(name(), ": corrupt Parquet data near row ", row_, " (", status.ToString(), ")");
    if (batch) {
      auto valid = batch->Validate();
      if (!valid.ok())
        fail(name(), ": corrupt Parquet data near row ", row_, " (", valid.ToString(), ")");
    }
    batch_ = std::move(batch);
    pos_ = 0;
    return batch_ != nullptr;
  }

  static constexpr int64_t kMaxChunkBytes = int64_t{1} << 30;
  // Values a file may decode to: 1000 times its size (text compresses 3-10x), at least 1 GiB.
  static constexpr uint64_t kMaxExpansion = 1000;
  static constexpr uint64_t kMinDecodeBudget = uint64_t{1} << 30;
  uint64_t file_bytes_ = 0;
  uint64_t decode_budget_ = kMinDecodeBudget;
  uint64_t decoded_ = 0;
  ReadOptions options_;
  int64_t declared_rows_ = -1;
  std::unique_ptr<parquet::arrow::FileReader> reader_;
  std::unique_ptr<arrow::RecordBatchReader> batches_;
  std::shared_ptr<arrow::RecordBatch> batch_;
  int64_t pos_ = 0;
  int64_t row_ = 0;
};

}  // namespace

std::unique_ptr<RecordReader> open_parquet_records(const std::filesystem::path& path,
                                                   const ReadOptions& options) {
  return std::make_unique<ParquetReader>(path, options);
}

}  // namespace moetrace::data
