#include "data/records.h"

#include "core/error.h"
#include "core/log.h"

namespace moetrace::data {

int64_t ReadCounters::total_skipped() const {
  int64_t n = 0;
  for (const auto& [reason, count] : skipped) n += count;
  return n;
}

void RecordReader::skip(int64_t row, const std::string& reason, const std::string& detail) {
  ++counters_.skipped[reason];
  if (logged_ < max_logged_) {
    log_warn(name_, ": row ", row, " skipped: ", reason, detail.empty() ? "" : " (", detail,
             detail.empty() ? "" : ")");
  } else if (logged_ == max_logged_) {
    log_warn(name_, ": more rows skipped; only counting from here");
  }
  ++logged_;
}

const char* format_name(Format f) {
  switch (f) {
    case Format::kAuto:
      return "auto";
    case Format::kParquet:
      return "parquet";
    case Format::kJsonLines:
      return "jsonl";
    case Format::kJsonArray:
      return "json";
    case Format::kCsv:
      return "csv";
    case Format::kTsv:
      return "tsv";
    case Format::kText:
      return "text";
  }
  return "?";
}

bool parse_format(const std::string& s, Format* out) {
  for (Format f : {Format::kAuto, Format::kParquet, Format::kJsonLines, Format::kJsonArray,
                   Format::kCsv, Format::kTsv, Format::kText}) {
    if (s == format_name(f)) {
      *out = f;
      return true;
    }
  }
  return false;
}

Format format_from_name(const std::filesystem::path& path) {
  std::filesystem::path p = path.filename();
  std::string ext = p.extension().string();
  if (ext == ".gz" || ext == ".zst" || ext == ".zstd") {
    p = p.stem();
    ext = p.extension().string();
  }
  for (char& c : ext) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  if (ext == ".parquet") return Format::kParquet;
  if (ext == ".jsonl" || ext == ".ndjson" || ext == ".json") return Format::kJsonLines;
  if (ext == ".csv") return Format::kCsv;
  if (ext == ".tsv") return Format::kTsv;
  if (ext == ".txt" || ext == ".text" || ext == ".tokens" || ext == ".raw") return Format::kText;
  return Format::kAuto;
}

namespace {

std::unique_ptr<RecordReader> open_stream(std::unique_ptr<ByteStream> in, std::string name,
                                          const ReadOptions& options, Format f) {
  if (options.encoding == Encoding::kLatin1) in = latin1_to_utf8(std::move(in));
  switch (f) {
    case Format::kJsonLines:
    case Format::kJsonArray:
      return make_json_reader(std::move(in), std::move(name), options);
    case Format::kCsv:
    case Format::kTsv: {
      ReadOptions o = options;
      o.format = f;
      return make_csv_reader(std::move(in), std::move(name), o);
    }
    case Format::kText:
      return make_text_reader(std::move(in), std::move(name), options);
    case Format::kAuto:
    case Format::kParquet:
      break;
  }
  fail(name, ": no reader for format ", format_name(f));
}

}  // namespace

std::unique_ptr<RecordReader> open_records(const std::filesystem::path& path,
                                           const ReadOptions& options) {
  Format f = options.format == Format::kAuto ? format_from_name(path) : options.format;
  if (f == Format::kAuto) {
    fail(path.string(),
         ": unknown data format (expected .parquet, .jsonl, .json, .csv, .tsv or .txt, ",
         "optionally .gz/.zst)");
  }
  if (f == Format::kParquet) return open_parquet_records(path, options);
  return open_stream(open_byte_stream(path), path.string(), options, f);
}

std::unique_ptr<RecordReader> open_records_from_memory(std::string bytes, const std::string& name,
                                                       const ReadOptions& options) {
  return open_stream(memory_byte_stream(std::move(bytes), name), name, options, options.format);
}

bool valid_utf8(std::string_view s) {
  const auto* p = reinterpret_cast<const unsigned char*>(s.data());
  const auto* end = p + s.size();
  while (p < end) {
    unsigned char c = *p;
    if (c < 0x80) {
      ++p;
      continue;
    }
    int n;
    uint32_t cp;
    if ((c & 0xE0) == 0xC0) {
      n = 1;
      cp = c & 0x1F;
    } else if ((c & 0xF0) == 0xE0) {
      n = 2;
      cp = c & 0x0F;
    } else if ((c & 0xF8) == 0xF0) {
      n = 3;
      cp = c & 0x07;
    } else {
      return false;
    }
    if (end - p <= n) return false;
    for (int i = 1; i <= n; ++i) {
      if ((p[i] & 0xC0) != 0x80) return false;
      cp = (cp << 6) | (p[i] & 0x3F);
    }
    static constexpr uint32_t kMin[] = {0, 0x80, 0x800, 0x10000};
    if (cp < kMin[n] || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return false;
    p += n + 1;
  }
  return true;
}

}  // namespace moetrace::data
