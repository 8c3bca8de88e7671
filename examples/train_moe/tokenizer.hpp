#pragma once
// The tokens moefold-train trains on: the bytes of the text (the default, vocabulary 256), or
// the ids of a SentencePiece model (--tokenizer-type GPTSentencePieceTokenizer --tokenizer-model
// FILE, Megatron's names), with the vocabulary padded to a multiple of
// --make-vocab-size-divisible-by · TP as Megatron pads it. SentencePiece is optional: a build
// without Debian's libsentencepiece-dev refuses the flag, saying so.

#include <cstdint>
#include <string>

#include "moefold/train/text_corpus.hpp"
#include "options.hpp"

namespace moefold::train_demo {

/// Megatron's name of the SentencePiece tokenizer.
inline constexpr char const* kSentencePiece = "GPTSentencePieceTokenizer";

/// True when this build can read SentencePiece models.
bool has_sentencepiece() noexcept;

/// The number of pieces of the SentencePiece model `file`; throws `invalid_config` naming the
/// file when it cannot be loaded, or when this build has no SentencePiece.
int sentencepiece_vocab_size(std::string const& file);

/// The corpus of the run: --data-path's bytes, or their SentencePiece tokens (each split
/// encoded on its own). Loaded and encoded once per process, copied per rank.
TextCorpus load_corpus(TrainOptions const& o);

}  // namespace moefold::train_demo
