// Fish's persistent tun (see tun.h): openPersistentTun(name) -> {fd, ifindex, created}, unpersistTun(fd).
//
// Man pages: netdevice(7), if_nametoindex(3), open(2), ioctl(2), fcntl(2). Kernel docs:
// Documentation/networking/tuntap.rst. Recipe: notes/fish-kernel.md §3 step 3, §9.
//
// Runs on the JS thread, unlike netns.cc: a tun joins the network namespace of the thread that opens
// /dev/net/tun, and Fish's whole process lives in the namespace it serves (started there, e.g. with
// `ip netns exec`, notes §2), so the JS thread's namespace is the right one and no namespace thread is needed.
#include "tun.h"

#include <fcntl.h>
#include <linux/if_tun.h>
#include <net/if.h>
#include <sys/ioctl.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <string>

#include "errors.h"
#include "fd.h"

// Older uapi headers may lack the tun ioctls.
#ifndef TUNSETIFF
#define TUNSETIFF 0x400454ca
#endif
#ifndef TUNSETPERSIST
#define TUNSETPERSIST 0x400454cb
#endif

namespace fdferry {

namespace {

constexpr const char* kTunDevice = "/dev/net/tun";

// The kernel's dev_valid_name() plus '%' (as in netns.cc): TUNSETIFF would treat "fish%d" as a template and
// make up a name, and re-attaching by name after a crash would then miss the device.
std::string TunName(const Napi::Value& value) {
  Napi::Env env = value.Env();
  if (!value.IsString()) throw Napi::TypeError::New(env, "The \"name\" argument must be of type string");
  std::string name = value.As<Napi::String>().Utf8Value();
  bool valid = !name.empty() && name.size() < IFNAMSIZ && name != "." && name != "..";
  for (unsigned char c : name) {
    if (c == '\0' || c == '/' || c == ':' || c == '%' || c == ' ' || (c >= '\t' && c <= '\r')) valid = false;
  }
  if (!valid) {
    Napi::Error error = Napi::TypeError::New(
        env, "The \"name\" argument must be an interface name of 1 to 15 bytes without '/', ':', '%', whitespace "
             "or NUL. Received '" + name + "'");
    error.Set("code", Napi::String::New(env, "ERR_INVALID_ARG_VALUE"));
    throw error;
  }
  return name;
}

Napi::Value OpenPersistentTun(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const std::string name = TunName(info[0]);
  // Asked before TUNSETIFF, which attaches to an existing tun and creates a missing one alike: `created` tells
  // the caller whether it is cleaning up after a predecessor (routes and rules may already point at it).
  const bool existed = if_nametoindex(name.c_str()) != 0;

  FileDescriptor tun(open(kTunDevice, O_RDWR | O_CLOEXEC));
  if (!tun.valid()) throw ErrnoException(env, errno, "open", kTunDevice);
  ifreq ifr{};
  std::memcpy(ifr.ifr_name, name.data(), name.size());  // shorter than IFNAMSIZ: stays NUL-terminated
  // No IFF_VNET_HDR and no offloads: every packet read is whole with valid checksums (notes §5).
  ifr.ifr_flags = IFF_TUN | IFF_NO_PI;
  if (ioctl(tun.get(), TUNSETIFF, &ifr) < 0) throw ErrnoException(env, errno, "ioctl(TUNSETIFF)", name);

  // From here a device we created would outlive a failure (once persistent) or vanish with the fd (before):
  // undo persistence on the way out so a failed open leaves the host as it found it.
  auto fail = [&](int err, const char* step) {
    if (!existed) {
      ioctl(tun.get(), TUNSETPERSIST, 0);
    }
    return ErrnoException(env, err, step, name);
  };
  // Persistent: the device, and so the routes through it, survive a crash of Fish (notes §9); the successor
  // re-attaches with the same TUNSETIFF.
  if (ioctl(tun.get(), TUNSETPERSIST, 1) < 0) throw fail(errno, "ioctl(TUNSETPERSIST)");
  // The pump reads until EAGAIN. O_NONBLOCK lives on the open file description; we are its only holder now.
  int flags = fcntl(tun.get(), F_GETFL);
  if (flags < 0) throw fail(errno, "fcntl(F_GETFL)");
  if (fcntl(tun.get(), F_SETFL, flags | O_NONBLOCK) < 0) throw fail(errno, "fcntl(F_SETFL)");
  const unsigned ifindex = if_nametoindex(name.c_str());
  if (ifindex == 0) throw fail(errno, "if_nametoindex");

  Napi::Object result = Napi::Object::New(env);
  result.Set("fd", Napi::Number::New(env, tun.release()));
  result.Set("ifindex", Napi::Number::New(env, ifindex));
  result.Set("created", Napi::Boolean::New(env, !existed));
  return result;
}

// Clears persistence: the device (and every route through it) goes away when its last fd closes.
void UnpersistTun(const Napi::CallbackInfo& info) {
  const int fd = FdArgument(info, 0);
  if (ioctl(fd, TUNSETPERSIST, 0) < 0) throw ErrnoException(info.Env(), errno, "ioctl(TUNSETPERSIST)");
}

}  // namespace

void InitTun(Napi::Env env, Napi::Object exports) {
  exports.Set("openPersistentTun", Napi::Function::New(env, OpenPersistentTun, "openPersistentTun"));
  exports.Set("unpersistTun", Napi::Function::New(env, UnpersistTun, "unpersistTun"));
}

}  // namespace fdferry
