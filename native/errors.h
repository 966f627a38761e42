// Node-shaped errors for fdferry's addon, and the guard used wherever libuv calls into us.
//
// Man pages: errno(3), strerror(3). libuv: uv_err_name_r(), uv_strerror() (docs.libuv.org "Error handling").
//
// Every failing syscall surfaces as an Error carrying `errno` (negative, as Node core does on POSIX),
// `code` ('EBADF'), `syscall` ('sendmsg') and, when a path is involved, `path`, so the TypeScript layer can
// branch on `err.code` and never on message text.
#pragma once

#include <napi.h>

#include <initializer_list>
#include <string_view>
#include <system_error>

namespace fdferry {

// Builds (does not throw) the Node-style error for a failed syscall. `err` is a POSITIVE errno value, captured
// by the caller right after the failing call: anything run in between (close(2), allocation) may clobber errno.
// Message: "<syscall> <CODE>: <description>[ '<path>']", e.g. "close EBADF: bad file descriptor".
Napi::Error ErrnoException(Napi::Env env, int err, std::string_view syscall, std::string_view path = {});

// The same for a std::system_error thrown off the JS thread with the syscall as its what_arg, as
// std::system_error(errno, std::generic_category(), "epoll_create1") is: what() is then "<syscall>: <description>",
// and the part before the colon becomes `syscall`.
Napi::Error ErrnoException(Napi::Env env, const std::system_error& error);

// An fdferry protocol or usage fault that is not an errno: `code` is ours (e.g. 'EFDFERRY_TOOMANYFDS').
Napi::Error FdferryError(Napi::Env env, std::string_view code, std::string_view message);

// Thrown by CallIntoJs after the JS exception has already been handed to napi_fatal_exception: it only unwinds
// the rest of the libuv callback, and AtLoopBoundary swallows it.
struct JsCallFailed {};

// Calls `callback` from a libuv callback through napi_make_callback, which (unlike a plain call) opens a
// callback scope: nextTicks and microtasks run afterwards and async_hooks see `context`. This uses the C API
// directly because node-addon-api's wrapper turns any failure into a Napi::Error, and when a Worker is being
// terminated the pending "exception" is V8's termination marker, which node-addon-api cannot wrap and aborts on
// (napi_define_properties fails: JS may no longer run). Here a JS exception goes to napi_fatal_exception, which
// is a no-op once the environment is stopping, and JsCallFailed unwinds the caller.
void CallIntoJs(Napi::Env env, const Napi::AsyncContext& context, Napi::Object receiver, Napi::Function callback,
                std::initializer_list<napi_value> args);

// Runs `body` as the top of a libuv callback. libuv is C: a C++ exception unwinding into it terminates the
// process, so every exception stops here. A JS exception thrown by a callback we invoked (it arrives as a
// Napi::Error) is re-raised with napi_fatal_exception, which gives it 'uncaughtException' semantics exactly as
// if a core Node callback had thrown. The HandleScope is opened here because libuv callbacks run outside any
// JS frame, so no scope exists for the handles created while calling into JS.
template <typename Body>
void AtLoopBoundary(Napi::Env env, Body&& body) noexcept {
  napi_handle_scope scope;
  if (napi_open_handle_scope(env, &scope) != napi_ok) {
    napi_fatal_error("fdferry", NAPI_AUTO_LENGTH, "cannot open a handle scope in a libuv callback",
                     NAPI_AUTO_LENGTH);
  }
  try {
    body();
  } catch (const JsCallFailed&) {
    // Already reported by CallIntoJs.
  } catch (const Napi::Error& error) {
    napi_fatal_exception(env, error.Value());
  } catch (const std::exception& error) {
    napi_fatal_exception(env, Napi::Error::New(env, error.what()).Value());
  }
  napi_close_handle_scope(env, scope);
}

}  // namespace fdferry
