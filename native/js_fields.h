// Values crossing between the native engines and JS: option fields read with range checks (a clear
// TypeError or RangeError naming the field), errno names, drop counters and address text.
//
// Man pages: inet_pton(3), inet_ntop(3). libuv docs: uv_err_name_r().
#pragma once

#include <arpa/inet.h>
#include <napi.h>
#include <sys/socket.h>
#include <uv.h>

#include <cstdint>
#include <string>

namespace fdferry {

// Number.MAX_SAFE_INTEGER: the upper bound of id, byte and millisecond fields.
constexpr double kMaxSafeInteger = 9007199254740991.0;

// Reads an integral number field; `fallback` when absent, an error naming the field when wrong or outside [min, max].
inline double NumberField(const Napi::Object& object, const char* name, double fallback, double min, double max) {
  Napi::Value value = object.Get(name);
  if (value.IsUndefined()) return fallback;
  if (!value.IsNumber()) throw Napi::TypeError::New(object.Env(), std::string("\"") + name + "\" must be a number");
  double number = value.As<Napi::Number>().DoubleValue();
  if (!(number >= min && number <= max) || number != static_cast<double>(static_cast<int64_t>(number))) {
    throw Napi::RangeError::New(object.Env(), std::string("\"") + name + "\" is out of range");
  }
  return number;
}

// Reads an address field of the family (4 or 6) into `out` (4 or 16 bytes, network order); an error naming the
// field when it is not a string holding such an address.
inline void AddressField(const Napi::Object& object, const char* name, int family, uint8_t* out) {
  Napi::Value value = object.Get(name);
  if (!value.IsString() || inet_pton(family == 4 ? AF_INET : AF_INET6, value.As<Napi::String>().Utf8Value().c_str(), out) != 1) {
    throw Napi::TypeError::New(object.Env(), std::string("\"") + name + "\" must be an IPv" + std::to_string(family) + " address");
  }
}

// 'ECONNRESET' for a positive errno; null for 0.
inline Napi::Value ErrnoName(Napi::Env env, int err) {
  if (err == 0) return env.Null();
  char name[64];
  uv_err_name_r(-err, name, sizeof name);
  return Napi::String::New(env, name);
}

// A drop-counter object, {reason: count}, from (reason, count) pairs: a std::map or a vector of pairs.
template <typename Pairs>
Napi::Object DropsObject(Napi::Env env, const Pairs& drops) {
  Napi::Object object = Napi::Object::New(env);
  for (const auto& [reason, count] : drops) object.Set(reason, static_cast<double>(count));
  return object;
}

// An IPv4 (family 4) or IPv6 address as text.
inline std::string AddressString(int family, const uint8_t* address) {
  char text[INET6_ADDRSTRLEN] = {};
  inet_ntop(family == 4 ? AF_INET : AF_INET6, address, text, sizeof text);
  return text;
}

}  // namespace fdferry
