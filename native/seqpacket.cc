// AF_UNIX SOCK_SEQPACKET sockets on the environment's libuv loop, with SCM_RIGHTS fd passing.
//
// Man pages: unix(7) (abstract names, SO_PEERCRED, SCM_RIGHTS, SCM_MAX_FD), socket(2), socketpair(2), bind(2),
// listen(2), accept4(2), connect(2), sendmsg(2), recvmsg(2) (MSG_CMSG_CLOEXEC, MSG_CTRUNC, MSG_TRUNC),
// cmsg(3), getsockopt(2), socket(7) (SO_ERROR). libuv docs: uv_poll_t (UV_DISCONNECT; the callback gets a
// negative status and the watcher is stopped on POLLERR), uv_timer_t, uv_close, uv_ref/uv_unref.
//
// Node cannot adopt SOCK_SEQPACKET fds (uv_guess_handle says UNKNOWN, libuv/libuv#4989), so we poll them with
// a uv_poll_t and do the I/O ourselves. Framing and policy live in TypeScript; this file only moves messages.
#include "seqpacket.h"

#include <sys/socket.h>
#include <sys/un.h>

#include <cerrno>
#include <cstddef>
#include <cstring>
#include <string>

#include "errors.h"

namespace fdferry {

// Addresses (shared with notify.cc; declared in seqpacket.h)

std::string PathArgument(const Napi::CallbackInfo& info, size_t index) {
  if (!info[index].IsString()) throw Napi::TypeError::New(info.Env(), "path must be a string");
  // Utf8Value keeps embedded NULs, which abstract names need.
  return info[index].As<Napi::String>().Utf8Value();
}

// Fills `address` for `path` and returns the length to pass to bind/connect. sun_path is 108 bytes: a filesystem
// path needs its terminating NUL in there, so 107 bytes are usable; an abstract name (leading NUL) is not
// NUL-terminated and its length is part of the address, so it gets 107 bytes after the NUL.
socklen_t UnixAddress(Napi::Env env, const std::string& path, sockaddr_un& address, const char* syscall) {
  address = {};
  address.sun_family = AF_UNIX;
  const bool abstract = !path.empty() && path[0] == '\0';
  // An empty path would make bind() autobind to a random abstract name: never what the caller meant. A NUL
  // inside a filesystem path would silently cut it short.
  if (path.empty() || (!abstract && path.find('\0') != std::string::npos)) {
    throw ErrnoException(env, EINVAL, syscall, path);
  }
  const size_t usable = sizeof(address.sun_path) - 1;
  if ((abstract ? path.size() - 1 : path.size()) > usable) throw ErrnoException(env, ENAMETOOLONG, syscall, path);
  std::memcpy(address.sun_path, path.data(), path.size());
  // Abstract: exactly offsetof + length, because every byte of sun_path up to the length is part of the name
  // (sizeof(address) would add trailing NULs to it). Filesystem: include the NUL.
  return static_cast<socklen_t>(offsetof(sockaddr_un, sun_path) + path.size() + (abstract ? 0 : 1));
}

namespace {

// Room for the largest SCM_RIGHTS message the kernel will send. alignas: CMSG_FIRSTHDR/CMSG_NXTHDR cast the
// buffer to struct cmsghdr*, which must be aligned.
constexpr size_t kControlSize = CMSG_SPACE(sizeof(int) * kMaxFdsPerMessage);
struct alignas(cmsghdr) ControlBuffer {
  char bytes[kControlSize];
};

// Every socket we create is nonblocking (the loop must never block) and close-on-exec (a child we spawn gets
// only the fds we pass on purpose).
constexpr int kSocketFlags = SOCK_NONBLOCK | SOCK_CLOEXEC;

Napi::Value SeqpacketListen(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  std::string path = PathArgument(info, 0);
  if (!info[1].IsNumber()) throw Napi::TypeError::New(env, "backlog must be a number");
  int backlog = info[1].As<Napi::Number>().Int32Value();
  sockaddr_un address;
  socklen_t length = UnixAddress(env, path, address, "bind");

  FileDescriptor fd(socket(AF_UNIX, SOCK_SEQPACKET | kSocketFlags, 0));
  if (!fd.valid()) throw ErrnoException(env, errno, "socket");
  // No unlink of a stale path here: deciding that a path is stale (nobody listening) is policy, done in TS.
  if (bind(fd.get(), reinterpret_cast<sockaddr*>(&address), length) < 0) {
    throw ErrnoException(env, errno, "bind", path);
  }
  if (listen(fd.get(), backlog) < 0) throw ErrnoException(env, errno, "listen", path);
  return Napi::Number::New(env, fd.release());
}

Napi::Value SeqpacketConnect(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  std::string path = PathArgument(info, 0);
  sockaddr_un address;
  socklen_t length = UnixAddress(env, path, address, "connect");

  FileDescriptor fd(socket(AF_UNIX, SOCK_SEQPACKET | kSocketFlags, 0));
  if (!fd.valid()) throw ErrnoException(env, errno, "socket");
  // An AF_UNIX connect completes at once or fails; on a nonblocking socket a full backlog gives EAGAIN (not
  // EINPROGRESS), which we surface so TS can retry instead of blocking the loop here.
  if (connect(fd.get(), reinterpret_cast<sockaddr*>(&address), length) < 0) {
    throw ErrnoException(env, errno, "connect", path);
  }
  return Napi::Number::New(env, fd.release());
}

Napi::Value Pair(Napi::Env env, int type) {
  int fds[2];
  if (socketpair(AF_UNIX, type | kSocketFlags, 0, fds) < 0) throw ErrnoException(env, errno, "socketpair");
  FileDescriptor a(fds[0]), b(fds[1]);
  Napi::Array result = Napi::Array::New(env, 2);
  result.Set(0u, Napi::Number::New(env, a.get()));
  result.Set(1u, Napi::Number::New(env, b.get()));
  a.release();
  b.release();
  return result;
}

Napi::Value SeqpacketPair(const Napi::CallbackInfo& info) { return Pair(info.Env(), SOCK_SEQPACKET); }
Napi::Value StreamPair(const Napi::CallbackInfo& info) { return Pair(info.Env(), SOCK_STREAM); }

Napi::Value OpenSeqpacket(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!info[1].IsObject()) throw Napi::TypeError::New(env, "callbacks must be an object");
  Napi::Object callbacks = info[1].As<Napi::Object>();
  return Fdferry::Of(env).socketClass.New(
      {info[0], callbacks.Get("message"), callbacks.Get("drain"), callbacks.Get("close")});
}

Napi::Value OpenListener(const Napi::CallbackInfo& info) {
  return Fdferry::Of(info.Env()).listenerClass.New({info[0], info[1]});
}

Napi::FunctionReference CallbackArgument(const Napi::CallbackInfo& info, size_t index, const char* name) {
  if (!info[index].IsFunction()) {
    throw Napi::TypeError::New(info.Env(), std::string(name) + " must be a function");
  }
  return Napi::Persistent(info[index].As<Napi::Function>());
}

// Refuses a second watcher on an fd this environment already polls: uv_poll_init on such an fd would remove the
// first watcher's epoll registration (libuv's fd check does EPOLL_CTL_ADD then DEL) and libuv later aborts.
void CheckNotPolled(Napi::Env env, Fdferry& addon, int fd) {
  if (addon.IsPolled(fd)) throw ErrnoException(env, EEXIST, "uv_poll_init");
}

}  // namespace

