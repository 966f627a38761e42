// Sealed memfds: anonymous files that carry state across a restart and cannot change once sealed.
//
// Man pages: memfd_create(2), fcntl(2) ("File Sealing"). g++ predefines _GNU_SOURCE, which glibc needs to
// declare memfd_create and the F_*_SEALS commands.
#include "memfd.h"

#include <fcntl.h>
#include <sys/mman.h>

#include <cerrno>

#include "errors.h"
#include "fd.h"

namespace fdferry {

namespace {

// The four seals every fdferry state file must carry. F_SEAL_SEAL comes last in meaning but goes in the same
// call: once it is set nothing can be added or removed, so the set is final.
constexpr int kAllSeals = F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_WRITE | F_SEAL_SEAL;

Napi::Value MemfdCreate(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!info[0].IsString()) throw Napi::TypeError::New(env, "name must be a string");
  std::string name = info[0].As<Napi::String>().Utf8Value();
  // MFD_CLOEXEC: never leak into children we spawn. MFD_ALLOW_SEALING: without it the memfd starts with
  // F_SEAL_SEAL set and can never be sealed.
  int fd = memfd_create(name.c_str(), MFD_CLOEXEC | MFD_ALLOW_SEALING);
  if (fd < 0) throw ErrnoException(env, errno, "memfd_create");
  return Napi::Number::New(env, fd);
}

void MemfdSeal(const Napi::CallbackInfo& info) {
  int fd = FdArgument(info, 0);
  // Fails with EBUSY while a writable shared mapping exists (F_SEAL_WRITE), and EPERM if already F_SEAL_SEAL'd.
  if (fcntl(fd, F_ADD_SEALS, kAllSeals) < 0) throw ErrnoException(info.Env(), errno, "fcntl");
}

Napi::Value MemfdSeals(const Napi::CallbackInfo& info) {
  int fd = FdArgument(info, 0);
  int seals = fcntl(fd, F_GET_SEALS);
  if (seals < 0) throw ErrnoException(info.Env(), errno, "fcntl");
  return Napi::Number::New(info.Env(), seals);
}

}  // namespace

void InitMemfd(Napi::Env env, Napi::Object exports) {
  exports.Set("memfdCreate", Napi::Function::New(env, MemfdCreate, "memfdCreate"));
  exports.Set("memfdSeal", Napi::Function::New(env, MemfdSeal, "memfdSeal"));
  exports.Set("memfdSeals", Napi::Function::New(env, MemfdSeals, "memfdSeals"));
}

}  // namespace fdferry
