// The clocks of the native engines: monotonic for timeouts and idle times, wall for what JS reports.
//
// Man pages: clock_gettime(2).
#pragma once

#include <time.h>

#include <cstdint>

namespace fdferry {

inline int64_t MonotonicMs() {
  timespec now{};
  clock_gettime(CLOCK_MONOTONIC, &now);
  return static_cast<int64_t>(now.tv_sec) * 1000 + now.tv_nsec / 1000000;
}

inline double WallMs() {
  timespec now{};
  clock_gettime(CLOCK_REALTIME, &now);
  return static_cast<double>(now.tv_sec) * 1000.0 + static_cast<double>(now.tv_nsec / 1000000);
}

}  // namespace fdferry