// ---------------------------------------------------------------------------------------------------------------
// SeqpacketSocket

Napi::Function SeqpacketSocket::DefineClass(Napi::Env env) {
  return ObjectWrap::DefineClass(env, "SeqpacketSocket",
                                 {
                                     InstanceAccessor<&SeqpacketSocket::Fd>("fd"),
                                     InstanceAccessor<&SeqpacketSocket::Queued>("queued"),
                                     InstanceMethod<&SeqpacketSocket::Send>("send"),
                                     InstanceMethod<&SeqpacketSocket::SetReading>("setReading"),
                                     InstanceMethod<&SeqpacketSocket::PeerCredentials>("peerCredentials"),
                                     InstanceMethod<&SeqpacketSocket::Close>("close"),
                                     InstanceMethod<&SeqpacketSocket::JsRef>("ref"),
                                     InstanceMethod<&SeqpacketSocket::JsUnref>("unref"),
                                 });
}

SeqpacketSocket::SeqpacketSocket(const Napi::CallbackInfo& info)
    : ObjectWrap(info),
      addon_(Fdferry::Of(info.Env())),
      // One async context for the object's whole life: every callback it makes is then one async resource to
      // async_hooks/AsyncLocalStorage, like a net.Socket's.
      async_context_(info.Env(), "fdferry:SeqpacketSocket", info.This().As<Napi::Object>()) {
  Napi::Env env = info.Env();
  int fd = FdArgument(info, 0);
  on_message_ = CallbackArgument(info, 1, "message");
  on_drain_ = CallbackArgument(info, 2, "drain");
  on_close_ = CallbackArgument(info, 3, "close");
  CheckNotPolled(env, addon_, fd);
  int status = poll_.Init(addon_.pendingCloses(),
                          [&](uv_poll_t* handle) { return uv_poll_init(addon_.loop(), handle, fd); });
  if (status < 0) throw ErrnoException(env, -status, "uv_poll_init");
  poll_.get()->data = this;
  UpdatePoll();
  // Ownership of the fd starts only now that nothing else can fail: if the constructor throws, the fd stays
  // the caller's (and may belong to another open socket, see CheckNotPolled).
  fd_.reset(fd);
  addon_.Register(fd, this);
  // A strong reference while open: the loop holds a pointer to us, so the GC must not collect the wrapper
  // even when JS drops every reference to an open socket. Release() turns it weak again.
  Ref();
}

