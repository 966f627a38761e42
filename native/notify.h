// Unix datagram sockets: the sd_notify(3) transport, and the receiving end tests use to play systemd.
//
// Man pages: unix(7), sendmsg(2), sd_notify(3) (the protocol: newline-separated KEY=VALUE lines in one datagram,
// fds in SCM_RIGHTS).
#pragma once

#include <napi.h>

namespace fdferry {

// Registers datagramSocket, datagramBind and datagramSend on `exports`.
void InitNotify(Napi::Env env, Napi::Object exports);

}  // namespace fdferry
