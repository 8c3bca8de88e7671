// AdamW against a hand-computed update, the learning-rate schedule, and the text corpus's
// deterministic sequences and unigram entropy.

#include <cmath>
#include <string>
#include <string_view>
#include <vector>

#include "moefold/train/adamw.hpp"
#include "moefold/train/lr_schedule.hpp"
#include "moefold/train/text_corpus.hpp"
#include "support/catch.hpp"
#include "support/exec.hpp"

using namespace moefold;

TEST_CASE("AdamW makes the bias-corrected, decoupled-decay update, 1-D parameters get no decay") {
  Param<double> w = Param<double>::whole("w", ParamClass::dense, 2, 1);
  Param<double> b = Param<double>::whole("b", ParamClass::tp_replicated, 1, 2);
  w.value = {1.0, -2.0};
  b.value = {0.5, 0.5};
  w.grad = {0.1, -0.3};
  b.grad = {0.2, 0.0};
  AdamW<test::Exec, double> opt({&w, &b},
                                {.beta1 = 0.9, .beta2 = 0.99, .eps = 1e-8, .weight_decay = 0.1});
  opt.step(0.01);
  // First step: m̂ = g, v̂ = g², so the step is lr·g/(|g| + eps) = ±lr.
  CHECK(w.value[0] == Approx(1.0 - 0.01 * 0.1 * 1.0 - 0.01 * 0.1 / (0.1 + 1e-8)).epsilon(1e-14));
  CHECK(w.value[1] == Approx(-2.0 + 0.01 * 0.1 * 2.0 + 0.01 * 0.3 / (0.3 + 1e-8)).epsilon(1e-14));
  CHECK(b.value[0] == Approx(0.5 - 0.01 * 0.2 / (0.2 + 1e-8)).epsilon(1e-14));  // no decay
  CHECK(b.value[1] == 0.5);                                                      // zero grad
  CHECK(opt.steps() == 1);
}

TEST_CASE("the learning rate warms up linearly and decays along a cosine to min_lr") {
  LrSchedule const s{.lr = 1.0, .min_lr = 0.1, .warmup_iters = 10, .decay_iters = 110};
  CHECK(s.at(1) == Approx(0.1));
  CHECK(s.at(10) == Approx(1.0));
  CHECK(s.at(60) == Approx(0.55));  // half-way through the decay
  CHECK(s.at(110) == Approx(0.1));
  CHECK(s.at(500) == Approx(0.1));
}

TEST_CASE("the corpus gives the same sequences for the same index and its unigram entropy") {
  std::string text;
  for (int i = 0; i < 500; ++i) text += "abcd";
  auto const c = TextCorpus::from_text(text, 0.1);
  CHECK(c.split_size(Split::train) == 1800);
  CHECK(c.split_size(Split::validation) == 200);
  auto const a = c.sequence(Split::train, 5, 16, 1);
  CHECK(a.size() == 17);
  CHECK(a == c.sequence(Split::train, 5, 16, 1));
  CHECK(a != c.sequence(Split::train, 6, 16, 1));
  for (std::size_t i = 1; i < a.size(); ++i) CHECK((a[i] - a[i - 1] == 1 || a[i] - a[i - 1] == -3));
  CHECK(c.unigram_entropy() == Approx(std::log(4.0)));
  CHECK_THROWS_AS(c.sequence(Split::validation, 0, 500, 1), error);
}

TEST_CASE("a tokenized corpus encodes each split on its own and streams token ids",
          "[train][data][tokenizer]") {
  // Train "abcd"·450 (1800 bytes), validation "wxyz"·50 (200 bytes); the encoder makes one
  // token of every two bytes: 256·first + second.
  std::string text;
  for (int i = 0; i < 450; ++i) text += "abcd";
  for (int i = 0; i < 50; ++i) text += "wxyz";
  std::vector<std::size_t> encoded;  // the lengths the encoder saw
  auto const c = TextCorpus::from_text(text, 0.1).tokenized([&](std::string_view t) {
    encoded.push_back(t.size());
    std::vector<std::int32_t> ids;
    for (std::size_t i = 0; i + 1 < t.size(); i += 2) ids.push_back(256 * t[i] + t[i + 1]);
    return ids;
  });
  CHECK(encoded == std::vector<std::size_t>{1800, 200});
  CHECK(c.is_tokenized());
  CHECK(c.split_tokens(Split::train) == 900);
  CHECK(c.split_tokens(Split::validation) == 100);
  CHECK(c.bytes_per_token(Split::validation) == 2.0);
  CHECK(c.split_size(Split::train) == 1800);  // bytes stay bytes
  int const ab = 256 * 'a' + 'b', cd = 256 * 'c' + 'd', wx = 256 * 'w' + 'x', yz = 256 * 'y' + 'z';
  for (std::uint64_t i = 0; i < 20; ++i) {
    auto const t = c.sequence(Split::train, i, 8, 1), v = c.sequence(Split::validation, i, 8, 1);
    REQUIRE(t.size() == 9);
    for (std::size_t k = 0; k < t.size(); ++k) {
      CHECK((t[k] == ab || t[k] == cd));
      CHECK((v[k] == wx || v[k] == yz));
    }
  }
  CHECK_THROWS_WITH(c.sequence(Split::validation, 0, 100, 1),
                    Catch::Contains("the validation split has 100 tokens, too few for sequences "
                                    "of 100"));
}

TEST_CASE("a corpus file that cannot be read is named with the system's reason",
          "[train][data]") {
  // /proc/self/mem is a regular file whose read at offset 0 fails with EIO.
  CHECK_THROWS_WITH(TextCorpus::load("/proc/self/mem"),
                    Catch::Contains("cannot read '/proc/self/mem': Input/output error"));
  CHECK_THROWS_WITH(TextCorpus::load("/nonexistent/moefold/corpus"),
                    Catch::Contains("no text found at '/nonexistent/moefold/corpus'"));
}