SeqpacketSocket::~SeqpacketSocket() { ReleaseResources(); }

Napi::Value SeqpacketSocket::Fd(const Napi::CallbackInfo& info) { return Napi::Number::New(info.Env(), fd_.get()); }

Napi::Value SeqpacketSocket::Queued(const Napi::CallbackInfo& info) {
  return Napi::Number::New(info.Env(), static_cast<double>(queue_.size()));
}

int SeqpacketSocket::SendNow(const uint8_t* data, size_t length, const int* fds, size_t count) {
  iovec iov{const_cast<uint8_t*>(data), length};
  msghdr message{};
  message.msg_iov = &iov;
  message.msg_iovlen = 1;
  ControlBuffer control{};  // zeroed: the padding CMSG_SPACE adds goes to the kernel
  if (count > 0) {
    message.msg_control = control.bytes;
    message.msg_controllen = CMSG_SPACE(sizeof(int) * count);
    cmsghdr* header = CMSG_FIRSTHDR(&message);
    header->cmsg_level = SOL_SOCKET;
    header->cmsg_type = SCM_RIGHTS;
    header->cmsg_len = CMSG_LEN(sizeof(int) * count);
    std::memcpy(CMSG_DATA(header), fds, sizeof(int) * count);
  }
  // MSG_NOSIGNAL: a vanished peer must give EPIPE, not a SIGPIPE that kills the daemon. MSG_DONTWAIT: the
  // fd came from outside and may have been made blocking by another process sharing the file description.
  // SEQPACKET sends are atomic, so there is no partial write to resume.
  ssize_t sent;
  do {
    sent = sendmsg(fd_.get(), &message, MSG_NOSIGNAL | MSG_DONTWAIT);
  } while (sent < 0 && errno == EINTR);
  return sent < 0 ? errno : 0;
}

