// Fuzz target: order strings and FoldedMapping::from with sizes taken from the input bytes.
// Invalid input must throw moefold::error; a valid folding must satisfy the folding rules
// (both layouts factorize the world, every rank is in exactly its own groups).

#include <cstdint>
#include <cstdlib>
#include <fuzzer/FuzzedDataProvider.h>

#include "moefold/mesh/folded_mapping.hpp"

namespace {

// Mostly small sizes (where valid foldings live), sometimes any int (to reach overflows).
int size_from(FuzzedDataProvider& in) {
  if (in.ConsumeBool()) return in.ConsumeIntegral<int>();
  return in.ConsumeIntegralInRange<int>(-1, 64);
}

void require(bool ok) {
  if (!ok) std::abort();
}

void check_valid(moefold::FoldedMapping const& f) {
  long const w = f.world_size();
  require(long{f.tp()} * f.cp() * f.dp() * f.pp() == w);
  require(long{f.etp()} * f.ep() * f.edp() * f.pp() == w);
  if (w > 256) return;  // keep each input fast
  for (moefold::Group g : f.catalogue()) {
    for (int r = 0; r < w; ++r) {
      auto const members = f.group_of(g, r);
      auto const at = f.rank_in_group(g, r);
      require(members.empty() == !at.has_value());
      if (at) require(members.at(static_cast<std::size_t>(*at)) == r);
    }
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(std::uint8_t const* data, std::size_t size) {
  FuzzedDataProvider in(data, size);
  moefold::FoldingConfig c;
  c.world = in.ConsumeBool() ? in.ConsumeIntegralInRange<int>(-1, 1 << 16)
                             : in.ConsumeIntegralInRange<int>(1, 256);
  c.tp = size_from(in);
  c.cp = size_from(in);
  c.pp = size_from(in);
  c.ep = size_from(in);
  if (in.ConsumeBool()) c.etp = size_from(in);
  if (in.ConsumeBool()) c.vpp = size_from(in);
  c.num_distributed_optimizer_instances = in.ConsumeBool() ? size_from(in) : 1;
  if (in.ConsumeBool()) c.order = in.ConsumeRandomLengthString(64);
  try {
    auto const order = moefold::Order::parse(c.order);
    require(!order.axes().empty());
  } catch (moefold::error const&) {
  }
  try {
    check_valid(moefold::FoldedMapping::from(c));
  } catch (moefold::error const&) {
  }
  return 0;
}
