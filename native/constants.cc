// The numeric constants TypeScript needs to interpret describeFd(), memfdSeals() and tcpInfo() results, taken
// from the headers this addon was compiled against rather than retyped in TS.
//
// Man pages: fcntl(2) (seals), socket(2), unix(7) (SCM_MAX_FD), tcp(7) (TCP states), open(2) (O_* flags).
// Header: <netinet/tcp.h> for the TCP state enum (uapi <linux/tcp.h> lacks it; fd.cc uses that one instead).
#include "constants.h"

#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>

#include "seqpacket.h"

namespace fdferry {

Napi::Object MakeConstants(Napi::Env env) {
  Napi::Object c = Napi::Object::New(env);
  auto set = [&](const char* name, double value) { c.Set(name, Napi::Number::New(env, value)); };
  set("F_SEAL_SEAL", F_SEAL_SEAL);
  set("F_SEAL_SHRINK", F_SEAL_SHRINK);
  set("F_SEAL_GROW", F_SEAL_GROW);
  set("F_SEAL_WRITE", F_SEAL_WRITE);
  set("AF_UNIX", AF_UNIX);
  set("AF_INET", AF_INET);
  set("AF_INET6", AF_INET6);
  set("SOCK_STREAM", SOCK_STREAM);
  set("SOCK_DGRAM", SOCK_DGRAM);
  set("SOCK_SEQPACKET", SOCK_SEQPACKET);
  set("IPPROTO_TCP", IPPROTO_TCP);
  set("IPPROTO_UDP", IPPROTO_UDP);
  set("TCP_ESTABLISHED", TCP_ESTABLISHED);
  set("TCP_LISTEN", TCP_LISTEN);
  set("TCP_CLOSE_WAIT", TCP_CLOSE_WAIT);
  set("O_NONBLOCK", O_NONBLOCK);
  set("O_CLOEXEC", O_CLOEXEC);
  // SCM_MAX_FD is kernel-internal (include/net/scm.h), not in any uapi header; it has been 253 since 2.6.
  set("SCM_MAX_FD", kMaxFdsPerMessage);
  set("MAX_FRAME", kMaxFrame);
  set("HIGH_WATER_MARK", kHighWaterMark);
  c.Freeze();
  return c;
}

}  // namespace fdferry
