#include "upgrade_pump.h"

namespace fdferry {
void InitUpgradePump(Napi::Env, Napi::Object, Fdferry&) {}
}  // namespace fdferry
