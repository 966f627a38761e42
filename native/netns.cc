// Network environments for Bumblebee: a private anonymous netns holding a tun and two listeners, built on a
// dedicated thread; re-entering one after a hand-over; attaching to a persistent tun in a named netns; and
// asking a socket which netns it lives in.
//
// Man pages: unshare(2), setns(2), namespaces(7), network_namespaces(7), proc(5) (/proc/thread-self,
// /proc/sys), pthread_sigmask(3), netdevice(7), rtnetlink(7), netlink(7), socket(7), ip(7), ipv6(7), bind(2),
// listen(2), fstat(2), inet_pton(3). Kernel docs: Documentation/networking/tuntap.rst, ip-sysctl.rst.
// SIOCGSKNS is in include/uapi/linux/sockios.h (Linux 4.9) and not in man-pages. Recipe:
// notes/bumblebee-kernel.md §2, §3, §8.
//
// Every call that changes namespace does it on a std::thread of its own and joins it before returning (see
// netns.h). The thread records the first failing step and returns; everything it opened is owned by
// FileDescriptors local to it, so a failure at any step closes all of it, and only a complete result is handed
// to the JS thread. A thread that unshared leaves nothing behind when it exits: the namespace lives exactly as
// long as the fds we return (and any sockets later created in it).
#include "netns.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <linux/if_addr.h>
#include <linux/if_tun.h>
#include <linux/netlink.h>
#include <linux/rtnetlink.h>
#include <net/if.h>
#include <netinet/in.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <new>
#include <string>
#include <string_view>
#include <system_error>
#include <thread>
#include <utility>

#include "errors.h"
#include "fd.h"

// glibc's <sys/ioctl.h> stops short of SIOCGSKNS, and older uapi headers may lack the tun ioctl.
#ifndef SIOCGSKNS
#define SIOCGSKNS 0x894C
#endif
#ifndef TUNSETIFF
#define TUNSETIFF 0x400454ca
#endif

namespace fdferry {

namespace {

constexpr const char* kOwnNamespace = "/proc/thread-self/ns/net";
constexpr const char* kTunDevice = "/dev/net/tun";

// ---------------------------------------------------------------------------------------------------------------
// What a namespace thread reports back. It must not touch N-API (only the JS thread may), so it records the
// first failing step here and the JS thread turns it into an Error after joining.

struct Failure {
  int err = 0;          // positive errno of the failing step
  std::string syscall;  // the step: "unshare", "ioctl(SIOCSIFADDR)", "write", "RTM_NEWADDR", ...
  std::string path;     // what it acted on: a file, an interface name, "address:port"
  std::string code;     // set instead of `err` for a fault that is not an errno
  std::string message;

  bool failed() const { return err != 0 || !code.empty(); }

  // Takes the errno value as an argument, read by the caller right at the failing call, and string_views (no
  // allocation before errno is captured). Returns false so that a step can `return f.Errno(errno, ...)`.
  bool Errno(int error, std::string_view step, std::string_view subject = {}) {
    if (!failed()) {
      err = error;
      syscall = step;
      path = subject;
    }
    return false;
  }

  bool Fault(std::string_view fault_code, std::string fault_message) {
    if (!failed()) {
      code = fault_code;
      message = std::move(fault_message);
    }
    return false;
  }

