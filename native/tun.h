// Fish's persistent tun: create or re-attach it by name in the calling process's network namespace, and clear
// its persistence when Fish is uninstalled.
//
// Man pages: netdevice(7), if_nametoindex(3), open(2), ioctl(2), fcntl(2). Kernel docs:
// Documentation/networking/tuntap.rst. Recipe: notes/fish-kernel.md §3 step 3, §9 (crash: re-attach by name).
#pragma once

#include <napi.h>

namespace fdferry {

// Registers openPersistentTun and unpersistTun.
void InitTun(Napi::Env env, Napi::Object exports);

}  // namespace fdferry
