// File-descriptor ownership for fdferry's addon.
//
// Man pages: close(2), fcntl(2).
#pragma once

#include <napi.h>

#include <fcntl.h>
#include <unistd.h>

#include <utility>

namespace fdferry {

// Owns one fd and closes it exactly once. Move-only: two owners of one number would close it twice, and the
// second close(2) could hit an unrelated fd that reused the number in the meantime.
class FileDescriptor {
 public:
  FileDescriptor() = default;
  explicit FileDescriptor(int fd) : fd_(fd) {}
  ~FileDescriptor() { reset(); }

  FileDescriptor(FileDescriptor&& other) noexcept : fd_(other.release()) {}
  FileDescriptor& operator=(FileDescriptor&& other) noexcept {
    if (this != &other) reset(other.release());
    return *this;
  }
  FileDescriptor(const FileDescriptor&) = delete;
  FileDescriptor& operator=(const FileDescriptor&) = delete;

  int get() const { return fd_; }
  bool valid() const { return fd_ >= 0; }

  // Gives up ownership (the caller, usually JS, now closes it) and returns the number.
  int release() { return std::exchange(fd_, -1); }

  // Closes the current fd, if any, and adopts `fd`. close(2) errors are ignored here: on Linux the fd is gone
  // even when close reports EINTR or EIO, and a destructor has no one to report to.
  void reset(int fd = -1) {
    int old = std::exchange(fd_, fd);
    if (old >= 0) ::close(old);
  }

 private:
  int fd_ = -1;
};

// Duplicates with close-on-exec set atomically (F_DUPFD_CLOEXEC), so the copy never leaks into a child spawned
// by another thread between dup and fcntl. The lowest number handed out is 3: a duplicate must never land on a
// stdio slot that happens to be closed (a daemon started with stdin closed would then "read" from our socket).
// Returns -1 with errno set on failure.
int DupCloexec(int fd);

// Sets O_NONBLOCK unless it is set already. Read-modify-write: F_SETFL replaces every status flag, and they live
// on the open file description, which the fd's owner shares. Returns -1 with errno set on failure.
inline int MakeNonblocking(int fd) {
  int flags = fcntl(fd, F_GETFL);
  if (flags < 0) return -1;
  if (flags & O_NONBLOCK) return 0;
  return fcntl(fd, F_SETFL, flags | O_NONBLOCK);
}

// Reads argument `index` as an fd number. Only the type is checked (an int32): range checks are the kernel's
// job, so close(-1) fails with EBADF like any other bad fd.
int FdArgument(const Napi::CallbackInfo& info, size_t index);

// Registers dup, close, closeAll, describeFd and setNonblocking on `exports`.
void InitFd(Napi::Env env, Napi::Object exports);

}  // namespace fdferry
