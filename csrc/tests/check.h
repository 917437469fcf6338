// The host tests' checks: count failures instead of stopping, so one run reports every broken case.
#pragma once

#include <cmath>
#include <cstdio>

namespace madtp_test {

inline int failures = 0;

// 0 if every check passed, else 1 after printing the count: the exit status ctest reads.
inline int report(const char* suite) {
  if (failures != 0) {
    std::fprintf(stderr, "%s: %d check(s) failed\n", suite, failures);
    return 1;
  }
  std::printf("%s: all checks passed\n", suite);
  return 0;
}

}  // namespace madtp_test

#define CHECK(cond)                                                                 \
  do {                                                                              \
    if (!(cond)) {                                                                  \
      std::fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
      ++madtp_test::failures;                                                       \
    }                                                                               \
  } while (0)

// |a - b| <= tol * (1 + |b|): relative for large values, absolute near zero.
#define CHECK_NEAR(a, b, tol)                                                                               \
  do {                                                                                                      \
    const double a_ = (a), b_ = (b);                                                                        \
    if (!(std::fabs(a_ - b_) <= (tol) * (1.0 + std::fabs(b_)))) {                                           \
      std::fprintf(stderr, "%s:%d: %s = %.9g, expected %s = %.9g\n", __FILE__, __LINE__, #a, a_, #b, b_); \
      ++madtp_test::failures;                                                                               \
    }                                                                                                       \
  } while (0)
