// AF_UNIX SOCK_SEQPACKET sockets polled on the environment's libuv loop, with SCM_RIGHTS fd passing.
//
// Man pages: unix(7), socket(2), socketpair(2), bind(2), listen(2), accept4(2), connect(2), sendmsg(2),
// recvmsg(2), cmsg(3), getsockopt(2). libuv docs: uv_poll_t, uv_timer_t, uv_close, uv_ref.
#pragma once

#include <napi.h>
#include <uv.h>

#include <sys/socket.h>
#include <sys/un.h>

#include <deque>
#include <string>
#include <vector>

#include "binding.h"
#include "fd.h"
#include "uv_handle.h"

namespace fdferry {

// SCM_MAX_FD (include/net/scm.h): the kernel refuses a message with more fds (EINVAL), so we check first.
constexpr int kMaxFdsPerMessage = 253;
// Largest message we accept. The receive buffer is exactly this size, so MSG_TRUNC can only mean a peer
// that broke the protocol, never a buffer we sized too small.
constexpr int kMaxFrame = 65536;
// send() returns false once this many messages wait in the user-space queue.
constexpr int kHighWaterMark = 1024;
// Fairness: one busy socket must not starve the rest of the loop (node_netlink uses the same cap).
constexpr int kMaxPerWakeup = 32;
// How long a listener stops accepting after EMFILE & co. (see SeqpacketListener::Accept).
constexpr uint64_t kAcceptBackoffMs = 100;

// Reads argument `index` as a socket path (a leading NUL means an abstract name).
std::string PathArgument(const Napi::CallbackInfo& info, size_t index);

// Fills `address` for `path` and returns the length for bind/connect/sendto; throws ENAMETOOLONG/EINVAL as a
// Node-style error naming `syscall`.
socklen_t UnixAddress(Napi::Env env, const std::string& path, sockaddr_un& address, const char* syscall);

class SeqpacketSocket final : public Napi::ObjectWrap<SeqpacketSocket>, public LoopResource {
 public:
  static Napi::Function DefineClass(Napi::Env env);
  // Constructed only by openSeqpacket: (fd, message, drain, close).
  explicit SeqpacketSocket(const Napi::CallbackInfo& info);
  ~SeqpacketSocket() override;

  void CloseForTeardown() override;

 private:
  // A message that met EAGAIN. It owns a copy of the bytes and duplicates of the fds, so the caller may
  // reuse its buffer and close its fds as soon as send() returns.
  struct Pending {
    std::vector<uint8_t> data;
    std::vector<FileDescriptor> fds;
  };

  Napi::Value Fd(const Napi::CallbackInfo& info);
  Napi::Value Queued(const Napi::CallbackInfo& info);
  Napi::Value Send(const Napi::CallbackInfo& info);
  void SetReading(const Napi::CallbackInfo& info);
  Napi::Value PeerCredentials(const Napi::CallbackInfo& info);
  void Close(const Napi::CallbackInfo& info);
  void JsRef(const Napi::CallbackInfo& info);
  void JsUnref(const Napi::CallbackInfo& info);

  static void OnPoll(uv_poll_t* handle, int status, int events);
  void HandlePoll(int status, int events);
  void ReadMessages(Napi::Env env, Napi::Object self);
  void Flush(Napi::Env env, Napi::Object self);
  int SendNow(const uint8_t* data, size_t length, const int* fds, size_t count);
  void UpdatePoll();
  void ReleaseResources();
  void Release();
  void PeerClosed(Napi::Object self, Napi::Value error);

  Fdferry& addon_;
  Napi::AsyncContext async_context_;
  FileDescriptor fd_;
  UvHandle<uv_poll_t> poll_;
  Napi::FunctionReference on_message_;
  Napi::FunctionReference on_drain_;
  Napi::FunctionReference on_close_;
  std::deque<Pending> queue_;
  int events_ = 0;  // what poll_ is armed for right now
  bool reading_ = true;
  bool need_drain_ = false;
  bool closed_ = false;
};

class SeqpacketListener final : public Napi::ObjectWrap<SeqpacketListener>, public LoopResource {
 public:
  static Napi::Function DefineClass(Napi::Env env);
  // Constructed only by openListener: (fd, onConnection).
  explicit SeqpacketListener(const Napi::CallbackInfo& info);
  ~SeqpacketListener() override;

  void CloseForTeardown() override;

 private:
  Napi::Value Fd(const Napi::CallbackInfo& info);
  void SetAccepting(const Napi::CallbackInfo& info);
  void Close(const Napi::CallbackInfo& info);
  void JsRef(const Napi::CallbackInfo& info);
  void JsUnref(const Napi::CallbackInfo& info);

  static void OnPoll(uv_poll_t* handle, int status, int events);
  static void OnBackoffEnd(uv_timer_t* timer);
  void Accept(Napi::Env env, Napi::Object self);
  void UpdatePoll();
  void ReleaseResources();
  void Release();

  Fdferry& addon_;
  Napi::AsyncContext async_context_;
  FileDescriptor fd_;
  UvHandle<uv_poll_t> poll_;
  UvHandle<uv_timer_t> backoff_;
  Napi::FunctionReference on_connection_;
  bool polling_ = false;
  bool accepting_ = true;
  bool backing_off_ = false;
  bool closed_ = false;
};

// Registers seqpacketListen, seqpacketConnect, seqpacketPair, streamPair, openSeqpacket and openListener, and
// stores the two classes' constructors in `addon`.
void InitSeqpacket(Napi::Env env, Napi::Object exports, Fdferry& addon);

}  // namespace fdferry