  Napi::Error ToError(Napi::Env env) const {
    if (!code.empty()) return FdferryError(env, code, message);
    return ErrnoException(env, err, syscall, path);
  }
};

// Runs `body(failure)` on a new thread and waits for it; throws what it recorded. The JS thread never unshares
// or setns's, and neither does a libuv pool thread (they also serve fs, dns.lookup and crypto): both would stay
// in the other namespace for everything they do afterwards.
template <typename Body>
void RunOnNamespaceThread(Napi::Env env, Body&& body) {
  Failure failure;
  // All signals are blocked around the spawn, not first thing inside the thread: a thread starts with its
  // creator's mask, so this one never has a moment in which a process-directed signal (SIGCHLD from a child,
  // SIGTERM, SIGINT) is delivered to it. Node's handlers would cope on any thread, but a signal landing here could
  // only cost us an EINTR in the middle of the setup.
  sigset_t all;
  sigset_t previous;
  sigfillset(&all);
  int err = pthread_sigmask(SIG_SETMASK, &all, &previous);
  if (err != 0) throw ErrnoException(env, err, "pthread_sigmask");
  std::thread thread;
  int spawn_error = 0;
  try {
    thread = std::thread([&failure, &body]() noexcept {
      // An exception escaping a std::thread terminates the process. The only ones possible here are
      // allocation failures in std::string.
      try {
        body(failure);
      } catch (const std::bad_alloc&) {
        failure.Errno(ENOMEM, "netns thread");
      } catch (...) {
        failure.Errno(EINVAL, "netns thread");
      }
    });
  } catch (const std::system_error& error) {
    spawn_error = error.code().value();
  } catch (const std::bad_alloc&) {
    spawn_error = ENOMEM;
  }
  pthread_sigmask(SIG_SETMASK, &previous, nullptr);
  if (spawn_error != 0) throw ErrnoException(env, spawn_error, "pthread_create");
  thread.join();
  if (failure.failed()) throw failure.ToError(env);
}

// ---------------------------------------------------------------------------------------------------------------
// Argument validation. The TypeScript layer validates first; these are the last line, with Node's codes so a
// test can match them.

template <typename E>
E WithCode(E error, const char* code) {
  error.Set("code", Napi::String::New(error.Env(), code));
  return error;
}

// `what` is "\"options.mtu\" property" or "\"tunName\" argument", as in Node's own messages.
[[noreturn]] void ThrowInvalidType(Napi::Env env, const std::string& what, const char* type) {
  throw WithCode(Napi::TypeError::New(env, "The " + what + " must be of type " + type), "ERR_INVALID_ARG_TYPE");
}

[[noreturn]] void ThrowInvalidValue(Napi::Env env, const std::string& what, const std::string& expected,
                                    const std::string& received) {
  throw WithCode(Napi::TypeError::New(env, "The " + what + " must be " + expected + ". Received '" + received + "'"),
                 "ERR_INVALID_ARG_VALUE");
}

int64_t IntegerValue(Napi::Value value, const std::string& name, const std::string& what, int64_t min, int64_t max) {
  Napi::Env env = value.Env();
  if (!value.IsNumber()) ThrowInvalidType(env, what, "number");
  double number = value.As<Napi::Number>().DoubleValue();
  if (!(number >= static_cast<double>(min) && number <= static_cast<double>(max)) || number != std::trunc(number)) {
    std::string message = "The value of \"" + name + "\" is out of range. It must be an integer >= " +
                          std::to_string(min) + " and <= " + std::to_string(max) + ". Received " +
                          value.ToString().Utf8Value();
    throw WithCode(Napi::RangeError::New(env, message), "ERR_OUT_OF_RANGE");
  }
  return static_cast<int64_t>(number);
}

std::string StringValue(Napi::Value value, const std::string& what) {
  if (!value.IsString()) ThrowInvalidType(value.Env(), what, "string");
  return value.As<Napi::String>().Utf8Value();
}

// The kernel's dev_valid_name() plus '%': TUNSETIFF would treat "bb%d" as a template and make up a name, and
// every later ioctl by our name would then miss the device.
std::string InterfaceName(Napi::Value value, const std::string& what) {
  std::string name = StringValue(value, what);
  bool valid = !name.empty() && name.size() < IFNAMSIZ && name != "." && name != "..";
  for (unsigned char c : name) {
    if (c == '\0' || c == '/' || c == ':' || c == '%' || c == ' ' || (c >= '\t' && c <= '\r')) valid = false;
  }
  if (!valid) {
    ThrowInvalidValue(value.Env(), what,
                      "an interface name of 1 to 15 bytes without '/', ':', '%', whitespace or NUL, other than '.' "
                      "and '..'",
                      name);
  }
  return name;
}

// Parses with inet_pton into `out` (an in_addr or in6_addr) and returns the text, for error subjects.
std::string AddressValue(Napi::Value value, const std::string& what, int family, void* out) {
  std::string text = StringValue(value, what);
  // inet_pton stops at an embedded NUL, so "1.2.3.4\0junk" must be refused separately.
  if (text.find('\0') != std::string::npos || inet_pton(family, text.c_str(), out) != 1) {
    ThrowInvalidValue(value.Env(), what, family == AF_INET ? "an IPv4 address" : "an IPv6 address", text);
  }
  return text;
}

struct EnvironmentOptions {
  std::string tun_name;
  int mtu = 0;
  int tx_queue_length = 0;
  std::string address4_text;
  in_addr address4{};
  int prefix4 = 0;
  std::string address6_text;
  in6_addr address6{};
  int prefix6 = 0;
  uint16_t listen_port = 0;
  int backlog = 0;
};

EnvironmentOptions ParseEnvironmentOptions(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!info[0].IsObject()) ThrowInvalidType(env, "\"options\" argument", "object");
  Napi::Object object = info[0].As<Napi::Object>();
  auto integer = [&](const char* key, int64_t min, int64_t max) {
    std::string name = std::string("options.") + key;
    return static_cast<int>(IntegerValue(object.Get(key), name, "\"" + name + "\" property", min, max));
  };

