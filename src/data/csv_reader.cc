// CSV/TSV: RFC 4180 quoting (optional), any of \n, \r\n, \r as record ends, a UTF-8 BOM, blank
// lines ignored. A record whose field count differs from the header's is skipped as ragged.
#include <algorithm>

#include "core/error.h"
#include "data/records.h"

namespace moetrace::data {

namespace {

std::string trimmed(const std::string& s) {
  size_t b = s.find_first_not_of(" \t");
  if (b == std::string::npos) return {};
  size_t e = s.find_last_not_of(" \t");
  return s.substr(b, e - b + 1);
}

class CsvReader : public RecordReader {
 public:
  CsvReader(std::unique_ptr<ByteStream> in, std::string name, const ReadOptions& options)
      : RecordReader(std::move(name), options.max_logged), in_(std::move(in)), options_(options) {
    const bool tsv = options.format == Format::kTsv;
    delim_ = options.delimiter ? options.delimiter : (tsv ? '\t' : ',');
    quote_ = options.quote >= 0 ? options.quote : (tsv ? 0 : '"');
    in_.skip_bom();
    read_header();
  }

  bool next(Record* out) override {
    while (true) {
      if (pending_header_row_) {
        pending_header_row_ = false;
        if (emit(std::move(first_cells_), first_problem_, out)) return true;
        continue;
      }
      std::vector<std::string> cells;
      std::string problem;
      if (!read_record(&cells, &problem)) return false;
      if (emit(std::move(cells), problem, out)) return true;
    }
  }

 private:
  // Reads the first record and decides whether it is a header.
  void read_header() {
    std::string problem;
    if (!read_record(&first_cells_, &problem)) return;
    bool is_header;
    if (options_.header == Header::kYes) {
      is_header = true;
    } else if (options_.header == Header::kNo) {
      is_header = false;
    } else if (!options_.header_hints.empty()) {
      is_header = std::any_of(first_cells_.begin(), first_cells_.end(), [&](const std::string& c) {
        return std::find(options_.header_hints.begin(), options_.header_hints.end(), trimmed(c)) !=
               options_.header_hints.end();
      });
    } else {
      is_header = options_.columns.empty();
    }
    if (is_header) {
      if (!problem.empty()) fail(name(), ": unreadable header (", problem, ")");
      for (auto& c : first_cells_) {
        if (!valid_utf8(c)) fail(name(), ": header is not valid UTF-8");
        names_.push_back(trimmed(c));
      }
      first_cells_.clear();
    } else {
      names_ = options_.columns;
      for (size_t i = names_.size(); i < first_cells_.size(); ++i)
        names_.push_back(std::to_string(i));
      pending_header_row_ = true;
      first_problem_ = problem;
    }
  }

  bool emit(std::vector<std::string> cells, const std::string& problem, Record* out) {
    const int64_t row = row_++;
    if (!problem.empty()) {
      skip(row, problem);
      return false;
    }
    if (cells.size() != names_.size()) {
      skip(row, "ragged row",
           std::to_string(cells.size()) + " fields, expected " + std::to_string(names_.size()));
      return false;
    }
    nlohmann::json obj = nlohmann::json::object();
    for (size_t i = 0; i < cells.size(); ++i) {
      if (!valid_utf8(cells[i])) {
        skip(row, "invalid UTF-8", "column " + names_[i]);
        return false;
      }
      obj[names_[i]] = std::move(cells[i]);
    }
    out->row = row;
    out->fields = std::move(obj);
    ++counters_.rows;
    return true;
  }

  // One record; false at the end of input. Blank lines are skipped. *problem is set (and the
  // record still consumed) when it is too large or ends inside quotes.
  bool read_record(std::vector<std::string>* cells, std::string* problem) {
    while (true) {
      cells->clear();
      problem->clear();
      int c = in_.peek();
      if (c < 0) return false;
      if (c == '\n' || c == '\r') {  // blank line
        in_.get();
        if (c == '\r' && in_.peek() == '\n') in_.get();
        continue;
      }
      size_t bytes = 0;
      bool oversize = false;
      std::string field;
      bool quoted = false;      // inside quotes now
      bool was_quoted = false;  // field began with a quote
      auto end_field = [&] {
        // An oversize record is only scanned to its end: no cells kept (a 10 MB row of commas
        // would otherwise become millions of them).
        if (!oversize) cells->push_back(std::move(field));
        field.clear();
        was_quoted = false;
      };
      while (true) {
        c = in_.get();
        if (c < 0) {
          if (quoted) *problem = "unterminated quote";
          end_field();
          break;
        }
        if (++bytes > options_.max_record_bytes) oversize = true;
        if (quoted) {
          if (c == quote_) {
            if (in_.peek() == quote_) {
              in_.get();
              if (!oversize) field += static_cast<char>(c);
            } else {
              quoted = false;
            }
          } else if (!oversize) {
            field += static_cast<char>(c);
          }
          continue;
        }
        if (c == delim_) {
          end_field();
          continue;
        }
        if (c == '\n' || c == '\r') {
          if (c == '\r' && in_.peek() == '\n') in_.get();
          end_field();
          break;
        }
        if (quote_ && c == quote_ && field.empty() && !was_quoted) {
          quoted = was_quoted = true;
          continue;
        }
        if (!oversize) field += static_cast<char>(c);
      }
      if (oversize) *problem = "too large";
      return true;
    }
  }

  BufferedInput in_;
  ReadOptions options_;
  char delim_ = ',';
  int quote_ = '"';
  std::vector<std::string> names_;
  std::vector<std::string> first_cells_;
  std::string first_problem_;
  bool pending_header_row_ = false;
  int64_t row_ = 0;
};

}  // namespace

std::unique_ptr<RecordReader> make_csv_reader(std::unique_ptr<ByteStream> in, std::string name,
                                              const ReadOptions& options) {
  return std::make_unique<CsvReader>(std::move(in), std::move(name), options);
}

}  // namespace moetrace::data
