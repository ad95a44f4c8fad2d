// Plain text: one record {"text": ...} per non-blank line, or per blank-line-separated paragraph
// (lines joined with '\n'). Lines keep their inner spacing; a trailing '\r' is dropped.
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
        oversize |= line_oversize;
        if (any) text += '\n';
        if (!oversize) text += line;
        if (text.size() > options_.max_record_bytes) oversize = true;
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
      out->row = row;
      out->fields = nlohmann::json{{"text", std::move(text)}};
      ++counters_.rows;
      return true;
    }
  }

 private:
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
