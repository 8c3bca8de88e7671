#pragma once
/// \file
/// A byte-level text corpus for the training demo: the files of a directory (or one file)
/// concatenated in name order, split into train and validation bytes, with a deterministic
/// stream of fixed-length sequences that does not depend on the folding (DESIGN §3: step s
/// trains on sequences s·B … s·B+B−1 of one stream), and the byte-unigram entropy that a model
/// must beat. `tokenized` turns it into a corpus of tokens (e.g. SentencePiece's): the same
/// splits, each encoded on its own, and sequences of token ids.

#include <fmt/format.h>
#include <algorithm>
#include <array>
#include <cerrno>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <string_view>
#include <vector>

#include "moefold/core/error.hpp"
#include "moefold/core/init.hpp"

namespace moefold {
inline namespace v0 {

/// Which part of the corpus.
enum class Split : std::uint8_t { train, validation };

class TextCorpus {
 public:
  /// Reads `path`: a file, or every regular file of a directory whose name has no extension
  /// (the fortune files; `.dat` indexes and `.u8` links are skipped), in name order. The last
  /// `validation_fraction` of the bytes are the validation split.
  static TextCorpus load(std::filesystem::path const& path, double validation_fraction = 0.05) {
    namespace fs = std::filesystem;
    std::vector<fs::path> files;
    std::error_code ec;
    if (fs::is_directory(path, ec)) {
      for (auto const& entry : fs::directory_iterator(path, ec))
        if (entry.is_regular_file() && !entry.is_symlink() && !entry.path().has_extension())
          files.push_back(entry.path());
      std::sort(files.begin(), files.end());
    } else if (fs::is_regular_file(path, ec)) {
      files.push_back(path);
    }
    if (files.empty())
      throw error(errc::invalid_argument,
                  fmt::format("no text found at '{}' (install Debian's 'fortunes' package or pass "
                              "--data-path)",
                              path.string()));
    TextCorpus c;
    for (auto const& f : files) read_file(f, c.bytes_);
    c.files_ = files.size();
    c.train_end_ = static_cast<std::size_t>(static_cast<double>(c.bytes_.size()) * (1.0 - validation_fraction));
    return c;
  }
  /// Appends the bytes of `file` to `out`; throws naming the file and the system's reason.
  static void read_file(std::filesystem::path const& file, std::vector<unsigned char>& out) {
    std::FILE* fp = std::fopen(file.c_str(), "rb");
    if (!fp)
      throw error(errc::invalid_argument,
                  fmt::format("cannot read '{}': {}", file.string(), std::strerror(errno)));
    std::array<char, 1 << 16> buf;
    std::size_t n = 0;
    while ((n = std::fread(buf.data(), 1, buf.size(), fp)) > 0)
      out.insert(out.end(), buf.begin(), buf.begin() + static_cast<std::ptrdiff_t>(n));
    int const err = std::ferror(fp) ? errno : 0;
    std::fclose(fp);
    if (err != 0)
      throw error(errc::invalid_argument,
                  fmt::format("cannot read '{}': {}", file.string(), std::strerror(err)));
  }

  /// A corpus over the given text (for tests).
  static TextCorpus from_text(std::string const& text, double validation_fraction = 0.05) {
    TextCorpus c;
    c.bytes_.assign(text.begin(), text.end());
    c.files_ = 1;
    c.train_end_ = static_cast<std::size_t>(static_cast<double>(c.bytes_.size()) * (1.0 - validation_fraction));
    return c;
  }

  /// This corpus as tokens: `encode(text)` (a `std::vector<std::int32_t>` of ids for a
  /// `std::string_view`) of the train split and of the validation split, each on its own, so no
  /// token crosses the boundary. Sequences then hold token ids; the byte counts and the
  /// byte-unigram entropy stay those of the text.
  template <class Encode>
  TextCorpus tokenized(Encode&& encode) const {
    TextCorpus c = *this;
    auto const text = [this](std::size_t from, std::size_t to) {
      return std::string_view(reinterpret_cast<char const*>(bytes_.data()) + from, to - from);
    };
    c.tokens_ = encode(text(0, train_end_));
    c.token_train_end_ = c.tokens_.size();
    auto const validation = encode(text(train_end_, bytes_.size()));
    c.tokens_.insert(c.tokens_.end(), validation.begin(), validation.end());
    return c;
  }
  bool is_tokenized() const noexcept { return !tokens_.empty(); }
  /// The sequence elements of split `s`: its tokens, or its bytes.
  std::size_t split_tokens(Split s) const noexcept {
    if (!is_tokenized()) return split_size(s);
    return s == Split::train ? token_train_end_ : tokens_.size() - token_train_end_;
  }
  /// Bytes of text per sequence element of split `s` (1 for a byte-level corpus).
  double bytes_per_token(Split s) const noexcept {
    return static_cast<double>(split_size(s)) /
           static_cast<double>(std::max<std::size_t>(1, split_tokens(s)));
  }

  std::size_t size() const noexcept { return bytes_.size(); }
  std::size_t files() const noexcept { return files_; }
  std::size_t split_size(Split s) const noexcept {
    return s == Split::train ? train_end_ : bytes_.size() - train_end_;
  }

  /// Sequence `index` of the stream: `length + 1` consecutive bytes (or tokens; inputs and
  /// shifted targets) starting at a pseudo-random offset of the split, a function of (index,
  /// seed).
  std::vector<std::int32_t> sequence(Split s, std::uint64_t index, std::int64_t length,
                                     std::uint64_t seed) const {
    std::size_t const n = split_tokens(s);
    auto const span = static_cast<std::size_t>(length + 1);
    MOEFOLD_EXPECTS(n > span, "the {} split has {} {}, too few for sequences of {}",
                    s == Split::train ? "train" : "validation", n,
                    is_tokenized() ? "tokens" : "bytes", length);
    std::size_t const base =
        s == Split::train ? 0 : (is_tokenized() ? token_train_end_ : train_end_);
    std::uint64_t const r = detail::mix64(detail::mix64(seed ^ (s == Split::train ? 0x7a : 0x5b)) ^ index);
    std::size_t const start = base + static_cast<std::size_t>(r % (n - span));
    std::vector<std::int32_t> out(span);
    for (std::size_t i = 0; i < span; ++i)
      out[i] = is_tokenized() ? tokens_[start + i] : static_cast<std::int32_t>(bytes_[start + i]);
    return out;
  }

  /// The byte-unigram entropy of the train split in nats: the loss of a model that knows only
  /// byte frequencies.
  double unigram_entropy() const {
    std::array<double, 256> count{};
    for (std::size_t i = 0; i < train_end_; ++i) count[bytes_[i]] += 1;
    double h = 0;
    for (double c : count)
      if (c > 0) {
        double const p = c / static_cast<double>(train_end_);
        h -= p * std::log(p);
      }
    return h;
  }

 private:
  std::vector<unsigned char> bytes_;
  std::size_t files_ = 0;
  std::size_t train_end_ = 0;
  std::vector<std::int32_t> tokens_;  ///< with `tokenized`: train tokens, then validation ones
  std::size_t token_train_end_ = 0;
};

}  // namespace v0
}  // namespace moefold
