// How the native engines' threads report to JS: records pushed into a mutex-protected outbox from any thread, a
// uv_async_t that wakes the environment's loop, and one JS callback that receives each batch as one array.
//
// libuv docs: uv_async_t (uv_async_send is the one libuv call that is safe from another thread, and sends made
// before the loop gets to the handle coalesce into one callback, so a burst of records costs one JS call).
// Node-API docs: napi_make_callback (through CallIntoJs), napi_get_uv_event_loop (through Fdferry::loop).
//
// Close order, the same for every engine: mark the engine closed, stop and join every thread that pushes, take
// what is left in the outbox (records holding fds close them: nobody else knows their numbers), and only then
// close the async handle (EngineEvents::Close). A thread may call uv_async_send until it has stopped, and on a
// closed handle that call is a use after free.
#pragma once

#include <napi.h>
#include <uv.h>

#include <mutex>
#include <utility>
#include <vector>

#include "binding.h"
#include "errors.h"
#include "uv_handle.h"

namespace fdferry {

template <typename Record>
class EngineEvents;

// The thread side: where engine threads put what JS must hear about.
template <typename Record>
class Outbox {
 public:
  // Any thread, between EngineEvents::Open and the join that precedes EngineEvents::Close.
  void Push(Record record) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      records_.push_back(std::move(record));
    }
    uv_async_send(notify_);
  }

  // Everything pushed so far, oldest first.
  std::vector<Record> Take() {
    std::vector<Record> taken;
    std::lock_guard<std::mutex> lock(mutex_);
    taken.swap(records_);
    return taken;
  }

 private:
  friend class EngineEvents<Record>;

  std::mutex mutex_;
  std::vector<Record> records_;
  uv_async_t* notify_ = nullptr;  // set by EngineEvents::Open, before any thread starts
};

// The JS side: the async handle that announces an Outbox, and the callback that receives its records.
template <typename Record>
class EngineEvents {
 public:
  // `resource_name` is what async_hooks see ("fdferry:FishPump"); `engine` is the engine's JS object.
  EngineEvents(Napi::Env env, const char* resource_name, Napi::Object engine)
      : async_context_(env, resource_name, engine) {}

  // Opens the async handle on the environment's loop, announcing `outbox`. Each time it fires,
  // (engine->*Deliver)() runs as the top of a libuv callback (AtLoopBoundary); Deliver normally calls Deliver()
  // below. Throws the uv_async_init error; then nothing is open.
  template <typename Engine, void (Engine::*Deliver)()>
  void Open(Fdferry& addon, Outbox<Record>& outbox, Engine* engine, Napi::Function callback) {
    int status = notify_.Init(addon.pendingCloses(), [&](uv_async_t* handle) {
      return uv_async_init(addon.loop(), handle, &OnNotify<Engine, Deliver>);
    });
    if (status < 0) throw ErrnoException(callback.Env(), -status, "uv_async_init");
    notify_.get()->data = engine;
    outbox.notify_ = notify_.get();
    outbox_ = &outbox;
    callback_ = Napi::Persistent(callback);
  }

  // Takes the outbox and, unless it is empty, calls the callback once with [to_js(env, record), ...] on
  // `receiver` through MakeCallback. After Close it does nothing (and takes nothing).
  template <typename ToJs>
  void Deliver(Napi::Object receiver, ToJs&& to_js) {
    if (callback_.IsEmpty()) return;
    std::vector<Record> records = outbox_->Take();
    if (records.empty()) return;
    Napi::Env env = receiver.Env();
    Napi::Array list = Napi::Array::New(env, records.size());
    uint32_t index = 0;
    for (const Record& record : records) list.Set(index++, to_js(env, record));
    CallIntoJs(env, async_context_, receiver, callback_.Value(), {list});
  }

  // Closes the async handle and lets go of the callback; only after every thread that pushes has been joined
  // (see the close order above). Returns the records that never reached JS, for the engine to dispose of.
  std::vector<Record> Close() {
    std::vector<Record> left;
    if (outbox_ != nullptr) left = outbox_->Take();
    notify_.Close();
    callback_.Reset();
    return left;
  }

 private:
  template <typename Engine, void (Engine::*Deliver)()>
  static void OnNotify(uv_async_t* handle) {
    auto* engine = static_cast<Engine*>(handle->data);
    AtLoopBoundary(engine->Env(), [engine] { (engine->*Deliver)(); });
  }

  Napi::AsyncContext async_context_;
  Napi::FunctionReference callback_;
  UvHandle<uv_async_t> notify_;
  Outbox<Record>* outbox_ = nullptr;  // set by Open; owned by the engine's shared state, which outlives this
};

}  // namespace fdferry