Napi::Value SeqpacketSocket::Send(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (closed_) throw ErrnoException(env, EBADF, "sendmsg");
  if (!info[0].IsTypedArray()) throw Napi::TypeError::New(env, "data must be a Uint8Array");
  if (!info[1].IsArray()) throw Napi::TypeError::New(env, "fds must be an array");
  Napi::TypedArray view = info[0].As<Napi::TypedArray>();
  Napi::Array list = info[1].As<Napi::Array>();
  const uint8_t* data = static_cast<const uint8_t*>(view.ArrayBuffer().Data()) + view.ByteOffset();
  const size_t length = view.ByteLength();

  // On SEQPACKET a 0-byte read means EOF, so an empty message would look like a hang-up to the peer.
  if (length == 0) {
    throw FdferryError(env, "EFDFERRY_EMPTY", "send: empty messages are not allowed (the peer would read EOF)");
  }
  if (list.Length() > static_cast<uint32_t>(kMaxFdsPerMessage)) {
    throw FdferryError(env, "EFDFERRY_TOOMANYFDS",
                       "send: " + std::to_string(list.Length()) + " fds in one message, at most " +
                           std::to_string(kMaxFdsPerMessage) + " (SCM_MAX_FD)");
  }
  std::vector<int> fds(list.Length());
  for (uint32_t i = 0; i < list.Length(); i++) {
    Napi::Value value = list.Get(i);
    if (!value.IsNumber()) throw Napi::TypeError::New(env, "fds must be numbers");
    fds[i] = value.As<Napi::Number>().Int32Value();
  }

  // Order is preserved: while anything waits in the queue, new messages go behind it.
  if (queue_.empty()) {
    int err = SendNow(data, length, fds.data(), fds.size());
    if (err == 0) return Napi::Boolean::New(env, true);  // sent: the caller's fds are still the caller's
    if (err != EAGAIN && err != EWOULDBLOCK) throw ErrnoException(env, err, "sendmsg");
  }

  Pending pending;
  pending.data.assign(data, data + length);
  pending.fds.reserve(fds.size());
  for (int fd : fds) {
    // Duplicates, so the message stays valid after the caller closes its fds (the documented contract).
    // On failure the duplicates made so far are closed by their FileDescriptors.
    FileDescriptor copy(DupCloexec(fd));
    if (!copy.valid()) throw ErrnoException(env, errno, "fcntl");
    pending.fds.push_back(std::move(copy));
  }
  queue_.push_back(std::move(pending));
  UpdatePoll();  // arms UV_WRITABLE

  const bool below = queue_.size() < static_cast<size_t>(kHighWaterMark);
  if (!below) need_drain_ = true;
  return Napi::Boolean::New(env, below);
}

void SeqpacketSocket::SetReading(const Napi::CallbackInfo& info) {
  if (!info[0].IsBoolean()) throw Napi::TypeError::New(info.Env(), "reading must be a boolean");
  reading_ = info[0].As<Napi::Boolean>().Value();
  UpdatePoll();
}

Napi::Value SeqpacketSocket::PeerCredentials(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  // SO_PEERCRED is fixed at connect()/socketpair() time: for a socketpair it names the process that created
  // the pair, not whoever holds the other end now, so authenticate only connect()ed peers with it.
  ucred credentials{};
  socklen_t length = sizeof credentials;
  if (getsockopt(fd_.get(), SOL_SOCKET, SO_PEERCRED, &credentials, &length) < 0) {
    throw ErrnoException(env, errno, "getsockopt");
  }
  Napi::Object result = Napi::Object::New(env);
  result.Set("pid", Napi::Number::New(env, credentials.pid));
  result.Set("uid", Napi::Number::New(env, credentials.uid));
  result.Set("gid", Napi::Number::New(env, credentials.gid));
  return result;
}

// JS closing the socket itself does NOT call the `close` callback: that callback reports what the peer or the
// kernel did (EOF, hang-up, error). The caller of close() already knows, and calling back into it from inside
// its own close() would only invite re-entrancy bugs.
void SeqpacketSocket::Close(const Napi::CallbackInfo&) { Release(); }

void SeqpacketSocket::JsRef(const Napi::CallbackInfo&) {
  if (poll_) uv_ref(poll_.base());
}

void SeqpacketSocket::JsUnref(const Napi::CallbackInfo&) {
  if (poll_) uv_unref(poll_.base());
}

