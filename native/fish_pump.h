// Fish's data plane: registrations' packet sockets <-> a persistent tun, with NAT from a shared egress
// address and port slice, every new five-tuple reserved in conntrack over netlink, on one epoll thread.
//
// Man pages: epoll(7), unix(7), netlink(7), recvmmsg(2). Recipe: notes/fish-kernel.md §1, §4-7.
#pragma once

#include <napi.h>

#include "binding.h"

namespace fdferry {

// Registers createFishPump (lib/native-fish.ts is its typed contract).
void InitFishPump(Napi::Env env, Napi::Object exports, Fdferry& addon);

}  // namespace fdferry
