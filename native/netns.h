// Network namespaces and tun devices, always from a dedicated thread.
//
// Man pages: unshare(2), setns(2), network_namespaces(7), netdevice(7), rtnetlink(7). Kernel docs:
// Documentation/networking/tuntap.rst, ip-sysctl.rst. Recipe: notes/bumblebee-kernel.md §2-3.
//
// Namespace membership is per thread: a thread that unshares or setns's is never the JS thread nor a libuv pool
// thread (which also serve fs, dns.lookup, crypto). Each call starts a std::thread, does its work there, and
// joins it; the fds it returns keep the namespace alive after the thread is gone.
#pragma once

#include <napi.h>

namespace fdferry {

// Registers createNetworkEnvironment, checkNetworkEnvironment, openTunInNamespace and socketNamespaceInode.
void InitNetns(Napi::Env env, Napi::Object exports);

}  // namespace fdferry
