#pragma once
// Central finite differences for gradient checks (DESIGN §3: fp64, within 1e-6 relative).

#include <algorithm>
#include <cmath>
#include <vector>

namespace moefold::test {

/// (loss(v + eps) − loss(v − eps)) / 2·eps, restoring `v` afterwards.
template <class Loss>
double central_difference(double& v, Loss&& loss, double eps = 1e-6) {
  double const old = v;
  v = old + eps;
  double const up = loss();
  v = old - eps;
  double const down = loss();
  v = old;
  return (up - down) / (2 * eps);
}

/// ‖a − b‖₂ / ‖b‖₂ (‖a − b‖₂ when b is zero).
inline double relative_error(std::vector<double> const& a, std::vector<double> const& b) {
  double num = 0, den = 0;
  for (std::size_t i = 0; i < std::min(a.size(), b.size()); ++i) {
    num += (a[i] - b[i]) * (a[i] - b[i]);
    den += b[i] * b[i];
  }
  return den == 0 ? std::sqrt(num) : std::sqrt(num / den);
}

}  // namespace moefold::test
