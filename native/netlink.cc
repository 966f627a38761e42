// Raw netlink sockets (see netlink.h): netlinkOpen(protocol, groups), netlinkRequest(fd, message, timeoutMs), and
// for event (multicast) sockets netlinkReceive(fd, maxMessages) and netlinkSetReceiveBuffer(fd, bytes).
//
// Man pages: netlink(7), rtnetlink(7), socket(2), bind(2), setsockopt(2), sendto(2), recvmsg(2), poll(2).
// Kernel docs: Documentation/userspace-api/netlink/intro.rst. uapi: linux/netlink.h (nlmsgerr, extended ACK).
//
// netlinkRequest is synchronous on the JS thread on purpose. Its callers are control-plane steps (add a rule,
// a route, flush a registration's conntrack entries, dump Fish's entries at start-up) that run rarely and
// each cost one kernel round trip of microseconds; the kernel answers rtnetlink and ctnetlink requests in the
// sendmsg() call itself, so the reply is already queued when we poll. An AsyncWorker would add a pool hop and
// a Promise per rule for nothing, and would let two requests interleave on one socket. The packet path never
// comes here: the pump (fish_pump.cc) reserves conntrack entries on its own thread and socket. The timeout
// bounds the one case that could block (a kernel that never answers, or a reply that was lost to ENOBUFS).
#include "netlink.h"

#include <linux/netfilter/nfnetlink.h>
#include <linux/netlink.h>
#include <linux/rtnetlink.h>
#include <poll.h>
#include <sys/socket.h>
#include <time.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "errors.h"
#include "fd.h"

