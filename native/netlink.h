// Raw netlink sockets for the control plane: open one, and run one request/reply exchange on it.
//
// Man pages: netlink(7), rtnetlink(7), socket(2), bind(2), sendto(2), recvmsg(2), poll(2). Kernel docs:
// Documentation/userspace-api/netlink/intro.rst (ACKs, dumps, NLM_F_DUMP_INTR, extended ACK). Recipe:
// notes/fish-kernel.md §3 (rtnetlink), §7 (ctnetlink).
//
// The addon only moves bytes: every message is built and decoded in TypeScript (lib/netlink/), DESIGN §2.
#pragma once

#include <napi.h>

namespace fdferry {

// Registers netlinkOpen, netlinkRequest, and for event sockets netlinkReceive and netlinkSetReceiveBuffer.
void InitNetlink(Napi::Env env, Napi::Object exports);

}  // namespace fdferry
