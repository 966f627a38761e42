// Ownership of heap-allocated libuv handles.
//
// libuv docs: uv_close() ("Handle" section): closing completes asynchronously, and the handle's memory must
// stay valid until the close callback has run.
#pragma once

#include <uv.h>

#include <memory>
#include <utility>

namespace fdferry {

// Counts the handles whose uv_close() has been called but whose close callback has not run yet. The close
// callback is code in this shared library: when a Worker ends, Node unloads the addon after tearing the
// environment down, so teardown must not finish while any of these callbacks is still queued on the loop
// (it would jump into unmapped code). Fdferry waits for the count to reach zero (see binding.cc).
class PendingCloses {
 public:
  using IdleCallback = void (*)(void* arg);

  void Started() { count_++; }
  void Finished() {
    if (--count_ == 0 && on_idle_ != nullptr) on_idle_(idle_arg_);
  }
  int count() const { return count_; }
  // `callback` runs whenever the count drops to zero from now on.
  void OnIdle(IdleCallback callback, void* arg) {
    on_idle_ = callback;
    idle_arg_ = arg;
  }

 private:
  int count_ = 0;
  IdleCallback on_idle_ = nullptr;
  void* idle_arg_ = nullptr;
};

// Owns one libuv handle of type T (uv_poll_t, uv_timer_t). The handle lives on the heap, apart from the
// wrapper object, because the wrapper may be garbage-collected before libuv has finished closing the handle:
// Close() hands the allocation to libuv, and only the uv_close callback frees it.
template <typename T>
class UvHandle {
 public:
  UvHandle() = default;
  ~UvHandle() { Close(); }
  UvHandle(const UvHandle&) = delete;
  UvHandle& operator=(const UvHandle&) = delete;

  // Allocates the handle and runs `init` on it (uv_poll_init, uv_timer_init). On failure libuv never saw the
  // handle, so it is freed at once instead of going through uv_close. Returns the libuv status. `pending` must
  // outlive the close callback (it belongs to the per-environment Fdferry).
  template <typename Initializer>
  int Init(PendingCloses& pending, Initializer&& init) {
    auto handle = std::make_unique<T>();
    int status = init(handle.get());
    if (status == 0) {
      handle_ = handle.release();
      pending_ = &pending;
    }
    return status;
  }

  T* get() const { return handle_; }
  uv_handle_t* base() const { return reinterpret_cast<uv_handle_t*>(handle_); }
  explicit operator bool() const { return handle_ != nullptr; }

  // Starts closing the handle. From here on `data` points at the PendingCloses counter, never at the owner,
  // which may be destroyed before libuv calls OnClosed.
  void Close() {
    if (handle_ == nullptr) return;
    T* handle = std::exchange(handle_, nullptr);
    handle->data = pending_;
    pending_->Started();
    uv_close(reinterpret_cast<uv_handle_t*>(handle), OnClosed);
  }

 private:
  static void OnClosed(uv_handle_t* handle) {
    auto* pending = static_cast<PendingCloses*>(handle->data);
    delete reinterpret_cast<T*>(handle);
    pending->Finished();
  }

  T* handle_ = nullptr;
  PendingCloses* pending_ = nullptr;
};

}  // namespace fdferry