namespace fdferry {

namespace {

// Dump replies come in skbs of at most 32 KiB (the kernel caps its per-socket max_recvmsg_len there); 64 KiB
// plus headroom means a truncated read (MSG_TRUNC) can only be a protocol fault, never a normal large batch.
constexpr size_t kReceiveBuffer = 128 * 1024;

// One datagram from a netlink socket, without blocking, with the sender's address in `from` (replies from the
// kernel have nl_pid 0). MSG_TRUNC makes recvmsg return the datagram's real length; `truncated` says whether
// it was cut to fit the buffer, which for netlink can only be a protocol fault (see kReceiveBuffer).
ssize_t ReceiveDatagram(int fd, std::vector<uint8_t>& buffer, sockaddr_nl& from, bool& truncated) {
  iovec iov{buffer.data(), buffer.size()};
  msghdr header{};
  header.msg_name = &from;
  header.msg_namelen = sizeof from;
  header.msg_iov = &iov;
  header.msg_iovlen = 1;
  ssize_t received = recvmsg(fd, &header, MSG_DONTWAIT | MSG_TRUNC);
  truncated = received >= 0 && (static_cast<size_t>(received) > buffer.size() || (header.msg_flags & MSG_TRUNC) != 0);
  return received;
}

// Names for the request types Fish sends, so an error says which step failed without the caller decoding it.
// Anything else is shown by number.
std::string RequestName(int protocol, uint16_t type) {
  if (protocol == NETLINK_ROUTE) {
    switch (type) {
      case RTM_NEWLINK: return "RTM_NEWLINK";
      case RTM_DELLINK: return "RTM_DELLINK";
      case RTM_GETLINK: return "RTM_GETLINK";
      case RTM_NEWADDR: return "RTM_NEWADDR";
      case RTM_DELADDR: return "RTM_DELADDR";
      case RTM_NEWROUTE: return "RTM_NEWROUTE";
      case RTM_DELROUTE: return "RTM_DELROUTE";
      case RTM_GETROUTE: return "RTM_GETROUTE";
      case RTM_NEWRULE: return "RTM_NEWRULE";
      case RTM_DELRULE: return "RTM_DELRULE";
      case RTM_GETRULE: return "RTM_GETRULE";
      default: break;
    }
  } else if (protocol == NETLINK_NETFILTER && (type >> 8) == NFNL_SUBSYS_CTNETLINK) {
    switch (type & 0xff) {
      case 0: return "IPCTNL_MSG_CT_NEW";
      case 1: return "IPCTNL_MSG_CT_GET";
      case 2: return "IPCTNL_MSG_CT_DELETE";
      default: break;
    }
  }
  char buffer[32];
  std::snprintf(buffer, sizeof buffer, "type 0x%x", type);
  return buffer;
}

// An error thrown for a netlink answer: `code`/`errno` from the kernel's errno, `syscall: 'netlink'`, and a
// message naming the request, e.g. "netlink RTM_NEWRULE EEXIST: file already exists (seq 7)".
Napi::Error NetlinkError(Napi::Env env, int err, const std::string& request, uint32_t seq,
                         const std::string& detail = {}) {
  Napi::Error error = ErrnoException(env, err, "netlink");
  std::string message = error.Message();
  // ErrnoException wrote "netlink CODE: description"; insert the request after "netlink".
  message.insert(std::strlen("netlink"), " " + request);
  message += " (seq " + std::to_string(seq) + ")";
  if (!detail.empty()) message += ": " + detail;
  error.Set("message", Napi::String::New(env, message));
  error.Set("request", Napi::String::New(env, request));
  return error;
}

// The kernel's own explanation (NLMSGERR_ATTR_MSG, "extended ACK"), when it gave one: "Invalid prefix for
// given prefix length" beats a bare EINVAL. With NETLINK_CAP_ACK the echoed request is cut to its header, so
// the attributes start right after it.
std::string ExtendedAckMessage(const nlmsghdr* header) {
  if (!(header->nlmsg_flags & NLM_F_ACK_TLVS)) return {};
  const auto* error = static_cast<const nlmsgerr*>(NLMSG_DATA(header));
  size_t offset = NLMSG_HDRLEN + sizeof(nlmsgerr);
  if (!(header->nlmsg_flags & NLM_F_CAPPED)) offset += NLMSG_ALIGN(error->msg.nlmsg_len) - NLMSG_HDRLEN;
  const auto* base = reinterpret_cast<const uint8_t*>(header);
  while (offset + sizeof(nlattr) <= header->nlmsg_len) {
    nlattr attribute;
    std::memcpy(&attribute, base + offset, sizeof attribute);
    if (attribute.nla_len < sizeof(nlattr) || offset + attribute.nla_len > header->nlmsg_len) break;
    if ((attribute.nla_type & NLA_TYPE_MASK) == NLMSGERR_ATTR_MSG) {
      const char* text = reinterpret_cast<const char*>(base + offset + NLA_HDRLEN);
      return std::string(text, strnlen(text, attribute.nla_len - NLA_HDRLEN));
    }
    offset += NLA_ALIGN(attribute.nla_len);
  }
  return {};
}

int64_t NowMs() {
  timespec now;
  clock_gettime(CLOCK_MONOTONIC, &now);
  return static_cast<int64_t>(now.tv_sec) * 1000 + now.tv_nsec / 1000000;
}

// netlinkOpen(protocol, groups) -> fd
Napi::Value NetlinkOpen(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!info[0].IsNumber() || !info[1].IsNumber()) throw Napi::TypeError::New(env, "netlinkOpen(protocol, groups)");
  const int protocol = info[0].As<Napi::Number>().Int32Value();
  const uint32_t groups = info[1].As<Napi::Number>().Uint32Value();
  // Blocking: netlinkRequest polls before every read and reads with MSG_DONTWAIT, so it never waits without
  // a deadline either way, and a socket the pump or a uv_poll later borrows sets its own flags.
  FileDescriptor fd(socket(AF_NETLINK, SOCK_RAW | SOCK_CLOEXEC, protocol));
  if (!fd.valid()) throw ErrnoException(env, errno, "socket");
  // Both options are best effort (Linux 4.3 / 4.12): the first keeps error replies small (the kernel would
  // otherwise echo our whole request back), the second asks for the kernel's text explaining an error.
  int one = 1;
  setsockopt(fd.get(), SOL_NETLINK, NETLINK_CAP_ACK, &one, sizeof one);
  setsockopt(fd.get(), SOL_NETLINK, NETLINK_EXT_ACK, &one, sizeof one);
  sockaddr_nl address{};
  address.nl_family = AF_NETLINK;
  address.nl_pid = 0;  // the kernel assigns a unique port id
  address.nl_groups = groups;
  if (bind(fd.get(), reinterpret_cast<sockaddr*>(&address), sizeof address) < 0) {
    throw ErrnoException(env, errno, "bind");
  }
  return Napi::Number::New(env, fd.release());
}

// netlinkRequest(fd, message, timeoutMs) -> Buffer[]
Napi::Value NetlinkRequest(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const int fd = FdArgument(info, 0);
  if (!info[1].IsBuffer()) throw Napi::TypeError::New(env, "netlinkRequest: message must be a Buffer");
  if (!info[2].IsNumber()) throw Napi::TypeError::New(env, "netlinkRequest: timeoutMs must be a number");
  Napi::Buffer<uint8_t> message = info[1].As<Napi::Buffer<uint8_t>>();
  const int64_t timeout_ms = info[2].As<Napi::Number>().Int64Value();

  nlmsghdr request;
  if (message.Length() < sizeof request) {
    throw FdferryError(env, "ERR_INVALID_ARG_VALUE", "netlinkRequest: message is shorter than an nlmsghdr");
  }
  std::memcpy(&request, message.Data(), sizeof request);
  if (request.nlmsg_len != message.Length()) {
    throw FdferryError(env, "ERR_INVALID_ARG_VALUE",
                       "netlinkRequest: nlmsg_len " + std::to_string(request.nlmsg_len) +
                           " does not match the message length " + std::to_string(message.Length()));
  }
  int protocol = 0;
  socklen_t protocol_length = sizeof protocol;
  if (getsockopt(fd, SOL_SOCKET, SO_PROTOCOL, &protocol, &protocol_length) < 0) {
    throw ErrnoException(env, errno, "getsockopt");
  }
  const std::string name = RequestName(protocol, request.nlmsg_type);
  const uint32_t seq = request.nlmsg_seq;
  const bool dump = (request.nlmsg_flags & NLM_F_DUMP) == NLM_F_DUMP;
  const bool acked = (request.nlmsg_flags & NLM_F_ACK) != 0;

  sockaddr_nl kernel{};
  kernel.nl_family = AF_NETLINK;
  ssize_t sent;
  do {
    sent = sendto(fd, message.Data(), message.Length(), MSG_NOSIGNAL, reinterpret_cast<sockaddr*>(&kernel),
                  sizeof kernel);
  } while (sent < 0 && errno == EINTR);
  if (sent < 0) throw ErrnoException(env, errno, "sendto");

  std::vector<uint8_t> buffer(kReceiveBuffer);
  Napi::Array replies = Napi::Array::New(env);
  uint32_t count = 0;
  bool interrupted = false;
  const int64_t deadline = NowMs() + (timeout_ms > 0 ? timeout_ms : 0);
  for (;;) {
    const int64_t left = deadline - NowMs();
    pollfd pfd{fd, POLLIN, 0};
    int ready = poll(&pfd, 1, static_cast<int>(std::clamp<int64_t>(left, 0, INT32_MAX)));
    if (ready < 0) {
      if (errno == EINTR) continue;
      throw ErrnoException(env, errno, "poll");
    }
    if (ready == 0) throw NetlinkError(env, ETIMEDOUT, name, seq, "no answer from the kernel");

    sockaddr_nl from{};
    bool truncated = false;
    ssize_t received = ReceiveDatagram(fd, buffer, from, truncated);
    if (received < 0) {
      if (errno == EINTR || errno == EAGAIN) continue;
      // ENOBUFS: the socket's receive queue overflowed and a reply may be lost; the caller starts over.
      throw ErrnoException(env, errno, "recvmsg");
    }
    if (truncated) {
      throw NetlinkError(env, EMSGSIZE, name, seq,
                         "a reply of " + std::to_string(received) + " bytes did not fit the receive buffer");
    }
    // Only unicast answers from the kernel: a socket bound to groups also receives events (nl_groups != 0),
    // and another process could send to our port id.
    if (from.nl_pid != 0 || from.nl_groups != 0) continue;

    int length = static_cast<int>(received);
    bool finished = false;
    for (auto* reply = reinterpret_cast<nlmsghdr*>(buffer.data()); NLMSG_OK(reply, length);
         reply = NLMSG_NEXT(reply, length)) {
      // A reply to an earlier request that timed out, or an event: not ours.
      if (reply->nlmsg_seq != seq) continue;
      // Noted, not thrown yet: reading on to NLMSG_DONE drains the dump, so the socket is clean for the retry.
      if (reply->nlmsg_flags & NLM_F_DUMP_INTR) interrupted = true;
      if (reply->nlmsg_type == NLMSG_NOOP) continue;
      if (reply->nlmsg_type == NLMSG_OVERRUN) throw NetlinkError(env, EOVERFLOW, name, seq, "NLMSG_OVERRUN");
      if (reply->nlmsg_type == NLMSG_ERROR) {
        if (reply->nlmsg_len < NLMSG_LENGTH(sizeof(int))) {
          throw NetlinkError(env, EBADMSG, name, seq, "a truncated NLMSG_ERROR");
        }
        int error;
        std::memcpy(&error, NLMSG_DATA(reply), sizeof error);
        if (error != 0) throw NetlinkError(env, -error, name, seq, ExtendedAckMessage(reply));
        finished = true;
        break;
      }
      if (reply->nlmsg_type == NLMSG_DONE) {
        // A dump that failed part-way says so in DONE's payload (a negative errno).
        int error = 0;
        if (reply->nlmsg_len >= NLMSG_LENGTH(sizeof(int))) std::memcpy(&error, NLMSG_DATA(reply), sizeof error);
        if (error != 0) throw NetlinkError(env, -error, name, seq, ExtendedAckMessage(reply));
        finished = true;
        break;
      }
      replies.Set(count++, Napi::Buffer<uint8_t>::Copy(env, reinterpret_cast<uint8_t*>(reply), reply->nlmsg_len));
      // A plain request without NLM_F_ACK gets exactly one answer and no ACK to wait for.
      if (!dump && !acked) {
        finished = true;
        break;
      }
    }
    if (length > 0 && !finished) throw NetlinkError(env, EBADMSG, name, seq, "a malformed reply");
    if (finished) break;
  }
  // The kernel's view changed while it dumped (a rule or an entry was added or removed): what we have may
  // miss entries or hold duplicates. The caller dumps again.
  if (interrupted) {
    throw NetlinkError(env, EINTR, name, seq, "the dump was interrupted by a concurrent change (NLM_F_DUMP_INTR)");
  }
  return replies;
}

// netlinkReceive(fd, maxMessages) -> { messages: Buffer[], overflow: boolean, more: boolean }
//
// Drains an event socket (bound to multicast groups) without blocking: recvmsg(MSG_DONTWAIT) until EAGAIN or
// `maxMessages` messages. Only messages from the kernel (nl_pid 0) are kept. ENOBUFS means the kernel dropped
// events because the receive queue was full; it is reported once, by the recvmsg that returns it, so it is
// returned as `overflow` next to whatever was read before and after it rather than thrown (a throw would lose
// the messages already read in this call). The caller resyncs by dump. `more` says the limit was hit and the
// queue may hold more: the caller drains again later instead of holding the JS thread.
Napi::Value NetlinkReceive(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const int fd = FdArgument(info, 0);
  if (!info[1].IsNumber()) throw Napi::TypeError::New(env, "netlinkReceive(fd, maxMessages)");
  const int64_t max_messages = std::max<int64_t>(1, info[1].As<Napi::Number>().Int64Value());
  std::vector<uint8_t> buffer(kReceiveBuffer);
  Napi::Array messages = Napi::Array::New(env);
  uint32_t count = 0;
  bool overflow = false;
  bool more = false;
  for (;;) {
    if (count >= max_messages) {
      more = true;
      break;
    }
    sockaddr_nl from{};
    bool truncated = false;
    ssize_t received = ReceiveDatagram(fd, buffer, from, truncated);
    if (received < 0) {
      if (errno == EINTR) continue;
      if (errno == EAGAIN || errno == EWOULDBLOCK) break;
      if (errno == ENOBUFS) {
        overflow = true;
        continue;
      }
      throw ErrnoException(env, errno, "recvmsg");
    }
    // A cut datagram (larger than 128 KiB; events are a few hundred bytes) cannot be parsed: count it as lost.
    if (truncated) {
      overflow = true;
      continue;
    }
    if (from.nl_pid != 0) continue;
    int length = static_cast<int>(received);
    for (auto* message = reinterpret_cast<nlmsghdr*>(buffer.data()); NLMSG_OK(message, length);
         message = NLMSG_NEXT(message, length)) {
      if (message->nlmsg_type == NLMSG_NOOP || message->nlmsg_type == NLMSG_DONE) continue;
      if (message->nlmsg_type == NLMSG_OVERRUN) {
        overflow = true;
        continue;
      }
      messages.Set(count++, Napi::Buffer<uint8_t>::Copy(env, reinterpret_cast<uint8_t*>(message), message->nlmsg_len));
    }
  }
  Napi::Object result = Napi::Object::New(env);
  result.Set("messages", messages);
  result.Set("overflow", Napi::Boolean::New(env, overflow));
  result.Set("more", Napi::Boolean::New(env, more));
  return result;
}

// netlinkSetReceiveBuffer(fd, bytes) -> the receive buffer the kernel granted (getsockopt, which reports
// twice the requested size: the kernel doubles it for its bookkeeping).
//
// An event socket must absorb bursts (a flush of a registration's thousands of entries is one DESTROY event
// each) between two drains. SO_RCVBUFFORCE (CAP_NET_ADMIN, which Fish has) passes net.core.rmem_max; without
// the capability it falls back to SO_RCVBUF, capped at rmem_max, rather than fail: a smaller buffer only
// means overflows (reported, then resynced by dump) come sooner.
Napi::Value NetlinkSetReceiveBuffer(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const int fd = FdArgument(info, 0);
  if (!info[1].IsNumber()) throw Napi::TypeError::New(env, "netlinkSetReceiveBuffer(fd, bytes)");
  const int bytes = static_cast<int>(std::clamp<int64_t>(info[1].As<Napi::Number>().Int64Value(), 4096, INT32_MAX / 2));
  if (setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &bytes, sizeof bytes) < 0) {
    if (errno != EPERM) throw ErrnoException(env, errno, "setsockopt");
    if (setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &bytes, sizeof bytes) < 0) throw ErrnoException(env, errno, "setsockopt");
  }
  int granted = 0;
  socklen_t length = sizeof granted;
  if (getsockopt(fd, SOL_SOCKET, SO_RCVBUF, &granted, &length) < 0) throw ErrnoException(env, errno, "getsockopt");
  return Napi::Number::New(env, granted);
}

}  // namespace

void InitNetlink(Napi::Env env, Napi::Object exports) {
  exports.Set("netlinkOpen", Napi::Function::New(env, NetlinkOpen, "netlinkOpen"));
  exports.Set("netlinkRequest", Napi::Function::New(env, NetlinkRequest, "netlinkRequest"));
  exports.Set("netlinkReceive", Napi::Function::New(env, NetlinkReceive, "netlinkReceive"));
  exports.Set("netlinkSetReceiveBuffer", Napi::Function::New(env, NetlinkSetReceiveBuffer, "netlinkSetReceiveBuffer"));
}

}  // namespace fdferry
