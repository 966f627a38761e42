// Sealed memfds (see memfd.cc). Man pages: memfd_create(2), fcntl(2).
#pragma once

#include <napi.h>

namespace fdferry {

// Registers memfdCreate, memfdSeal and memfdSeals on `exports`.
void InitMemfd(Napi::Env env, Napi::Object exports);

}  // namespace fdferry