  EnvironmentOptions o;
  o.tun_name = InterfaceName(object.Get("tunName"), "\"options.tunName\" property");
  // Below 1280 the kernel removes IPv6 from the device (RFC 8200's minimum link MTU); 65535 is the tun's maximum.
  o.mtu = integer("mtu", 1280, 65535);
  o.tx_queue_length = integer("txQueueLength", 1, INT32_MAX);
  o.address4_text = AddressValue(object.Get("address4"), "\"options.address4\" property", AF_INET, &o.address4);
  o.prefix4 = integer("prefix4", 1, 32);
  o.address6_text = AddressValue(object.Get("address6"), "\"options.address6\" property", AF_INET6, &o.address6);
  o.prefix6 = integer("prefix6", 1, 128);
  // Port 0 would give the two listeners two different ephemeral ports.
  o.listen_port = static_cast<uint16_t>(integer("listenPort", 1, 65535));
  // The kernel caps listen()'s backlog at somaxconn, which we set to the same value in the namespace.
  o.backlog = integer("backlog", 1, INT32_MAX);
  return o;
}

// ---------------------------------------------------------------------------------------------------------------
// Steps, each run on a namespace thread. They return false after recording the failure.

ifreq InterfaceRequest(const std::string& name) {
  ifreq ifr{};
  // The name was validated to be shorter than IFNAMSIZ, so the zeroed struct keeps it NUL-terminated.
  std::memcpy(ifr.ifr_name, name.data(), name.size());
  return ifr;
}

// Opens our own thread's namespace: the fd pins it and lets a later thread setns into it. Names the file
// /proc/thread-self, because /proc/self is the main thread's view (its ns/net is the root namespace).
bool OpenOwnNamespace(FileDescriptor& out, struct stat& st, Failure& f) {
  FileDescriptor fd(open(kOwnNamespace, O_RDONLY | O_CLOEXEC));
  if (!fd.valid()) return f.Errno(errno, "open", kOwnNamespace);
  if (fstat(fd.get(), &st) < 0) return f.Errno(errno, "fstat", kOwnNamespace);
  out = std::move(fd);
  return true;
}

// /proc/sys/net files belong to the netns of the thread that opens them, so these land in the new namespace.
bool WriteSysctl(const char* path, const std::string& value, Failure& f) {
  FileDescriptor fd(open(path, O_WRONLY | O_CLOEXEC));
  if (!fd.valid()) return f.Errno(errno, "open", path);
  ssize_t written = write(fd.get(), value.data(), value.size());
  if (written < 0) return f.Errno(errno, "write", path);
  // A sysctl write is taken whole or refused; a short count would mean the value was cut.
  if (static_cast<size_t>(written) != value.size()) return f.Errno(EIO, "write", path);
  return true;
}

bool SetInterfaceFlags(int sock, const std::string& name, short flags, Failure& f) {
  ifreq ifr = InterfaceRequest(name);
  if (ioctl(sock, SIOCGIFFLAGS, &ifr) < 0) return f.Errno(errno, "ioctl(SIOCGIFFLAGS)", name);
  ifr.ifr_flags = static_cast<short>(ifr.ifr_flags | flags);
  if (ioctl(sock, SIOCSIFFLAGS, &ifr) < 0) return f.Errno(errno, "ioctl(SIOCSIFFLAGS)", name);
  return true;
}

// The tun joins the netns of the thread that opens /dev/net/tun, so this must run on the namespace thread.
// Attaches to an existing device of that name or creates a non-persistent one. Plain IFF_TUN|IFF_NO_PI: no
// IFF_VNET_HDR and no offloads, so every packet read is complete with valid checksums (notes §5).
bool OpenTun(const std::string& name, FileDescriptor& out, Failure& f) {
  FileDescriptor tun(open(kTunDevice, O_RDWR | O_CLOEXEC));
  if (!tun.valid()) return f.Errno(errno, "open", kTunDevice);
  ifreq ifr = InterfaceRequest(name);
  ifr.ifr_flags = IFF_TUN | IFF_NO_PI;
  if (ioctl(tun.get(), TUNSETIFF, &ifr) < 0) return f.Errno(errno, "ioctl(TUNSETIFF)", name);
  // The pump reads the tun until EAGAIN from epoll. Setting O_NONBLOCK is safe only now, while we are the sole
  // holder: it lives on the open file description, which every later holder shares.
  int flags = fcntl(tun.get(), F_GETFL);
  if (flags < 0) return f.Errno(errno, "fcntl(F_GETFL)", name);
  if (fcntl(tun.get(), F_SETFL, flags | O_NONBLOCK) < 0) return f.Errno(errno, "fcntl(F_SETFL)", name);
  out = std::move(tun);
  return true;
}

bool SetInterfaceAddress(int sock, const std::string& name, unsigned long request, const char* step, in_addr address,
                         Failure& f) {
  ifreq ifr = InterfaceRequest(name);
  sockaddr_in sin{};
  sin.sin_family = AF_INET;
  sin.sin_addr = address;
  std::memcpy(&ifr.ifr_addr, &sin, sizeof sin);
  if (ioctl(sock, request, &ifr) < 0) return f.Errno(errno, step, name);
  return true;
}

// The IPv6 address goes over rtnetlink with IFA_F_NODAD: one added by ioctl stays tentative for a few
// milliseconds even on a NOARP tun, and bind() fails with EADDRNOTAVAIL meanwhile (notes §3 step 7). The prefix
// route appears by itself.
bool AddAddress6(int ifindex, const in6_addr& address, int prefix, const std::string& subject, Failure& f) {
  FileDescriptor nl(socket(AF_NETLINK, SOCK_RAW | SOCK_CLOEXEC, NETLINK_ROUTE));
  if (!nl.valid()) return f.Errno(errno, "socket(AF_NETLINK)", subject);

  constexpr uint32_t kSequence = 1;  // the socket is ours alone and carries this one request
  nlmsghdr header{};
  header.nlmsg_len = NLMSG_LENGTH(sizeof(ifaddrmsg)) + RTA_LENGTH(sizeof(in6_addr));
  header.nlmsg_type = RTM_NEWADDR;
  // EXCL: an address already there means a namespace that is not the fresh one we think it is.
  header.nlmsg_flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_EXCL | NLM_F_CREATE;
  header.nlmsg_seq = kSequence;
  ifaddrmsg message{};
  message.ifa_family = AF_INET6;
  message.ifa_prefixlen = static_cast<unsigned char>(prefix);
  message.ifa_flags = IFA_F_NODAD;
  message.ifa_scope = RT_SCOPE_UNIVERSE;
  message.ifa_index = static_cast<uint32_t>(ifindex);
  rtattr local{};
  local.rta_len = RTA_LENGTH(sizeof(in6_addr));
  local.rta_type = IFA_LOCAL;

  // Assembled with memcpy at the offsets the NLMSG/RTA macros define (16 + 8 + 4 + 16 = 44 bytes).
  alignas(nlmsghdr) unsigned char request[NLMSG_SPACE(sizeof(ifaddrmsg)) + RTA_SPACE(sizeof(in6_addr))] = {};
  std::memcpy(request, &header, sizeof header);
  std::memcpy(request + NLMSG_LENGTH(0), &message, sizeof message);
  std::memcpy(request + NLMSG_SPACE(sizeof(ifaddrmsg)), &local, sizeof local);
  std::memcpy(request + NLMSG_SPACE(sizeof(ifaddrmsg)) + RTA_LENGTH(0), &address, sizeof address);

  sockaddr_nl kernel{};
  kernel.nl_family = AF_NETLINK;
  ssize_t sent = sendto(nl.get(), request, header.nlmsg_len, 0, reinterpret_cast<sockaddr*>(&kernel), sizeof kernel);
  if (sent < 0) return f.Errno(errno, "sendto(RTM_NEWADDR)", subject);
  if (static_cast<size_t>(sent) != header.nlmsg_len) return f.Errno(EPROTO, "sendto(RTM_NEWADDR)", subject);

  // MSG_DONTWAIT cannot lose the ack: rtnetlink handles a request inside the sender's sendto() and queues the ack
  // before it returns. It only guarantees that a missing ack is an error instead of a JS thread joined forever.
  alignas(nlmsghdr) unsigned char reply[4096];
  ssize_t received = recv(nl.get(), reply, sizeof reply, MSG_DONTWAIT);
  if (received < 0) return f.Errno(errno, "recv(RTM_NEWADDR)", subject);
  size_t length = static_cast<size_t>(received);
  size_t offset = 0;
  while (offset + sizeof(nlmsghdr) <= length) {
    nlmsghdr h;
    std::memcpy(&h, reply + offset, sizeof h);
    if (h.nlmsg_len < sizeof h || h.nlmsg_len > length - offset) break;
    if (h.nlmsg_seq == kSequence && h.nlmsg_type == NLMSG_ERROR) {
      if (h.nlmsg_len < NLMSG_LENGTH(sizeof(nlmsgerr))) break;
      nlmsgerr ack;
      std::memcpy(&ack, reply + offset + NLMSG_LENGTH(0), sizeof ack);
      if (ack.error == 0) return true;
      return f.Errno(-ack.error, "RTM_NEWADDR", subject);
    }
    offset += NLMSG_ALIGN(h.nlmsg_len);
  }
  return f.Errno(EPROTO, "recv(RTM_NEWADDR)", subject);
}

// Non-blocking because the pump accepts from epoll; what accept4() returns is blocking regardless (accept(2)
// does not inherit O_NONBLOCK on Linux), which is what the requester receiving the socket expects.
bool OpenListener(const sockaddr* address, socklen_t address_length, int backlog, const std::string& subject,
                  FileDescriptor& out, Failure& f) {
  const int family = address->sa_family;
  FileDescriptor sock(socket(family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0));
  if (!sock.valid()) return f.Errno(errno, "socket", subject);
  const int one = 1;
  // A successor's listeners are new sockets on the same address while TIME_WAITs from the old ones may remain.
  if (setsockopt(sock.get(), SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) < 0) {
    return f.Errno(errno, "setsockopt(SO_REUSEADDR)", subject);
  }
  // IPv4 has its own listener; a dual-stack one would report v4 peers as ::ffff: addresses the NAT never made.
  if (family == AF_INET6 && setsockopt(sock.get(), IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof one) < 0) {
    return f.Errno(errno, "setsockopt(IPV6_V6ONLY)", subject);
  }
  if (bind(sock.get(), address, address_length) < 0) return f.Errno(errno, "bind", subject);
  if (listen(sock.get(), backlog) < 0) return f.Errno(errno, "listen", subject);
  out = std::move(sock);
  return true;
}

// ---------------------------------------------------------------------------------------------------------------
// createNetworkEnvironment(options) -> { netnsFd, tunFd, listener4Fd, listener6Fd, netnsInode, ifindex }

struct Environment {
  FileDescriptor netns;
  FileDescriptor tun;
  FileDescriptor listener4;
  FileDescriptor listener6;
  ino_t inode = 0;
  int ifindex = 0;
};

// notes/bumblebee-kernel.md §3, in that order. Runs on the namespace thread.
bool BuildEnvironment(const EnvironmentOptions& o, Environment& out, Failure& f) {
  if (unshare(CLONE_NEWNET) < 0) return f.Errno(errno, "unshare");

  FileDescriptor netns;
  struct stat st {};
  if (!OpenOwnNamespace(netns, st, f)) return false;

  const std::string backlog = std::to_string(o.backlog);
  const std::pair<const char*, std::string> sysctls[] = {
      // A new namespace copies IPv4 conf from the initial netns, not from its creator, so rp_filter may well be 1,
      // and it would drop SYNs from pool addresses that the tun's routes do not lead back to.
      {"/proc/sys/net/ipv4/conf/all/rp_filter", "0"},
      {"/proc/sys/net/ipv4/conf/default/rp_filter", "0"},
      // Pool addresses are reused by unrelated clients: remembered RTT and cwnd would carry over between them.
      {"/proc/sys/net/ipv4/tcp_no_metrics_save", "1"},
      // Both per namespace; listen() is capped at somaxconn.
      {"/proc/sys/net/core/somaxconn", backlog},
      {"/proc/sys/net/ipv4/tcp_max_syn_backlog", backlog},
      // Before the tun exists, so that it gets no link-local address and sends no RS or MLD into the pump.
      {"/proc/sys/net/ipv6/conf/default/addr_gen_mode", "1"},
  };
  for (const auto& [path, value] : sysctls) {
    if (!WriteSysctl(path, value, f)) return false;
  }

  // The interface ioctls act in the namespace of the socket they are issued on, so this socket is made here.
  FileDescriptor control(socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0));
  if (!control.valid()) return f.Errno(errno, "socket");
  const int s = control.get();
  if (!SetInterfaceFlags(s, "lo", IFF_UP, f)) return false;