void SeqpacketSocket::UpdatePoll() {
  if (closed_ || !poll_) return;
  // UV_WRITABLE only while something is queued: a socket is almost always writable, and asking for it
  // otherwise would wake the loop on every iteration.
  const int wanted = (reading_ ? UV_READABLE | UV_DISCONNECT : 0) | (queue_.empty() ? 0 : UV_WRITABLE);
  if (wanted == events_) return;
  const int status = wanted != 0 ? uv_poll_start(poll_.get(), wanted, OnPoll) : uv_poll_stop(poll_.get());
  if (status < 0) throw ErrnoException(Env(), -status, "uv_poll_start");
  events_ = wanted;
}

void SeqpacketSocket::OnPoll(uv_poll_t* handle, int status, int events) {
  auto* self = static_cast<SeqpacketSocket*>(handle->data);
  if (self == nullptr) return;
  AtLoopBoundary(self->Env(), [&] { self->HandlePoll(status, events); });
}

void SeqpacketSocket::HandlePoll(int status, int events) {
  Napi::Env env = Env();
  // A local handle on our own JS object keeps it (and so `this`) alive for the whole callback, even after
  // Release() turns the reference weak and the JS callbacks drop their last reference to it.
  Napi::Object self = Value();

  if (status < 0) {
    // libuv saw POLLERR and stopped the watcher. The real error is the socket's pending SO_ERROR (reading it
    // clears it). ECONNRESET/EPIPE mean the peer went away, possibly with messages still queued for us: those
    // are still readable, and EOF follows them.
    events_ = 0;
    int err = 0;
    socklen_t length = sizeof err;
    if (getsockopt(fd_.get(), SOL_SOCKET, SO_ERROR, &err, &length) < 0) err = errno;
    if (err != 0 && err != ECONNRESET && err != EPIPE) {
      PeerClosed(self, ErrnoException(env, err, "poll").Value());
      return;
    }
    events = UV_READABLE | UV_WRITABLE;
  }

  // Read before writing: if the peer is gone, its last messages and its EOF are delivered before a failing
  // flush could close the socket under them.
  if ((events & (UV_READABLE | UV_DISCONNECT)) && reading_) {
    ReadMessages(env, self);
    if (closed_) return;
  }
  if ((events & UV_WRITABLE) && !queue_.empty()) {
    Flush(env, self);
    if (closed_) return;
  }
  UpdatePoll();
}

