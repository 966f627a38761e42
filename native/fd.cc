// Generic fd utilities: dup, close, inspection, O_NONBLOCK. (TCP_INFO is in tcp_info.cc.)
//
// Man pages: fcntl(2), close(2), fstat(2), inode(7), getsockopt(2), socket(7), getpeername(2).
#include "fd.h"


#include <fcntl.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/stat.h>

#include <cerrno>
#include <string>

#include "binding.h"
#include "errors.h"

namespace fdferry {

int DupCloexec(int fd) { return fcntl(fd, F_DUPFD_CLOEXEC, 3); }

int FdArgument(const Napi::CallbackInfo& info, size_t index) {
  Napi::Value value = info[index];
  if (!value.IsNumber()) throw Napi::TypeError::New(info.Env(), "fd must be a number");
  double number = value.As<Napi::Number>().DoubleValue();
  int fd = value.As<Napi::Number>().Int32Value();
  if (number != static_cast<double>(fd)) throw Napi::TypeError::New(info.Env(), "fd must be an int32");
  return fd;
}

namespace {

// reserveFdTable(count): makes the kernel grow this process's fd table to hold `count` fds now, by
// duplicating onto fd count-1 and closing it again. The table never shrinks, and growing it later, in a
// multi-threaded process, costs milliseconds per doubling at the worst moment (a successor receiving
// thousands of fds while every relay is paused). Returns false when the limit does not allow it.
Napi::Value ReserveFdTable(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 1 || !info[0].IsNumber()) throw Napi::TypeError::New(env, "reserveFdTable(count)");
  int count = info[0].As<Napi::Number>().Int32Value();
  if (count <= 3) return Napi::Boolean::New(env, true);
  int fd = fcntl(0, F_DUPFD_CLOEXEC, count - 1);
  if (fd < 0) {
    // stdin may be closed: any open fd will do.
    fd = fcntl(STDOUT_FILENO, F_DUPFD_CLOEXEC, count - 1);
  }
  if (fd < 0) return Napi::Boolean::New(env, false);
  ::close(fd);
  return Napi::Boolean::New(env, true);
}

Napi::Value Dup(const Napi::CallbackInfo& info) {
  int fd = FdArgument(info, 0);
  int copy = DupCloexec(fd);
  if (copy < 0) throw ErrnoException(info.Env(), errno, "fcntl");
  return Napi::Number::New(info.Env(), copy);
}

// Closing an fd that an open SeqpacketSocket/Listener still polls would make libuv abort() at the next re-arm
// (epoll_ctl EBADF, libuv/libuv#5130), or poll an unrelated file that reuses the number. Refuse it.
bool IsPolled(Napi::Env env, int fd) { return Fdferry::Of(env).IsPolled(fd); }

void Close(const Napi::CallbackInfo& info) {
  int fd = FdArgument(info, 0);
  if (IsPolled(info.Env(), fd)) {
    throw FdferryError(info.Env(), "EFDFERRY_POLLED",
                       "close: fd " + std::to_string(fd) +
                           " belongs to an open socket or listener; close that instead");
  }
  // EINTR is not retried: on Linux the fd is released before close(2) can be interrupted, and retrying could
  // close a number another thread has just been given. EBADF is the caller's double close: say so loudly.
  if (::close(fd) < 0 && errno != EINTR) throw ErrnoException(info.Env(), errno, "close");
}

void CloseAll(const Napi::CallbackInfo& info) {
  if (!info[0].IsArray()) throw Napi::TypeError::New(info.Env(), "fds must be an array");
  Napi::Array fds = info[0].As<Napi::Array>();
  for (uint32_t i = 0; i < fds.Length(); i++) {
    Napi::Value value = fds.Get(i);
    // Cleanup paths must not throw: skip anything that is not a closable fd instead of failing half-way.
    if (!value.IsNumber()) continue;
    int fd = value.As<Napi::Number>().Int32Value();
    if (!IsPolled(info.Env(), fd)) ::close(fd);
  }
}

int GetIntOption(Napi::Env env, int fd, int level, int name) {
  int value = 0;
  socklen_t length = sizeof value;
  if (getsockopt(fd, level, name, &value, &length) < 0) throw ErrnoException(env, errno, "getsockopt");
  return value;
}

Napi::Value DescribeFd(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fd = FdArgument(info, 0);
  struct stat st;
  if (fstat(fd, &st) < 0) throw ErrnoException(env, errno, "fstat");

  Napi::Object result = Napi::Object::New(env);
  const char* kind = S_ISSOCK(st.st_mode)  ? "socket"
                     : S_ISREG(st.st_mode) ? "file"
                     : S_ISFIFO(st.st_mode) ? "pipe"
                     : S_ISCHR(st.st_mode) ? "char"
                     : S_ISDIR(st.st_mode) ? "dir"
                                           : "other";
  result.Set("kind", kind);
  if (S_ISREG(st.st_mode)) result.Set("size", Napi::Number::New(env, static_cast<double>(st.st_size)));
  if (S_ISSOCK(st.st_mode)) {
    result.Set("family", GetIntOption(env, fd, SOL_SOCKET, SO_DOMAIN));
    result.Set("type", GetIntOption(env, fd, SOL_SOCKET, SO_TYPE));
    result.Set("protocol", GetIntOption(env, fd, SOL_SOCKET, SO_PROTOCOL));
    result.Set("listening", Napi::Boolean::New(env, GetIntOption(env, fd, SOL_SOCKET, SO_ACCEPTCONN) != 0));
    // getpeername succeeds exactly when the socket has a peer (ENOTCONN otherwise); the address is unused.
    sockaddr_storage peer;
    socklen_t length = sizeof peer;
    const bool connected = getpeername(fd, reinterpret_cast<sockaddr*>(&peer), &length) == 0;
    result.Set("connected", Napi::Boolean::New(env, connected));
  }
  return result;
}

void SetNonblocking(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fd = FdArgument(info, 0);
  if (!info[1].IsBoolean()) throw Napi::TypeError::New(env, "nonblocking must be a boolean");
  bool nonblocking = info[1].As<Napi::Boolean>().Value();
  // Read-modify-write: F_SETFL replaces every status flag (O_APPEND, O_ASYNC...), so never set it blindly.
  // The flags live on the open file description, shared with every process holding this file.
  int flags = fcntl(fd, F_GETFL);
  if (flags < 0) throw ErrnoException(env, errno, "fcntl");
  int wanted = nonblocking ? (flags | O_NONBLOCK) : (flags & ~O_NONBLOCK);
  if (wanted != flags && fcntl(fd, F_SETFL, wanted) < 0) throw ErrnoException(env, errno, "fcntl");
}

}  // namespace

// Bytes waiting in a pipe (or socket): FIONREAD. A restarted Splicer asks each stored pipe what it holds.
Napi::Value PendingBytes(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fd = FdArgument(info, 0);
  int bytes = 0;
  if (ioctl(fd, FIONREAD, &bytes) < 0) throw ErrnoException(env, errno, "ioctl");
  return Napi::Number::New(env, bytes);
}

void InitFd(Napi::Env env, Napi::Object exports) {
  exports.Set("pendingBytes", Napi::Function::New(env, PendingBytes, "pendingBytes"));
  exports.Set("dup", Napi::Function::New(env, Dup, "dup"));
  exports.Set("reserveFdTable", Napi::Function::New(env, ReserveFdTable, "reserveFdTable"));
  exports.Set("close", Napi::Function::New(env, Close, "close"));
  exports.Set("closeAll", Napi::Function::New(env, CloseAll, "closeAll"));
  exports.Set("describeFd", Napi::Function::New(env, DescribeFd, "describeFd"));
  exports.Set("setNonblocking", Napi::Function::New(env, SetNonblocking, "setNonblocking"));
}

}  // namespace fdferry
