// What is specific to the in-process world's non-blocking all-to-all and peer reads:
// exchange_view copies nothing (the blocks are the peers' own send buffers), a started
// collective fails fast at wait() when a peer fails, a dropped handle fails the world naming
// the rank, and a failing callback still leaves the peers' buffers alone until they are done.

#include <chrono>
#include <cstdint>
#include <span>
#include <stdexcept>
#include <string>
#include <vector>

#include "moefold/comm/inproc/run.hpp"
#include "support/catch.hpp"

using namespace moefold;
using Catch::Matchers::Contains;
using namespace std::chrono_literals;

namespace {

/// Each rank sends `per_peer` floats to every rank; block d of rank q holds q·100 + d.
struct Uniform {
  std::int64_t per_peer;
  int size;
  int rank;
  std::vector<float> send;
  std::vector<std::int64_t> counts;
  Uniform(std::int64_t n, int p, int me) : per_peer(n), size(p), rank(me), counts(p, n) {
    for (int d = 0; d < p; ++d)
      send.insert(send.end(), static_cast<std::size_t>(n), static_cast<float>(me * 100 + d));
  }
  std::span<float const> s() const { return send; }
  std::span<std::int64_t const> c() const { return counts; }
};

}  // namespace

TEST_CASE("inproc exchange_view: the blocks are the peers' send buffers, not copies",
          "[comm][inproc][view]") {
  std::vector<std::string> failures(4);
  inproc::run(4, [&](inproc::Communicator& c) {
    Uniform const u(3, c.size(), c.rank());
    // Every rank learns where every peer's send buffer lives.
    std::vector<std::int64_t> mine{
        static_cast<std::int64_t>(reinterpret_cast<std::uintptr_t>(u.send.data()))};
    std::vector<std::int64_t> where(4);
    c.all_gather(std::span<std::int64_t const>(mine), std::span<std::int64_t>(where));
    c.exchange_view(u.s(), u.c(), u.c(), [&](std::span<std::span<float const> const> blocks) {
      for (int q = 0; q < 4; ++q) {
        auto const expected = static_cast<std::uintptr_t>(where[static_cast<std::size_t>(q)]) +
                              static_cast<std::uintptr_t>(c.rank()) * 3 * sizeof(float);
        auto const got =
            reinterpret_cast<std::uintptr_t>(blocks[static_cast<std::size_t>(q)].data());
        if (got != expected ||
            blocks[static_cast<std::size_t>(q)][0] != static_cast<float>(q * 100 + c.rank()))
          failures[static_cast<std::size_t>(c.rank())] +=
              "block " + std::to_string(q) + " is not in place; ";
      }
    });
  });
  for (auto const& f : failures) CHECK(f.empty());
  STATIC_REQUIRE(has_peer_reads_v<inproc::Communicator>);
}

TEST_CASE(
    "inproc start_all_to_all_v: a peer that fails before it starts fails the others at "
    "wait(), named",
    "[comm][inproc][nonblocking][fault]") {
  std::vector<std::string> messages(4);
  std::vector<errc> categories(4, errc::internal);
  std::string rethrown;
  try {
    inproc::run(4, [&](inproc::Communicator& c) {
      auto const me = static_cast<std::size_t>(c.rank());
      Uniform const u(2, c.size(), c.rank());
      std::vector<float> recv(8);
      try {
        if (c.rank() == 2) throw error(errc::internal, "rank 2 fails on purpose");
        auto h = c.start_all_to_all_v(u.s(), u.c(), std::span<float>(recv), u.c());
        h.wait();
      } catch (error const& e) {
        messages[me] = e.what();
        categories[me] = e.category();
        throw;
      }
    });
  } catch (std::exception const& e) {
    rethrown = e.what();
  }
  CHECK(rethrown == "rank 2 fails on purpose");
  for (int r : {0, 1, 3}) {
    INFO("rank " << r << ": " << messages[static_cast<std::size_t>(r)]);
    CHECK(categories[static_cast<std::size_t>(r)] == errc::aborted);
    CHECK_THAT(messages[static_cast<std::size_t>(r)],
               Contains("abandoned all_to_all_v on the group of world ranks 0 1 2 3 because rank "
                        "2 failed: rank 2 fails on purpose"));
  }
}

TEST_CASE("inproc start_all_to_all_v: a handle dropped without wait() fails the world, named",
          "[comm][inproc][nonblocking][fault]") {
  std::string rethrown;
  try {
    inproc::run(4, [&](inproc::Communicator& c) {
      Uniform const u(2, c.size(), c.rank());
      std::vector<float> recv(8);
      auto h = c.start_all_to_all_v(u.s(), u.c(), std::span<float>(recv), u.c());
      if (c.rank() != 1) h.wait();
    });  // rank 1's handle goes out of scope unwaited
  } catch (std::exception const& e) {
    rethrown = e.what();
  }
  CHECK_THAT(rethrown, Contains("world rank 1 dropped the handle of a started all_to_all_v on "
                                "the group of world ranks 0 1 2 3 without wait()"));
}

TEST_CASE("inproc start_all_to_all_v: a handle unwound by an exception completes quietly",
          "[comm][inproc][nonblocking][fault]") {
  std::vector<std::vector<float>> received(4);
  std::vector<std::string> caught(4);
  inproc::run(4, [&](inproc::Communicator& c) {
    auto const me = static_cast<std::size_t>(c.rank());
    Uniform const u(2, c.size(), c.rank());
    std::vector<float> recv(8);
    try {
      auto h = c.start_all_to_all_v(u.s(), u.c(), std::span<float>(recv), u.c());
      if (c.rank() == 3) throw std::runtime_error("rank 3 throws between start and wait");
      h.wait();
    } catch (std::runtime_error const& e) {
      caught[me] = e.what();  // rank 3 carries on: its handle completed the exchange
    }
    c.barrier();
    received[me] = recv;
  });  // no rank fails: the unwound handle did not abort the world
  CHECK(caught[3] == "rank 3 throws between start and wait");
  for (int r = 0; r < 4; ++r)
    for (int q = 0; q < 4; ++q) {
      INFO("rank " << r << " from " << q);
      CHECK(received[static_cast<std::size_t>(r)][static_cast<std::size_t>(2 * q)] ==
            static_cast<float>(q * 100 + r));
    }
}

TEST_CASE(
    "inproc exchange_view: a callback that throws on one rank fails every rank, and no "
    "buffer is freed while a peer reads it",
    "[comm][inproc][view][fault]") {
  // ThreadSanitizer (the tsan build) catches a read of a freed buffer here.
  std::string rethrown;
  try {
    inproc::run(6, [&](inproc::Communicator& c) {
      for (int round = 0; round < 4; ++round) {
        auto u = std::make_unique<Uniform>(64, c.size(), c.rank());
        float sum = 0;
        c.exchange_view(u->s(), u->c(), u->c(),
                        [&](std::span<std::span<float const> const> blocks) {
                          if (round == 2 && c.rank() == 4)
                            throw std::runtime_error("callback of rank 4 throws");
                          for (auto b : blocks)
                            for (float v : b) sum += v;
                        });
        u.reset();  // the send buffer goes away as soon as the call returns
      }
    });
  } catch (std::exception const& e) {
    rethrown = e.what();
  }
  CHECK(rethrown == "callback of rank 4 throws");
}