  FileDescriptor tun;
  if (!OpenTun(o.tun_name, tun, f)) return false;

  if (!SetInterfaceAddress(s, o.tun_name, SIOCSIFADDR, "ioctl(SIOCSIFADDR)", o.address4, f)) return false;
  in_addr netmask{};
  netmask.s_addr = htonl(static_cast<uint32_t>(UINT64_C(0xffffffff) << (32 - o.prefix4)));
  if (!SetInterfaceAddress(s, o.tun_name, SIOCSIFNETMASK, "ioctl(SIOCSIFNETMASK)", netmask, f)) return false;
  ifreq ifr = InterfaceRequest(o.tun_name);
  ifr.ifr_mtu = o.mtu;
  if (ioctl(s, SIOCSIFMTU, &ifr) < 0) return f.Errno(errno, "ioctl(SIOCSIFMTU)", o.tun_name);
  // The default of 500 overflows in bursts (tx_dropped on the tun).
  ifr = InterfaceRequest(o.tun_name);
  ifr.ifr_qlen = o.tx_queue_length;
  if (ioctl(s, SIOCSIFTXQLEN, &ifr) < 0) return f.Errno(errno, "ioctl(SIOCSIFTXQLEN)", o.tun_name);
  if (!SetInterfaceFlags(s, o.tun_name, IFF_UP | IFF_RUNNING, f)) return false;
  ifr = InterfaceRequest(o.tun_name);
  if (ioctl(s, SIOCGIFINDEX, &ifr) < 0) return f.Errno(errno, "ioctl(SIOCGIFINDEX)", o.tun_name);
  const int ifindex = ifr.ifr_ifindex;

