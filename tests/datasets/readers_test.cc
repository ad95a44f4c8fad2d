#include <gtest/gtest.h>
#include <zlib.h>
#include <zstd.h>

#include <filesystem>
#include <fstream>
#include <sstream>

#include "core/error.h"
#include "data/records.h"

namespace moetrace::data {
namespace {

namespace fs = std::filesystem;
const fs::path kData = MOETRACE_TEST_DATA;

struct ReadAll {
  std::vector<Record> records;
  ReadCounters counters;
  int64_t declared = -1;
};

ReadAll read_all(const fs::path& path, ReadOptions options = {}) {
  auto reader = open_records(path, options);
  ReadAll out;
  Record r;
  while (reader->next(&r)) out.records.push_back(r);
  out.counters = reader->counters();
  out.declared = reader->declared_rows();
  return out;
}

// The first `limit` records only.
size_t read_some(const fs::path& path, size_t limit) {
  auto reader = open_records(path, {});
  Record r;
  size_t n = 0;
  while (n < limit && reader->next(&r)) ++n;
  return n;
}

ReadAll read_bytes(const std::string& bytes, Format f, ReadOptions options = {}) {
  options.format = f;
  auto reader = open_records_from_memory(bytes, "<memory>", options);
  ReadAll out;
  Record r;
  while (reader->next(&r)) out.records.push_back(r);
  out.counters = reader->counters();
  return out;
}

fs::path temp_file(const std::string& name, const std::string& bytes) {
  fs::path p = fs::temp_directory_path() / ("mt_readers_" + name);
  std::ofstream(p, std::ios::binary) << bytes;
  return p;
}

std::string slurp(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// --- the real samples in their published formats ---

TEST(Readers, MrpcTsvWithBomAndHeader) {
  auto r = read_all(kData / "glue/MRPC/dev.tsv");
  ASSERT_EQ(r.records.size(), 408u);
  EXPECT_EQ(r.counters.total_skipped(), 0);
  const auto& first = r.records[0].fields;
  EXPECT_TRUE(first.contains("Quality"));  // the BOM is not part of the first column's name
  EXPECT_EQ(
      first["#1 String"],
      "He said the foodservice pie business doesn't fit the company's long-term growth strategy.");
  EXPECT_TRUE(first.contains("#2 String"));
}

TEST(Readers, QnliAndStsbTsv) {
  auto q = read_all(kData / "glue/QNLI/dev.tsv");
  EXPECT_EQ(q.records.size(), 5463u);
  EXPECT_EQ(q.counters.total_skipped(), 0);
  EXPECT_EQ(q.records[0].fields["question"],
            "What came into force after the new constitution was herald?");
  auto s = read_all(kData / "glue/STS-B/dev.tsv");
  EXPECT_EQ(s.records.size(), 1500u);
  EXPECT_EQ(s.records[0].fields["sentence2"], "A man wearing a hard hat is dancing.");
  EXPECT_EQ(s.records[1499].row, 1499);
}

TEST(Readers, AgNewsCsvWithoutHeader) {
  ReadOptions o;
  o.columns = {"label", "title", "description"};
  o.header_hints = {"text", "title", "description"};  // none is in the first row: no header
  auto r = read_all(kData / "ag_news/test.csv", o);
  ASSERT_EQ(r.records.size(), 7600u);
  EXPECT_EQ(r.counters.total_skipped(), 0);
  EXPECT_EQ(r.records[0].fields["label"], "3");
  EXPECT_EQ(r.records[0].fields["title"], "Fears for T N pension after talks");
}

TEST(Readers, SuperGlueJsonLines) {
  EXPECT_EQ(read_all(kData / "superglue_cb/val.jsonl").records.size(), 56u);
  EXPECT_EQ(read_all(kData / "superglue_cb/train.jsonl").records.size(), 250u);
  auto rte = read_all(kData / "superglue_rte/val.jsonl");
  ASSERT_EQ(rte.records.size(), 277u);
  EXPECT_TRUE(rte.records[0].fields["premise"].is_string());
  EXPECT_TRUE(rte.records[0].fields["hypothesis"].is_string());
  EXPECT_EQ(read_all(kData / "superglue_rte/train.jsonl").records.size(), 2490u);
}

TEST(Readers, TweetEvalText) {
  auto r = read_all(kData / "tweet_eval/datasets/emotion/val_text.txt");
  EXPECT_EQ(r.records.size(), 374u);
  EXPECT_EQ(read_all(kData / "tweet_eval/datasets/emotion/test_text.txt").records.size(), 1421u);
}

TEST(Readers, Sst2StsaAsTextLines) {
  // "<label> <tokenized sentence>" per line: plain text, one record per line.
  ReadOptions o;
  o.format = Format::kText;
  auto r = read_all(kData / "sst2_stsa/stsa.binary.dev", o);
  ASSERT_EQ(r.records.size(), 872u);
  EXPECT_EQ(r.records[0].fields["text"], "0 one long string of cliches .");
}

TEST(Readers, WikiTextLinesAndParagraphs) {
  auto lines = read_all(kData / "wikitext2_tokens/valid.txt");
  // 3760 lines, of which the blank ones are separators.
  int64_t non_blank = 0;
  {
    std::ifstream in(kData / "wikitext2_tokens/valid.txt");
    std::string l;
    while (std::getline(in, l)) non_blank += l.find_first_not_of(" \t\r") != std::string::npos;
  }
  EXPECT_EQ(static_cast<int64_t>(lines.records.size()), non_blank);
  EXPECT_EQ(lines.records[0].fields["text"], " = Homarus gammarus = ");
  ReadOptions para;
  para.text_mode = TextMode::kParagraphs;
  auto paragraphs = read_all(kData / "wikitext2_tokens/valid.txt", para);
  EXPECT_GT(paragraphs.records.size(), 0u);
  EXPECT_LE(paragraphs.records.size(), lines.records.size());
}

// --- the Parquet samples: four encodings each ---

TEST(Readers, ParquetSamplesInEveryEncoding) {
  struct Case {
    const char* dir;
    size_t rows;
    const char* column;
  };
  for (const Case& c : {Case{"sst2", 872, "sentence"}, Case{"super_glue-cb", 56, "premise"},
                        Case{"super_glue-rte", 277, "hypothesis"}}) {
    for (const char* file :
         {"validation-00000-of-00001.parquet", "validation.zstd-rg64.parquet",
          "validation.gzip-plain-v2.parquet", "validation.uncompressed.parquet"}) {
      SCOPED_TRACE(std::string(c.dir) + "/" + file);
      auto r = read_all(kData / "parquet" / c.dir / file);
      ASSERT_EQ(r.records.size(), c.rows);
      EXPECT_EQ(r.declared, static_cast<int64_t>(c.rows));
      EXPECT_TRUE(r.records[c.rows - 1].fields[c.column].is_string());
      EXPECT_EQ(r.records[c.rows - 1].row, static_cast<int64_t>(c.rows) - 1);
    }
  }
  // Same rows as the JSON Lines original.
  auto pq = read_all(kData / "parquet/super_glue-rte/validation.zstd-rg64.parquet");
  auto jl = read_all(kData / "superglue_rte/val.jsonl");
  ASSERT_EQ(pq.records.size(), jl.records.size());
  for (size_t i = 0; i < pq.records.size(); ++i) {
    EXPECT_EQ(pq.records[i].fields["premise"], jl.records[i].fields["premise"]);
  }
  auto sst = read_all(kData / "parquet/sst2/validation.gzip-plain-v2.parquet");
  EXPECT_EQ(sst.records[0].fields["sentence"], "one long string of cliches .");
}

TEST(Readers, ParquetColumnProjection) {
  ReadOptions o;
  o.wanted_columns = {"sentence"};
  auto r = read_all(kData / "parquet/sst2/validation-00000-of-00001.parquet", o);
  ASSERT_EQ(r.records.size(), 872u);
  EXPECT_EQ(r.records[0].fields.size(), 1u);
}

// Every file of apache/parquet-testing: those pyarrow reads give the same row count (string columns
// readable), the others a clear Error; nothing crashes.
TEST(Readers, ParquetTestingSuite) {
  std::ifstream in(fs::path(MOETRACE_SOURCE_DIR) / "tests/datasets/parquet_testing_expected.tsv");
  ASSERT_TRUE(in);
  std::string line;
  int ok = 0, errors = 0, string_files = 0;
  while (std::getline(in, line)) {
    if (line.empty() || line[0] == '#') continue;
    std::istringstream ls(line);
    std::string rel, status, rows, strings;
    std::getline(ls, rel, '\t');
    std::getline(ls, status, '\t');
    std::getline(ls, rows, '\t');
    std::getline(ls, strings, '\t');
    SCOPED_TRACE(rel);
    const fs::path path = kData / "parquet-testing" / rel;
    if (status == "ok") {
      ReadOptions o;
      std::vector<std::string> cols;
      for (size_t b = 0; !strings.empty() && b <= strings.size();) {
        size_t e = strings.find('|', b);
        if (e == std::string::npos) e = strings.size();
        cols.push_back(strings.substr(b, e - b));
        b = e + 1;
      }
      o.wanted_columns = cols;
      if (cols.empty()) {
        // No string column: the file must still open; its other columns read without a crash.
        try {
          open_records(path, o);
        } catch (const Error& e) {
          ADD_FAILURE() << e.what();
        }
        try {
          read_some(path, 500);
        } catch (const Error&) {
        }
        ++ok;
        continue;
      }
      ++string_files;
      try {
        auto r = read_all(path, o);
        EXPECT_EQ(static_cast<int64_t>(r.records.size()) + r.counters.total_skipped(),
                  std::stoll(rows));
        EXPECT_TRUE(r.records.empty() || r.records[0].fields.contains(cols[0]));
      } catch (const Error& e) {
        ADD_FAILURE() << e.what();
      }
      // All columns, whatever their types: no crash, rows or a clear Error.
      try {
        read_some(path, 500);
      } catch (const Error&) {
      }
      ++ok;
    } else {
      EXPECT_THROW(read_all(path), Error);
      ++errors;
    }
  }
  EXPECT_GE(ok, 70);
  EXPECT_GE(string_files, 20);
  EXPECT_GE(errors, 7);
}

TEST(Readers, BadDataGivesErrorNamingTheFile) {
  try {
    read_all(kData / "parquet-testing/bad_data/PARQUET-1481.parquet");
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("PARQUET-1481.parquet"), std::string::npos);
  }
}

TEST(Readers, TruncatedParquetIsAnError) {
  std::string bytes = slurp(kData / "parquet/sst2/validation-00000-of-00001.parquet");
  for (size_t keep : {bytes.size() / 2, bytes.size() - 3, size_t{0}, size_t{7}}) {
    auto p = temp_file("truncated.parquet", bytes.substr(0, keep));
    EXPECT_THROW(read_all(p), Error) << keep;
    fs::remove(p);
  }
  // Corrupt page data in the middle.
  std::string corrupt = bytes;
  for (size_t i = 100; i < 4000; i += 7) corrupt[i] = static_cast<char>(corrupt[i] ^ 0x5a);
  auto p = temp_file("corrupt.parquet", corrupt);
  try {
    read_all(p);
  } catch (const Error&) {
  }
  fs::remove(p);
}

// --- CSV details ---

TEST(Readers, CsvQuotingCrlfBomAndRaggedRows) {
  const std::string csv =
      "\xEF\xBB\xBFid,text\r\n"
      "1,\"hello, \"\"world\"\"\"\r\n"
      "2,\"two\r\nlines\"\r\n"
      "\r\n"
      "3,ragged,row\r\n"
      "4,plain\r\n"
      "5,\"unterminated";
  auto r = read_bytes(csv, Format::kCsv);
  ASSERT_EQ(r.records.size(), 3u);
  EXPECT_EQ(r.records[0].fields["text"], "hello, \"world\"");
  EXPECT_EQ(r.records[1].fields["text"], "two\r\nlines");
  EXPECT_EQ(r.records[2].fields["id"], "4");
  EXPECT_EQ(r.records[2].row, 3);  // the ragged row keeps its number
  EXPECT_EQ(r.counters.skipped.at("ragged row"), 1);
  EXPECT_EQ(r.counters.skipped.at("unterminated quote"), 1);
}

TEST(Readers, CsvHeaderDetection) {
  ReadOptions o;
  o.header_hints = {"text"};
  o.columns = {"label", "text"};
  auto with = read_bytes("label,text\n1,a\n", Format::kCsv, o);
  ASSERT_EQ(with.records.size(), 1u);
  EXPECT_EQ(with.records[0].fields["text"], "a");
  auto without = read_bytes("1,a\n2,b\n", Format::kCsv, o);
  ASSERT_EQ(without.records.size(), 2u);
  EXPECT_EQ(without.records[0].fields["text"], "a");
  EXPECT_EQ(without.records[0].row, 0);
}

TEST(Readers, InvalidUtf8RowsAreSkipped) {
  auto csv =
      read_bytes("text\nfine\nbad \xff\xfe\nover\xC0\xAFlong\nok \xE2\x82\xAC\n", Format::kCsv);
  ASSERT_EQ(csv.records.size(), 2u);
  EXPECT_EQ(csv.counters.skipped.at("invalid UTF-8"), 2);
  auto jl = read_bytes("{\"text\": \"a\"}\n{\"text\": \"\xff\"}\n", Format::kJsonLines);
  EXPECT_EQ(jl.records.size(), 1u);
  EXPECT_EQ(jl.counters.skipped.at("invalid UTF-8"), 1);
  auto txt = read_bytes("a\n\xed\xa0\x80 surrogate\nb\n", Format::kText);
  EXPECT_EQ(txt.records.size(), 2u);
}

TEST(Readers, HugeRowIsSkipped) {
  const std::string big(10 << 20, 'x');  // a 10 MB row
  auto csv = read_bytes("text\nsmall\n" + big + "\nafter\n", Format::kCsv);
  ASSERT_EQ(csv.records.size(), 2u);
  EXPECT_EQ(csv.records[1].fields["text"], "after");
  EXPECT_EQ(csv.counters.skipped.at("too large"), 1);
  auto jl = read_bytes("{\"text\": \"" + big + "\"}\n{\"text\": \"after\"}\n", Format::kJsonLines);
  ASSERT_EQ(jl.records.size(), 1u);
  EXPECT_EQ(jl.counters.skipped.at("too large"), 1);
  auto commas = read_bytes("text\n" + std::string(10 << 20, ',') + "\nafter\n", Format::kCsv);
  ASSERT_EQ(commas.records.size(), 1u);
  EXPECT_EQ(commas.counters.skipped.at("too large"), 1);
  auto txt = read_bytes(big + "\nafter\n", Format::kText);
  ASSERT_EQ(txt.records.size(), 1u);
  EXPECT_EQ(txt.records[0].row, 1);
}

TEST(Readers, EmptyFiles) {
  for (Format f : {Format::kCsv, Format::kTsv, Format::kJsonLines, Format::kText}) {
    EXPECT_EQ(read_bytes("", f).records.size(), 0u);
  }
  auto p = temp_file("empty.parquet", "");
  EXPECT_THROW(read_all(p), Error);
  fs::remove(p);
}

// --- JSON ---

TEST(Readers, JsonArraysAndBadLines) {
  auto arr = read_bytes(" [ {\"a\": \"x, ]\"}, {\"a\": [1, {\"b\": 2}]} ,\"plain\", 5 ]",
                        Format::kJsonLines);
  ASSERT_EQ(arr.records.size(), 3u);
  EXPECT_EQ(arr.records[0].fields["a"], "x, ]");
  EXPECT_EQ(arr.records[2].fields["text"], "plain");
  EXPECT_EQ(arr.counters.skipped.at("not a JSON object"), 1);
  auto jl = read_bytes("{\"a\": 1}\n{broken\n\n[1]\n{\"a\": 2}", Format::kJsonLines);
  ASSERT_EQ(jl.records.size(), 2u);
  EXPECT_EQ(jl.records[1].row, 3);
  EXPECT_EQ(jl.counters.skipped.at("invalid JSON"), 1);
  auto deep = read_bytes(std::string(100000, '[') + "\n{\"a\": 1}\n", Format::kJsonLines);
  EXPECT_EQ(deep.records.size(), 0u);  // one array, too deep: skipped, no stack overflow
}

// --- compression ---

TEST(Readers, GzipAndZstdCompressedFiles) {
  const std::string raw = slurp(kData / "superglue_cb/val.jsonl");
  // gzip
  const fs::path gz = fs::temp_directory_path() / "mt_readers_cb.jsonl.gz";
  gzFile g = gzopen(gz.c_str(), "wb");
  ASSERT_NE(g, nullptr);
  gzwrite(g, raw.data(), static_cast<unsigned>(raw.size()));
  gzclose(g);
  EXPECT_EQ(read_all(gz).records.size(), 56u);
  // zstd
  std::string z(ZSTD_compressBound(raw.size()), '\0');
  z.resize(ZSTD_compress(z.data(), z.size(), raw.data(), raw.size(), 3));
  const fs::path zst = temp_file("cb.jsonl.zst", z);
  EXPECT_EQ(read_all(zst).records.size(), 56u);
  // truncated compressed data is a clear error
  const fs::path cut = temp_file("cut.jsonl.zst", z.substr(0, z.size() / 2));
  EXPECT_THROW(read_all(cut), Error);
  const std::string gz_bytes = slurp(gz);
  const fs::path gcut = temp_file("cut.jsonl.gz", gz_bytes.substr(0, gz_bytes.size() / 2));
  EXPECT_THROW(read_all(gcut), Error);
  for (const auto& p : {gz, zst, cut, gcut}) fs::remove(p);
}

TEST(Readers, FormatFromName) {
  EXPECT_EQ(format_from_name("a/train-00000-of-00002.parquet"), Format::kParquet);
  EXPECT_EQ(format_from_name("x.jsonl.gz"), Format::kJsonLines);
  EXPECT_EQ(format_from_name("x.TSV.zst"), Format::kTsv);
  EXPECT_EQ(format_from_name("README.md"), Format::kAuto);
  EXPECT_THROW(open_records("README.md", {}), Error);
}

TEST(Readers, Utf8Validation) {
  EXPECT_TRUE(valid_utf8("plain ascii"));
  EXPECT_TRUE(valid_utf8("\xE2\x82\xAC \xF0\x9F\x98\x80"));
  EXPECT_FALSE(valid_utf8("\xC0\xAF"));          // overlong
  EXPECT_FALSE(valid_utf8("\xED\xA0\x80"));      // surrogate
  EXPECT_FALSE(valid_utf8("\xF4\x90\x80\x80"));  // above U+10FFFF
  EXPECT_FALSE(valid_utf8("\xE2\x82"));          // truncated
}

}  // namespace
}  // namespace moetrace::data