void SeqpacketSocket::ReadMessages(Napi::Env env, Napi::Object self) {
  char* buffer = addon_.receiveBuffer();
  for (int i = 0; i < kMaxPerWakeup && reading_ && !closed_; i++) {
    iovec iov{buffer, static_cast<size_t>(kMaxFrame)};
    ControlBuffer control;
    msghdr message{};
    message.msg_iov = &iov;
    message.msg_iovlen = 1;
    message.msg_control = control.bytes;
    message.msg_controllen = sizeof control.bytes;

    // MSG_CMSG_CLOEXEC: received fds are close-on-exec from the moment they exist, so they cannot leak into a
    // child spawned meanwhile. MSG_DONTWAIT: see SendNow.
    ssize_t n;
    do {
      n = recvmsg(fd_.get(), &message, MSG_CMSG_CLOEXEC | MSG_DONTWAIT);
    } while (n < 0 && errno == EINTR);
    if (n < 0) {
      const int err = errno;
      if (err == EAGAIN || err == EWOULDBLOCK) return;
      // The peer closed with unread data on its side. recvmsg reports the pending error once (and clears it);
      // messages already queued for us are still readable after it, then EOF.
      if (err == ECONNRESET) continue;
      PeerClosed(self, ErrnoException(env, err, "recvmsg").Value());
      return;
    }

    // Collect the fds of EVERY SCM_RIGHTS header: the kernel may split them over several. They are owned here
    // until JS gets them, so any early exit closes them.
    std::vector<FileDescriptor> fds;
    for (cmsghdr* header = CMSG_FIRSTHDR(&message); header != nullptr; header = CMSG_NXTHDR(&message, header)) {
      if (header->cmsg_level != SOL_SOCKET || header->cmsg_type != SCM_RIGHTS) continue;
      const size_t count = (header->cmsg_len - CMSG_LEN(0)) / sizeof(int);
      const unsigned char* bytes = CMSG_DATA(header);
      for (size_t k = 0; k < count; k++) {
        int fd;
        std::memcpy(&fd, bytes + k * sizeof(int), sizeof fd);  // CMSG_DATA need not be int-aligned
        fds.emplace_back(fd);
      }
    }

    if (n == 0) {
      // EOF (we never send empty messages, and neither may a peer). Any fds that came with it are closed.
      PeerClosed(self, env.Null());
      return;
    }

    Napi::Buffer<char> data = Napi::Buffer<char>::Copy(env, buffer, static_cast<size_t>(n));
    Napi::Array list = Napi::Array::New(env);
    Napi::Value fault = env.Null();
    if (message.msg_flags & (MSG_CTRUNC | MSG_TRUNC)) {
      // A protocol error for this message: with MSG_CTRUNC the kernel dropped the fds it could not install
      // (receiver at RLIMIT_NOFILE, an LSM said no), so the set is incomplete and useless. Close every fd that
      // did arrive rather than hand JS half a set. MSG_TRUNC: the sender broke the MAX_FRAME contract.
      fds.clear();
      Napi::Object info = Napi::Object::New(env);
      info.Set("ctrunc", Napi::Boolean::New(env, (message.msg_flags & MSG_CTRUNC) != 0));
      info.Set("trunc", Napi::Boolean::New(env, (message.msg_flags & MSG_TRUNC) != 0));
      fault = info;
    } else {
      for (size_t k = 0; k < fds.size(); k++) {
        list.Set(static_cast<uint32_t>(k), Napi::Number::New(env, fds[k].get()));
      }
      // From here the fds are the callback's, even if it throws.
      for (FileDescriptor& fd : fds) fd.release();
    }
    CallIntoJs(env, async_context_, self, on_message_.Value(), {data, list, fault});
    // The callback may have closed the socket or paused reading: the loop condition re-checks both.
  }
}

void SeqpacketSocket::Flush(Napi::Env env, Napi::Object self) {
  while (!queue_.empty()) {
    Pending& front = queue_.front();
    std::vector<int> fds;
    fds.reserve(front.fds.size());
    for (const FileDescriptor& fd : front.fds) fds.push_back(fd.get());
    const int err = SendNow(front.data.data(), front.data.size(), fds.data(), fds.size());
    if (err == EAGAIN || err == EWOULDBLOCK) return;  // still full: UV_WRITABLE stays armed
    if (err == 0) {
      queue_.pop_front();  // the kernel holds its own references now: our duplicates are closed here
      continue;
    }
    // The messages can no longer be sent; drop them (closing their duplicated fds).
    queue_.clear();
    need_drain_ = false;
    if (err == EPIPE || err == ECONNRESET) {
      // The peer hung up (or shut down its reading side). While we read, the read side reports the hang-up
      // itself after delivering the peer's last messages; otherwise report it now.
      if (!reading_) PeerClosed(self, env.Null());
      return;
    }
    PeerClosed(self, ErrnoException(env, err, "sendmsg").Value());
    return;
  }
  if (need_drain_) {
    need_drain_ = false;
    UpdatePoll();  // disarm UV_WRITABLE before JS runs: drain handlers usually send again, which re-arms it
    CallIntoJs(env, async_context_, self, on_drain_.Value(), {});
  }
}

// Everything except the JS side: safe from destructors and from the cleanup hook.
// Order matters (libuv aborts otherwise, libuv/libuv#5130): mark closed and take the fd out first, so nothing
// re-arms the watcher; stop and close the watcher, which also removes the fd from epoll; only then close(2) the
// fd. The handle memory is freed later, in the uv_close callback (see UvHandle).
void SeqpacketSocket::ReleaseResources() {
  if (closed_) return;
  closed_ = true;
  FileDescriptor fd = std::move(fd_);  // fd_ reads -1 from here on
  if (poll_) uv_poll_stop(poll_.get());
  poll_.Close();
  addon_.Unregister(fd.get());
  fd.reset();
  queue_.clear();  // closes the duplicated fds of messages never sent
  need_drain_ = false;
}