  if (!AddAddress6(ifindex, o.address6, o.prefix6, o.address6_text + "/" + std::to_string(o.prefix6), f)) {
    return false;
  }

  const std::string port = std::to_string(o.listen_port);
  sockaddr_in address4{};
  address4.sin_family = AF_INET;
  address4.sin_addr = o.address4;
  address4.sin_port = htons(o.listen_port);
  FileDescriptor listener4;
  if (!OpenListener(reinterpret_cast<const sockaddr*>(&address4), sizeof address4, o.backlog,
                    o.address4_text + ":" + port, listener4, f)) {
    return false;
  }
  sockaddr_in6 address6{};
  address6.sin6_family = AF_INET6;
  address6.sin6_addr = o.address6;
  address6.sin6_port = htons(o.listen_port);
  FileDescriptor listener6;
  if (!OpenListener(reinterpret_cast<const sockaddr*>(&address6), sizeof address6, o.backlog,
                    "[" + o.address6_text + "]:" + port, listener6, f)) {
    return false;
  }

  out.netns = std::move(netns);
  out.tun = std::move(tun);
  out.listener4 = std::move(listener4);
  out.listener6 = std::move(listener6);
  out.inode = st.st_ino;
  out.ifindex = ifindex;
  return true;
}

Napi::Value CreateNetworkEnvironment(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  // Everything is validated before the thread starts: a bad option must never leave half a namespace behind.
  const EnvironmentOptions options = ParseEnvironmentOptions(info);
  Environment environment;
  RunOnNamespaceThread(env, [&](Failure& f) { BuildEnvironment(options, environment, f); });

  Napi::Object result = Napi::Object::New(env);
  result.Set("netnsFd", Napi::Number::New(env, environment.netns.get()));
  result.Set("tunFd", Napi::Number::New(env, environment.tun.get()));
  result.Set("listener4Fd", Napi::Number::New(env, environment.listener4.get()));
  result.Set("listener6Fd", Napi::Number::New(env, environment.listener6.get()));
  result.Set("netnsInode", Napi::Number::New(env, static_cast<double>(environment.inode)));
  result.Set("ifindex", Napi::Number::New(env, environment.ifindex));
  // Ownership passes to JS only once the result exists: if building it threw, the fds close here instead.
  environment.netns.release();
  environment.tun.release();
  environment.listener4.release();
  environment.listener6.release();
  return result;
}

