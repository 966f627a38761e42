#include "netns.h"

namespace fdferry {
void InitNetns(Napi::Env, Napi::Object) {}
}  // namespace fdferry
