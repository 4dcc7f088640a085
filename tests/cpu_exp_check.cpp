// Accuracy of csrc/cpu/vec_exp.h's vexp against long double expl, in ulps of the result, on a dense grid of the
// range where exp is a normal number, plus the special values. Built and run by tests/test_cpu_kernels.py.
#include <cmath>
#include <cstdio>
#include <limits>
#include <random>

#include "cpu/vec_exp.h"

using metric_kernels::cpu::vexp;

template <typename T>
double ulps(T got, long double want) {
  const T rounded = static_cast<T>(want);
  const T ulp = std::nextafter(rounded, std::numeric_limits<T>::infinity()) - rounded;
  return static_cast<double>(std::fabs(static_cast<long double>(got) - want) / ulp);
}

// The kernels call vexp in loops the compiler vectorises: check it there too.
template <typename T>
void vexp_all(const T* in, T* out, int n) {
  for (int i = 0; i < n; ++i) out[i] = vexp(in[i]);
}

template <typename T>
bool check(const char* name, T lo, T hi, double limit) {
  constexpr int kCount = 1 << 22;
  static T in[kCount], out[kCount];
  std::mt19937_64 random(7);
  std::uniform_real_distribution<double> uniform(0.0, 1.0);
  for (int i = 0; i < kCount; ++i)
    in[i] = i % 2 ? static_cast<T>(lo + (hi - lo) * uniform(random)) : static_cast<T>(lo + (hi - lo) * i / kCount);
  vexp_all(in, out, kCount);
  double worst = 0;
  T worst_at = 0;
  for (int i = 0; i < kCount; ++i) {
    const double error = ulps(out[i], std::exp(static_cast<long double>(in[i])));
    if (error > worst) worst = error, worst_at = in[i];
    if (out[i] != vexp(in[i]) && std::fabs(out[i] - vexp(in[i])) > 2 * std::numeric_limits<T>::epsilon() * out[i]) {
      std::printf("%s: vectorised and scalar results differ at %.9g\n", name, static_cast<double>(in[i]));
      return false;
    }
  }
  const T inf = std::numeric_limits<T>::infinity();
  const bool special = vexp(-inf) == 0 && vexp(inf) == inf && std::isnan(vexp(std::numeric_limits<T>::quiet_NaN())) &&
                       vexp(T(0)) == 1 && vexp(lo - 1) <= std::numeric_limits<T>::min() && vexp(hi + 1) == inf;
  std::printf("%s: max error %.3f ulp at %.9g, special values %s\n", name, worst, static_cast<double>(worst_at),
              special ? "ok" : "WRONG");
  return worst <= limit && special;
}

int main() {
  const bool ok = check<float>("float", -87.3f, 88.7f, 1.5) & check<double>("double", -708.3, 709.7, 1.5);
  std::printf("%s\n", ok ? "ok" : "FAILED");
  return ok ? 0 : 1;
}