// ---------------------------------------------------------------------------------------------------------------
// checkNetworkEnvironment(netnsFd, tunName) -> { netnsInode, tunFlags }: the successor's proof that it can
// re-enter the namespace it received (notes §7 step 6).

Napi::Value CheckNetworkEnvironment(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const int netns_fd = FdArgument(info, 0);
  const std::string tun_name = InterfaceName(info[1], "\"tunName\" argument");
  ino_t inode = 0;
  uint16_t tun_flags = 0;
  RunOnNamespaceThread(env, [&](Failure& f) {
    struct stat expected {};
    if (fstat(netns_fd, &expected) < 0) return f.Errno(errno, "fstat");
    // EINVAL when the fd is not a network namespace.
    if (setns(netns_fd, CLONE_NEWNET) < 0) return f.Errno(errno, "setns");
    FileDescriptor own;
    struct stat st {};
    if (!OpenOwnNamespace(own, st, f)) return false;
    if (st.st_ino != expected.st_ino || st.st_dev != expected.st_dev) {
      return f.Fault("EFDFERRY_NETNS", "setns: the thread is in netns inode " + std::to_string(st.st_ino) +
                                           " after joining fd " + std::to_string(netns_fd) + ", which is inode " +
                                           std::to_string(expected.st_ino));
    }
    FileDescriptor control(socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0));
    if (!control.valid()) return f.Errno(errno, "socket");
    ifreq ifr = InterfaceRequest(tun_name);
    if (ioctl(control.get(), SIOCGIFFLAGS, &ifr) < 0) return f.Errno(errno, "ioctl(SIOCGIFFLAGS)", tun_name);
    inode = st.st_ino;
    // ifr_flags is a short: through uint16_t, a flag in bit 15 (IFF_DYNAMIC) does not make the number negative.
    tun_flags = static_cast<uint16_t>(ifr.ifr_flags);
    return true;
  });

  Napi::Object result = Napi::Object::New(env);
  result.Set("netnsInode", Napi::Number::New(env, static_cast<double>(inode)));
  result.Set("tunFlags", Napi::Number::New(env, tun_flags));
  return result;
}

