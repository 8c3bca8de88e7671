// The safetensors format as moefold writes and reads it (interop/safetensors.hpp): the exact
// bytes of a small file, a round trip of every dtype, and a clear refusal of each kind of
// malformed file.

#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "moefold/interop/safetensors.hpp"
#include "support/catch.hpp"
#include "support/error_of.hpp"

using namespace moefold;
using moefold::test::error_of;
namespace fs = std::filesystem;

namespace {

fs::path scratch_file(std::string const& name) {
  auto const dir =
      fs::temp_directory_path() / ("moefold_safetensors_" + std::to_string(::getpid()));
  fs::create_directories(dir);
  return dir / name;
}

void write_bytes(fs::path const& p, std::string const& bytes) {
  std::ofstream(p, std::ios::binary)
      .write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

/// A file: the 8-byte little-endian length of `header`, `header`, then `data`.
std::string file_of(std::string const& header, std::string const& data) {
  std::string out(8, '\0');
  std::uint64_t const n = header.size();
  for (int k = 0; k < 8; ++k) out[static_cast<std::size_t>(k)] = static_cast<char>(n >> (8 * k));
  return out + header + data;
}

std::string open_error(std::string const& bytes) {
  auto const p = scratch_file("bad.safetensors");
  write_bytes(p, bytes);
  return error_of([&] { SafetensorsFile::open(p); });
}

}  // namespace

TEST_CASE(
    "a safetensors file is the header length, the sorted JSON header padded to 8 bytes, "
    "and the raw little-endian data in name order",
    "[interop][safetensors]") {
  SafetensorsWriter w;
  std::vector<float> const b{1.0f, -2.0f};
  std::vector<std::int32_t> const a{7};
  w.add("b", {2}, std::span<float const>(b));
  w.add("a", {}, std::span<std::int32_t const>(a));  // a scalar
  auto const bytes = w.bytes();
  std::string const header =
      R"({"__metadata__":{"format":"pt"},"a":{"data_offsets":[0,4],"dtype":"I32","shape":[]},)"
      R"("b":{"data_offsets":[4,12],"dtype":"F32","shape":[2]}})";
  std::string const padded = header + std::string((8 - header.size() % 8) % 8, ' ');
  // data: int32 7, float 1.0 (0x3f800000), float −2.0 (0xc0000000), little-endian
  std::string const data("\x07\x00\x00\x00\x00\x00\x80\x3f\x00\x00\x00\xc0", 12);
  CHECK(std::string(bytes.begin(), bytes.end()) == file_of(padded, data));
  CHECK((8 + padded.size()) % 8 == 0);
}

TEST_CASE("every dtype survives a write and a read, shapes and metadata too",
          "[interop][safetensors]") {
  SafetensorsWriter w;
  std::vector<float> const f32{1.5f, -0.0f, 3.25e-8f, 1e30f, -7.0f, 0.1f};
  std::vector<double> const f64{0.1, -1e300};
  std::vector<bf16> const b16{bf16(1.0f), bf16(-3.5f), bf16(0.15625f)};
  std::vector<std::int64_t> const i64{-5, std::int64_t{1} << 40};
  std::vector<std::uint8_t> const u8{0, 255};
  w.add("x.f32", {2, 3}, std::span<float const>(f32));
  w.add("x.f64", {2}, std::span<double const>(f64));
  w.add("x.bf16", {3, 1}, std::span<bf16 const>(b16));
  w.add("x.i64", {2}, std::span<std::int64_t const>(i64));
  w.add("x.u8", {1, 2}, std::span<std::uint8_t const>(u8));
  w.metadata()["source"] = "moefold";
  auto const p = scratch_file("all.safetensors");
  w.write(p);
  auto const f = SafetensorsFile::open(p);
  CHECK(f.names() == std::vector<std::string>{"x.bf16", "x.f32", "x.f64", "x.i64", "x.u8"});
  CHECK(f.metadata().at("format") == "pt");
  CHECK(f.metadata().at("source") == "moefold");
  CHECK(f.entry("x.f32").shape == std::vector<std::int64_t>{2, 3});
  CHECK(f.entry("x.bf16").dtype == DType::bf16);
  CHECK(f.read<float>("x.f32") == f32);
  CHECK(f.read<double>("x.f64") == f64);
  CHECK(f.read<float>("x.bf16") == std::vector<float>{1.0f, -3.5f, 0.15625f});
  CHECK(f.read<std::int64_t>("x.i64") == i64);
  CHECK(f.read<std::uint8_t>("x.u8") == u8);
  CHECK(f.read<double>("x.f32")[2] == double(3.25e-8f));  // converted on read
  CHECK(error_of([&] { f.entry("x.f16"); }).find("has no tensor 'x.f16'") != std::string::npos);
}

TEST_CASE("malformed safetensors files are refused, naming what is wrong",
          "[interop][safetensors][errors]") {
  std::string const ok_entry = R"("t":{"dtype":"F32","shape":[2],"data_offsets":[0,8]})";
  std::string const eight(8, '\0');
  struct Case {
    std::string what, bytes, message;
  };
  std::vector<Case> const cases{
      {"shorter than the length field", std::string(5, '\0'),
       "is truncated: 5 bytes, fewer than the 8 of the header length"},
      {"a header length past the end", file_of("{}", "").substr(0, 8) + "{",
       "has a truncated header: its length says 2 bytes but 1 follow"},
      {"a header that is not JSON", file_of("{\"t\":", ""), "has a header that is not JSON"},
      {"a header that is a list", file_of("[1,2]", ""), "has a header that is not a JSON object"},
      {"an unknown dtype",
       file_of(R"({"t":{"dtype":"F8_E4M3","shape":[2],"data_offsets":[0,2]}})", "ab"),
       "tensor 't': unknown dtype 'F8_E4M3' (moefold reads F32, F64, BF16, I32, I64, U8)"},
      {"offsets past the data", file_of("{" + ok_entry + "}", "1234"),
       "tensor 't': data_offsets [0, 8) out of range: the data section has 4 bytes"},
      {"offsets reversed",
       file_of(R"({"t":{"dtype":"F32","shape":[0],"data_offsets":[8,0]}})", eight),
       "data_offsets [8, 0) out of range"},
      {"a shape that disagrees with its bytes",
       file_of(R"({"t":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", eight),
       "data_offsets [0, 8) hold 8 bytes but shape [3] of F32 needs 12"},
      {"a negative extent",
       file_of(R"({"t":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}})", eight),
       "shape [-2] is not of sizes >= 0"},
      {"a missing field", file_of(R"({"t":{"dtype":"F32","shape":[2]}})", eight),
       "tensor 't': needs an object with dtype, shape and data_offsets"},
      {"overlapping tensors",
       file_of("{" + ok_entry + R"(,"u":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})", eight),
       "has overlapping tensors"},
      {"a gap", file_of(R"({"t":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})", eight),
       "has a gap: data bytes [0, 4) belong to no tensor"},
      {"trailing bytes", file_of("{" + ok_entry + "}", eight + "xy"),
       "has 10 data bytes but its tensors cover [0, 8)"},
      {"metadata that is not text", file_of(R"({"__metadata__":{"format":1}})", ""),
       "has __metadata__ 'format' that is not a string"},
  };
  for (auto const& c : cases) {
    INFO(c.what);
    auto const e = open_error(c.bytes);
    CHECK(e.find("safetensors file ") == 0);
    CHECK(e.find(c.message) != std::string::npos);
  }
  // A valid file of the same pieces opens.
  CHECK(open_error(file_of("{" + ok_entry + "}", eight)) == "no error");
}

TEST_CASE("the writer refuses a tensor whose bytes do not fill its shape, or a name twice",
          "[interop][safetensors][errors]") {
  SafetensorsWriter w;
  std::vector<float> const three{1, 2, 3};
  CHECK(error_of([&] {
          w.add("t", {2, 2}, std::span<float const>(three));
        }).find("tensor 't' of shape [2, 2] F32 needs 16 bytes, got 12") != std::string::npos);
  w.add("t", {3}, std::span<float const>(three));
  CHECK(error_of([&] {
          w.add("t", {3}, std::span<float const>(three));
        }).find("tensor 't' is added twice") != std::string::npos);
}
