// Unix datagram sockets: the sd_notify(3) transport, and the receiving end tests use to play systemd.
//
// Man pages: unix(7), socket(2), bind(2), sendmsg(2), cmsg(3), sd_notify(3).
//
// The daemon sends its own notifications (never through `systemd-notify` or a short-lived child: systemd
// attributes a datagram to a unit by its sender's pid, and a sender that already exited may not be attributed).
// Receiving needs no code of its own: a bound datagram fd can be wrapped by openSeqpacket, whose recvmsg loop
// reads datagrams just as well.
#include "notify.h"

#include <sys/socket.h>
#include <sys/un.h>

#include <cstring>
#include <vector>

#include "errors.h"
#include "fd.h"
#include "seqpacket.h"

namespace fdferry {

namespace {

Napi::Value DatagramSocket(const Napi::CallbackInfo& info) {
  int fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0) throw ErrnoException(info.Env(), errno, "socket");
  return Napi::Number::New(info.Env(), fd);
}

Napi::Value DatagramBind(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  std::string path = PathArgument(info, 0);
  sockaddr_un address;
  socklen_t length = UnixAddress(env, path, address, "bind");
  FileDescriptor fd(socket(AF_UNIX, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0));
  if (!fd.valid()) throw ErrnoException(env, errno, "socket");
  if (bind(fd.get(), reinterpret_cast<sockaddr*>(&address), length) < 0) throw ErrnoException(env, errno, "bind", path);
  return Napi::Number::New(env, fd.release());
}

// datagramSend(fd, address, data, fds): one datagram to `address`, with `fds` as SCM_RIGHTS.
Napi::Value DatagramSend(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fd = FdArgument(info, 0);
  std::string path = PathArgument(info, 1);
  if (!info[2].IsTypedArray()) throw Napi::TypeError::New(env, "data must be a Uint8Array");
  auto data = info[2].As<Napi::Uint8Array>();
  std::vector<int> fds;
  if (info.Length() > 3 && info[3].IsArray()) {
    auto list = info[3].As<Napi::Array>();
    for (uint32_t i = 0; i < list.Length(); i++) fds.push_back(list.Get(i).As<Napi::Number>().Int32Value());
  }
  if (fds.size() > static_cast<size_t>(kMaxFdsPerMessage)) {
    throw FdferryError(env, "EFDFERRY_TOOMANYFDS", "at most 253 fds fit in one message");
  }
  sockaddr_un address;
  socklen_t length = UnixAddress(env, path, address, "sendmsg");
  iovec iov{data.Data(), data.ByteLength()};
  msghdr message{};
  message.msg_name = &address;
  message.msg_namelen = length;
  message.msg_iov = &iov;
  message.msg_iovlen = 1;
  std::vector<char> control;
  if (!fds.empty()) {
    // Zeroed and sized by CMSG_SPACE so the padding the kernel reads is defined.
    control.assign(CMSG_SPACE(sizeof(int) * fds.size()), 0);
    message.msg_control = control.data();
    message.msg_controllen = control.size();
    cmsghdr* header = CMSG_FIRSTHDR(&message);
    header->cmsg_level = SOL_SOCKET;
    header->cmsg_type = SCM_RIGHTS;
    header->cmsg_len = CMSG_LEN(sizeof(int) * fds.size());
    std::memcpy(CMSG_DATA(header), fds.data(), sizeof(int) * fds.size());
  }
  if (sendmsg(fd, &message, MSG_NOSIGNAL) < 0) throw ErrnoException(env, errno, "sendmsg", path);
  return env.Undefined();
}

}  // namespace

void InitNotify(Napi::Env env, Napi::Object exports) {
  exports.Set("datagramSocket", Napi::Function::New(env, DatagramSocket, "datagramSocket"));
  exports.Set("datagramBind", Napi::Function::New(env, DatagramBind, "datagramBind"));
  exports.Set("datagramSend", Napi::Function::New(env, DatagramSend, "datagramSend"));
}

}  // namespace fdferry
