#include "onramp.h"

namespace fdferry {
void InitOnRamp(Napi::Env, Napi::Object, Fdferry&) {}
}  // namespace fdferry
