// Module entry point: per-environment state, exports, and environment teardown.
//
// Node-API docs: Napi::Addon<T> (napi_set_instance_data), napi_get_uv_event_loop, napi_add_async_cleanup_hook /
// napi_remove_async_cleanup_hook. libuv docs: uv_close.
#include "binding.h"

#include <vector>

#include "constants.h"
#include "errors.h"
#include "fd.h"
#include "fish_pump.h"
#include "memfd.h"
#include "netlink.h"
#include "netns.h"
#include "notify.h"
#include "onramp.h"
#include "seqpacket.h"
#include "splice_engine.h"
#include "tcp_info.h"
#include "tun.h"
#include "upgrade_pump.h"

namespace fdferry {

Fdferry::Fdferry(Napi::Env env, Napi::Object exports) : receive_buffer_(new char[kMaxFrame]) {
  if (napi_get_uv_event_loop(env, &loop_) != napi_ok || loop_ == nullptr) {
    throw Napi::Error::New(env, "fdferry: napi_get_uv_event_loop failed");
  }
  InitFd(env, exports);
  InitTcpInfo(env, exports);
  InitMemfd(env, exports);
  InitNotify(env, exports);
  InitSeqpacket(env, exports, *this);
  InitSpliceEngine(env, exports, *this);
  InitNetns(env, exports);
  InitNetlink(env, exports);
  InitTun(env, exports);
  InitUpgradePump(env, exports, *this);
  InitOnRamp(env, exports, *this);
  InitFishPump(env, exports, *this);
  exports.Set("constants", MakeConstants(env));
  DefineAddon(exports, {});

  // When the environment goes away (a Worker ends or is terminated, the main thread exits), close what JS left
  // open: otherwise the fds leak into the rest of the process, and a Worker's loop cannot close with our
  // handles on it. An *async* cleanup hook because closing a libuv handle completes later, in a callback that
  // is code in this library: Node keeps running the loop until we call napi_remove_async_cleanup_hook, and
  // only then frees the environment and unloads the addon. The hook also holds the napi_env (and so `this`)
  // alive until then.
  napi_status status = napi_add_async_cleanup_hook(env, OnTeardown, this, nullptr);
  if (status != napi_ok) throw Napi::Error::New(env, "fdferry: napi_add_async_cleanup_hook failed");
}

Fdferry::~Fdferry() = default;

void Fdferry::OnTeardown(napi_async_cleanup_hook_handle handle, void* arg) {
  auto* self = static_cast<Fdferry*>(arg);
  self->teardown_ = handle;
  // Node calls this from C: nothing may propagate out of it.
  try {
    self->CloseAll();
  } catch (...) {
  }
  // Closes started earlier (a socket JS closed just before a Worker was terminated) count as well.
  if (self->pending_closes_.count() == 0) {
    FinishTeardown(self);
  } else {
    self->pending_closes_.OnIdle(FinishTeardown, self);
  }
}

void Fdferry::FinishTeardown(void* arg) {
  auto* self = static_cast<Fdferry*>(arg);
  self->pending_closes_.OnIdle(nullptr, nullptr);
  napi_async_cleanup_hook_handle handle = std::exchange(self->teardown_, nullptr);
  if (handle != nullptr) napi_remove_async_cleanup_hook(handle);
}

void Fdferry::CloseAll() {
  // Closing unregisters, so walk a copy.
  std::vector<LoopResource*> open(fdless_.begin(), fdless_.end());
  for (auto& [fd, resource] : open_) open.push_back(resource);
  for (LoopResource* resource : open) resource->CloseForTeardown();
}

}  // namespace fdferry

// The macro pastes the class name into an identifier, so it needs the unqualified name.
using fdferry::Fdferry;
NODE_API_ADDON(Fdferry)
