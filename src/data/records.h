// Streaming record readers for the formats datasets come in: Parquet, JSON Lines, JSON arrays,
// CSV/TSV and plain text, each optionally gzip/zstd-compressed. A record is a JSON object (column
// name -> value) with its row number in the file. Bad rows (invalid UTF-8, unparsable, ragged, too
// big) are skipped, counted by reason and logged with the file and row; a file that cannot be read
// at all throws Error naming it.
#pragma once

#include <cstdint>
#include <filesystem>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "data/byte_stream.h"

namespace moetrace::data {

enum class Format { kAuto, kParquet, kJsonLines, kJsonArray, kCsv, kTsv, kText };
enum class Header { kAuto, kYes, kNo };
enum class TextMode { kLines, kParagraphs };
// The bytes of a text-based file: UTF-8, or Latin-1 (ISO-8859-1, transcoded to UTF-8 as it is
// read).
enum class Encoding { kUtf8, kLatin1 };

const char* format_name(Format f);
// From the file name, ignoring a .gz/.zst/.zstd suffix; kAuto when unknown. `.json` is kJsonLines
// here; the reader looks at the first byte and switches to kJsonArray on '['.
Format format_from_name(const std::filesystem::path& path);
bool parse_format(const std::string& s, Format* out);

struct ReadOptions {
  Format format = Format::kAuto;
  // CSV/TSV. delimiter 0: ',' for CSV, '\t' for TSV. quote: 0 = none; -1 (default) = '"' for CSV
  // and none for TSV (GLUE's TSVs hold stray quotes and are read with QUOTE_NONE by everyone).
  char delimiter = 0;
  int quote = -1;
  // kAuto: the first row is a header when one of its cells is in header_hints (or when no hints
  // and no `columns` are given).
  Header header = Header::kAuto;
  std::vector<std::string> header_hints;
  // Names of the columns of a headerless file; missing names become "0", "1", ...
  std::vector<std::string> columns;
  TextMode text_mode = TextMode::kLines;
  // Plain-text files: 0, or a byte at whose last occurrences each line is split into `columns`
  // (Financial PhraseBank's `sentence@label`: the text may hold the byte itself, the label not).
  char text_delimiter = 0;
  Encoding encoding = Encoding::kUtf8;
  // Top-level columns to read from Parquet (empty: all).
  std::vector<std::string> wanted_columns;
  // A record bigger than this is skipped (reason "too large").
  size_t max_record_bytes = size_t{4} << 20;
  // How many bad rows per file are logged one by one before only the count is kept.
  int max_logged = 5;
};

struct Record {
  int64_t row = 0;        // 0-based position of the record in its file, bad rows included
  nlohmann::json fields;  // object
};

struct ReadCounters {
  int64_t rows = 0;                        // good records returned
  std::map<std::string, int64_t> skipped;  // reason -> count
  int64_t total_skipped() const;
};

class RecordReader {
 public:
  virtual ~RecordReader() = default;
  // The next good record; false at the end of the file.
  virtual bool next(Record* out) = 0;
  // Total rows the file declares, when known without reading it (Parquet); -1 otherwise.
  virtual int64_t declared_rows() const { return -1; }
  const ReadCounters& counters() const { return counters_; }
  const std::string& name() const { return name_; }

 protected:
  explicit RecordReader(std::string name, int max_logged)
      : name_(std::move(name)), max_logged_(max_logged) {}
  // Counts a skipped row and logs it (the first max_logged of the file).
  void skip(int64_t row, const std::string& reason, const std::string& detail = {});

  ReadCounters counters_;

 private:
  std::string name_;
  int max_logged_;
  int logged_ = 0;
};

std::unique_ptr<RecordReader> open_records(const std::filesystem::path& path,
                                           const ReadOptions& options);
// The same over bytes in memory (fuzzing, tests); format must not be kAuto or kParquet.
std::unique_ptr<RecordReader> open_records_from_memory(std::string bytes, const std::string& name,
                                                       const ReadOptions& options);

// Implementations (one per file).
std::unique_ptr<RecordReader> open_parquet_records(const std::filesystem::path& path,
                                                   const ReadOptions& options);
std::unique_ptr<RecordReader> make_csv_reader(std::unique_ptr<ByteStream> in, std::string name,
                                              const ReadOptions& options);
std::unique_ptr<RecordReader> make_json_reader(std::unique_ptr<ByteStream> in, std::string name,
                                               const ReadOptions& options);
std::unique_ptr<RecordReader> make_text_reader(std::unique_ptr<ByteStream> in, std::string name,
                                               const ReadOptions& options);

// True when s is well-formed UTF-8 (no overlongs, surrogates or code points above U+10FFFF).
bool valid_utf8(std::string_view s);

}  // namespace moetrace::data