void SeqpacketSocket::Release() {
  if (closed_) return;
  ReleaseResources();
  // Drop the callbacks: they usually close over this very object, and strong references from native code
  // would keep that cycle alive forever. Then let the GC have the wrapper.
  on_message_.Reset();
  on_drain_.Reset();
  on_close_.Reset();
  Unref();
}

void SeqpacketSocket::PeerClosed(Napi::Object self, Napi::Value error) {
  Napi::Function callback = on_close_.Value();  // a local: Release() resets the reference
  Release();
  CallIntoJs(Env(), async_context_, self, callback, {error});
}

void SeqpacketSocket::CloseForTeardown() { Release(); }

// ---------------------------------------------------------------------------------------------------------------
// SeqpacketListener

Napi::Function SeqpacketListener::DefineClass(Napi::Env env) {
  return ObjectWrap::DefineClass(env, "SeqpacketListener",
                                 {
                                     InstanceAccessor<&SeqpacketListener::Fd>("fd"),
                                     InstanceMethod<&SeqpacketListener::SetAccepting>("setAccepting"),
                                     InstanceMethod<&SeqpacketListener::Close>("close"),
                                     InstanceMethod<&SeqpacketListener::JsRef>("ref"),
                                     InstanceMethod<&SeqpacketListener::JsUnref>("unref"),
                                 });
}

SeqpacketListener::SeqpacketListener(const Napi::CallbackInfo& info)
    : ObjectWrap(info),
      addon_(Fdferry::Of(info.Env())),
      async_context_(info.Env(), "fdferry:SeqpacketListener", info.This().As<Napi::Object>()) {
  Napi::Env env = info.Env();
  int fd = FdArgument(info, 0);
  on_connection_ = CallbackArgument(info, 1, "onConnection");
  CheckNotPolled(env, addon_, fd);
  int status = poll_.Init(addon_.pendingCloses(),
                          [&](uv_poll_t* handle) { return uv_poll_init(addon_.loop(), handle, fd); });
  if (status < 0) throw ErrnoException(env, -status, "uv_poll_init");
  poll_.get()->data = this;
  status = backoff_.Init(addon_.pendingCloses(),
                         [&](uv_timer_t* handle) { return uv_timer_init(addon_.loop(), handle); });
  if (status < 0) throw ErrnoException(env, -status, "uv_timer_init");
  backoff_.get()->data = this;
  UpdatePoll();
  // As in SeqpacketSocket: the fd is ours only once nothing can fail any more, and we stay alive while open.
  fd_.reset(fd);
  addon_.Register(fd, this);
  Ref();
}

SeqpacketListener::~SeqpacketListener() { ReleaseResources(); }

Napi::Value SeqpacketListener::Fd(const Napi::CallbackInfo& info) {
  return Napi::Number::New(info.Env(), fd_.get());
}

void SeqpacketListener::SetAccepting(const Napi::CallbackInfo& info) {
  if (!info[0].IsBoolean()) throw Napi::TypeError::New(info.Env(), "accepting must be a boolean");
  accepting_ = info[0].As<Napi::Boolean>().Value();
  UpdatePoll();
}

void SeqpacketListener::Close(const Napi::CallbackInfo&) { Release(); }

void SeqpacketListener::JsRef(const Napi::CallbackInfo&) {
  if (poll_) uv_ref(poll_.base());
  if (backoff_) uv_ref(backoff_.base());
}

void SeqpacketListener::JsUnref(const Napi::CallbackInfo&) {
  if (poll_) uv_unref(poll_.base());
  if (backoff_) uv_unref(backoff_.base());
}

void SeqpacketListener::UpdatePoll() {
  if (closed_ || !poll_) return;
  const bool wanted = accepting_ && !backing_off_;
  if (wanted == polling_) return;
  const int status = wanted ? uv_poll_start(poll_.get(), UV_READABLE, OnPoll) : uv_poll_stop(poll_.get());
  if (status < 0) throw ErrnoException(Env(), -status, "uv_poll_start");
  polling_ = wanted;
}

