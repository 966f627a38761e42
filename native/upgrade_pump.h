// Bumblebee's data plane: flow sockets <-> tun with NAT, and the listeners' accept, on one epoll thread.
//
// Man pages: epoll(7), unix(7), accept(2), tcp(7). Recipe: notes/bumblebee-kernel.md §4-6.
#pragma once

#include <napi.h>

#include "binding.h"

namespace fdferry {

// Registers createUpgradePump.
void InitUpgradePump(Napi::Env env, Napi::Object exports, Fdferry& addon);

}  // namespace fdferry