// ---------------------------------------------------------------------------------------------------------------
// openTunInNamespace(netnsPath, tunName) -> tun fd, attached to an existing (persistent) tun in a named netns,
// e.g. one made with `ip netns exec x ip tuntap add dev ctun mode tun`.

Napi::Value OpenTunInNamespace(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const std::string netns_path = StringValue(info[0], "\"netnsPath\" argument");
  if (netns_path.empty() || netns_path.find('\0') != std::string::npos) {
    ThrowInvalidValue(env, "\"netnsPath\" argument", "a non-empty path without NUL", netns_path);
  }
  const std::string tun_name = InterfaceName(info[1], "\"tunName\" argument");
  FileDescriptor tun;
  RunOnNamespaceThread(env, [&](Failure& f) {
    {
      FileDescriptor netns(open(netns_path.c_str(), O_RDONLY | O_CLOEXEC));
      if (!netns.valid()) return f.Errno(errno, "open", netns_path);
      if (setns(netns.get(), CLONE_NEWNET) < 0) return f.Errno(errno, "setns", netns_path);
    }
    // TUNSETIFF on a name that does not exist would quietly create a new, non-persistent tun that vanishes with
    // this fd. Asking for the index first turns that into ENODEV.
    FileDescriptor control(socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0));
    if (!control.valid()) return f.Errno(errno, "socket");
    ifreq ifr = InterfaceRequest(tun_name);
    if (ioctl(control.get(), SIOCGIFINDEX, &ifr) < 0) return f.Errno(errno, "ioctl(SIOCGIFINDEX)", tun_name);
    return OpenTun(tun_name, tun, f);
  });
  Napi::Number result = Napi::Number::New(env, tun.get());
  tun.release();
  return result;
}

