// The on-ramp demultiplexer: a client-side tun split into one SOCK_SEQPACKET socket per TCP flow, and back,
// with an optional catch-all sink socket for everything else (or everything).
//
// Used by the test harness, the benchmark and the example proxy to feed Bumblebee (flow sockets) and Fish (the
// sink), so that they measure the daemon and not a JavaScript packet loop. Man pages: unix(7), epoll(7). Recipe: notes/bumblebee-kernel.md §9.
#pragma once

#include <napi.h>

#include "binding.h"

namespace fdferry {

// Registers createOnRamp.
void InitOnRamp(Napi::Env env, Napi::Object exports, Fdferry& addon);

}  // namespace fdferry
