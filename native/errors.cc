// Node-shaped errors (see errors.h).
//
// Man pages: errno(3). libuv: uv_err_name_r(), uv_strerror(), UV__ERR() (libuv error codes are -errno on Unix).
#include "errors.h"

#include <uv.h>

#include <string>

namespace fdferry {

Napi::Error ErrnoException(Napi::Env env, int err, std::string_view syscall, std::string_view path) {
  // libuv's error codes are negated errno values on Unix, so uv_err_name_r(-err) yields Node's own `code`
  // strings ("EBADF") and unknown values come out as "Unknown system error N", as in Node.
  char code[64];
  uv_err_name_r(-err, code, sizeof code);

  std::string message;
  message.append(syscall).append(" ").append(code).append(": ").append(uv_strerror(-err));
  if (!path.empty()) {
    // Abstract socket names start with a NUL; show them the way ss(8) and systemd do ("@name").
    std::string shown(path);
    if (shown.front() == '\0') shown.front() = '@';
    message.append(" '").append(shown).append("'");
  }

  Napi::Error error = Napi::Error::New(env, message);
  error.Set("errno", Napi::Number::New(env, -err));
  error.Set("code", Napi::String::New(env, code));
  error.Set("syscall", Napi::String::New(env, std::string(syscall)));
  if (!path.empty()) error.Set("path", Napi::String::New(env, std::string(path)));
  return error;
}

Napi::Error ErrnoException(Napi::Env env, const std::system_error& error) {
  std::string_view what = error.what();
  return ErrnoException(env, error.code().value(), what.substr(0, what.find(':')));
}

void CallIntoJs(Napi::Env env, const Napi::AsyncContext& context, Napi::Object receiver, Napi::Function callback,
                std::initializer_list<napi_value> args) {
  napi_value result;
  if (napi_make_callback(env, context, receiver, callback, args.size(), args.begin(), &result) == napi_ok) return;
  bool pending = false;
  if (napi_is_exception_pending(env, &pending) == napi_ok && pending) {
    napi_value exception;
    if (napi_get_and_clear_last_exception(env, &exception) == napi_ok) napi_fatal_exception(env, exception);
  }
  throw JsCallFailed{};
}

Napi::Error FdferryError(Napi::Env env, std::string_view code, std::string_view message) {
  Napi::Error error = Napi::Error::New(env, std::string(message));
  error.Set("code", Napi::String::New(env, std::string(code)));
  return error;
}

}  // namespace fdferry