void SeqpacketListener::OnPoll(uv_poll_t* handle, int status, int) {
  auto* listener = static_cast<SeqpacketListener*>(handle->data);
  if (listener == nullptr) return;
  AtLoopBoundary(listener->Env(), [&] {
    if (status < 0) listener->polling_ = false;  // libuv stopped the watcher on POLLERR; accept4 says why
    Napi::Object self = listener->Value();  // keeps the wrapper alive through the callbacks
    listener->Accept(listener->Env(), self);
    listener->UpdatePoll();
  });
}

void SeqpacketListener::OnBackoffEnd(uv_timer_t* timer) {
  auto* listener = static_cast<SeqpacketListener*>(timer->data);
  if (listener == nullptr) return;
  AtLoopBoundary(listener->Env(), [&] {
    listener->backing_off_ = false;
    listener->UpdatePoll();
  });
}

void SeqpacketListener::Accept(Napi::Env env, Napi::Object self) {
  for (int i = 0; i < kMaxPerWakeup && accepting_ && !closed_; i++) {
    FileDescriptor connection(accept4(fd_.get(), nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC));
    if (connection.valid()) {
      Napi::Number fd = Napi::Number::New(env, connection.release());  // the callback owns it from here
      CallIntoJs(env, async_context_, self, on_connection_.Value(), {env.Null(), fd});
      continue;
    }
    const int err = errno;
    if (err == EAGAIN || err == EWOULDBLOCK) return;
    if (err == EINTR || err == ECONNABORTED) continue;  // that connection is gone; the next may be fine
    // EMFILE, ENFILE, ENOBUFS, ENOMEM (or anything unexpected). The pending connection stays in the backlog,
    // so the listening fd stays readable: with a level-triggered poll we would be woken again at once and spin
    // at 100% CPU until an fd frees up. Stop polling for a while instead, then try again.
    backing_off_ = true;
    UpdatePoll();
    uv_timer_start(backoff_.get(), OnBackoffEnd, kAcceptBackoffMs, 0);
    CallIntoJs(env, async_context_, self, on_connection_.Value(),
               {ErrnoException(env, err, "accept4").Value(), Napi::Number::New(env, -1)});
    return;
  }
}

// Same order as SeqpacketSocket::ReleaseResources: closed flag and fd out first, watchers closed, then close(2).
void SeqpacketListener::ReleaseResources() {
  if (closed_) return;
  closed_ = true;
  FileDescriptor fd = std::move(fd_);
  if (poll_) uv_poll_stop(poll_.get());
  poll_.Close();
  backoff_.Close();  // uv_close stops a running timer too
  addon_.Unregister(fd.get());
  fd.reset();
}

void SeqpacketListener::Release() {
  if (closed_) return;
  ReleaseResources();
  on_connection_.Reset();  // see SeqpacketSocket::Release
  Unref();
}

void SeqpacketListener::CloseForTeardown() { Release(); }

// ---------------------------------------------------------------------------------------------------------------

void InitSeqpacket(Napi::Env env, Napi::Object exports, Fdferry& addon) {
  exports.Set("seqpacketListen", Napi::Function::New(env, SeqpacketListen, "seqpacketListen"));
  exports.Set("seqpacketConnect", Napi::Function::New(env, SeqpacketConnect, "seqpacketConnect"));
  exports.Set("seqpacketPair", Napi::Function::New(env, SeqpacketPair, "seqpacketPair"));
  exports.Set("streamPair", Napi::Function::New(env, StreamPair, "streamPair"));
  exports.Set("openSeqpacket", Napi::Function::New(env, OpenSeqpacket, "openSeqpacket"));
  exports.Set("openListener", Napi::Function::New(env, OpenListener, "openListener"));
  // The constructors are kept per environment in the addon instance, never in a static: a static
  // FunctionReference would belong to whichever environment (main thread or Worker) loaded the addon first.
  addon.socketClass = Napi::Persistent(SeqpacketSocket::DefineClass(env));
  addon.listenerClass = Napi::Persistent(SeqpacketListener::DefineClass(env));
}

}  // namespace fdferry
