// Plain text: one record {"text": ...} per non-blank line, or per blank-line-separated paragraph
// (lines joined with '\n'). Lines keep their inner spacing; a trailing '\r' is dropped. With a
// text_delimiter, a record is split into named columns instead (`sentence@label`).
#include "data/records.h"

namespace moetrace::data {

namespace {

bool blank(const std::string& s) { return s.find_first_not_of(" \t\r\f\v") == std::string::npos; }

class TextReader : public RecordReader {
 public:
  TextReader(std::unique_ptr<ByteStream> in, std::string name, const ReadOptions& options)
      : RecordReader(std::move(name), options.max_logged), in_(std::move(in)), options_(options) {
    in_.skip_bom();
  }

  bool next(Record* out) override {
    std::string text, line;
    bool oversize = false;
    while (true) {
      text.clear();
      oversize = false;
      bool any = false;
      bool line_oversize = false;
      while (read_line(&line, &line_oversize)) {
        if (blank(line) && !line_oversize) {
          if (any) break;
          continue;
        }
        // Once too large, a paragraph is only read to its end: nothing more is kept (a paragraph
        // of a billion short lines would otherwise keep a billion newlines).
        oversize |= line_oversize;
        if (!oversize) {
          if (any) text += '\n';
          text += line;
          if (text.size() > options_.max_record_bytes) oversize = true;
        }
        if (oversize && !text.empty()) std::string().swap(text);
        any = true;
        if (options_.text_mode == TextMode::kLines) break;
      }
      if (!any) return false;
      const int64_t row = row_++;
      if (oversize) {
        skip(row, "too large");
        continue;
      }
      if (!valid_utf8(text)) {
        skip(row, "invalid UTF-8");
        continue;
      }
      nlohmann::json fields;
      if (!split_columns(text, &fields)) {
        skip(row, "ragged row",
             std::string("fewer than ") + std::to_string(options_.columns.size() - 1) + " '" +
                 options_.text_delimiter + "' separators");
        continue;
      }
      out->row = row;
      out->fields = std::move(fields);
      ++counters_.rows;
      return true;
    }
  }

 private:
  // {"text": text}, or with a text_delimiter the columns split off at its last occurrences (the
  // first column keeps any earlier ones). False when there are too few.
  bool split_columns(std::string& text, nlohmann::json* out) const {
    const auto& cols = options_.columns;
    if (!options_.text_delimiter || cols.size() < 2) {
      *out = nlohmann::json{{"text", std::move(text)}};
      return true;
    }
    *out = nlohmann::json::object();
    std::string_view rest = text;
    for (size_t c = cols.size() - 1; c > 0; --c) {
      const size_t at = rest.rfind(options_.text_delimiter);
      if (at == std::string_view::npos) return false;
      (*out)[cols[c]] = std::string(rest.substr(at + 1));
      rest = rest.substr(0, at);
    }
    (*out)[cols[0]] = std::string(rest);
    return true;
  }

  bool read_line(std::string* line, bool* oversize) {
    line->clear();
    *oversize = false;
    int c = in_.get();
    if (c < 0) return false;
    size_t bytes = 0;
    for (; c >= 0 && c != '\n'; c = in_.get()) {
      if (++bytes > options_.max_record_bytes) {
        *oversize = true;
        continue;
      }
      *line += static_cast<char>(c);
    }
    if (!line->empty() && line->back() == '\r') line->pop_back();
    return true;
  }

  BufferedInput in_;
  ReadOptions options_;
  int64_t row_ = 0;
};

}  // namespace

std::unique_ptr<RecordReader> make_text_reader(std::unique_ptr<ByteStream> in, std::string name,
                                               const ReadOptions& options) {
  return std::make_unique<TextReader>(std::move(in), std::move(name), options);
}

}  // namespace moetrace::data
