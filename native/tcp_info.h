// getsockopt(TCP_INFO) (see tcp_info.cc). Man pages: tcp(7).
#pragma once

#include <napi.h>

namespace fdferry {

// Registers tcpInfo on `exports`.
void InitTcpInfo(Napi::Env env, Napi::Object exports);

}  // namespace fdferry
