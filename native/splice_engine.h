// Splicer's data plane: relays between pairs of stream sockets on dedicated epoll threads.
//
// Man pages: splice(2), pipe(7) (F_SETPIPE_SZ, pipe-user-pages-soft), epoll(7), eventfd(2), shutdown(2),
// socket(7) (SO_ERROR). libuv docs: uv_async_t.
//
// Threads and ownership
// - Each engine thread owns its relays outright: only that thread reads or writes a relay's state, so the data
//   path takes no locks. The JS thread talks to a thread by posting commands (a mutex-protected queue plus an
//   eventfd in the thread's epoll set) and, for the few synchronous calls (snapshot, pause), waits for the
//   answer on a std::future.
// - The engine borrows the two sockets of a relay and never closes them: they go back to JS untouched in the
//   completion (or in the paused state). It owns its pipes.
// - Completions travel back through one outbox and a uv_async_t on the environment's loop (engine_events.h),
//   so a burst of relays ending costs one JS call.
#pragma once

#include <napi.h>

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "binding.h"
#include "engine_events.h"

namespace fdferry {

class SpliceThread;

// Engine-wide settings (see SpliceEngineOptions in lib/native-splice.ts).
struct SpliceSettings {
  int threads = 1;
  int pipe_size = 256 * 1024;
  int max_pipes = 1024;
  int max_idle_pipes = 64;
  // Crash survival (systemd's fd store): every pipe is made at start, never closed, and numbered; which relay
  // and direction borrows each one is written to `pipe_owners`, a table in a memfd the service manager keeps,
  // so a process started after a crash finds the bytes that were in flight and whose they are.
  bool persistent_pipes = false;
};

// One pipe of a persistent pool, as JS stores it.
struct PersistentPipe {
  int index;
  int read_end;
  int write_end;
};

// Counters shared by the engine's threads and read by JS without locking.
struct SpliceCounters {
  std::atomic<int64_t> relays{0};
  std::atomic<int64_t> pipes_in_use{0};
  std::atomic<int64_t> pipes_idle{0};
  std::atomic<int64_t> pipe_resize_failures{0};
  std::atomic<int64_t> pipe_size_min{0};
  std::atomic<int64_t> pipe_waits{0};
  std::atomic<int64_t> copy_relays{0};
  std::atomic<int64_t> bytes_total{0};
};

// A relay that ended, as the engine thread reports it.
struct RelayCompletionRecord {
  double id = 0;
  const char* reason = "complete";
  int err = 0;
  char side = 0;  // 'a', 'b' or 0
  uint64_t bytes_ab = 0;
  uint64_t bytes_ba = 0;
  bool finished_ab = false;
  bool finished_ba = false;
  double started_at = 0;  // wall-clock ms
  double ended_at = 0;
  // Bytes read from one side but never delivered to the other (a relay that ended with bytes in flight):
  // they go back to the owner in the envelope instead of being dropped.
  std::string unsent_ab;
  std::string unsent_ba;
};

// Everything a paused relay needs to resume (here, or in a successor that received its fds).
struct PausedRelayRecord {
  double id = 0;
  int fd_a = -1;
  int fd_b = -1;
  double idle_timeout_ms = 0;
  double max_duration_ms = 0;
  double max_bytes_ab = 0;
  double max_bytes_ba = 0;
  std::string preface_ab;  // what is left of each preface
  std::string preface_ba;
  uint64_t bytes_ab = 0;
  uint64_t bytes_ba = 0;
  bool finished_ab = false;
  bool finished_ba = false;
  bool eof_ab = false;
  bool eof_ba = false;
  int pipe_ab[2] = {-1, -1};  // read end, write end; -1 when the direction held no bytes
  int pipe_ba[2] = {-1, -1};
  uint64_t pipe_bytes_ab = 0;
  uint64_t pipe_bytes_ba = 0;
  // The pipes' numbers in a persistent pool (-1 otherwise): a rollback puts them back where they were.
  int pipe_index_ab = -1;
  int pipe_index_ba = -1;
  double started_at = 0;
};

// What the engine shares with its threads: settings, counters and the completion outbox.
struct SpliceShared {
  SpliceSettings settings;
  SpliceCounters counters;
  Outbox<RelayCompletionRecord> completions;
  // Persistent pipes: the owner table (one 64-bit word per pipe: 0 = idle, else (relay id << 1 | direction) + 1,
  // direction 0 = A to B) mapped from `pipe_table_fd`, and every pipe made.
  uint64_t* pipe_owners = nullptr;
  int pipe_table_fd = -1;
  std::vector<PersistentPipe> persistent;
  std::atomic<int64_t> pipes_total{0};  // pipes open, idle ones included: the max-pipes budget
};

class SpliceEngine final : public Napi::ObjectWrap<SpliceEngine>, public LoopResource {
 public:
  static Napi::Function DefineClass(Napi::Env env);
  // Constructed only by createSpliceEngine: (options, onComplete).
  explicit SpliceEngine(const Napi::CallbackInfo& info);
  ~SpliceEngine() override;

  void CloseForTeardown() override;

 private:
  Napi::Value Add(const Napi::CallbackInfo& info);
  Napi::Value Cancel(const Napi::CallbackInfo& info);
  void EndAll(const Napi::CallbackInfo& info);
  Napi::Value Snapshot(const Napi::CallbackInfo& info);
  Napi::Value Stats(const Napi::CallbackInfo& info);
  Napi::Value PauseAll(const Napi::CallbackInfo& info);
  void Resume(const Napi::CallbackInfo& info);
  void Close(const Napi::CallbackInfo& info);
  void Flush(const Napi::CallbackInfo& info);
  Napi::Value PipeTable(const Napi::CallbackInfo& info);

  void DeliverCompletions();
  SpliceThread& ThreadFor(double id);
  void StopThreads();
  void MakePersistentPool();
  void ReleasePipeTable();

  Fdferry& addon_;
  std::shared_ptr<SpliceShared> shared_;
  EngineEvents<RelayCompletionRecord> events_;
  // Stopped (joined) before events_ closes, in the order engine_events.h gives.
  std::vector<std::unique_ptr<SpliceThread>> threads_;
  bool closed_ = false;
};

// Registers createSpliceEngine on `exports`.
void InitSpliceEngine(Napi::Env env, Napi::Object exports, Fdferry& addon);

}  // namespace fdferry
