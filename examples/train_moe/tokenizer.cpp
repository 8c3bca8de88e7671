#include "tokenizer.hpp"

#include <map>
#include <memory>
#include <mutex>
#include <string_view>
#include <utility>
#include <vector>

#include <fmt/format.h>

#include "moefold/core/error.hpp"

#if MOEFOLD_TRAIN_HAS_SENTENCEPIECE
#include <sentencepiece_processor.h>
#endif

namespace moefold::train_demo {

namespace {
#if !MOEFOLD_TRAIN_HAS_SENTENCEPIECE
[[noreturn]] void no_sentencepiece() {
  throw invalid_config(fmt::format(
      "--tokenizer-type {}: this build of moefold-train has no SentencePiece (install Debian's "
      "libsentencepiece-dev and reconfigure)",
      kSentencePiece));
}
#else
std::unique_ptr<sentencepiece::SentencePieceProcessor> load_model(std::string const& file) {
  auto sp = std::make_unique<sentencepiece::SentencePieceProcessor>();
  if (auto const status = sp->Load(file); !status.ok())
    throw invalid_config(fmt::format("--tokenizer-model {}: not a SentencePiece model ({})", file,
                                     status.ToString()));
  return sp;
}
#endif
}  // namespace

bool has_sentencepiece() noexcept { return MOEFOLD_TRAIN_HAS_SENTENCEPIECE != 0; }

int sentencepiece_vocab_size([[maybe_unused]] std::string const& file) {
#if MOEFOLD_TRAIN_HAS_SENTENCEPIECE
  return load_model(file)->GetPieceSize();
#else
  no_sentencepiece();
#endif
}

TextCorpus load_corpus(TrainOptions const& o) {
  if (o.tokenizer_type != kSentencePiece) return TextCorpus::load(data_path_of(o));
#if MOEFOLD_TRAIN_HAS_SENTENCEPIECE
  // In-process ranks are threads: the first encodes, the others copy.
  static std::mutex mutex;
  static std::map<std::pair<std::string, std::string>, TextCorpus> done;
  std::lock_guard lock(mutex);
  auto const key = std::pair(data_path_of(o), o.tokenizer_model);
  if (auto it = done.find(key); it != done.end()) return it->second;
  auto const sp = load_model(o.tokenizer_model);
  auto corpus = TextCorpus::load(data_path_of(o)).tokenized([&](std::string_view text) {
    std::vector<int> ids;
    if (auto const status = sp->Encode(text, &ids); !status.ok())
      throw error(errc::invalid_argument,
                  fmt::format("SentencePiece could not encode the corpus: {}", status.ToString()));
    return std::vector<std::int32_t>(ids.begin(), ids.end());
  });
  return done.emplace(key, std::move(corpus)).first->second;
#else
  no_sentencepiece();
#endif
}

}  // namespace moefold::train_demo