// ---------------------------------------------------------------------------------------------------------------
// socketNamespaceInode(fd) -> inode of the netns the socket was created in. Needs no namespace thread: the
// ioctl only hands back a new fd on that namespace (O_CLOEXEC, from the kernel's open_related_ns).

Napi::Value SocketNamespaceInode(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const int fd = FdArgument(info, 0);
  FileDescriptor netns(ioctl(fd, SIOCGSKNS));
  if (!netns.valid()) throw ErrnoException(env, errno, "ioctl(SIOCGSKNS)");
  struct stat st {};
  if (fstat(netns.get(), &st) < 0) throw ErrnoException(env, errno, "fstat");
  return Napi::Number::New(env, static_cast<double>(st.st_ino));
}

}  // namespace

void InitNetns(Napi::Env env, Napi::Object exports) {
  exports.Set("createNetworkEnvironment",
              Napi::Function::New(env, CreateNetworkEnvironment, "createNetworkEnvironment"));
  exports.Set("checkNetworkEnvironment", Napi::Function::New(env, CheckNetworkEnvironment, "checkNetworkEnvironment"));
  exports.Set("openTunInNamespace", Napi::Function::New(env, OpenTunInNamespace, "openTunInNamespace"));
  exports.Set("socketNamespaceInode", Napi::Function::New(env, SocketNamespaceInode, "socketNamespaceInode"));
}

}  // namespace fdferry
