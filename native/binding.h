// Per-environment state of fdferry's addon.
//
// Node-API docs: napi_set_instance_data (through Napi::Addon<T>), napi_add_async_cleanup_hook,
// napi_get_uv_event_loop.
//
// The addon is loaded once per environment: the main thread and every worker_threads Worker get their own
// Fdferry instance, their own loop and their own class constructors. Nothing JS-related is static.
#pragma once

#include <napi.h>
#include <uv.h>

#include <memory>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include "uv_handle.h"

namespace fdferry {

// An object that keeps an fd registered on the environment's loop (SeqpacketSocket, SeqpacketListener).
class LoopResource {
 public:
  // Closes the handles and the fd without calling into JS: the environment is being torn down.
  virtual void CloseForTeardown() = 0;

 protected:
  ~LoopResource() = default;
};

class Fdferry : public Napi::Addon<Fdferry> {
 public:
  Fdferry(Napi::Env env, Napi::Object exports);
  ~Fdferry();
  Fdferry(const Fdferry&) = delete;
  Fdferry& operator=(const Fdferry&) = delete;

  static Fdferry& Of(Napi::Env env) { return *env.GetInstanceData<Fdferry>(); }

  // The loop of the environment the addon was loaded into. Never uv_default_loop(): in a Worker that is the
  // main thread's loop, and touching it from another thread corrupts it.
  uv_loop_t* loop() const { return loop_; }

  // The registry of open sockets and listeners, keyed by the fd each one polls. It lets the cleanup hook close
  // whatever is still open, and lets us refuse a second watcher (or a bare close(2)) on a polled fd: libuv
  // aborts on both (libuv/libuv#1851, #5130).
  void Register(int fd, LoopResource* resource) { open_[fd] = resource; }
  void Unregister(int fd) { open_.erase(fd); }
  bool IsPolled(int fd) const { return open_.count(fd) != 0; }
  // For loop resources that poll no fd of their own (a uv_async_t, a thread): closed at teardown all the same.
  void Register(LoopResource* resource) { fdless_.insert(resource); }
  void Unregister(LoopResource* resource) { fdless_.erase(resource); }

  // One receive buffer per environment, shared by its sockets: every read copies the message out into a
  // Buffer before calling JS, so no two reads ever use it at once, and sockets do not each pin 64 KiB.
  char* receiveBuffer() { return receive_buffer_.get(); }

  // Every uv_close() this environment has in flight (see PendingCloses). Outlives them all: this object is
  // freed with the napi_env, which the teardown hook keeps alive until the count is zero.
  PendingCloses& pendingCloses() { return pending_closes_; }

  Napi::FunctionReference socketClass;
  Napi::FunctionReference listenerClass;
  Napi::FunctionReference spliceEngineClass;
  Napi::FunctionReference upgradePumpClass;
  Napi::FunctionReference onRampClass;
  Napi::FunctionReference fishPumpClass;

 private:
  static void OnTeardown(napi_async_cleanup_hook_handle handle, void* arg);
  static void FinishTeardown(void* arg);
  void CloseAll();

  PendingCloses pending_closes_;
  napi_async_cleanup_hook_handle teardown_ = nullptr;

  uv_loop_t* loop_ = nullptr;
  std::unordered_map<int, LoopResource*> open_;
  std::unordered_set<LoopResource*> fdless_;
  std::unique_ptr<char[]> receive_buffer_;
};

// What each createX(...) export does: `new X(...)` through the environment's constructor reference, with the
// first `arity` arguments (absent ones undefined), so JS never holds the classes themselves.
inline Napi::Value Construct(const Napi::FunctionReference& constructor, const Napi::CallbackInfo& info, size_t arity) {
  std::vector<napi_value> args;
  for (size_t i = 0; i < arity; i++) args.push_back(info[i]);  // info[i] is undefined past info.Length()
  return constructor.New(args);
}

}  // namespace fdferry
