// The restricted unpickler on hand-written opcode streams.
#include "io/pickle.h"

#include <gtest/gtest.h>

#include "io/io_test_util.h"

namespace moetrace {
namespace {

using testing::expect_error;

Pickle parse(const std::string& bytes) { return Pickle::parse(bytes, "test.pkl"); }

// A literal with embedded NULs, whole.
template <size_t N>
std::string bytes(const char (&s)[N]) {
  return std::string(s, N - 1);
}

TEST(Pickle, ScalarsAndContainers) {
  // {"a": [1, -2, 70000, True, None, 0.5, "x", b"yz", (), -129]}, protocol 2.
  const std::string p = bytes(
                            "\x80\x02}q\x00X\x01\x00\x00\x00"
                            "a]q\x01(K\x01J\xfe\xff\xff\xff") +
                        bytes("J\x70\x11\x01\x00\x88NG\x3f\xe0\x00\x00\x00\x00\x00\x00") +
                        bytes(
                            "\x8c\x01x"
                            "C\x02yz)\x8a\x02\x7f\xfe"
                            "h\x01\x8a\x00"
                            "es.");
  Pickle pk = parse(p);
  const PickleValue* root = pk.root();
  ASSERT_EQ(root->kind, PickleValue::Kind::kDict);
  ASSERT_EQ(root->items.size(), 2u);
  EXPECT_EQ(root->items[0]->s, "a");
  const PickleValue* list = root->items[1];
  ASSERT_EQ(list->kind, PickleValue::Kind::kList);
  ASSERT_EQ(list->items.size(), 12u);
  EXPECT_EQ(list->items[0]->i, 1);
  EXPECT_EQ(list->items[1]->i, -2);
  EXPECT_EQ(list->items[2]->i, 70000);
  EXPECT_EQ(list->items[3]->kind, PickleValue::Kind::kBool);
  EXPECT_EQ(list->items[4]->kind, PickleValue::Kind::kNone);
  EXPECT_EQ(list->items[5]->f, 0.5);
  EXPECT_EQ(list->items[6]->s, "x");
  EXPECT_EQ(list->items[7]->kind, PickleValue::Kind::kBytes);
  EXPECT_EQ(list->items[8]->kind, PickleValue::Kind::kTuple);
  EXPECT_EQ(list->items[9]->i, -385);  // LONG1 0x7f 0xfe
  EXPECT_EQ(list->items[10], list);    // BINGET 1: the list itself (a cycle is fine)
  EXPECT_EQ(list->items[11]->i, 0);
}

TEST(Pickle, RejectsGlobalsOutsideTheAllowedList) {
  expect_error(
      [] {
        parse(
            "\x80\x02"
            "cos\nsystem\n"
            "X\x02\x00\x00\x00ls\x85R.");
      },
      {"test.pkl", "'os.system'"});
  expect_error(
      [] {
        parse(
            "\x80\x02"
            "cposix\nsystem\n.");
      },
      {"'posix.system'"});
  expect_error(
      [] {
        parse(
            "\x80\x02"
            "cbuiltins\neval\n.");
      },
      {"'builtins.eval'"});
  expect_error(
      [] {
        parse(
            "\x80\x02"
            "ctorch\nload\n.");
      },
      {"'torch.load'"});
  expect_error(
      [] {
        parse(
            "\x80\x02"
            "ctorch._utils\n_rebuild_device_tensor_from_numpy\n.");
      },
      {"'torch._utils._rebuild_device_tensor_from_numpy'"});
  // STACK_GLOBAL (protocol 4) goes through the same check.
  expect_error(
      [] {
        parse(
            "\x80\x04\x8c\x08"
            "builtins\x8c\x04"
            "exec\x93.");
      },
      {"'builtins.exec'"});
}

TEST(Pickle, AllowedGlobalsAreNotCallableBeyondTheirRole) {
  // A storage class used as a function.
  expect_error(
      [] {
        parse(
            "\x80\x02"
            "ctorch\nFloatStorage\n)R.");
      },
      {"cannot be called"});
  // OrderedDict with arguments.
  expect_error(
      [] {
        parse(
            "\x80\x02"
            "ccollections\nOrderedDict\n]\x85R.");
      },
      {"OrderedDict"});
  // A persistent id that is not a storage tuple.
  expect_error([] { parse("\x80\x02K\x01Q."); }, {"persistent id"});
}

TEST(Pickle, MalformedStreams) {
  expect_error([] { parse(""); }, {"test.pkl", "without STOP"});
  expect_error([] { parse("\x80\x02}"); }, {"without STOP"});
  expect_error([] { parse("\x80\x02."); }, {"STOP with 0 values"});
  expect_error([] { parse("\x80\x02K\x01K\x02."); }, {"STOP with 2 values"});
  expect_error([] { parse("\x80\x02h\x05."); }, {"memo key 5"});
  expect_error(
      [] {
        parse(
            "\x80\x02X\xff\xff\xff\x7f"
            "abc.");
      },
      {"passes the end"});
  expect_error([] { parse("\x80\x02I1\n."); }, {"unsupported pickle opcode 'I'"});
  expect_error([] { parse("\x80\x02t."); }, {"MARK"});
  expect_error([] { parse("\x80\x02(K\x01s."); }, {"opcode 's' needs a value"});
  expect_error(
      [] {
        parse(
            "\x80\x02K\x01K\x02"
            "a.");
      },
      {"APPEND on a int"});
  expect_error([] { parse("\x80\x09."); }, {"protocol 9"});
  expect_error([] { parse("\x80\x02N0."); }, {"STOP with 0 values"});
  expect_error(
      [] {
        parse(
            "\x80\x02"
            "0.");
      },
      {"POP on an empty stack"});
  // POP under a MARK removes the MARK, never values below it.
  EXPECT_EQ(parse("\x80\x02K\x07(0.").root()->i, 7);
  expect_error([] { parse("\x80\x02K\x07(0t."); }, {"needs a MARK"});
  expect_error(
      [] {
        parse(
            "\x80\x02\x8a\x09"
            "123456789.");
      },
      {"64 bits"});
}

}  // namespace
}  // namespace moetrace
