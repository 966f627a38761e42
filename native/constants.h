// The `constants` export (see constants.cc).
#pragma once

#include <napi.h>

namespace fdferry {

// A frozen object of name -> number: seals, families, socket types, TCP states, fd flags and our own limits.
Napi::Object MakeConstants(Napi::Env env);

}  // namespace fdferry
